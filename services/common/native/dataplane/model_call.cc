#include "model_call.h"

#include <algorithm>

#include "call.h"
#include "cloudml/internal/v1/dataplane.pb.h"
#include "group.h"
#include "metadata.h"
#include "picking.h"
#include "protocol.h"
#include "wire.h"

namespace cloudml::dataplane {

std::chrono::system_clock::time_point ModelCall::deadline() const { return call_.ctx().deadline(); }

void ModelCall::MemberMetadata(cloudml::internal::v1::PredictMember* member) const {
  for (const auto& kv : call_.ctx().client_metadata()) {
    std::string key(kv.first.data(), kv.first.size());
    if (IsHopHeader(key) || key == kAuthorization) continue;
    auto* entry = member->add_metadata();
    entry->set_key(std::move(key));
    entry->set_value(kv.second.data(), kv.second.size());
  }
}

void ModelCall::BatchDone(const grpc::Status& status, const std::string& response,
                          const google::protobuf::RepeatedPtrField<cloudml::internal::v1::MetadataEntry>* trailers) {
  group_ = nullptr;
  status_ = status;
  response_ = ToBuffer(response);
  if (trailers)
    for (const auto& t : *trailers)
      if (!IsHopHeader(t.key()) && ValidMetadata(t.key(), t.value()))
        call_.ctx().AddTrailingMetadata(t.key(), t.value());
  call_.Done(kBackend, true);
}

void ModelCall::Start() {
  call_.plane().model_calls_in_flight++;
  call_.stream().Read(&request_, call_.Op(kRead));
}

void ModelCall::Cancelled() {
  if (client_) client_->TryCancel();
  // Cancelled, or its deadline passed, while it waits for company:
  // out of the group and finished now (BatchDone).
  if (group_) group_->Leave(this);
}

void ModelCall::Done(int op, bool ok) {
  if (op == kRead) {
    if (!ok) {
      call_.stream().Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the call carried no request message"),
                            call_.Op(kFinish));
      return;
    }
    Route();
  } else if (op == kBackend) {
    BackendDone();
  } else if (op == kFinish) {
    call_.plane().model_calls_in_flight--;
  }
}

// RESOURCE_EXHAUSTED for a request over `limit` bytes; false if it fits.
bool ModelCall::TooLarge(uint64_t limit) {
  if (!limit || request_bytes_.size() <= limit) return false;
  call_.stream().Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                     api_ + " request of " + std::to_string(request_bytes_.size()) +
                                         " bytes is larger than this model's limit of " + std::to_string(limit) +
                                         " bytes"),
                        call_.Op(kFinish));
  return true;
}

void ModelCall::Route() {
  Plane& p = call_.plane();
  Spec spec;
  request_bytes_ = Flatten(request_);
  max_request_bytes_ = p.options.max_request_bytes;
  if (TooLarge(max_request_bytes_)) return;
  if (p.options.front()) {
    version_ = 0;  // unresolved: the replica checks the model_spec
    coalesce_max_ = api_ == "Predict" ? p.options.coalesce_max : 0;
    batch_timeout_us_ = p.options.batch_timeout_us;
    return Fast(p.options.front_for);
  }
  if (!ParseSpec(api_, request_bytes_, &spec)) return Slow();
  model_ = spec.name;
  std::string auth;
  if (!Authorization(call_.ctx(), &auth)) return Slow();
  key_ = CacheKey(auth, spec);
  FastRoute route;
  if (!p.Lookup(key_, spec, api_, p.rng, &route)) return Slow();
  version_ = route.version;
  addresses_ = std::move(route.addresses);
  coalesce_max_ = route.coalesce_max;
  batch_timeout_us_ = route.batch_timeout_us;
  if (route.max_request_bytes) max_request_bytes_ = std::min(max_request_bytes_, route.max_request_bytes);
  if (TooLarge(max_request_bytes_)) return;
  bare_ = route.bare;
  Fast(Pick(""));
}

