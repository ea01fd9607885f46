// One accepted call on the public port. gRPC's generic service hands over a
// call's context and stream before its method is known, so a Call is
// requested with both, and once accepted it becomes what its method needs:
// a ModelCall (a TF Serving call that reaches replicas), a RelayCall
// (anything else), or neither (the control plane's own Dataplane service,
// refused). The role lives inside the Call (no allocation of its own); the
// Call owns the tags of every operation, forwards their completions to its
// role, and lives until every operation it started has completed and gRPC
// has reported the call done.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <variant>

#include "handler.h"
#include "model_call.h"
#include "plane.h"
#include "relay_call.h"

namespace cloudml::dataplane {

// Every operation of a call, whichever its role.
enum CallOp { kAccept, kDone, kRead, kBackend, kFinish, kUpStart, kUpInitial, kUpWrite, kUpWritesDone, kUpRead,
              kUpFinish, kDownInitial, kDownWrite, kCallOps };

class Call : public Handler {
 public:
  // Asks the server for the next call.
  explicit Call(Plane& plane);

  void Done(int op, bool ok) override;

  // The tag for starting `op` (counted until it completes).
  Tag* Op(CallOp op) {
    pending_++;
    return &tags_[op];
  }
  // An operation completed by other means (a ModelCall in a PredictBatch group).
  void Hold() { pending_++; }

  Plane& plane() { return plane_; }
  grpc::GenericServerContext& ctx() { return ctx_; }
  const grpc::GenericServerContext& ctx() const { return ctx_; }
  grpc::GenericServerAsyncReaderWriter& stream() { return stream_; }
  Clock::time_point started() const { return started_; }

 private:
  void Accepted();

  Plane& plane_;
  grpc::GenericServerContext ctx_;
  grpc::GenericServerAsyncReaderWriter stream_{&ctx_};
  Tag tags_[kCallOps] = {{this, kAccept}, {this, kDone}, {this, kRead}, {this, kBackend}, {this, kFinish},
                         {this, kUpStart}, {this, kUpInitial}, {this, kUpWrite}, {this, kUpWritesDone},
                         {this, kUpRead}, {this, kUpFinish}, {this, kDownInitial}, {this, kDownWrite}};
  int pending_ = 1;  // the done notification
  bool done_seen_ = false;
  Clock::time_point started_;
  std::variant<std::monostate, ModelCall, RelayCall> role_;
};

}  // namespace cloudml::dataplane
