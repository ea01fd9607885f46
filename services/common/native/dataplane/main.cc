// The native data plane: owns the gateway's public gRPC port, or sits in
// front of one model-server replica (replica front mode, below).
//
// Why it exists: one Python gRPC hop costs ~0.4 ms on a small machine (grpc
// core plus the event loop), more than the TF Serving Predict it forwards.
// This process keeps the Predict hot path out of Python, while every decision
// stays in the Python gateway (the control plane): authentication, tenancy,
// version/label/traffic-split resolution and the routing registries.
//
// How:
// - The public port is spoken as plain HTTP/2 by h2front.h (nghttp2, its
//   own thread): a model call whose route is cached goes from there straight
//   to a replica, parsed no further than its model_spec; everything else is
//   relayed frame by frame to this process's gRPC server on a private Unix
//   socket, which does all that follows (--h2-front off: the gRPC server
//   owns the public port, as before). The reason: a relayed call cost the
//   gRPC library's server and client call, ~×1.2-1.4 of a direct call at
//   c=1 on this 2-CPU box; HTTP/2 alone costs about what copying bytes does.
//   A non-batching replica's front does the same for its one replica.
// - TF Serving's forwarded calls (PredictionService Predict, Classify,
//   Regress, MultiInference, GetModelMetadata) are read whole. The request's
//   model_spec (field 1; for MultiInference, field 1 of its first task) and
//   the `authorization` metadata form a cache key. On a hit, the call goes
//   straight to a replica; on a miss (or anything unusual) it goes to the
//   control plane, which routes it itself and returns its RouteDecision in
//   trailing metadata (`x-cloudml-route-bin`), cached here for the next call.
// - Decisions are valid only for the control plane's current generation,
//   which it streams on the Attach call and bumps whenever routes, replica
//   endpoints, token keys or revocations change; a new generation empties the
//   cache. Without a live Attach stream nothing is cached: every call takes
//   the control plane's path. A decision never outlives the caller's token.
//   Channels to replicas (Plane::backends) that are idle and were not used in
//   this generation or the one before are dropped on each new generation, so
//   replica churn never grows this process.
// - Coalescing: for a replica with server-side batching (its coalesce_max
//   and batch timeout in the decision), a Predict call that finds another
//   call in flight to that replica waits here in the replica's open group;
//   the group goes as one ReplicaService.PredictBatch call at the first of:
//   its batch timeout after its first member came (an alarm), coalesce_max
//   members (a group that fills every batch thread of the replica), its
//   max_request_bytes, or the return of any call to the replica. A lone call
//   is never delayed; a call that waits, waits at most the batch timeout (the
//   replica would hold it that long for company anyway), never for another
//   call to finish: any number of groups may be in flight to one replica (see
//   Group). Under load the replica pays its per-call gRPC cost once per group
//   and runs the group's batches without waiting out its batch timeout again.
//   Each member keeps its own status, response, retry, metrics, deadline,
//   metadata and trailers (see replica.proto): a caller that cancels, or whose
//   deadline passes, while it waits leaves its group at once and is never
//   sent; a member whose deadline passed when its group goes is answered
//   DEADLINE_EXCEEDED here; the others carry their own time left, and the
//   group's call the latest member's deadline.
// - Fast path: the version is picked by the decision's traffic-split
//   weights, the replica by least outstanding requests of two random choices;
//   UNAVAILABLE from the replica is retried once, on another replica of the
//   version if the decision has one, else through the control plane (whose
//   view may be newer); the entry is dropped. The client's deadline travels.
// - Platform APIs (unary or streaming) are relayed byte for byte, with
//   metadata, status, trailers, deadline and cancellation. Authentication
//   works as for model calls: a call whose `authorization` the control plane
//   has not vouched for in this generation goes through it (it checks the
//   token, forwards the call, and returns an AuthDecision in trailing
//   metadata `x-cloudml-auth-bin`); later calls with that authorization, and
//   calls to public methods, go straight to an instance of their owning
//   service (round robin) from the instance table the control plane streams.
//   Every other method (health, reflection, ModelService) is relayed to the
//   control plane the same way.
// - One thread drives one completion queue for the server and every client
//   call, so a forwarded call never changes threads. It sleeps in the queue
//   between events by default. With --spin-us N it polls without blocking
//   (yielding the core on each empty poll) only while a replica's reply is
//   due, for at most N µs after the latest send (spin.h). Measured on the
//   2-CPU box, loaded by others (bench/bench_serving.py's pacing table and a
//   minimal C++ relay on the same gRPC): a relayed call costs this process
//   ~0.25-0.45 ms of CPU without polling, 5-10 % over the bare library's
//   floor; polling saves one wake-up per call at ~the replica's round trip
//   in CPU, and did not pay for that there, so it is off by default. The
//   former policy, polling 1 ms after every event, cost ~1 ms of CPU per
//   call at any pacing with pauses.
//
// Usage (the Python gateway starts it; it dies with its parent):
//   cloudml-dataplane --listen HOST:PORT --upstream HOST:PORT [--spin-us N]
//                             [--max-request-bytes N] [--h2-front on|off]
//                             [--rest-listen HOST:PORT --rest-upstream unix:PATH]
//   with the secret in $CLOUDML_DATAPLANE_SECRET. Prints the bound port.
//
// Request size: a model call larger than --max-request-bytes (the gateway's
// platform-wide cap), or than its version's max_request_bytes in the routing
// decision (what its replicas published), is RESOURCE_EXHAUSTED here, before
// any replica sees it; a PredictBatch group holds at most that many bytes of
// requests. Larger calls go through the control plane only when no decision
// is cached, and it applies the same limits.
//
// Replica front mode: a model-server replica with batching on starts it in
// front of itself, so that callers who reach the replica directly (not
// through a gateway) get the same coalescing:
//   cloudml-dataplane --listen HOST:PORT --front-for HOST:PORT
//                             --coalesce-max N [--batch-timeout-us N] [--spin-us N]
//                             [--max-request-bytes N]
// (--batch-timeout-us: the replica's batch_timeout_micros; default 0, when
// only calls that arrive together are grouped.)
// Every call goes to the one replica: Predict calls coalesce exactly as
// above, every other call is relayed. No control plane, no cache, no retry,
// no tokens; x-cloudml-* headers from callers are dropped, so the replica
// checks every model_spec itself.
//
// Framed replicas (--frames on, the default): the HTTP/2 front sends a call
// it routed to a replica that publishes a framed socket over the framed
// protocol (frame.h) rather than gRPC; --frames off keeps gRPC for every
// call. A non-batching replica's front gets the replica's framed socket as
// --front-frame unix:PATH.
//
// REST (--rest-listen): the gateway's public REST port, served on the HTTP/2
// front's thread (rest.h); --rest-upstream is the Python gateway's REST
// server, which answers everything the data plane does not.
//
// Files: main.cc (flags, the loop), h2front.h (the public port's HTTP/2),
// rest.h (the REST port), rest_json.h (TF Serving's JSON), exchange.h (a call through either),
// frame.h (the framed replica protocol), plane.h (state: options, channels,
// cached decisions, figures), call.h (an accepted call and its role:
// model_call.h, relay_call.h), group.h (coalescing into PredictBatch),
// attach.h (the control stream), wire.h (model_spec off the wire),
// metadata.h (what crosses a hop), picking.h (version and replica picking),
// spin.h (when the loop polls),
// protocol.h (names shared with Python; generated from
// services/common/native/protocol.py). Built by scripts/build_native.sh.

