// The floor for the data plane's CPU per relayed call (bench/bench_relay_floor.py):
// the least an async gRPC relay on the same library does. A generic service and
// one completion queue; each call is read whole, sent upstream with its
// deadline, and its reply (or status) sent back. No metadata, limits or
// routing. --echo 1 answers the request itself (one server call alone).
#include <grpcpp/grpcpp.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <absl/synchronization/mutex.h>
#include <cstdio>
#include <cstring>
#include <string>
#include <memory>
using namespace grpc;
struct Relay;
static GenericStub* g_stub; static AsyncGenericService g_service; static std::unique_ptr<ServerCompletionQueue> g_cq;
static bool g_echo = false;
struct Relay {
  GenericServerContext ctx; GenericServerAsyncReaderWriter stream{&ctx};
  ByteBuffer req, resp; ClientContext cctx; Status status;
  std::unique_ptr<GenericClientAsyncResponseReader> call;
  int state = 0;
  Relay() { g_service.RequestCall(&ctx, &stream, g_cq.get(), g_cq.get(), this); }
  void Next(bool ok) {
    switch (state) {
      case 0: new Relay(); if (!ok) { delete this; return; } state = 1; stream.Read(&req, this); return;
      case 1:
        if (g_echo) { resp = req; state = 3; stream.WriteAndFinish(resp, WriteOptions(), Status::OK, this); return; }
        cctx.set_deadline(ctx.deadline());
        call = g_stub->PrepareUnaryCall(&cctx, ctx.method(), req, g_cq.get());
        call->StartCall(); state = 2; call->Finish(&resp, &status, this); return;
      case 2: state = 3;
        if (status.ok()) stream.WriteAndFinish(resp, WriteOptions(), status, this); else stream.Finish(status, this);
        return;
      default: delete this;
    }
  }
};
int main(int argc, char** argv) {
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  std::string listen, up;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--listen")) listen = argv[i+1];
    if (!strcmp(argv[i], "--front-for")) up = argv[i+1];
    if (!strcmp(argv[i], "--echo")) g_echo = true;
  }
  ChannelArguments args; args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  args.SetInt(GRPC_ARG_MINIMAL_STACK, 1);  // as the data plane
  auto ch = CreateCustomChannel(up, InsecureChannelCredentials(), args);
  GenericStub stub(ch); g_stub = &stub;
  ServerBuilder b; int port = 0;
  b.AddListeningPort(listen, InsecureServerCredentials(), &port);
  b.RegisterAsyncGenericService(&g_service);
  g_cq = b.AddCompletionQueue();
  auto server = b.BuildAndStart();
  printf("%d\n", port); fflush(stdout);
  for (int i = 0; i < 8; i++) new Relay();
  void* tag; bool ok;
  while (g_cq->Next(&tag, &ok)) static_cast<Relay*>(tag)->Next(ok);
}
