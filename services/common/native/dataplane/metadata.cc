#include "metadata.h"

namespace cloudml::dataplane {

std::unique_ptr<grpc::ClientContext> NewClient(const grpc::GenericServerContext& from, bool to_replica) {
  auto client = std::make_unique<grpc::ClientContext>();
  client->set_deadline(from.deadline());
  for (const auto& kv : from.client_metadata()) {
    std::string key(kv.first.data(), kv.first.size());
    if (IsHopHeader(key) || (to_replica && key == kAuthorization)) continue;
    client->AddMetadata(key, std::string(kv.second.data(), kv.second.size()));
  }
  return client;
}

void CopyTrailers(const grpc::ClientContext& from, grpc::GenericServerContext* to) {
  for (const auto& kv : from.GetServerTrailingMetadata()) {
    std::string key(kv.first.data(), kv.first.size());
    if (!IsHopHeader(key)) to->AddTrailingMetadata(key, std::string(kv.second.data(), kv.second.size()));
  }
}

bool Authorization(const grpc::GenericServerContext& ctx, std::string* out) {
  int count = 0;
  for (const auto& kv : ctx.client_metadata()) {
    if (kv.first == kAuthorization) {
      out->assign(kv.second.data(), kv.second.size());
      count++;
    }
  }
  return count <= 1;
}

}  // namespace cloudml::dataplane
