// The gateway's native data plane: owns the gateway's public gRPC port.
//
// Why it exists: one Python gRPC hop costs ~0.4 ms on a small machine (grpc
// core plus the event loop), more than the TF Serving Predict it forwards.
// This process keeps the Predict hot path out of Python, while every decision
// stays in the Python gateway (the control plane): authentication, tenancy,
// version/label/traffic-split resolution and the routing registries.
//
// How:
// - TF Serving's forwarded calls (PredictionService Predict, Classify,
//   Regress, MultiInference, GetModelMetadata) are read whole. The request's
//   model_spec (field 1; for MultiInference, field 1 of its first task) and
//   the `authorization` metadata form a cache key. On a hit, the call goes
//   straight to a replica; on a miss (or anything unusual) it goes to the
//   control plane, which routes it itself and returns its RouteDecision in
//   trailing metadata (`x-cloudml-route-bin`), cached here for the next call.
// - Decisions are valid only for the control plane's current generation,
//   which it streams on the Attach call and bumps whenever routes, replica
//   endpoints, token keys or revocations change; a new generation empties the
//   cache. Without a live Attach stream nothing is cached: every call takes
//   the control plane's path. A decision never outlives the caller's token.
//   Channels to replicas (Plane::backends) that are idle and were not used in
//   this generation or the one before are dropped on each new generation, so
//   replica churn never grows this process.
// - Coalescing: for a replica with server-side batching (its coalesce_max
//   and batch timeout in the decision), a Predict call that finds another
//   call in flight to that replica waits here in the replica's open group;
//   the group goes as one ReplicaService.PredictBatch call at the first of:
//   its batch timeout after its first member came (an alarm), coalesce_max
//   members (a group that fills every batch thread of the replica), its
//   max_request_bytes, or the return of any call to the replica. A lone call
//   is never delayed; a call that waits, waits at most the batch timeout (the
//   replica would hold it that long for company anyway), never for another
//   call to finish: any number of groups may be in flight to one replica (see
//   Group). Under load the replica pays its per-call gRPC cost once per group
//   and runs the group's batches without waiting out its batch timeout again.
//   Each member keeps its own status, response, retry, metrics, deadline,
//   metadata and trailers (see replica.proto): a caller that cancels, or whose
//   deadline passes, while it waits leaves its group at once and is never
//   sent; a member whose deadline passed when its group goes is answered
//   DEADLINE_EXCEEDED here; the others carry their own time left, and the
//   group's call the latest member's deadline.
// - Fast path: the version is picked by the decision's traffic-split
//   weights, the replica by least outstanding requests of two random choices;
//   UNAVAILABLE from the replica is retried once, on another replica of the
//   version if the decision has one, else through the control plane (whose
//   view may be newer); the entry is dropped. The client's deadline travels.
// - Platform APIs (unary or streaming) are relayed byte for byte, with
//   metadata, status, trailers, deadline and cancellation. Authentication
//   works as for model calls: a call whose `authorization` the control plane
//   has not vouched for in this generation goes through it (it checks the
//   token, forwards the call, and returns an AuthDecision in trailing
//   metadata `x-cloudml-auth-bin`); later calls with that authorization, and
//   calls to public methods, go straight to an instance of their owning
//   service (round robin) from the instance table the control plane streams.
//   Every other method (health, reflection, ModelService) is relayed to the
//   control plane the same way.
// - One thread drives one completion queue for the server and every client
//   call, so a forwarded call never changes threads. After any event the
//   loop polls without blocking for --spin-us microseconds (default 1000)
//   before it sleeps: under traffic, the replica's reply and the caller's
//   next call are picked up without a wake-up (each wake-up costs tens of µs
//   on a VM, more when the CPU has gone idle). The window covers a Predict's
//   round trip to a replica (~0.5 ms for a small model on the 2-CPU box:
//   bench/bench_serving.py at concurrency 1 measured the gateway adding
//   ×1.39 p50 over a direct call with no spinning, ×1.23 with 300 µs and
//   ×1.05 with 1000 µs). The price is CPU: one core while calls keep coming,
//   about 1 ms per call at low rates, nothing when idle; 0 turns it off.
//   It spins only while at most kSpinMaxInFlight model calls are in flight:
//   under load, events come anyway, and spinning through the gaps would take
//   a core from the replicas and callers sharing the machine (measured:
//   half_plus_two at concurrency 32 through the gateway fell from ~3,800 to
//   ~2,450 rps when it spun regardless). Each empty poll yields the core
//   (sched_yield), so the caller's and the replica's threads that share it
//   run at once: with 2 CPUs at concurrency 1, half_plus_two's p99 through
//   the gateway fell from ~2.0 to ~1.3 ms and its throughput rose ~6 %.
//
// Usage (the Python gateway starts it; it dies with its parent):
//   cloudml-gateway-dataplane --listen HOST:PORT --upstream HOST:PORT [--spin-us N]
//                             [--max-request-bytes N]
//   with the secret in $CLOUDML_DATAPLANE_SECRET. Prints the bound port.
//
// Request size: a model call larger than --max-request-bytes (the gateway's
// platform-wide cap), or than its version's max_request_bytes in the routing
// decision (what its replicas published), is RESOURCE_EXHAUSTED here, before
// any replica sees it; a PredictBatch group holds at most that many bytes of
// requests. Larger calls go through the control plane only when no decision
// is cached, and it applies the same limits.
//
// Replica front mode: a model-server replica with batching on starts it in
// front of itself, so that callers who reach the replica directly (not
// through a gateway) get the same coalescing:
//   cloudml-gateway-dataplane --listen HOST:PORT --front-for HOST:PORT
//                             --coalesce-max N [--batch-timeout-us N] [--spin-us N]
//                             [--max-request-bytes N]
// (--batch-timeout-us: the replica's batch_timeout_micros; default 0, when
// only calls that arrive together are grouped.)
// Every call goes to the one replica: Predict calls coalesce exactly as
// above, every other call is relayed. No control plane, no cache, no retry,
// no tokens; x-cloudml-* headers from callers are dropped, so the replica
// checks every model_spec itself.

