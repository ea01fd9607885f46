#include "relay_call.h"

#include "call.h"
#include "cloudml/internal/v1/dataplane.pb.h"
#include "metadata.h"
#include "protocol.h"

namespace cloudml::dataplane {

void RelayCall::Start() {
  Plane& p = call_.plane();
  const std::string& method = call_.ctx().method();
  client_ = NewClient(call_.ctx(), false);
  if (!Authorization(call_.ctx(), &auth_)) auth_.clear();  // several: never vouched for
  grpc::GenericStub* stub = p.RelayStub(method, auth_.empty() ? nullptr : &auth_, &direct_);
  if (!direct_ && !p.options.front()) client_->AddMetadata(kSecretHeader, p.options.secret);
  relay_ = stub->PrepareCall(client_.get(), method, p.cq.get());
  relay_->StartCall(call_.Op(kUpStart));
}

void RelayCall::Done(int op, bool ok) {
  auto& stream = call_.stream();
  switch (op) {
    case kUpStart:
      if (!ok) return UpFinish();
      stream.Read(&in_, call_.Op(kRead));
      relay_->ReadInitialMetadata(call_.Op(kUpInitial));
      return;
    case kRead:
      if (up_finished_) return;
      if (!ok) {
        relay_->WritesDone(call_.Op(kUpWritesDone));
        return;
      }
      relay_->Write(in_, call_.Op(kUpWrite));
      return;
    case kUpWrite:
      if (ok && !up_finished_) stream.Read(&in_, call_.Op(kRead));
      return;
    case kUpInitial:
      if (!ok) return UpFinish();
      for (const auto& kv : client_->GetServerInitialMetadata()) {
        std::string key(kv.first.data(), kv.first.size());
        if (!IsHopHeader(key)) call_.ctx().AddInitialMetadata(key, std::string(kv.second.data(), kv.second.size()));
      }
      stream.SendInitialMetadata(call_.Op(kDownInitial));
      return;
    case kDownInitial:
    case kDownWrite:
      if (!ok) {
        client_->TryCancel();
        return UpFinish();
      }
      relay_->Read(&out_, call_.Op(kUpRead));
      return;
    case kUpRead:
      if (!ok) return UpFinish();
      stream.Write(out_, call_.Op(kDownWrite));
      return;
    case kUpFinish:
      if (direct_) {
        Plane& p = call_.plane();
        const std::string& method = call_.ctx().method();
        size_t slash = method.find('/', 1);
        p.relays[{method.substr(1, slash - 1), method.substr(slash + 1), CodeName(status_.error_code())}]++;
        p.stats_dirty = true;
      } else {
        Vouched();
      }
      CopyTrailers(*client_, &call_.ctx());
      stream.Finish(status_, call_.Op(kFinish));
      return;
    default:
      return;
  }
}

// Remembers the control plane's AuthDecision for this call's authorization.
void RelayCall::Vouched() {
  Plane& p = call_.plane();
  for (const auto& kv : client_->GetServerTrailingMetadata()) {
    if (kv.first != kAuthHeader) continue;
    cloudml::internal::v1::AuthDecision msg;
    if (!auth_.empty() && p.generation &&
        msg.ParseFromArray(kv.second.data(), static_cast<int>(kv.second.size())) &&
        msg.generation() == p.generation)
      p.vouched[auth_] = msg.expires_at();
    if (p.vouched.size() > kCacheLimit) p.vouched.clear();
    return;
  }
}

void RelayCall::UpFinish() {
  up_finished_ = true;
  relay_->Finish(&status_, call_.Op(kUpFinish));
}

}  // namespace cloudml::dataplane
