// The gateway's public port spoken as plain HTTP/2 (nghttp2), so that a model
// call whose route is cached costs one light hop instead of a gRPC server
// call plus a gRPC client call (issue 15: a minimal relay on Debian's gRPC
// 1.51 costs ×1.2-1.4 of a direct call at c=1, a byte relay ×1.02-1.08;
// bench/bench_relay_floor.py).
//
// What it does with each stream a caller opens:
// - A forwarded TF Serving call (protocol.h: Predict, Classify, ...) is read
//   whole (up to --max-request-bytes; a larger one is streamed on as below).
//   If its uncompressed request names a model whose routing decision the
//   gRPC side has cached (Plane::Lookup: same key, generation and expiry
//   rules as ModelCall::Route) and that version's replicas do not coalesce,
//   it goes straight to a replica picked as ModelCall picks (traffic split,
//   least outstanding of two), with the caller's metadata minus its token and
//   the hop headers, its grpc-timeout, and the routed-version header unless
//   the replica resolves the spec alike. The reply is read whole; UNAVAILABLE
//   (or a broken connection) and a reply from another version than routed
//   drop the cached decision and send the call the slow way, once.
// - Everything else (a cache miss, a batching replica's calls, platform APIs,
//   streams of any shape) is relayed frame by frame, with flow control, to
//   the gRPC server of this same process on a private Unix socket
//   (Options::internal), which does what it always did: the control plane,
//   coalescing, relays, limits, decisions to cache.
// Cancellation (RST_STREAM) and deadlines travel both ways; a caller's
// x-cloudml-* headers never reach a replica (the gRPC side drops them too).
//
// It runs on its own thread; the state it shares with the gRPC thread
// (decisions, figures) is behind Plane::mu.
#pragma once

#include <chrono>
#include <memory>
#include <string>

namespace cloudml::dataplane {

struct Plane;

// Binds a non-blocking listening socket for `address`: "unix:PATH" (a stale
// socket file there is replaced, as gRPC does) or HOST:PORT. -1 if it
// cannot; *port: the bound port (1 for a Unix socket, as gRPC reports it).
// The REST port (rest.h) binds its own with it too.
int Bind(const std::string& address, int* port);

// A listening socket steps out of its epoll set for 100 ms when the process
// runs out of descriptors (accept4: EMFILE/ENFILE): the connection it could
// not take stays queued, and its level-triggered event would otherwise spin
// the loop at 100 % of a core for as long as a hostile caller holds them.
struct ListenerPause {
  bool paused = false;
  std::chrono::steady_clock::time_point until{};
};
// After accept4 failed: pauses `fd` if the failure was exhaustion.
void PauseOnExhaustion(int epoll, int fd, ListenerPause* pause);
// Once per loop turn: takes `fd` (epoll data `tag`) back once its pause is over.
void ResumeListener(int epoll, int fd, void* tag, ListenerPause* pause);

class H2Front {
 public:
  // Relays what it does not serve itself to the gRPC server on
  // plane.options.internal ("unix:PATH", set before Listen).
  explicit H2Front(Plane& plane);
  ~H2Front();
  // Binds HOST:PORT or unix:PATH; the bound port (1 for a Unix socket), or 0 if it cannot.
  int Listen(const std::string& address);
  // Binds the REST port (rest.h) on HOST:PORT, relaying to `upstream` (the
  // Python gateway's REST server, "unix:PATH"); the bound port, or 0.
  int ListenRest(const std::string& address, const std::string& upstream);
  // Serves until Stop() (from any thread); then stops taking connections and
  // returns once its streams have ended, or after `grace` seconds.
  void Run(double grace);
  void Stop();

  struct Impl;

 private:
  bool Setup();  // the epoll loop, once
  std::unique_ptr<Impl> impl_;
};

}  // namespace cloudml::dataplane