#include <sched.h>
#include <absl/synchronization/mutex.h>
#include <grpcpp/alarm.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <atomic>
#include <algorithm>
#include <chrono>
#include <deque>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "cloudml/gateway/v1/dataplane.pb.h"
#include "cloudml/models/v1/replica.pb.h"

namespace {

using Clock = std::chrono::steady_clock;
namespace pb = cloudml::gateway::v1;

constexpr char kSecretHeader[] = "x-cloudml-dataplane";
constexpr char kDecisionHeader[] = "x-cloudml-route-bin";
constexpr char kAuthHeader[] = "x-cloudml-auth-bin";
constexpr char kResolvedVersion[] = "x-cloudml-resolved-version";
constexpr char kPredictionService[] = "/tensorflow.serving.PredictionService/";
constexpr char kDataplaneService[] = "/cloudml.gateway.v1.Dataplane/";
constexpr char kAttach[] = "/cloudml.gateway.v1.Dataplane/Attach";
constexpr char kPredictBatch[] = "/cloudml.models.v1.ReplicaService/PredictBatch";
// Predict calls in flight to a replica before others wait to be coalesced. On the
// MLP at concurrency 32 (2 CPUs, alternating rounds): 1 served 8,256 rps against
// 7,338 with 2; larger groups cost the replica less per call.
constexpr int kRpcsBeforeCoalescing = 1;
constexpr int kMaxMessage = 64 * 1024 * 1024;  // as the Python services
constexpr int kSpinMaxInFlight = 2;
constexpr size_t kCacheLimit = 100000;  // entries; the cache starts over beyond it

const char* CodeName(grpc::StatusCode code) {
  static const char* names[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  int i = static_cast<int>(code);
  return i >= 0 && i < 17 ? names[i] : "UNKNOWN";
}

std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  out.reserve(buffer.Length());
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

grpc::ByteBuffer ToBuffer(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

// --- reading model_spec off the wire (proto3 wire format) ---------------------

bool Varint(const std::string& d, size_t* pos, uint64_t* out) {
  uint64_t v = 0;
  for (int shift = 0; shift < 64 && *pos < d.size(); shift += 7) {
    uint8_t b = static_cast<uint8_t>(d[(*pos)++]);
    v |= static_cast<uint64_t>(b & 0x7f) << shift;
    if (!(b & 0x80)) { *out = v; return true; }
  }
  return false;
}

// Visits each field; `fn(number, wire, value, bytes)` returns false to stop.
// Returns false on malformed input.
template <typename Fn>
bool Fields(const std::string& d, Fn fn) {
  size_t pos = 0;
  while (pos < d.size()) {
    uint64_t tag, value = 0;
    if (!Varint(d, &pos, &tag)) return false;
    int number = static_cast<int>(tag >> 3), wire = static_cast<int>(tag & 7);
    std::string bytes;
    if (wire == 0) {
      if (!Varint(d, &pos, &value)) return false;
    } else if (wire == 1 || wire == 5) {
      size_t n = wire == 1 ? 8 : 4;
      if (pos + n > d.size()) return false;
      pos += n;
    } else if (wire == 2) {
      uint64_t len;
      if (!Varint(d, &pos, &len) || len > d.size() - pos) return false;
      bytes.assign(d, pos, len);
      pos += len;
    } else {
      return false;
    }
    if (!fn(number, wire, value, bytes)) return true;
  }
  return true;
}

bool Field1(const std::string& d, std::string* out, bool* found) {
  *found = false;
  return Fields(d, [&](int number, int wire, uint64_t, const std::string& bytes) {
    if (number == 1 && wire == 2) { *out = bytes; *found = true; return false; }
    return true;
  });
}

struct Spec {
  std::string name, label;
  bool has_version = false;
  int64_t version = 0;
};

bool ParseModelSpec(const std::string& bytes, Spec* spec) {
  return Fields(bytes, [&](int number, int wire, uint64_t, const std::string& b) {
    if (number == 1 && wire == 2) spec->name = b;
    if (number == 4 && wire == 2) spec->label = b;
    if (number == 2 && wire == 2) {  // google.protobuf.Int64Value
      spec->has_version = true;
      spec->version = 0;
      Fields(b, [&](int n, int w, uint64_t v, const std::string&) {
        if (n == 1 && w == 0) spec->version = static_cast<int64_t>(v);
        return true;
      });
    }
    return true;
  });
}

// The ModelSpec of a forwarded call; false if absent, nameless or malformed
// (the control plane then answers with TF Serving's error).
bool ParseSpec(const std::string& api, const std::string& request, Spec* spec) {
  std::string bytes;
  bool found;
  if (!Field1(request, &bytes, &found) || !found) return false;
  if (api == "MultiInference") {
    std::string task = bytes;
    if (!Field1(task, &bytes, &found) || !found) return false;
  }
  return ParseModelSpec(bytes, spec) && !spec->name.empty();
}

// The version in the model_spec (field 2) of the serialized PredictResponse
// `d`, scanning its top-level fields without copying them; false if absent.
bool SpecVersion(const std::string& d, int64_t* version) {
  size_t pos = 0;
  while (pos < d.size()) {
    uint64_t tag, value;
    if (!Varint(d, &pos, &tag)) return false;
    int wire = static_cast<int>(tag & 7);
    if (wire == 0) {
      if (!Varint(d, &pos, &value)) return false;
    } else if (wire == 1 || wire == 5) {
      pos += wire == 1 ? 8 : 4;
    } else if (wire == 2) {
      if (!Varint(d, &pos, &value) || value > d.size() - pos) return false;
      if ((tag >> 3) == 2) {
        Spec spec;
        if (!ParseModelSpec(d.substr(pos, value), &spec) || !spec.has_version) return false;
        *version = spec.version;
        return true;
      }
      pos += value;
    } else {
      return false;
    }
  }
  return false;
}

// The served version in a PredictResponse's model_spec. The model server
// writes model_spec first, so its first bytes usually do; other layouts are
// read whole.
bool ResponseVersion(const grpc::ByteBuffer& response, int64_t* version) {
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return false;
  std::string head;
  for (const auto& slice : slices) {
    head.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
    if (head.size() >= 512) break;
  }
  size_t pos = 0;
  uint64_t tag, len;
  if (Varint(head, &pos, &tag) && tag == ((2 << 3) | 2) && Varint(head, &pos, &len) && len <= head.size() - pos) {
    Spec spec;
    if (!ParseModelSpec(head.substr(pos, len), &spec) || !spec.has_version) return false;
    *version = spec.version;
    return true;
  }
  return SpecVersion(Flatten(response), version);
}

// --- state ------------------------------------------------------------------------

struct Options {
  std::string listen = "127.0.0.1:0", upstream, secret;
  int spin_us = 1000;
  std::string front_for;      // replica front mode: the replica's own address
  uint32_t coalesce_max = 0;  // replica front mode: its ReplicaEndpoint.coalesce_max
  uint64_t max_request_bytes = 64 * 1024 * 1024;  // the largest model call taken at all
  uint32_t batch_timeout_us = 0;  // replica front mode: the replica's batch_timeout_micros
  bool front() const { return !front_for.empty(); }
};

class Call;
class Group;

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
  };
  std::vector<Choice> choices;
  double total_weight = 0;
};

struct Instances {
  std::vector<std::string> addresses;
  size_t next = 0;
};

struct Stat {
  uint64_t count = 0;
  double sum = 0;
  std::vector<uint64_t> buckets;
};

struct Plane {
  Options options;
  grpc::AsyncGenericService service;
  std::unique_ptr<grpc::ServerCompletionQueue> cq;
  std::unique_ptr<grpc::Server> server;
  std::shared_ptr<grpc::Channel> upstream_channel;
  std::unique_ptr<grpc::GenericStub> upstream;
  std::unordered_map<std::string, Backend> backends;
  std::unordered_map<std::string, Decision> cache;
  uint64_t generation = 0;  // 0: no live Attach stream, nothing is cached
  uint64_t epoch = 0;       // generation changes seen (Backend::used)
  std::vector<double> bucket_bounds;
  std::map<std::tuple<std::string, std::string, std::string, std::string>, Stat> stats;
  uint64_t fast_calls = 0, slow_calls = 0, coalesced_calls = 0;
  std::unordered_map<std::string, Instances> services;  // "/pkg.Service/" -> instances
  std::unordered_set<std::string> public_methods;
  std::unordered_map<std::string, double> vouched;  // authorization -> token expiry (this generation)
  std::map<std::tuple<std::string, std::string, std::string>, uint64_t> relays;  // (service, method, code)
  int model_calls_in_flight = 0;  // accepted TF Serving calls not yet finished
  bool stats_dirty = true;
  std::mt19937_64 rng{std::random_device{}()};
  bool stopping = false;

