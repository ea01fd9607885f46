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
//   call, so a forwarded call never changes threads. After any event the
//   loop polls without blocking for --spin-us microseconds (default 1000)
//   before it sleeps: under traffic, the replica's reply and the caller's
//   next call are picked up without a wake-up (each wake-up costs tens of µs
//   on a VM, more when the CPU has gone idle). The window covers a Predict's
//   round trip to a replica (~0.5 ms for a small model on the 2-CPU box:
//   bench/bench_serving.py at concurrency 1 measured the gateway adding
//   ×1.39 p50 over a direct call with no spinning, ×1.23 with 300 µs and
//   ×1.05 with 1000 µs). The price is CPU: one core while calls keep coming,
//   about 1 ms per call at low rates, nothing when idle; 0 turns it off.
//   It spins only while at most kSpinMaxInFlight model calls are in flight:
//   under load, events come anyway, and spinning through the gaps would take
//   a core from the replicas and callers sharing the machine (measured:
//   half_plus_two at concurrency 32 through the gateway fell from ~3,800 to
//   ~2,450 rps when it spun regardless). Each empty poll yields the core
//   (sched_yield), so the caller's and the replica's threads that share it
//   run at once: with 2 CPUs at concurrency 1, half_plus_two's p99 through
//   the gateway fell from ~2.0 to ~1.3 ms and its throughput rose ~6 %.
//
// Usage (the Python gateway starts it; it dies with its parent):
//   cloudml-dataplane --listen HOST:PORT --upstream HOST:PORT [--spin-us N]
//                             [--max-request-bytes N]
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
// Files: main.cc (flags, the loop), plane.h (state: options, channels,
// cached decisions, figures), call.h (an accepted call and its role:
// model_call.h, relay_call.h), group.h (coalescing into PredictBatch),
// attach.h (the control stream), wire.h (model_spec off the wire),
// metadata.h (what crosses a hop), picking.h (version and replica picking),
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
#include "handler.h"
#include "plane.h"
#include "protocol.h"

namespace cloudml::dataplane {
namespace {

// Spin only while at most this many model calls are in flight (see the top).
constexpr int kSpinMaxInFlight = 2;

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
    else return false;
  }
  const char* secret = getenv(kSecretEnv);
  if (secret) o->secret = secret;
  if (argc % 2 != 1) return false;
  if (o->front()) return o->upstream.empty();
  return !o->upstream.empty() && !o->secret.empty();
}

// Starts the server on the listening address; false if it cannot listen.
bool Listen(Plane& plane) {
  // In front mode the replica is the "upstream" that every non-model call is relayed to.
  const std::string& upstream = plane.options.front() ? plane.options.front_for : plane.options.upstream;
  plane.upstream_channel = grpc::CreateCustomChannel(upstream, grpc::InsecureChannelCredentials(),
                                                     plane.ChannelArgs());
  plane.upstream = std::make_unique<grpc::GenericStub>(plane.upstream_channel);

  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(plane.options.listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterAsyncGenericService(&plane.service);
  // Platform calls keep their 64 MiB; model calls are held to
  // --max-request-bytes (and their model's limit) in ModelCall::Route.
  builder.SetMaxReceiveMessageSize(static_cast<int>(std::min<uint64_t>(
      std::max<uint64_t>(kMaxMessage, plane.options.max_request_bytes), INT32_MAX)));
  builder.SetMaxSendMessageSize(kMaxMessage);
  plane.cq = builder.AddCompletionQueue();
  plane.server = builder.BuildAndStart();
  if (!plane.server || port == 0) return false;
  printf("%d\n", port);
  fflush(stdout);
  return true;
}

// The loop: spin briefly after each event, then block (waking every 100 ms
// to notice a signal). On SIGTERM/SIGINT in-flight calls drain (5 s at most).
void Run(Plane& plane, Attachment& attachment) {
  const auto spin = std::chrono::microseconds(plane.options.spin_us);
  auto last_event = Clock::now();
  std::thread stopper;
  void* tag;
  bool ok;
  for (;;) {
    if (g_signalled && !plane.stopping) {
      plane.stopping = true;
      if (!plane.options.front()) attachment.Stop();
      // Drain: in-flight calls finish within the grace period while this
      // thread keeps driving the queue.
      stopper = std::thread([&plane] {
        plane.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
        plane.cq->Shutdown();
      });
    }
    bool spinning = Clock::now() - last_event < spin && plane.model_calls_in_flight <= kSpinMaxInFlight;
    gpr_timespec deadline = spinning ? gpr_time_0(GPR_CLOCK_MONOTONIC)
                                     : gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(100, GPR_TIMESPAN));
    auto status = plane.cq->AsyncNext(&tag, &ok, deadline);
    if (status == grpc::CompletionQueue::SHUTDOWN) break;
    // A poll that found nothing gives the core to any other runnable thread.
    if (spinning && status == grpc::CompletionQueue::TIMEOUT) sched_yield();
    if (status == grpc::CompletionQueue::GOT_EVENT) {
      auto* t = static_cast<Tag*>(tag);
      t->handler->Done(t->op, ok);
      last_event = Clock::now();
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
            "usage: %s --listen HOST:PORT --upstream HOST:PORT [--spin-us N]\n"
            "  (and the control plane's secret in %s)\n"
            "   or: %s --listen HOST:PORT --front-for HOST:PORT --coalesce-max N [--batch-timeout-us N]\n"
            "       [--spin-us N] [--max-request-bytes N]\n",
            argv[0], kSecretEnv, argv[0]);
    return 2;
  }
  signal(SIGTERM, OnSignal);
  signal(SIGINT, OnSignal);
  if (!Listen(plane)) {
    fprintf(stderr, "dataplane: cannot listen on %s\n", plane.options.listen.c_str());
    return 1;
  }
  for (int i = 0; i < 32; i++) new Call(plane);
  Attachment attachment(plane);
  if (!plane.options.front()) attachment.Connect();
  Run(plane, attachment);
  return 0;
}
