// Coalescing: Predict calls to one replica that wait together, then go as
// one ReplicaService.PredictBatch call. A group opens when a call finds
// another call in flight to the replica (Backend::open), and is sent at the
// first of: its batch timeout after it opened (an alarm), coalesce_max
// members, the next byte over the replica's max_request_bytes, or the return
// of any call to the replica. So a call waits at most the batch timeout for
// company, never for a call to finish: any number of groups may be in flight
// to one replica. Each is either full or has waited out the timeout the
// replica would have made its calls wait anyway, and the replica's own batch
// queue (max_enqueued_batches) bounds what it takes, as it does for direct
// callers.
#pragma once

#include <grpcpp/alarm.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "handler.h"
#include "plane.h"

namespace cloudml::dataplane {

class ModelCall;

class Group : public Handler {
 public:
  Group(Plane& plane, const std::string& address, const ModelCall& first);

  bool Fits(const ModelCall& call) const;
  bool Full() const;
  void Add(ModelCall* call);

  // A waiting member's caller went away: it is finished at once, never sent.
  void Leave(ModelCall* call);

  // Sends the group: members whose deadline has passed are answered
  // DEADLINE_EXCEEDED instead; each other member carries the time its caller
  // has left and its caller's metadata. The call's deadline is the latest.
  void Send();

  void Done(int op, bool ok) override;

 private:
  enum Op { kTimer, kRpc };

  // No longer takes members (sent, or every member left).
  void Close();
  void Answer();

  Plane& plane_;
  std::string address_;
  uint32_t coalesce_max_;
  uint64_t limit_, bytes_ = 0;
  int64_t version_;
  std::vector<ModelCall*> members_;  // waiting while open_, then the ones sent
  bool open_ = true;
  int pending_ = 0;
  grpc::Alarm alarm_;
  grpc::ClientContext ctx_;
  grpc::ByteBuffer response_;
  grpc::Status status_;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> rpc_;
  Clock::time_point sent_;  // Plane::spin
  Tag tags_[2] = {{this, kTimer}, {this, kRpc}};
};

// A Predict call that waits for company: into the replica's open group (a
// new one if there is none or it cannot take the call), sent once full.
void JoinGroup(Plane& plane, const std::string& address, Backend& backend, ModelCall* call);

// A call to the replica returned: its waiting group goes now.
void FlushGroup(Plane& plane, const std::string& address);

}  // namespace cloudml::dataplane