  grpc::ChannelArguments ChannelArgs() {
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
    return args;
  }

  Backend& BackendFor(const std::string& address) {
    auto it = backends.find(address);
    if (it != backends.end()) {
      it->second.used = epoch;
      return it->second;
    }
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
  void Sweep() {
    for (auto it = backends.begin(); it != backends.end();) {
      const Backend& b = it->second;
      if (b.idle() && b.used + 1 < epoch && !InServices(it->first))
        it = backends.erase(it);
      else
        ++it;
    }
  }

  bool InServices(const std::string& address) const {
    for (const auto& [name, in] : services)
      for (const auto& a : in.addresses)
        if (a == address) return true;
    return false;
  }

  // The stub for a platform call's owning service, or the control plane's.
  grpc::GenericStub* RelayStub(const std::string& method, const std::string* auth, bool* direct) {
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

  void SetGeneration(uint64_t g) {
    if (g != generation) {
      cache.clear();
      vouched.clear();
      epoch++;
      Sweep();
    }
    generation = g;
  }

  static double Now() {
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  }

  void Record(const std::string& model, const std::string& version, const std::string& api,
              grpc::StatusCode code, double seconds) {
    Stat& s = stats[{model, version, api, CodeName(code)}];
    if (s.buckets.size() != bucket_bounds.size() + 1) s.buckets.assign(bucket_bounds.size() + 1, 0);
    size_t i = 0;
    while (i < bucket_bounds.size() && seconds > bucket_bounds[i]) i++;
    s.buckets[i]++;
    s.count++;
    s.sum += seconds;
    stats_dirty = true;
  }
};

Plane* g_plane = nullptr;

// Every asynchronous operation's tag: the owner and which of its operations.
struct Handler {
  virtual void Done(int op, bool ok) = 0;
  virtual ~Handler() = default;
};
struct Tag {
  Handler* handler;
  int op;
};

bool HopHeader(const std::string& key) {
  return key.empty() || key[0] == ':' || key.compare(0, 5, "grpc-") == 0 || key == "user-agent" ||
         key == "te" || key == "content-type" || key == "host" || key == "accept-encoding" ||
         key == kSecretHeader || key == kResolvedVersion || key == kDecisionHeader || key == kAuthHeader;
}

// `to_replica`: the caller's token stops here; replicas never see it.
void CopyClientMetadata(const grpc::GenericServerContext& from, grpc::ClientContext* to, bool to_replica) {
  for (const auto& kv : from.client_metadata()) {
    std::string key(kv.first.data(), kv.first.size());
    if (HopHeader(key) || (to_replica && key == "authorization")) continue;
    to->AddMetadata(key, std::string(kv.second.data(), kv.second.size()));
  }
}

void CopyTrailers(const grpc::ClientContext& from, grpc::GenericServerContext* to) {
  for (const auto& kv : from.GetServerTrailingMetadata()) {
    std::string key(kv.first.data(), kv.first.size());
    if (!HopHeader(key)) to->AddTrailingMetadata(key, std::string(kv.second.data(), kv.second.size()));
  }
}

// --- a call on the public port ------------------------------------------------------

// One accepted call. Which way it goes depends on its method, known only once
// accepted: a TF Serving call that reaches replicas (kModel), the control
// plane's own service (kRefused), or anything else, relayed (kRelay).
// The object lives until every operation it started has completed and gRPC
// has reported the call done.
void JoinGroup(const std::string& address, Backend& backend, Call* call);
void FlushGroup(const std::string& address);
void LeaveGroup(Group* group, Call* call);

class Call : public Handler {
 public:
  Call() {
    ctx_.AsyncNotifyWhenDone(&tags_[kDone]);
    g_plane->service.RequestCall(&ctx_, &stream_, g_plane->cq.get(), g_plane->cq.get(), Tag_(kAccept));
  }

  // For coalescing: this waiting Predict call's request, deadline, version and limits.
  const std::string& request_bytes() const { return request_bytes_; }
  std::chrono::system_clock::time_point deadline() const { return ctx_.deadline(); }
  int64_t version() const { return version_; }
  uint32_t coalesce_max() const { return coalesce_max_; }
  uint64_t max_request_bytes() const { return max_request_bytes_; }
  uint32_t batch_timeout_us() const { return batch_timeout_us_; }
  // The group it waits in (nullptr once the group is sent).
  void set_group(Group* group) { group_ = group; }

  // Its caller's metadata as a PredictBatch member's, filtered as
  // CopyClientMetadata does for a replica.
  void MemberMetadata(cloudml::models::v1::PredictMember* member) const {
    for (const auto& kv : ctx_.client_metadata()) {
      std::string key(kv.first.data(), kv.first.size());
      if (HopHeader(key) || key == "authorization") continue;
      auto* entry = member->add_metadata();
      entry->set_key(std::move(key));
      entry->set_value(kv.second.data(), kv.second.size());
    }
  }

  // Its result: from the PredictBatch group it went in, with the trailers
  // the replica set for it, or from the group it never went out in.
  void BatchDone(const grpc::Status& status, const std::string& response,
                 const google::protobuf::RepeatedPtrField<cloudml::models::v1::MetadataEntry>* trailers) {
    group_ = nullptr;
    status_ = status;
    response_ = ToBuffer(response);
    if (trailers)
      for (const auto& t : *trailers)
        if (!HopHeader(t.key())) ctx_.AddTrailingMetadata(t.key(), t.value());
    Done(kBackend, true);
  }

 private:
  enum Op { kAccept, kDone, kRead, kBackend, kFinish, kUpStart, kUpInitial, kUpWrite, kUpWritesDone, kUpRead,
            kUpFinish, kDownInitial, kDownWrite, kOps };
  enum Mode { kModel, kRelay, kRefused };

  Tag* Tag_(Op op) {
    pending_++;
    return &tags_[op];
  }

  void Done(int op, bool ok) override {
    pending_--;
    if (op == kAccept) {
      if (!ok) return;  // the server is shutting down (the process exits: no clean-up)
      new Call();
      started_ = Clock::now();
      Accepted();
    } else if (op == kDone) {
      done_seen_ = true;
      if (ctx_.IsCancelled()) {
        if (client_) client_->TryCancel();
        // Cancelled, or its deadline passed, while it waits for company:
        // out of the group and finished now (BatchDone).
        if (group_) LeaveGroup(group_, this);
      }
    } else if (mode_ == kModel) {
      ModelOp(op, ok);
    } else {
      RelayOp(op, ok);
    }
    if (pending_ == 0 && done_seen_) delete this;
  }

  void Accepted() {
    const std::string& method = ctx_.method();
    if (method.compare(0, sizeof(kDataplaneService) - 1, kDataplaneService) == 0) {
      mode_ = kRefused;
      stream_.Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "Method not found: " + method), Tag_(kFinish));
      return;
    }
    if (method.compare(0, sizeof(kPredictionService) - 1, kPredictionService) == 0) {
      api_ = method.substr(sizeof(kPredictionService) - 1);
      if (api_ == "Predict" || api_ == "Classify" || api_ == "Regress" || api_ == "MultiInference" ||
          api_ == "GetModelMetadata") {
        mode_ = kModel;
        g_plane->model_calls_in_flight++;
        stream_.Read(&request_, Tag_(kRead));
        return;
      }
    }
    mode_ = kRelay;
    NewClient();
    if (!Authorization(&auth_)) auth_.clear();  // several: never vouched for
    grpc::GenericStub* stub = g_plane->RelayStub(method, auth_.empty() ? nullptr : &auth_, &direct_);
    if (!direct_ && !g_plane->options.front()) client_->AddMetadata(kSecretHeader, g_plane->options.secret);
    relay_ = stub->PrepareCall(client_.get(), method, g_plane->cq.get());
    relay_->StartCall(Tag_(kUpStart));
  }

