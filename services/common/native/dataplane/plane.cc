#include "plane.h"

#include "cloudml/internal/v1/dataplane.pb.h"
#include "picking.h"
#include "wire.h"

namespace cloudml::dataplane {

const char* CodeName(grpc::StatusCode code) {
  static const char* names[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  int i = static_cast<int>(code);
  return i >= 0 && i < 17 ? names[i] : "UNKNOWN";
}

grpc::ChannelArguments Plane::ChannelArgs() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessage);
  args.SetMaxSendMessageSize(kMaxMessage);
  // This process retries (once, on another replica) itself; gRPC's own
  // retry support would only copy every request for nothing.
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  // No client-side filters beyond what a call needs (~20-35 µs less per hop
  // at concurrency 1, measured three times in alternating bursts). What they
  // did happens elsewhere: the deadline still travels as grpc-timeout and the
  // replica or service enforces it, as does this process's server side, and
  // the caller's own client checks the size of what it receives.
  args.SetInt(GRPC_ARG_MINIMAL_STACK, 1);
  // Nobody reads channelz; off, it saves its per-call counters (~5-10 % of
  // this process's CPU per call in two alternating runs, within the noise
  // of a loaded machine).
  args.SetInt(GRPC_ARG_ENABLE_CHANNELZ, 0);
  return args;
}

Backend& Plane::NewBackend(const std::string& address) {
  Backend& b = backends[address];
  b.stub = std::make_unique<grpc::GenericStub>(
      grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), ChannelArgs()));
  b.used = epoch;
  return b;
}

// Drops the channels to addresses nothing uses any more: idle (no call,
// RPC or group), not in the service instance table, and not used in this
// generation or the one before (a live replica's decision is usually
// cached again within a generation; one that is not reconnects when next
// picked). Replica churn thus never grows `backends`.
void Plane::Sweep() {
  for (auto it = backends.begin(); it != backends.end();) {
    const Backend& b = it->second;
    if (b.idle() && b.used + 1 < epoch && !InServices(it->first))
      it = backends.erase(it);
    else
      ++it;
  }
}

bool Plane::InServices(const std::string& address) const {
  for (const auto& [name, in] : services)
    for (const auto& a : in.addresses)
      if (a == address) return true;
  return false;
}

grpc::GenericStub* Plane::RelayStub(const std::string& method, const std::string* auth, bool* direct) {
  *direct = false;
  size_t slash = method.find('/', 1);
  if (slash == std::string::npos || !generation) return upstream.get();
  if (!public_methods.count(method)) {
    auto v = auth ? vouched.find(*auth) : vouched.end();
    if (v == vouched.end() || v->second <= Now()) return upstream.get();
  }
  auto it = services.find(method.substr(0, slash + 1));
  if (it == services.end() || it->second.addresses.empty()) return upstream.get();
  Instances& in = it->second;
  *direct = true;
  return BackendFor(in.addresses[in.next++ % in.addresses.size()]).stub.get();
}

std::string CacheKey(const std::string& authorization, const Spec& spec) {
  std::string key = authorization;
  key.append(1, '\0').append(spec.name).append(1, '\0');
  if (spec.has_version) key.append("v").append(std::to_string(spec.version));
  key.append(1, '\0').append(spec.label);
  return key;
}

Decision DecisionOf(const cloudml::internal::v1::RouteDecision& msg) {
  Decision d;
  d.generation = msg.generation();
  d.expires_at = msg.expires_at();
  d.model = msg.model();
  for (const auto& c : msg.choices()) {
    if (c.addresses_size() == 0 || c.weight() <= 0) continue;
    d.choices.push_back({c.version(), c.weight(), {c.addresses().begin(), c.addresses().end()},
                         c.coalesce_max(), c.max_request_bytes(), c.batch_timeout_micros()});
    // Framed sockets only when given for every address, in its order.
    if (c.frame_addresses_size() == c.addresses_size())
      d.choices.back().frames.assign(c.frame_addresses().begin(), c.frame_addresses().end());
    d.total_weight += c.weight();
  }
  return d;
}

std::string RestCacheKey(const std::string& authorization, const Spec& spec) {
  return "rest" + std::string(1, '\0') + CacheKey(authorization, spec);
}

bool Plane::Lookup(const std::string& key, const Spec& spec, const std::string& api, std::mt19937_64& draw,
                   FastRoute* out) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = generation ? cache.find(key) : cache.end();
  if (it == cache.end()) return false;
  const Decision& d = it->second;
  if (d.expires_at > 0 && d.expires_at <= Now()) {
    cache.erase(it);
    return false;
  }
  const Decision::Choice* choice = &d.choices[0];
  if (d.choices.size() > 1)  // the traffic split
    choice = &PickWeighted(d.choices, std::uniform_real_distribution<double>(0, d.total_weight)(draw));
  out->version = choice->version;
  out->addresses = choice->addresses;
  out->frames = choice->frames;
  out->coalesce_max = choice->coalesce_max;
  out->max_request_bytes = choice->max_request_bytes;
  out->batch_timeout_us = choice->batch_timeout_us;
  out->signatures = choice->signatures;
  // The replica resolves this spec to the same version by itself: no
  // routed-version header (see RouteDecision.model); the response's
  // version is checked instead.
  out->bare = api == "Predict" && spec.name == d.model && spec.label.empty() &&
              (!spec.has_version || spec.version == choice->version);
  return true;
}

void Plane::Cache(const std::string& key, Decision d) {
  std::lock_guard<std::mutex> lock(mu);
  if (!generation || d.generation != generation || d.choices.empty()) return;
  if (cache.size() > kCacheLimit) cache.clear();
  cache[key] = std::move(d);
}

void Plane::Forget(const std::string& key) {
  std::lock_guard<std::mutex> lock(mu);
  cache.erase(key);
}

void Plane::Count(uint64_t Plane::*counter, uint64_t n) {
  std::lock_guard<std::mutex> lock(mu);
  this->*counter += n;
  stats_dirty = true;
}

void Plane::SetGeneration(uint64_t g) {
  std::lock_guard<std::mutex> lock(mu);
  if (g != generation) {
    cache.clear();
    vouched.clear();
    epoch++;
    epochs = epoch;
    Sweep();
  }
  generation = g;
}

void Plane::Record(const std::string& model, const std::string& version, const std::string& api,
                   grpc::StatusCode code, double seconds) {
  std::lock_guard<std::mutex> lock(mu);
  Stat& s = stats[{model, version, api, CodeName(code)}];
  if (s.buckets.size() != bucket_bounds.size() + 1) s.buckets.assign(bucket_bounds.size() + 1, 0);
  size_t i = 0;
  while (i < bucket_bounds.size() && seconds > bucket_bounds[i]) i++;
  s.buckets[i]++;
  s.count++;
  s.sum += seconds;
  stats_dirty = true;
}

}  // namespace cloudml::dataplane
