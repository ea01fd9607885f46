// One call through the HTTP/2 front (h2front.h): a caller's stream and the
// upstream stream it became, or a REST predict call (rest.h) on its way to a
// replica. Shared by the two fronts, which run on the same thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "spin.h"

namespace cloudml::dataplane {

struct Conn;        // an HTTP/2 connection (h2front.cc)
struct RestCall;    // a REST request waiting for its replica (rest.cc)
struct FrameGroup;  // Predict calls coalesced for a replica's framed socket (h2front.cc)

struct Nv {
  std::string name, value;
};

// One caller's stream and what it became upstream.
struct Exchange {
  Conn* down = nullptr;
  RestCall* rest = nullptr;  // a REST call: answered by RestFront, not on `down`
  int32_t down_id = 0;
  Conn* up = nullptr;  // nullptr: no upstream stream open
  int32_t up_id = -1;
  std::vector<Nv> request_headers;
  std::string path;
  std::string body;      // the request: whole (a model call) or what is not yet sent on (relayed)
  size_t body_sent = 0;  // of `body`, copied upstream
  size_t down_unconsumed = 0, up_unconsumed = 0;  // received, not yet given back to flow control
  size_t charged = 0;  // of Conn::whole_bytes (the caller's connection), for this call
  bool request_ended = false;
  bool whole = false;  // a model call read whole before it is routed
  bool fast = false;   // at a replica; its reply is read whole
  bool retried = false;
  bool relayed_started = false;  // the upstream stream to the gRPC side is open (or was)
  std::string api, key, model, address;
  std::string frame;      // the picked replica's framed socket (frame.h), "" if none
  uint64_t frame_id = 0;  // sent there: its id on that connection
  // A Predict call to a batching replica (its route's coalesce_max > 1): how
  // it may be coalesced there (frame.h), and the group it waits in or went
  // with; `batching`: sent alone, counted in the replica's calls in flight.
  uint32_t coalesce_max = 0, batch_timeout_us = 0;
  uint64_t limit = 0;  // a group's request bytes at most
  FrameGroup* group = nullptr;
  bool batching = false;
  int64_t version = 0;
  bool bare = false;
  // A REST call to a batching replica: sent to this process's own gRPC side
  // (Options::internal), which coalesces it with other calls to that
  // replica; the caller's token goes with it there (never to a replica).
  bool to_grpc_side = false;
  Clock::time_point started;
  Clock::time_point deadline = Clock::time_point::max();  // from the caller's grpc-timeout
  size_t header_bytes = 0;  // the caller's headers so far (kMaxHeaderBytes)
  // The reply.
  std::vector<Nv> response_headers, trailers;
  std::string response;
  size_t response_sent = 0;
  bool response_submitted = false, response_ended = false, trailers_only = false, in_trailers = false;
};

}  // namespace cloudml::dataplane