  // The call's `authorization` value ("" without one); false if it has several.
  bool Authorization(std::string* out) const {
    int count = 0;
    for (const auto& kv : ctx_.client_metadata()) {
      if (kv.first == "authorization") {
        out->assign(kv.second.data(), kv.second.size());
        count++;
      }
    }
    return count <= 1;
  }

  void NewClient(bool to_replica = false) {
    client_ = std::make_unique<grpc::ClientContext>();
    client_->set_deadline(ctx_.deadline());
    CopyClientMetadata(ctx_, client_.get(), to_replica);
  }

  // --- kModel ---

  void ModelOp(int op, bool ok) {
    if (op == kRead) {
      if (!ok) {
        stream_.Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the call carried no request message"),
                       Tag_(kFinish));
        return;
      }
      Route();
    } else if (op == kBackend) {
      BackendDone();
    } else if (op == kFinish) {
      g_plane->model_calls_in_flight--;
    }
  }

  // RESOURCE_EXHAUSTED for a request over `limit` bytes; false if it fits.
  bool TooLarge(uint64_t limit) {
    if (!limit || request_bytes_.size() <= limit) return false;
    stream_.Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                api_ + " request of " + std::to_string(request_bytes_.size()) +
                                    " bytes is larger than this model's limit of " + std::to_string(limit) +
                                    " bytes"),
                   Tag_(kFinish));
    return true;
  }

  void Route() {
    Plane& p = *g_plane;
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
    if (!Authorization(&auth)) return Slow();
    key_ = auth;
    key_.append(1, '\0').append(spec.name).append(1, '\0');
    if (spec.has_version) key_.append("v").append(std::to_string(spec.version));
    key_.append(1, '\0').append(spec.label);
    auto it = p.generation ? p.cache.find(key_) : p.cache.end();
    if (it == p.cache.end()) return Slow();
    const Decision& d = it->second;
    if (d.expires_at > 0 && d.expires_at <= Plane::Now()) {
      p.cache.erase(it);
      return Slow();
    }
    const Decision::Choice* choice = &d.choices[0];
    if (d.choices.size() > 1) {  // the traffic split
      double pick = std::uniform_real_distribution<double>(0, d.total_weight)(p.rng);
      for (const auto& c : d.choices) {
        choice = &c;
        if ((pick -= c.weight) <= 0) break;
      }
    }
    version_ = choice->version;
    addresses_ = choice->addresses;
    coalesce_max_ = choice->coalesce_max;
    batch_timeout_us_ = choice->batch_timeout_us;
    if (choice->max_request_bytes) max_request_bytes_ = std::min(max_request_bytes_, choice->max_request_bytes);
    if (TooLarge(max_request_bytes_)) return;
    // The replica resolves this spec to the same version by itself: no
    // routed-version header (see RouteDecision.model); the response's
    // version is checked instead.
    bare_ = api_ == "Predict" && spec.name == d.model && spec.label.empty() &&
            (!spec.has_version || spec.version == version_);
    Fast(Pick(""));
  }

  // Least outstanding requests of two random choices, never `exclude`.
  std::string Pick(const std::string& exclude) {
    std::vector<const std::string*> candidates;
    for (const auto& a : addresses_)
      if (a != exclude) candidates.push_back(&a);
    if (candidates.empty()) return "";
    if (candidates.size() == 1) return *candidates[0];
    std::uniform_int_distribution<size_t> dist(0, candidates.size() - 1);
    size_t i = dist(g_plane->rng), j = dist(g_plane->rng);
    while (j == i) j = dist(g_plane->rng);
    const std::string &a = *candidates[i], &b = *candidates[j];
    return g_plane->BackendFor(a).outstanding <= g_plane->BackendFor(b).outstanding ? a : b;
  }

  void Fast(const std::string& address) {
    g_plane->fast_calls++;
    g_plane->stats_dirty = true;
    fast_ = true;
    address_ = address;
    Backend& backend = g_plane->BackendFor(address);
    backend.outstanding++;
    batched_ = false;
    if (api_ == "Predict" && coalesce_max_ > 1 && backend.rpcs >= kRpcsBeforeCoalescing) {
      pending_++;  // BatchDone completes it
      batched_ = true;
      JoinGroup(address, backend, this);
      return;
    }
    NewClient(true);
    if (api_ == "Predict") backend.rpcs++;
    if (!g_plane->options.front() && !bare_) client_->AddMetadata(kResolvedVersion, std::to_string(version_));
    unary_ = backend.stub->PrepareUnaryCall(client_.get(), ctx_.method(), request_, g_plane->cq.get());
    unary_->StartCall();
    unary_->Finish(&response_, &status_, Tag_(kBackend));
  }

  void Slow() {
    g_plane->slow_calls++;
    g_plane->stats_dirty = true;
    fast_ = false;
    NewClient();
    client_->AddMetadata(kSecretHeader, g_plane->options.secret);
    unary_ = g_plane->upstream->PrepareUnaryCall(client_.get(), ctx_.method(), request_, g_plane->cq.get());
    unary_->StartCall();
    unary_->Finish(&response_, &status_, Tag_(kBackend));
  }

  void BackendDone() {
    Plane& p = *g_plane;
    if (fast_) {
      Backend& backend = p.BackendFor(address_);
      backend.outstanding--;
      if (api_ == "Predict" && !batched_) {
        backend.rpcs--;
        FlushGroup(address_);
      }
      if (status_.error_code() == grpc::StatusCode::UNAVAILABLE && !retried_ && !ctx_.IsCancelled() &&
          !p.options.front()) {
        retried_ = true;
        p.cache.erase(key_);  // the replica set may have changed: ask the control plane next time
        std::string other = Pick(address_);
        return other.empty() ? Slow() : Fast(other);
      }
      int64_t served;
      if (bare_ && !batched_ && status_.ok() && !(ResponseVersion(response_, &served) && served == version_)) {
        // Another version answered (a stale route): the control plane routes it again.
        p.cache.erase(key_);
        return Slow();
      }
      p.Record(model_, std::to_string(version_), api_, status_.error_code(),
               std::chrono::duration<double>(Clock::now() - started_).count());
    } else if (status_.ok() && p.generation && !key_.empty()) {
      Remember();
    }
    if (!batched_) CopyTrailers(*client_, &ctx_);
    if (status_.ok())
      stream_.WriteAndFinish(response_, grpc::WriteOptions(), status_, Tag_(kFinish));
    else
      stream_.Finish(status_, Tag_(kFinish));
  }

  // Caches the control plane's decision for this call's key, if current.
  void Remember() {
    Plane& p = *g_plane;
    for (const auto& kv : client_->GetServerTrailingMetadata()) {
      if (kv.first != kDecisionHeader) continue;
      pb::RouteDecision msg;
      if (!msg.ParseFromArray(kv.second.data(), static_cast<int>(kv.second.size())) ||
          msg.generation() != p.generation)
        return;
      Decision d;
      d.generation = msg.generation();
      d.expires_at = msg.expires_at();
      d.model = msg.model();
      for (const auto& c : msg.choices()) {
        if (c.addresses_size() == 0 || c.weight() <= 0) continue;
        d.choices.push_back({c.version(), c.weight(), {c.addresses().begin(), c.addresses().end()},
                             c.coalesce_max(), c.max_request_bytes(), c.batch_timeout_micros()});
        d.total_weight += c.weight();
      }
      if (p.cache.size() > kCacheLimit) p.cache.clear();
      if (!d.choices.empty()) p.cache[key_] = std::move(d);
      return;
    }
  }

  // --- kRelay: two pumps, caller -> control plane and back ---

  void RelayOp(int op, bool ok) {
    switch (op) {
      case kUpStart:
        if (!ok) return UpFinish();
        stream_.Read(&in_, Tag_(kRead));
        relay_->ReadInitialMetadata(Tag_(kUpInitial));
        return;
      case kRead:
        if (up_finished_) return;
        if (!ok) {
          relay_->WritesDone(Tag_(kUpWritesDone));
          return;
        }
        relay_->Write(in_, Tag_(kUpWrite));
        return;
      case kUpWrite:
        if (ok && !up_finished_) stream_.Read(&in_, Tag_(kRead));
        return;
      case kUpInitial:
        if (!ok) return UpFinish();
        for (const auto& kv : client_->GetServerInitialMetadata()) {
          std::string key(kv.first.data(), kv.first.size());
          if (!HopHeader(key)) ctx_.AddInitialMetadata(key, std::string(kv.second.data(), kv.second.size()));
        }
        stream_.SendInitialMetadata(Tag_(kDownInitial));
        return;
      case kDownInitial:
      case kDownWrite:
        if (!ok) {
          client_->TryCancel();
          return UpFinish();
        }
        relay_->Read(&out_, Tag_(kUpRead));
        return;
      case kUpRead:
        if (!ok) return UpFinish();
        stream_.Write(out_, Tag_(kDownWrite));
        return;
      case kUpFinish:
        if (direct_) {
          const std::string& method = ctx_.method();
          size_t slash = method.find('/', 1);
          g_plane->relays[{method.substr(1, slash - 1), method.substr(slash + 1), CodeName(status_.error_code())}]++;
          g_plane->stats_dirty = true;
        } else {
          Vouched();
        }
        CopyTrailers(*client_, &ctx_);
        stream_.Finish(status_, Tag_(kFinish));
        return;
      default:
        return;
    }
  }

  // Remembers the control plane's AuthDecision for this call's authorization.
  void Vouched() {
    Plane& p = *g_plane;
    for (const auto& kv : client_->GetServerTrailingMetadata()) {
      if (kv.first != kAuthHeader) continue;
      pb::AuthDecision msg;
      if (!auth_.empty() && p.generation &&
          msg.ParseFromArray(kv.second.data(), static_cast<int>(kv.second.size())) &&
          msg.generation() == p.generation)
        p.vouched[auth_] = msg.expires_at();
      if (p.vouched.size() > kCacheLimit) p.vouched.clear();
      return;
    }
  }

  void UpFinish() {
    up_finished_ = true;
    relay_->Finish(&status_, Tag_(kUpFinish));
  }

  grpc::GenericServerContext ctx_;
  grpc::GenericServerAsyncReaderWriter stream_{&ctx_};
  Tag tags_[kOps] = {{this, kAccept}, {this, kDone}, {this, kRead}, {this, kBackend}, {this, kFinish},
                     {this, kUpStart}, {this, kUpInitial}, {this, kUpWrite}, {this, kUpWritesDone},
                     {this, kUpRead}, {this, kUpFinish}, {this, kDownInitial}, {this, kDownWrite}};
  int pending_ = 1;  // the done notification
  bool done_seen_ = false;
  Mode mode_ = kRelay;
  Clock::time_point started_;
  std::unique_ptr<grpc::ClientContext> client_;
  grpc::Status status_;
  // kModel
  std::string api_, key_, model_, address_;
  std::vector<std::string> addresses_;
  int64_t version_ = 0;
  uint32_t coalesce_max_ = 0;
  uint32_t batch_timeout_us_ = 0;   // how long it may wait for company
  uint64_t max_request_bytes_ = 0;  // this call's limit; also its PredictBatch group's
  Group* group_ = nullptr;          // the group it waits in, not sent yet
  std::string request_bytes_;
  bool fast_ = false, retried_ = false, batched_ = false;
  bool bare_ = false;  // sent without the routed-version header (see Route)
  grpc::ByteBuffer request_, response_;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> unary_;
  // kRelay
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> relay_;
  grpc::ByteBuffer in_, out_;
  bool up_finished_ = false, direct_ = false;
  std::string auth_;
};