// Least outstanding requests of two random choices, never `exclude` ("" if none is left).
std::string ModelCall::Pick(const std::string& exclude) {
  Plane& p = call_.plane();
  std::vector<const std::string*> candidates;
  for (const auto& a : addresses_)
    if (a != exclude) candidates.push_back(&a);
  const std::string* picked = PickTwo(
      candidates, [&p](size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(p.rng); },
      [&p](const std::string& address) { return p.BackendFor(address).outstanding; });
  return picked ? *picked : "";
}

void ModelCall::Fast(const std::string& address) {
  Plane& p = call_.plane();
  p.Count(&Plane::fast_calls);
  fast_ = true;
  address_ = address;
  Backend& backend = p.BackendFor(address);
  backend.outstanding++;
  batched_ = false;
  if (api_ == "Predict" && coalesce_max_ > 1 && backend.rpcs >= kRpcsBeforeCoalescing) {
    call_.Hold();  // BatchDone completes it
    batched_ = true;
    JoinGroup(p, address, backend, this);
    return;
  }
  client_ = NewClient(call_.ctx(), true);
  if (api_ == "Predict") backend.rpcs++;
  if (!p.options.front() && !bare_) client_->AddMetadata(kResolvedVersion, std::to_string(version_));
  unary_ = backend.stub->PrepareUnaryCall(client_.get(), call_.ctx().method(), request_, p.cq.get());
  unary_->StartCall();
  unary_->Finish(&response_, &status_, call_.Op(kBackend));
  sent_ = p.spin.Sent();
  out_ = true;
}

void ModelCall::Slow() {
  Plane& p = call_.plane();
  p.Count(&Plane::slow_calls);
  fast_ = false;
  client_ = NewClient(call_.ctx(), false);
  client_->AddMetadata(kSecretHeader, p.options.secret);
  unary_ = p.upstream->PrepareUnaryCall(client_.get(), call_.ctx().method(), request_, p.cq.get());
  unary_->StartCall();
  unary_->Finish(&response_, &status_, call_.Op(kBackend));
}

void ModelCall::BackendDone() {
  Plane& p = call_.plane();
  if (out_) {
    out_ = false;
    p.spin.Answered(sent_);
  }
  if (fast_) {
    Backend& backend = p.BackendFor(address_);
    backend.outstanding--;
    if (api_ == "Predict" && !batched_) {
      backend.rpcs--;
      FlushGroup(p, address_);
    }
    if (status_.error_code() == grpc::StatusCode::UNAVAILABLE && !retried_ && !call_.ctx().IsCancelled() &&
        !p.options.front()) {
      retried_ = true;
      p.Forget(key_);  // the replica set may have changed: ask the control plane next time
      std::string other = Pick(address_);
      return other.empty() ? Slow() : Fast(other);
    }
    int64_t served;
    if (bare_ && !batched_ && status_.ok() && !(ResponseVersion(response_, &served) && served == version_)) {
      // Another version answered (a stale route): the control plane routes it again.
      p.Forget(key_);
      return Slow();
    }
    p.Record(model_, std::to_string(version_), api_, status_.error_code(),
             std::chrono::duration<double>(Clock::now() - call_.started()).count());
  } else if (status_.ok() && p.generation && !key_.empty()) {
    Remember();
  }
  if (!batched_) CopyTrailers(*client_, &call_.ctx());
  if (status_.ok())
    call_.stream().WriteAndFinish(response_, grpc::WriteOptions(), status_, call_.Op(kFinish));
  else
    call_.stream().Finish(status_, call_.Op(kFinish));
}

// Caches the control plane's decision for this call's key, if current.
void ModelCall::Remember() {
  Plane& p = call_.plane();
  for (const auto& kv : client_->GetServerTrailingMetadata()) {
    if (kv.first != kDecisionHeader) continue;
    cloudml::internal::v1::RouteDecision msg;
    if (msg.ParseFromArray(kv.second.data(), static_cast<int>(kv.second.size())))
      p.Cache(key_, DecisionOf(msg));  // dropped unless of the current generation
    return;
  }
}

}  // namespace cloudml::dataplane
