// The framed replica protocol: how the data plane's HTTP/2 front (h2front.h)
// sends a model call it has routed to a replica without a gRPC hop (issue 14:
// a replica's Python gRPC server costs ~0.6 ms of CPU per call, ~80 % of a
// direct call; the same work behind a length-prefixed Unix socket ~0.13 ms,
// bench/bench_replica_floor.py).
//
// A replica that serves it listens on a Unix socket beside its gRPC one
// (`<dir>/<replica id>.frame.sock`: the same directory, so only the platform
// can reach it), writes `frame_address` ("unix:PATH") to its port file, and
// the models service publishes it (ReplicaEndpoint.frame_address, checked to
// be that path) for gateways (VersionChoice.frame_addresses). Batching
// replicas keep gRPC (PredictBatch) for coalesced calls.
//
// Wire format, every integer little-endian. A connection carries frames
// both ways, calls interleaved (any number in flight):
//
//   frame := u32 length   (the bytes that follow: kind, id and payload)
//            u8  kind
//            u64 id       (chosen by the data plane; unique on its
//                          connection while the call is in flight)
//            payload
//
//   kind 1, CALL (data plane -> replica):
//            u8  method           (Method below)
//            i64 resolved_version (the version the gateway routed the call
//                                  to, as x-cloudml-resolved-version; 0: none,
//                                  the replica resolves the model_spec itself)
//            u64 timeout_us       (the caller's time left; 0: no deadline)
//            the serialized request message (PredictRequest, ...)
//   kind 2, CANCEL (data plane -> replica): no payload. The caller went
//            away: the replica stops the call if it still runs. It may still
//            answer; a REPLY for an id the data plane no longer holds is
//            ignored.
//   kind 3, REPLY (replica -> data plane):
//            u32 code             (a gRPC status code, 0..16)
//            u32 message_length   (at most kMaxMessage)
//            message              (UTF-8, the status message; as gRPC's
//                                  grpc-message before percent-encoding)
//            the serialized response message (code 0 only)
//
// Each side treats the other as untrusted: a frame longer than its limit (the
// replica: kind, id, call header, its max_request_bytes and kBatchSlack; the
// data plane: kMaxReply), an unknown kind or method, a payload shorter than its fixed
// part, a code above 16 or a message over kMaxMessage closes the connection.
// The data plane then answers the calls it held there UNAVAILABLE, which
// sends each once more the slow way (through its gRPC side, as a broken
// HTTP/2 stream does). The replica enforces each call's deadline itself
// (DEADLINE_EXCEEDED, "Deadline Exceeded") and runs calls as its gRPC
// handlers do: same checks, same errors, same metrics.
//
// Batching replicas: the data plane's HTTP/2 front coalesces Predict calls
// to a replica with coalesce_max > 1 as the gRPC side does (group.h: a call
// that finds another in flight waits at most the batch timeout for company;
// any number of groups in flight), and sends each group as one kPredictBatch
// CALL: each member with its own request, time left and metadata; resolved
// version in the PredictBatchRequest; the CALL's timeout the latest
// member's. The REPLY's PredictBatchResponse has a result per member.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "protocol.h"

namespace cloudml::dataplane::frame {

enum Kind : uint8_t { kCall = 1, kCancel = 2, kReply = 3 };
// The forwarded methods (protocol.h kForwardedMethods), in this order.
// kPredictBatch: a coalesced group (replica.proto PredictBatchRequest ->
// PredictBatchResponse), as ReplicaService.PredictBatch over gRPC.
enum Method : uint8_t {
  kPredict = 0, kClassify = 1, kRegress = 2, kMultiInference = 3, kGetModelMetadata = 4, kPredictBatch = 5 };

constexpr size_t kPrefix = 4 + 1 + 8;             // length, kind, id
constexpr size_t kCallHeader = 1 + 8 + 8;         // method, resolved_version, timeout_us
constexpr size_t kReplyHeader = 4 + 4;            // code, message_length
constexpr size_t kMaxMessage = 64 << 10;          // a status message
constexpr size_t kMaxReply = (64 << 20) + 4096;   // a replica's largest answer (its gRPC send limit) and slack
// What a replica takes beyond its max_request_bytes: a PredictBatch group's
// framing and its members' metadata (the data plane counts them against
// max_request_bytes, but a group always takes its first member).
constexpr size_t kBatchSlack = 128 << 10;

// The method index of a forwarded method's name ("Predict", ...); -1 if none.
int MethodOf(const std::string& api);

// Appends one CALL frame to `out`.
void AppendCall(std::string* out, uint64_t id, Method method, int64_t resolved_version, uint64_t timeout_us,
                const char* request, size_t request_size);
// Appends one CANCEL frame to `out`.
void AppendCancel(std::string* out, uint64_t id);

struct Reply {
  uint64_t id = 0;
  uint32_t code = 0;
  std::string message, response;
};

// Reads one REPLY frame from the front of `in[0, size)`: 1 and *used (the
// frame's bytes) when one is whole, 0 when more bytes are needed, -1 when
// the bytes are not a valid REPLY (the connection must close).
int ParseReply(const char* in, size_t size, Reply* out, size_t* used);

}  // namespace cloudml::dataplane::frame