// Predict calls to one replica that wait together, then go as one
// PredictBatch call. A group opens when a call finds another call in flight to
// the replica (Backend::open), and is sent at the first of: its batch timeout
// after it opened (an alarm), coalesce_max members, the next byte over the
// replica's max_request_bytes, or the return of any call to the replica. So a
// call waits at most the batch timeout for company, never for a call to
// finish: any number of groups may be in flight to one replica. Each is
// either full or has waited out the timeout the replica would have made its
// calls wait anyway, and the replica's own batch queue (max_enqueued_batches)
// bounds what it takes, as it does for direct callers.
class Group : public Handler {
 public:
  Group(const std::string& address, const Call& first) : address_(address), coalesce_max_(first.coalesce_max()),
      limit_(first.max_request_bytes()), version_(first.version()) {
    pending_++;
    alarm_.Set(g_plane->cq.get(), std::chrono::system_clock::now() + std::chrono::microseconds(first.batch_timeout_us()),
               &tags_[kTimer]);
  }

  bool Fits(const Call& call) const {
    if (members_.size() >= std::max<uint32_t>(1, coalesce_max_)) return false;
    return !limit_ || bytes_ + call.request_bytes().size() <= limit_;
  }
  bool Full() const { return members_.size() >= std::max<uint32_t>(1, coalesce_max_); }

