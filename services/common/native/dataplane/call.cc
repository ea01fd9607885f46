#include "call.h"

#include <string>

#include "protocol.h"

namespace cloudml::dataplane {

Call::Call(Plane& plane) : plane_(plane) {
  ctx_.AsyncNotifyWhenDone(&tags_[kDone]);
  plane_.service.RequestCall(&ctx_, &stream_, plane_.cq.get(), plane_.cq.get(), Op(kAccept));
}

void Call::Done(int op, bool ok) {
  pending_--;
  if (op == kAccept) {
    if (!ok) return;  // the server is shutting down (the process exits: no clean-up)
    new Call(plane_);
    started_ = Clock::now();
    Accepted();
  } else if (op == kDone) {
    done_seen_ = true;
    if (ctx_.IsCancelled()) {
      if (auto* model = std::get_if<ModelCall>(&role_)) model->Cancelled();
      else if (auto* relay = std::get_if<RelayCall>(&role_)) relay->Cancelled();
    }
  } else if (auto* model = std::get_if<ModelCall>(&role_)) {
    model->Done(op, ok);
  } else if (auto* relay = std::get_if<RelayCall>(&role_)) {
    relay->Done(op, ok);
  }
  if (pending_ == 0 && done_seen_) delete this;
}

void Call::Accepted() {
  const std::string& method = ctx_.method();
  if (method.compare(0, sizeof(kDataplaneService) - 1, kDataplaneService) == 0) {
    stream_.Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "Method not found: " + method), Op(kFinish));
    return;
  }
  if (method.compare(0, sizeof(kPredictionService) - 1, kPredictionService) == 0) {
    std::string api = method.substr(sizeof(kPredictionService) - 1);
    for (const char* forwarded : kForwardedMethods) {
      if (api == forwarded) {
        role_.emplace<ModelCall>(*this, std::move(api)).Start();
        return;
      }
    }
  }
  role_.emplace<RelayCall>(*this).Start();
}

}  // namespace cloudml::dataplane
