// Any other call on the public port (platform APIs, health, reflection,
// ModelService), relayed byte for byte, unary or streaming: two pumps,
// caller -> upstream and back, with metadata, status, trailers, deadline and
// cancellation. Upstream is the owning service's instance when the control
// plane vouched for the caller's token (or the method is public), else the
// control plane. Part of an accepted Call (call.h).
#pragma once

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

namespace cloudml::dataplane {

class Call;

class RelayCall {
 public:
  explicit RelayCall(Call& call) : call_(call) {}

  // Starts the upstream call.
  void Start();
  // One of its operations completed (Call's ops).
  void Done(int op, bool ok);
  // The caller went away: the upstream call is cancelled.
  void Cancelled() {
    if (client_) client_->TryCancel();
  }

 private:
  void Vouched();
  void UpFinish();

  Call& call_;
  std::unique_ptr<grpc::ClientContext> client_;
  grpc::Status status_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> relay_;
  grpc::ByteBuffer in_, out_;
  bool up_finished_ = false, direct_ = false;
  std::string auth_;
};

}  // namespace cloudml::dataplane