  void Add(Call* call) {
    members_.push_back(call);
    bytes_ += call->request_bytes().size();
    call->set_group(this);
  }

  // A waiting member's caller went away: it is finished at once, never sent.
  void Leave(Call* call) {
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

  // Sends the group: members whose deadline has passed are answered
  // DEADLINE_EXCEEDED instead; each other member carries the time its caller
  // has left and its caller's metadata. The call's deadline is the latest.
  void Send() {
    Close();
    Plane& p = *g_plane;
    auto now = std::chrono::system_clock::now();
    std::vector<Call*> members;
    members.swap(members_);
    cloudml::models::v1::PredictBatchRequest request;
    request.set_resolved_version(version_);
    auto deadline = now;
    for (Call* m : members) {
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
    p.coalesced_calls += members_.size();
    p.stats_dirty = true;
    ctx_.set_deadline(deadline);
    Backend& backend = p.BackendFor(address_);
    backend.rpcs++;
    pending_++;
    rpc_ = backend.stub->PrepareUnaryCall(&ctx_, kPredictBatch, ToBuffer(request.SerializeAsString()), p.cq.get());
    rpc_->StartCall();
    rpc_->Finish(&response_, &status_, &tags_[kRpc]);
  }

  void Done(int op, bool ok) override {
    pending_--;
    if (op == kTimer) {
      if (ok && open_) Send();
    } else {
      Answer();
      FlushGroup(address_);
    }
    if (pending_ == 0) delete this;
  }

 private:
  enum Op { kTimer, kRpc };

  // No longer takes members (sent, or every member left).
  void Close() {
    if (!open_) return;
    open_ = false;
    Backend& backend = g_plane->BackendFor(address_);
    if (backend.open == this) backend.open = nullptr;
    alarm_.Cancel();
  }

  void Answer() {
    g_plane->BackendFor(address_).rpcs--;
    cloudml::models::v1::PredictBatchResponse response;
    bool parsed = status_.ok() && response.ParseFromString(Flatten(response_)) &&
                  response.results_size() == static_cast<int>(members_.size());
    for (size_t i = 0; i < members_.size(); i++) {
      if (parsed) {
        const auto& r = response.results(static_cast<int>(i));
        members_[i]->BatchDone(grpc::Status(static_cast<grpc::StatusCode>(r.code()), r.message()), r.response(),
                               &r.trailers());
      } else {
        members_[i]->BatchDone(
            status_.ok() ? grpc::Status(grpc::StatusCode::INTERNAL, "malformed PredictBatch response") : status_, "",
            nullptr);
      }
    }
    members_.clear();
  }

  std::string address_;
  uint32_t coalesce_max_;
  uint64_t limit_, bytes_ = 0;
  int64_t version_;
  std::vector<Call*> members_;  // waiting while open_, then the ones sent
  bool open_ = true;
  int pending_ = 0;
  grpc::Alarm alarm_;
  grpc::ClientContext ctx_;
  grpc::ByteBuffer response_;
  grpc::Status status_;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> rpc_;
  Tag tags_[2] = {{this, kTimer}, {this, kRpc}};
};

// A Predict call that waits for company: into the replica's open group (a
// new one if there is none or it cannot take the call), sent once full.
void JoinGroup(const std::string& address, Backend& backend, Call* call) {
  if (backend.open && !backend.open->Fits(*call)) backend.open->Send();
  if (!backend.open) backend.open = new Group(address, *call);
  Group* group = backend.open;
  group->Add(call);
  if (group->Full()) group->Send();
}

// A call to the replica returned: its waiting group goes now.
void FlushGroup(const std::string& address) {
  Backend& backend = g_plane->BackendFor(address);
  if (backend.open) backend.open->Send();
}

void LeaveGroup(Group* group, Call* call) { group->Leave(call); }

// --- the Attach stream to the control plane ------------------------------------------

// Keeps one Attach call open: reads generations, writes a report each second.
// When the stream breaks, nothing is cached (generation 0) until it is back.
class Attachment : public Handler {
 public:
  void Connect() {
    client_ = std::make_unique<grpc::ClientContext>();
    client_->AddMetadata(kSecretHeader, g_plane->options.secret);
    stream_ = g_plane->upstream->PrepareCall(client_.get(), kAttach, g_plane->cq.get());
    live_ = true;
    writing_ = false;
    pending_++;
    stream_->StartCall(&tags_[kStart]);
  }

  // Ends the stream for good (the process is stopping).
  void Stop() {
    if (live_) Broken();
    alarm_.Cancel();
  }

  void Done(int op, bool ok) override {
    pending_--;
    Plane& p = *g_plane;
    if (!live_) {  // the old stream draining, or the wait before reconnecting
      if (pending_ == 0 && !p.stopping) {
        if (op == kTimer && reconnect_armed_) {
          reconnect_armed_ = false;
          Connect();
        } else {
          reconnect_armed_ = true;
          Arm(std::chrono::milliseconds(200));
        }
      }
      return;
    }
    switch (op) {
      case kStart:
        if (!ok) return Broken();
        pending_++;
        stream_->Read(&in_, &tags_[kRead]);
        Tick();
        return;
      case kRead: {
        if (!ok) return Broken();
        pb::DataplaneControl control;
        if (control.ParseFromString(Flatten(in_))) {
          if (control.latency_buckets_size() > 0 && p.bucket_bounds.empty())
            p.bucket_bounds.assign(control.latency_buckets().begin(), control.latency_buckets().end());
          p.SetGeneration(control.generation());
          std::unordered_map<std::string, Instances> services;
          for (const auto& s : control.services()) {
            Instances& in = services["/" + s.service() + "/"];
            in.addresses.assign(s.addresses().begin(), s.addresses().end());
            auto old = p.services.find("/" + s.service() + "/");
            if (old != p.services.end()) in.next = old->second.next;
          }
          p.services = std::move(services);
          p.public_methods = {control.public_methods().begin(), control.public_methods().end()};
        }
        pending_++;
        stream_->Read(&in_, &tags_[kRead]);
        return;
      }
      case kWrite:
        writing_ = false;
        if (!ok) return Broken();
        return;
      case kTimer:
        Tick();
        return;
      default:
        return;
    }
  }

 private:
  enum Op { kStart, kRead, kWrite, kTimer, kFinish };

  void Tick() {
    Plane& p = *g_plane;
    if (!writing_ && p.stats_dirty) {
      pb::DataplaneReport report;
      report.set_fast_path_calls(p.fast_calls);
      report.set_slow_path_calls(p.slow_calls);
      report.set_coalesced_calls(p.coalesced_calls);
      for (const auto& [key, s] : p.stats) {
        auto* stat = report.add_stats();
        stat->set_model(std::get<0>(key));
        stat->set_version(std::get<1>(key));
        stat->set_api(std::get<2>(key));
        stat->set_code(std::get<3>(key));
        stat->set_count(s.count);
        stat->set_latency_sum_seconds(s.sum);
        for (auto b : s.buckets) stat->add_latency_buckets(b);
      }
      for (const auto& [key, count] : p.relays) {
        auto* relay = report.add_relays();
        relay->set_service(std::get<0>(key));
        relay->set_method(std::get<1>(key));
        relay->set_code(std::get<2>(key));
        relay->set_count(count);
      }
      out_ = ToBuffer(report.SerializeAsString());
      p.stats_dirty = false;
      writing_ = true;
      pending_++;
      stream_->Write(out_, &tags_[kWrite]);
    }
    Arm(std::chrono::milliseconds(1000));
  }

  void Arm(std::chrono::milliseconds after) {
    pending_++;
    alarm_.Set(g_plane->cq.get(), std::chrono::system_clock::now() + after, &tags_[kTimer]);
  }

  // Stops caching, ends the old stream; Done() reconnects once it has drained.
  void Broken() {
    Plane& p = *g_plane;
    live_ = false;
    p.SetGeneration(0);
    p.services.clear();
    p.stats_dirty = true;
    if (!p.stopping) fprintf(stderr, "dataplane: control stream lost; reconnecting\n");
    client_->TryCancel();
    alarm_.Cancel();
    pending_++;
    stream_->Finish(&status_, &tags_[kFinish]);
  }

  Tag tags_[5] = {{this, kStart}, {this, kRead}, {this, kWrite}, {this, kTimer}, {this, kFinish}};
  std::unique_ptr<grpc::ClientContext> client_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> stream_;
  grpc::ByteBuffer in_, out_;
  grpc::Status status_;
  grpc::Alarm alarm_;
  int pending_ = 0;
  bool live_ = false, writing_ = false, reconnect_armed_ = false;
};

std::atomic<bool> g_signalled{false};

void OnSignal(int) { g_signalled = true; }

bool ParseArgs(int argc, char** argv, Options* o) {
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--listen") o->listen = value;
    else if (flag == "--upstream") o->upstream = value;
    else if (flag == "--spin-us") o->spin_us = atoi(value.c_str());
    else if (flag == "--front-for") o->front_for = value;
    else if (flag == "--coalesce-max") o->coalesce_max = static_cast<uint32_t>(atoi(value.c_str()));
    else if (flag == "--max-request-bytes") o->max_request_bytes = strtoull(value.c_str(), nullptr, 10);
    else if (flag == "--batch-timeout-us") o->batch_timeout_us = static_cast<uint32_t>(atoi(value.c_str()));
    else return false;
  }
  const char* secret = getenv("CLOUDML_DATAPLANE_SECRET");
  if (secret) o->secret = secret;
  if (argc % 2 != 1) return false;
  if (o->front()) return o->upstream.empty();
  return !o->upstream.empty() && !o->secret.empty();
}

}  // namespace

