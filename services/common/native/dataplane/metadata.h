// What metadata crosses a hop: everything but the hop's own (IsHopHeader,
// from protocol.h), and the caller's token never to a replica.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <cstring>
#include <memory>
#include <string>

#include "protocol.h"

namespace cloudml::dataplane {

inline bool IsHopHeader(const std::string& key) {
  if (key.empty()) return true;
  for (const char* prefix : kHopPrefixes)
    if (key.compare(0, strlen(prefix), prefix) == 0) return true;
  for (const char* name : kHopHeaders)
    if (key == name) return true;
  return false;
}

// Whether a PredictBatch member's trailer (bytes a replica, which runs tenant
// code, put in a message rather than in HTTP/2 headers that gRPC checked) is
// a valid gRPC metadata entry: a lower-case key of [0-9a-z_.-], and a
// printable ASCII value unless the key ends in "-bin". Anything else is dropped.
inline bool ValidMetadata(const std::string& key, const std::string& value) {
  if (key.empty()) return false;
  for (char c : key)
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.')) return false;
  if (key.size() > 4 && key.compare(key.size() - 4, 4, "-bin") == 0) return true;
  for (char c : value)
    if (c < 0x20 || c > 0x7e) return false;
  return true;
}

// A client context for forwarding the call of `from`: its deadline and its
// metadata. `to_replica`: the caller's token stops here; replicas never see it.
std::unique_ptr<grpc::ClientContext> NewClient(const grpc::GenericServerContext& from, bool to_replica);

// The upstream's trailing metadata, back to the caller.
void CopyTrailers(const grpc::ClientContext& from, grpc::GenericServerContext* to);

// The call's `authorization` value ("" without one); false if it has several.
bool Authorization(const grpc::GenericServerContext& ctx, std::string* out);

}  // namespace cloudml::dataplane
