// The data plane's state: its options, the channels to replicas and
// services (Backend), the routing decisions the control plane handed it
// (Decision, cached per caller and model_spec for one generation), the
// service instance table, and the figures it reports. One Plane per
// process, owned by main() and handed to every handler.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "rest_json.h"
#include "spin.h"

namespace cloudml::dataplane {

constexpr int kMaxMessage = 64 * 1024 * 1024;  // as the Python services
constexpr size_t kCacheLimit = 100000;  // entries; the cache starts over beyond it
// Predict calls (alone, or groups) in flight to a batching replica before
// others wait to be coalesced, by the gRPC side (model_call.cc) and by the
// HTTP/2 front over a framed socket (h2front.cc). On the MLP at concurrency
// 32 (2 CPUs, alternating rounds): 1 served 8,256 rps against 7,338 with 2;
// larger groups cost the replica less per call.
constexpr int kRpcsBeforeCoalescing = 1;
// A PredictBatch answer without one result per member.
constexpr char kMalformedBatch[] = "malformed PredictBatch response";

class Group;
}  // namespace cloudml::dataplane
namespace cloudml::internal::v1 {
class RouteDecision;
}  // namespace cloudml::internal::v1
namespace cloudml::dataplane {

struct Options {
  std::string listen = "127.0.0.1:0", upstream, secret;
  int spin_us = 0;  // see spin.h
  std::string front_for;      // replica front mode: the replica's own address
  uint32_t coalesce_max = 0;  // replica front mode: its ReplicaEndpoint.coalesce_max
  uint64_t max_request_bytes = 64 * 1024 * 1024;  // the largest model call taken at all
  uint32_t batch_timeout_us = 0;  // replica front mode: the replica's batch_timeout_micros
  bool h2 = true;  // gateway mode: the public port is the HTTP/2 front's (h2front.h)
  std::string internal;  // then: where the gRPC server listens (a private Unix socket)
  std::string rest_listen;    // the public REST port (rest.h), if this process owns it
  std::string rest_upstream;  // then: the Python gateway's REST server ("unix:PATH")
  // The HTTP/2 front sends routed calls to a replica's framed socket
  // (frame.h) where it has one; off: always gRPC (benches compare the two).
  bool frames = true;
  std::string front_frame;  // replica front mode: the replica's framed socket, if any
  bool front() const { return !front_for.empty(); }
};

struct Backend {
  std::unique_ptr<grpc::GenericStub> stub;
  int outstanding = 0;    // model calls routed here and not answered (for balancing)
  int rpcs = 0;           // Predict calls and PredictBatch groups in flight (for coalescing)
  Group* open = nullptr;  // the group Predict calls join while they wait, if any
  uint64_t used = 0;      // Plane::epoch when last used (see Plane::Sweep)
  bool idle() const { return outstanding == 0 && rpcs == 0 && open == nullptr; }
};

struct Decision {
  uint64_t generation = 0;
  double expires_at = 0;
  std::string model;  // as the replicas know it
  struct Choice {
    int64_t version;
    double weight;
    std::vector<std::string> addresses;
    uint32_t coalesce_max;
    uint64_t max_request_bytes;  // 0: only the process-wide limit
    uint32_t batch_timeout_us;
    // REST decisions: the version's signatures (nullptr: not known yet).
    std::shared_ptr<const Signatures> signatures = nullptr;
    // Per address: its framed socket (frame.h), "" where it has none.
    std::vector<std::string> frames = {};
  };
  std::vector<Choice> choices;
  double total_weight = 0;
};

// The control plane's RouteDecision as the cache holds it (choices without
// replicas or weight left out).
Decision DecisionOf(const cloudml::internal::v1::RouteDecision& msg);

// A cached decision, resolved for one call (Plane::Lookup).
struct FastRoute {
  int64_t version = 0;
  std::vector<std::string> addresses;
  std::vector<std::string> frames;  // per address, its framed socket ("" where none)
  uint32_t coalesce_max = 0;
  uint64_t max_request_bytes = 0;  // 0: only the process-wide limit
  uint32_t batch_timeout_us = 0;
  bool bare = false;  // the replica resolves the spec to this version by itself (no routed-version header)
  std::shared_ptr<const Signatures> signatures;  // a REST decision's, for this version
};

// The framed socket of `picked` (a pointer into `addresses`), "" if it has none.
inline std::string FrameOf(const std::vector<std::string>& addresses, const std::vector<std::string>& frames,
                           const std::string* picked) {
  size_t i = static_cast<size_t>(picked - addresses.data());
  return i < frames.size() && frames.size() == addresses.size() ? frames[i] : std::string();
}

struct Spec;

// The decision cache's key for a caller's `authorization` and model_spec.
std::string CacheKey(const std::string& authorization, const Spec& spec);
// The same for a REST predict call's authorization and model path.
std::string RestCacheKey(const std::string& authorization, const Spec& spec);

struct Instances {
  std::vector<std::string> addresses;
  size_t next = 0;
};

struct Stat {
  uint64_t count = 0;
  double sum = 0;
  std::vector<uint64_t> buckets;
};

const char* CodeName(grpc::StatusCode code);

struct Plane {
  Options options;
  grpc::AsyncGenericService service;
  std::unique_ptr<grpc::ServerCompletionQueue> cq;
  std::unique_ptr<grpc::Server> server;
  std::shared_ptr<grpc::Channel> upstream_channel;
  std::unique_ptr<grpc::GenericStub> upstream;
  std::unordered_map<std::string, Backend> backends;
  // Guards what the HTTP/2 front's thread (h2front.h) shares: `cache`,
  // `generation` (written under it; the gRPC thread, its only writer, reads
  // it freely), `stats` and the call counters.
  std::mutex mu;
  std::unordered_map<std::string, Decision> cache;
  uint64_t generation = 0;  // 0: no live Attach stream, nothing is cached
  uint64_t epoch = 0;       // generation changes seen (Backend::used)
  std::atomic<uint64_t> epochs{0};  // the same, for the HTTP/2 front's thread
  std::vector<double> bucket_bounds;
  std::map<std::tuple<std::string, std::string, std::string, std::string>, Stat> stats;
  uint64_t fast_calls = 0, slow_calls = 0, coalesced_calls = 0, rest_calls = 0, frame_calls = 0;  // under mu
  std::unordered_map<std::string, Instances> services;  // "/pkg.Service/" -> instances
  std::unordered_set<std::string> public_methods;
  std::unordered_map<std::string, double> vouched;  // authorization -> token expiry (this generation)
  std::map<std::tuple<std::string, std::string, std::string>, uint64_t> relays;  // (service, method, code)
  int model_calls_in_flight = 0;  // accepted TF Serving calls not yet finished
  SpinPolicy spin{0};              // when the loop polls (spin.h); main() sets --spin-us
  std::atomic<bool> stats_dirty{true};
  std::mt19937_64 rng{std::random_device{}()};
  bool stopping = false;