int main(int argc, char** argv) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);  // dies with the gateway that started it
  // Debian builds abseil without NDEBUG, which leaves absl::Mutex's deadlock
  // detection on: a graph update on every lock gRPC takes (~10% of this
  // process's CPU in a profile). gRPC's own tests run without it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  Plane plane;
  g_plane = &plane;
  if (!ParseArgs(argc, argv, &plane.options)) {
    fprintf(stderr,
            "usage: %s --listen HOST:PORT --upstream HOST:PORT [--spin-us N]\n"
            "  (and the control plane's secret in CLOUDML_DATAPLANE_SECRET)\n"
            "   or: %s --listen HOST:PORT --front-for HOST:PORT --coalesce-max N [--batch-timeout-us N]\n"
            "       [--spin-us N] [--max-request-bytes N]\n",
            argv[0], argv[0]);
    return 2;
  }
  signal(SIGTERM, OnSignal);
  signal(SIGINT, OnSignal);

  // In front mode the replica is the "upstream" that every non-model call is relayed to.
  const std::string& upstream = plane.options.front() ? plane.options.front_for : plane.options.upstream;
  plane.upstream_channel = grpc::CreateCustomChannel(upstream, grpc::InsecureChannelCredentials(),
                                                     plane.ChannelArgs());
  plane.upstream = std::make_unique<grpc::GenericStub>(plane.upstream_channel);

  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(plane.options.listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterAsyncGenericService(&plane.service);
  // Platform calls keep their 64 MiB; model calls are held to
  // --max-request-bytes (and their model's limit) in Call::Route.
  builder.SetMaxReceiveMessageSize(static_cast<int>(std::min<uint64_t>(
      std::max<uint64_t>(kMaxMessage, plane.options.max_request_bytes), INT32_MAX)));
  builder.SetMaxSendMessageSize(kMaxMessage);
  plane.cq = builder.AddCompletionQueue();
  plane.server = builder.BuildAndStart();
  if (!plane.server || port == 0) {
    fprintf(stderr, "dataplane: cannot listen on %s\n", plane.options.listen.c_str());
    return 1;
  }
  printf("%d\n", port);
  fflush(stdout);

  for (int i = 0; i < 32; i++) new Call();
  Attachment attachment;
  if (!plane.options.front()) attachment.Connect();

  // The loop: spin briefly after each event, then block (waking every 100 ms
  // to notice a signal).
  const auto spin = std::chrono::microseconds(plane.options.spin_us);
  auto last_event = Clock::now();
  std::thread stopper;
  void* tag;
  bool ok;
  for (;;) {
    if (g_signalled && !plane.stopping) {
      plane.stopping = true;
      if (!plane.options.front()) attachment.Stop();
      // Drain: in-flight calls finish within the grace period while this
      // thread keeps driving the queue.
      stopper = std::thread([&plane] {
        plane.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
        plane.cq->Shutdown();
      });
    }
    bool spinning = Clock::now() - last_event < spin && plane.model_calls_in_flight <= kSpinMaxInFlight;
    gpr_timespec deadline = spinning ? gpr_time_0(GPR_CLOCK_MONOTONIC)
                                     : gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(100, GPR_TIMESPAN));
    auto status = plane.cq->AsyncNext(&tag, &ok, deadline);
    if (status == grpc::CompletionQueue::SHUTDOWN) break;
    // A poll that found nothing gives the core to any other runnable thread.
    if (spinning && status == grpc::CompletionQueue::TIMEOUT) sched_yield();
    if (status == grpc::CompletionQueue::GOT_EVENT) {
      auto* t = static_cast<Tag*>(tag);
      t->handler->Done(t->op, ok);
      last_event = Clock::now();
    }
  }
  if (stopper.joinable()) stopper.join();
  return 0;
}
