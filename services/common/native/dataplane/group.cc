#include "group.h"

#include <algorithm>
#include <chrono>

#include "cloudml/internal/v1/replica.pb.h"
#include "model_call.h"
#include "wire.h"

namespace cloudml::dataplane {

constexpr char kPredictBatch[] = "/cloudml.internal.v1.ReplicaService/PredictBatch";

Group::Group(Plane& plane, const std::string& address, const ModelCall& first)
    : plane_(plane), address_(address), coalesce_max_(first.coalesce_max()), limit_(first.max_request_bytes()),
      version_(first.version()) {
  pending_++;
  alarm_.Set(plane_.cq.get(), std::chrono::system_clock::now() + std::chrono::microseconds(first.batch_timeout_us()),
             &tags_[kTimer]);
}

bool Group::Fits(const ModelCall& call) const {
  if (members_.size() >= std::max<uint32_t>(1, coalesce_max_)) return false;
  return !limit_ || bytes_ + call.request_bytes().size() <= limit_;
}

bool Group::Full() const { return members_.size() >= std::max<uint32_t>(1, coalesce_max_); }

void Group::Add(ModelCall* call) {
  members_.push_back(call);
  bytes_ += call->request_bytes().size();
  call->set_group(this);
}

void Group::Leave(ModelCall* call) {
  auto it = std::find(members_.begin(), members_.end(), call);
  if (it == members_.end()) return;
  members_.erase(it);
  bytes_ -= call->request_bytes().size();
  bool expired = call->deadline() <= std::chrono::system_clock::now();
  call->BatchDone(expired ? grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "Deadline Exceeded")
                          : grpc::Status(grpc::StatusCode::CANCELLED, "Cancelled"),
                  "", nullptr);
  if (members_.empty()) Close();
}

void Group::Send() {
  Close();
  Plane& p = plane_;
  auto now = std::chrono::system_clock::now();
  std::vector<ModelCall*> members;
  members.swap(members_);
  cloudml::internal::v1::PredictBatchRequest request;
  request.set_resolved_version(version_);
  auto deadline = now;
  for (ModelCall* m : members) {
    m->set_group(nullptr);
    auto d = m->deadline();
    if (d <= now) {
      m->BatchDone(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "Deadline Exceeded"), "", nullptr);
      continue;
    }
    members_.push_back(m);
    auto* member = request.add_members();
    member->set_request(m->request_bytes());
    if (d != std::chrono::system_clock::time_point::max())
      member->set_timeout_micros(
          std::max<int64_t>(1, std::chrono::duration_cast<std::chrono::microseconds>(d - now).count()));
    m->MemberMetadata(member);
    deadline = std::max(deadline, d);
  }
  if (members_.empty()) return;
  p.Count(&Plane::coalesced_calls, members_.size());
  ctx_.set_deadline(deadline);
  Backend& backend = p.BackendFor(address_);
  backend.rpcs++;
  pending_++;
  rpc_ = backend.stub->PrepareUnaryCall(&ctx_, kPredictBatch, ToBuffer(request.SerializeAsString()), p.cq.get());
  rpc_->StartCall();
  rpc_->Finish(&response_, &status_, &tags_[kRpc]);
  sent_ = p.spin.Sent();
}

void Group::Done(int op, bool ok) {
  pending_--;
  if (op == kTimer) {
    if (ok && open_) Send();
  } else {
    plane_.spin.Answered(sent_);
    Answer();
    FlushGroup(plane_, address_);
  }
  if (pending_ == 0) delete this;
}

void Group::Close() {
  if (!open_) return;
  open_ = false;
  Backend& backend = plane_.BackendFor(address_);
  if (backend.open == this) backend.open = nullptr;
  alarm_.Cancel();
}

void Group::Answer() {
  plane_.BackendFor(address_).rpcs--;
  cloudml::internal::v1::PredictBatchResponse response;
  bool parsed = status_.ok() && response.ParseFromString(Flatten(response_)) &&
                response.results_size() == static_cast<int>(members_.size());
  for (size_t i = 0; i < members_.size(); i++) {
    if (parsed) {
      const auto& r = response.results(static_cast<int>(i));
      members_[i]->BatchDone(grpc::Status(static_cast<grpc::StatusCode>(r.code()), r.message()), r.response(),
                             &r.trailers());
    } else {
      members_[i]->BatchDone(
          status_.ok() ? grpc::Status(grpc::StatusCode::INTERNAL, kMalformedBatch) : status_, "",
          nullptr);
    }
  }
  members_.clear();
}

void JoinGroup(Plane& plane, const std::string& address, Backend& backend, ModelCall* call) {
  if (backend.open && !backend.open->Fits(*call)) backend.open->Send();
  if (!backend.open) backend.open = new Group(plane, address, *call);
  Group* group = backend.open;
  group->Add(call);
  if (group->Full()) group->Send();
}

void FlushGroup(Plane& plane, const std::string& address) {
  Backend& backend = plane.BackendFor(address);
  if (backend.open) backend.open->Send();
}

}  // namespace cloudml::dataplane
