// A TF Serving call that reaches replicas (PredictionService's forwarded
// methods, protocol.h): read whole, routed from a cached decision straight to
// a replica (the fast path) or through the control plane (the slow path),
// alone or, for Predict, coalesced into its replica's PredictBatch group.
// Part of an accepted Call (call.h), which owns its context, stream and
// lifetime.
#pragma once

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cloudml/internal/v1/replica.pb.h"
#include "handler.h"

namespace cloudml::dataplane {

class Call;
class Group;

class ModelCall {
 public:
  ModelCall(Call& call, std::string api) : call_(call), api_(std::move(api)) {}

  // Reads the request.
  void Start();
  // One of its operations completed (Call's ops).
  void Done(int op, bool ok);
  // The caller went away: the upstream call is cancelled, a waiting call leaves its group.
  void Cancelled();

  // For coalescing: this waiting Predict call's request, deadline, version and limits.
  const std::string& request_bytes() const { return request_bytes_; }
  std::chrono::system_clock::time_point deadline() const;
  int64_t version() const { return version_; }
  uint32_t coalesce_max() const { return coalesce_max_; }
  uint64_t max_request_bytes() const { return max_request_bytes_; }
  uint32_t batch_timeout_us() const { return batch_timeout_us_; }
  // The group it waits in (nullptr once the group is sent).
  void set_group(Group* group) { group_ = group; }

  // Its caller's metadata as a PredictBatch member's, filtered as
  // NewClient does for a replica.
  void MemberMetadata(cloudml::internal::v1::PredictMember* member) const;

  // Its result: from the PredictBatch group it went in, with the trailers
  // the replica set for it, or from the group it never went out in.
  void BatchDone(const grpc::Status& status, const std::string& response,
                 const google::protobuf::RepeatedPtrField<cloudml::internal::v1::MetadataEntry>* trailers);

 private:
  bool TooLarge(uint64_t limit);
  void Route();
  std::string Pick(const std::string& exclude);
  void Fast(const std::string& address);
  void Slow();
  void BackendDone();
  void Remember();

  Call& call_;
  std::unique_ptr<grpc::ClientContext> client_;
  grpc::Status status_;
  std::string api_, key_, model_, address_;
  std::vector<std::string> addresses_;
  int64_t version_ = 0;
  uint32_t coalesce_max_ = 0;
  uint32_t batch_timeout_us_ = 0;   // how long it may wait for company
  uint64_t max_request_bytes_ = 0;  // this call's limit; also its PredictBatch group's
  Group* group_ = nullptr;          // the group it waits in, not sent yet
  std::string request_bytes_;
  bool fast_ = false, retried_ = false, batched_ = false;
  bool out_ = false;  // at a replica since sent_ (Plane::spin)
  Clock::time_point sent_;
  bool bare_ = false;  // sent without the routed-version header (see Route)
  grpc::ByteBuffer request_, response_;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> unary_;
};

}  // namespace cloudml::dataplane