#include <absl/synchronization/mutex.h>
#include <grpcpp/grpcpp.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "attach.h"
#include "call.h"
#include "h2front.h"
#include "handler.h"
#include "plane.h"
#include "protocol.h"

namespace cloudml::dataplane {
namespace {

std::atomic<bool> g_signalled{false};

void OnSignal(int) { g_signalled = true; }

bool ParseArgs(int argc, char** argv, Options* o) {
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--listen") o->listen = value;
    else if (flag == "--upstream") o->upstream = value;
    else if (flag == "--spin-us") o->spin_us = atoi(value.c_str());
    else if (flag == "--front-for") o->front_for = value;
    else if (flag == "--coalesce-max") o->coalesce_max = static_cast<uint32_t>(atoi(value.c_str()));
    else if (flag == "--max-request-bytes") o->max_request_bytes = strtoull(value.c_str(), nullptr, 10);
    else if (flag == "--batch-timeout-us") o->batch_timeout_us = static_cast<uint32_t>(atoi(value.c_str()));
    else if (flag == "--h2-front" && (value == "on" || value == "off")) o->h2 = value == "on";
    else if (flag == "--rest-listen") o->rest_listen = value;
    else if (flag == "--rest-upstream") o->rest_upstream = value;
    else if (flag == "--frames" && (value == "on" || value == "off")) o->frames = value == "on";
    else if (flag == "--front-frame") o->front_frame = value;
    else return false;
  }
  const char* secret = getenv(kSecretEnv);
  if (secret) o->secret = secret;
  if (argc % 2 != 1) return false;
  if (o->rest_listen.empty() != o->rest_upstream.empty() ||
      (!o->rest_upstream.empty() && o->rest_upstream.compare(0, 5, "unix:") != 0))
    return false;
  if (o->front()) {
    // A batching replica's front coalesces Predict calls: over the replica's
    // framed socket on the HTTP/2 front, else on gRPC's side.
    if (o->coalesce_max > 1 && (o->front_frame.empty() || !o->frames)) o->h2 = false;
    return o->upstream.empty() && o->rest_listen.empty();
  }
  return !o->upstream.empty() && !o->secret.empty();
}

// Starts the server on the listening address (or, behind the HTTP/2 front,
// on a private Unix socket); false if it cannot listen.
bool Listen(Plane& plane, H2Front* h2) {
  // In front mode the replica is the "upstream" that every non-model call is relayed to.
  const std::string& upstream = plane.options.front() ? plane.options.front_for : plane.options.upstream;
  plane.upstream_channel = grpc::CreateCustomChannel(upstream, grpc::InsecureChannelCredentials(),
                                                     plane.ChannelArgs());
  plane.upstream = std::make_unique<grpc::GenericStub>(plane.upstream_channel);

  grpc::ServerBuilder builder;
  int port = 0;
  std::string listen = plane.options.listen;
  if (h2 && plane.options.h2) {
    // Only this process may connect: a socket in a directory of its own
    // (0700) in $TMPDIR, or beside a Unix socket it listens on (a replica's
    // front: its directory is the replica's own).
    if (listen.compare(0, 5, "unix:") == 0) {
      plane.options.internal = listen + ".grpc";
    } else {
      const char* tmp = getenv("TMPDIR");
      std::string dir = std::string(tmp && *tmp ? tmp : "/tmp") + "/cloudml-dataplane-XXXXXX";
      if (!mkdtemp(dir.data())) return false;
      plane.options.internal = "unix:" + dir + "/grpc.sock";
    }
    listen = plane.options.internal;
  }
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterAsyncGenericService(&plane.service);
  // Platform calls keep their 64 MiB; model calls are held to
  // --max-request-bytes (and their model's limit) in ModelCall::Route.
  builder.SetMaxReceiveMessageSize(static_cast<int>(std::min<uint64_t>(
      std::max<uint64_t>(kMaxMessage, plane.options.max_request_bytes), INT32_MAX)));
  builder.SetMaxSendMessageSize(kMaxMessage);
  builder.AddChannelArgument(GRPC_ARG_ENABLE_CHANNELZ, 0);  // as Plane::ChannelArgs
  plane.cq = builder.AddCompletionQueue();
  plane.server = builder.BuildAndStart();
  if (!plane.server || port == 0) return false;
  if (h2 && plane.options.h2 && !(port = h2->Listen(plane.options.listen))) return false;
  if (h2 && !plane.options.rest_listen.empty() &&
      !h2->ListenRest(plane.options.rest_listen, plane.options.rest_upstream))
    return false;
  printf("%d\n", port);
  fflush(stdout);
  return true;
}

// The loop: poll while Plane::spin says a reply is due, else block (waking
// every 100 ms to notice a signal). On SIGTERM/SIGINT in-flight calls drain (5 s at most).
void Run(Plane& plane, Attachment& attachment, H2Front* h2, std::thread* h2_thread) {
  std::thread stopper;
  void* tag;
  bool ok;
  for (;;) {
    if (g_signalled && !plane.stopping) {
      plane.stopping = true;
      if (!plane.options.front()) attachment.Stop();
      // Drain: in-flight calls finish within the grace period while this
      // thread keeps driving the queue.
      stopper = std::thread([&plane, h2, h2_thread] {
        if (h2) {  // its streams drain through the gRPC server first
          h2->Stop();
          h2_thread->join();
        }
        plane.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
        plane.cq->Shutdown();
      });
    }
    bool spinning = plane.spin.Spin(Clock::now(), plane.model_calls_in_flight);
    gpr_timespec deadline = spinning ? gpr_time_0(GPR_CLOCK_MONOTONIC)
                                     : gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(100, GPR_TIMESPAN));
    auto status = plane.cq->AsyncNext(&tag, &ok, deadline);
    if (status == grpc::CompletionQueue::SHUTDOWN) break;
    // A poll that found nothing gives the core to any other runnable thread.
    if (spinning && status == grpc::CompletionQueue::TIMEOUT) sched_yield();
    if (status == grpc::CompletionQueue::GOT_EVENT) {
      auto* t = static_cast<Tag*>(tag);
      t->handler->Done(t->op, ok);
    }
  }
  if (stopper.joinable()) stopper.join();
}

}  // namespace
}  // namespace cloudml::dataplane

