// TF Serving's REST port, owned by the data plane (issue 14: REST went
// through the Python gateway, aiohttp and JSON in Python, then a second hop;
// at c=1 it was ×1.5-1.8 slower than a peer's in-process Python server).
//
// HTTP/1.1 on the gateway's public REST port, on the HTTP/2 front's thread
// and epoll loop (h2front.h). For each request on a connection, in order:
// - A model call (`POST /v1/models/NAME[/versions/N|/labels/L]:predict`,
//   `:classify` or `:regress`, with a Content-Length body, no
//   Content-Encoding) whose route the Python gateway has handed this process
//   (a RestDecision: the route as for gRPC, and the input dtypes of the
//   versions' signatures, which a predict call's tensors need; cached per
//   authorization and path, same generation, expiry and limits as
//   Plane::Lookup) is read whole (at most the model's request limit, within
//   5 s), converted to its request proto here (rest_json.h), sent straight to
//   a replica over HTTP/2 as the gRPC fast path sends it, and its reply
//   converted back to TF Serving's JSON here. A replica's error status is
//   answered as the Python gateway answers it ({"error": ...} with TF
//   Serving's HTTP status). A batching replica's calls go, converted, to this
//   process's own gRPC side instead (the caller's token with them), which
//   coalesces them with the replica's other calls (main.cc, group.h).
// - Everything else, and any call the codec declines (an error to report,
//   a dtype it does not handle...), an UNAVAILABLE replica, a stale version,
//   goes to the Python gateway as it came, on a connection of this caller's
//   own, and its answer comes back as it was written (the Python gateway's
//   REST server listens on a Unix socket only this process reaches). The
//   request carries the data plane's secret; the answer to a relayed predict
//   call carries the RestDecision for the path, which is cached here and
//   never passed on. A caller's own `x-cloudml-*` headers are dropped.
// - HTTP/1.1 and HTTP/1.0 (keep-alive only when asked, as ab -k does).
// - A request the relay cannot frame (chunked request bodies, Upgrade:
//   websockets for notebooks and TensorBoard) turns the connection into a
//   byte tunnel to the Python gateway for the rest of its life.
// Limits against hostile callers: request heads at most 64 KiB and 10 s,
// idle connections closed after 75 s (aiohttp's keep-alive), predict bodies
// read here within 5 s (the Python gateway's rule: 408 and close).
#pragma once

#include <memory>
#include <random>
#include <string>

namespace cloudml::dataplane {

struct Plane;
struct Exchange;

// What the REST front asks of the loop it runs in (H2Front::Impl).
class RestHost {
 public:
  virtual ~RestHost() = default;
  virtual int Epoll() = 0;
  // Sends `x` (a framed PredictRequest in x->body) to the replica at
  // `address`; RestFront::Replied, ::Slow or ::Failed follows.
  virtual void Fast(Exchange* x, const std::string& address) = 0;
  // The caller went away: resets `x`'s stream (x->rest is already cleared).
  virtual void Cancel(Exchange* x) = 0;
  virtual int Outstanding(const std::string& address) = 0;
  // This process's gRPC server ("unix:PATH"; "" without the HTTP/2 front),
  // where a batching replica's calls are coalesced.
  virtual const std::string& GrpcSide() = 0;
  virtual std::mt19937_64& Rng() = 0;
};

class RestFront {
 public:
  // `upstream`: the Python gateway's REST server ("unix:PATH").
  RestFront(Plane& plane, RestHost& host, std::string upstream);
  ~RestFront();
  // Binds HOST:PORT; the bound port, or 0.
  int Listen(const std::string& address);
  // True if `p` (an epoll event's data.ptr) is one of this front's; then handles it.
  bool Event(void* p, uint32_t events);
  // Timeouts; called once per loop turn.
  void Tick();
  // Draining: stops accepting; true once no request is in progress.
  bool Drained();
  void CloseAll();

  // From the host, for a call sent with RestHost::Fast (x->rest set):
  // the replica answered gRPC status `code`; the reply is in x.
  void Replied(Exchange* x, int code);
  // Send the call to the Python gateway instead (the replica was
  // unavailable, or answered for another version, or could not be reached).
  void Slow(Exchange* x);
  // The call failed here with this gRPC status (deadline, no stream).
  void Failed(Exchange* x, int code, const std::string& message);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace cloudml::dataplane