  grpc::ChannelArguments ChannelArgs();

  Backend& BackendFor(const std::string& address) {
    auto it = backends.find(address);
    if (it != backends.end()) {
      it->second.used = epoch;
      return it->second;
    }
    return NewBackend(address);
  }

  // Drops the channels to addresses nothing uses any more (see plane.cc).
  void Sweep();
  bool InServices(const std::string& address) const;

  // The stub for a platform call's owning service, or the control plane's.
  grpc::GenericStub* RelayStub(const std::string& method, const std::string* auth, bool* direct);

  void SetGeneration(uint64_t g);

  static double Now() {
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  }

  void Record(const std::string& model, const std::string& version, const std::string& api,
              grpc::StatusCode code, double seconds);

  // The cached decision for `key` (CacheKey), one version picked by its
  // traffic split; false if there is none for this generation, or it expired.
  bool Lookup(const std::string& key, const Spec& spec, const std::string& api, std::mt19937_64& draw,
              FastRoute* out);
  // Caches `d` for `key` if it is of the current generation (from any thread).
  void Cache(const std::string& key, Decision d);
  // Drops the decision for `key` (its replicas failed or answered for another version).
  void Forget(const std::string& key);
  void Count(uint64_t Plane::*counter, uint64_t n = 1);

 private:
  Backend& NewBackend(const std::string& address);
};

}  // namespace cloudml::dataplane