int main(int argc, char** argv) {
  using namespace cloudml::dataplane;
  prctl(PR_SET_PDEATHSIG, SIGKILL);  // dies with the gateway that started it
  // Debian builds abseil without NDEBUG, which leaves absl::Mutex's deadlock
  // detection on: a graph update on every lock gRPC takes (~10% of this
  // process's CPU in a profile). gRPC's own tests run without it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  Plane plane;
  if (!ParseArgs(argc, argv, &plane.options)) {
    fprintf(stderr,
            "usage: %s --listen HOST:PORT --upstream HOST:PORT [--spin-us N] [--h2-front on|off]\n"
            "       [--rest-listen HOST:PORT --rest-upstream unix:PATH] [--frames on|off]\n"
            "  (and the control plane's secret in %s)\n"
            "   or: %s --listen HOST:PORT --front-for HOST:PORT --coalesce-max N [--batch-timeout-us N]\n"
            "       [--spin-us N] [--max-request-bytes N] [--h2-front on|off] [--front-frame unix:PATH]\n",
            argv[0], kSecretEnv, argv[0]);
    return 2;
  }
  plane.spin = SpinPolicy(plane.options.spin_us);
  signal(SIGTERM, OnSignal);
  signal(SIGINT, OnSignal);
  // A peer that went away (a killed replica) must cost a failed write, not
  // this process (h2front.cc sends with MSG_NOSIGNAL as well).
  signal(SIGPIPE, SIG_IGN);
  std::unique_ptr<H2Front> h2;
  // The HTTP/2 front's loop also runs the REST port (rest.h).
  if (plane.options.h2 || !plane.options.rest_listen.empty()) h2 = std::make_unique<H2Front>(plane);
  if (!Listen(plane, h2.get())) {
    fprintf(stderr, "dataplane: cannot listen on %s\n", plane.options.listen.c_str());
    return 1;
  }
  for (int i = 0; i < 32; i++) new Call(plane);
  Attachment attachment(plane);
  if (!plane.options.front()) attachment.Connect();
  std::thread h2_thread;
  if (h2) h2_thread = std::thread([&h2] { h2->Run(5.0); });
  Run(plane, attachment, h2.get(), &h2_thread);
  if (!plane.options.internal.empty()) {
    std::string path = plane.options.internal.substr(5);
    unlink(path.c_str());
    if (plane.options.listen.compare(0, 5, "unix:") != 0) rmdir(path.substr(0, path.rfind('/')).c_str());
  }
  return 0;
}
