// See h2front.h. One epoll loop; every socket non-blocking; nghttp2 sessions
// driven by mem_recv/mem_send. A caller's stream and the upstream stream it
// became share one Exchange, which lives until both have closed.
#include "h2front.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <random>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "cloudml/internal/v1/replica.pb.h"
#include "metadata.h"
#include "picking.h"
#include "plane.h"
#include "protocol.h"
#include "exchange.h"
#include "frame.h"
#include "rest.h"
#include "wire.h"

namespace cloudml::dataplane {

// One HTTP/2 connection: a caller's (server) or one upstream (client); or a
// replica's framed socket (frame.h: `framed`, no HTTP/2 session).
struct Conn {
  H2Front::Impl* front = nullptr;
  int fd = -1;
  bool server = false;
  nghttp2_session* session = nullptr;
  bool framed = false;
  std::string in;  // framed: what the replica sent that is not a whole frame yet
  std::unordered_map<uint64_t, Exchange*> calls;  // framed: by frame id
  std::unordered_map<uint64_t, FrameGroup*> groups;  // framed: coalesced groups sent, by frame id
  uint64_t next_id = 1;
  std::string out;
  size_t out_off = 0;
  bool connecting = false, dead = false, want_out = false;
  std::string address;  // upstream: where it goes
  std::unordered_set<Exchange*> exchanges;
  size_t whole_bytes = 0;  // a caller's: bytes of model calls read whole, not yet ended (kMaxWholeBytes)
  uint64_t used = 0;  // Plane::epoch when a stream last opened on it
};

// Predict calls to one batching replica that go as one kPredictBatch CALL
// (frame.h): waiting (open, `conn` null) or sent.
struct FrameGroup {
  std::string address, frame;  // the replica's gRPC address (outstanding's key) and framed socket
  int64_t version = 0;
  uint32_t coalesce_max = 0;
  uint64_t limit = 0, bytes = 0;
  Clock::time_point due;           // sent by then at the latest (its batch timeout)
  std::vector<Exchange*> members;  // once sent, nullptr for a member whose caller left
  Conn* conn = nullptr;
  uint64_t id = 0;
};

namespace {

constexpr int32_t kWindow = 1 << 20;            // per stream, both directions
constexpr int32_t kConnectionWindow = 16 << 20;  // per connection
constexpr uint32_t kMaxStreams = 4096;           // a caller's concurrent streams
// Model calls are read whole before they are routed (and their bytes given
// back to flow control as they come): at most this much per caller
// connection; past it, its calls are relayed as they come (gRPC's side and
// its limits take them).
constexpr size_t kMaxWholeBytes = 256 << 20;
// A caller's headers (metadata) per call: more resets the stream (gRPC's own
// servers refuse past 8-16 KiB by default).
constexpr size_t kMaxHeaderBytes = 64 << 10;
constexpr int kLoopMs = 1000;                    // the longest the loop sleeps
// What replicas see as the caller (gRPC's own relays say "grpc-c++/...").
constexpr char kAgent[] = "cloudml-dataplane-h2 (nghttp2)";
// The upstreams key of a replica's framed socket ("unix:PATH" behind it).
constexpr char kFramedScheme[] = "frame:";


std::vector<nghttp2_nv> Nva(const std::vector<Nv>& headers) {
  std::vector<nghttp2_nv> nva;
  nva.reserve(headers.size());
  for (const auto& h : headers)
    nva.push_back({reinterpret_cast<uint8_t*>(const_cast<char*>(h.name.data())),
                   reinterpret_cast<uint8_t*>(const_cast<char*>(h.value.data())), h.name.size(), h.value.size(),
                   NGHTTP2_NV_FLAG_NONE});
  return nva;
}

const std::string* Find(const std::vector<Nv>& headers, const char* name) {
  for (const auto& h : headers)
    if (h.name == name) return &h.value;
  return nullptr;
}

// Drops the part of a relayed buffer already sent on, once it is most of it
// (a stream's buffer then holds at most about its flow-control window).
void Compact(std::string* buffer, size_t* sent) {
  if (*sent == buffer->size()) {
    buffer->clear();
    *sent = 0;
  } else if (*sent > (64 << 10) && *sent * 2 > buffer->size()) {
    buffer->erase(0, *sent);
    *sent = 0;
  }
}

// A grpc-timeout value ("<digits><unit>", unit one of H M S m u n) as a
// duration; false if malformed.
bool ParseTimeout(const std::string& v, std::chrono::nanoseconds* out) {
  if (v.size() < 2 || v.size() > 9) return false;
  int64_t n = 0;
  for (size_t i = 0; i + 1 < v.size(); i++) {
    if (v[i] < '0' || v[i] > '9') return false;
    n = n * 10 + (v[i] - '0');
  }
  using namespace std::chrono;
  switch (v.back()) {
    case 'H': *out = hours(n); return true;
    case 'M': *out = minutes(n); return true;
    case 'S': *out = seconds(n); return true;
    case 'm': *out = milliseconds(n); return true;
    case 'u': *out = microseconds(n); return true;
    case 'n': *out = nanoseconds(n); return true;
    default: return false;
  }
}

bool IsForwarded(const std::string& path, std::string* api) {
  size_t n = strlen(kPredictionService);
  if (path.compare(0, n, kPredictionService) != 0) return false;
  std::string method = path.substr(n);
  for (const char* m : kForwardedMethods)
    if (method == m) {
      *api = method;
      return true;
    }
  return false;
}

}  // namespace

struct H2Front::Impl : RestHost {
  Plane& plane;
  const std::string& internal;  // Options::internal, set before Listen
  int epoll = -1, listener = -1;
  std::string listen_path;  // the listener's socket file, on a unix: address
  std::atomic<bool> stopping{false};
  int wake[2] = {-1, -1};
  std::unordered_map<int, Conn*> conns;
  std::unordered_map<std::string, Conn*> upstreams;  // the current connection per address
  std::unordered_map<std::string, int> outstanding;  // fast calls per replica address
  std::unordered_set<Conn*> dirty;
  std::vector<Conn*> graveyard;
  std::mt19937_64 rng{std::random_device{}()};
  uint64_t epoch = 0;  // Plane::epochs, as last seen
  nghttp2_session_callbacks* server_callbacks = nullptr;
  nghttp2_session_callbacks* client_callbacks = nullptr;
  nghttp2_option* option = nullptr;
  std::unique_ptr<RestFront> rest;  // the REST port's (rest.h), if this process owns it
  ListenerPause pause;              // the listener's, while descriptors run out
  // Coalescing for batching replicas' framed sockets: the group waiting per
  // replica address, their Predict calls and groups in flight, and a timer
  // armed to the earliest waiting group's due time.
  std::unordered_map<std::string, FrameGroup*> open_groups;
  std::unordered_map<std::string, int> batch_rpcs;
  int timer = -1;
  Clock::time_point armed = Clock::time_point::max();

  explicit Impl(Plane& p) : plane(p), internal(p.options.internal) {}

  // --- RestHost ---

  int Epoll() override { return epoll; }
  int Outstanding(const std::string& address) override { return outstanding[address]; }
  const std::string& GrpcSide() override { return internal; }
  std::mt19937_64& Rng() override { return rng; }
  void Cancel(Exchange* x) override {
    if (x->group) return LeaveGroup(x);
    if (x->up && x->up->framed) return CancelFramed(x);
    if (x->up && !x->response_ended) {
      nghttp2_submit_rst_stream(x->up->session, NGHTTP2_FLAG_NONE, x->up_id, NGHTTP2_CANCEL);
      dirty.insert(x->up);
    }
  }

  // --- sockets ---

  void Watch(Conn* c) {
    epoll_event ev{};
    ev.events = EPOLLIN | (c->want_out ? EPOLLOUT : 0);
    ev.data.ptr = c;
    epoll_ctl(epoll, EPOLL_CTL_MOD, c->fd, &ev);
  }

  Conn* Add(int fd, bool server, const std::string& address) {
    auto* c = new Conn();
    c->front = this;
    c->fd = fd;
    c->server = server;
    c->address = address;
    c->framed = address.compare(0, strlen(kFramedScheme), kFramedScheme) == 0;
    if (!c->framed) {
      if (server)
        nghttp2_session_server_new2(&c->session, server_callbacks, c, option);
      else
        nghttp2_session_client_new2(&c->session, client_callbacks, c, option);
      nghttp2_settings_entry settings[] = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, kMaxStreams},
                                           {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, kWindow},
                                           {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, kMaxHeaderBytes},
                                           {NGHTTP2_SETTINGS_ENABLE_PUSH, 0}};
      nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, settings, server ? 3 : 4);
      nghttp2_session_set_local_window_size(c->session, NGHTTP2_FLAG_NONE, 0, kConnectionWindow);
    }
    conns[fd] = c;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT;
    ev.data.ptr = c;
    c->want_out = true;
    epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &ev);
    dirty.insert(c);
    return c;
  }

  // A connection to `address` ("unix:PATH" or "HOST:PORT"; "frame:unix:PATH"
  // a replica's framed socket); nullptr if it cannot start.
  Conn* Connect(const std::string& address) {
    int fd;
    bool connecting = false;
    bool framed = address.compare(0, strlen(kFramedScheme), kFramedScheme) == 0;
    std::string target = framed ? address.substr(strlen(kFramedScheme)) : address;
    if (framed && target.compare(0, 5, "unix:") != 0) return nullptr;
    if (target.compare(0, 5, "unix:") == 0) {
      sockaddr_un sa{};
      sa.sun_family = AF_UNIX;
      std::string path = target.substr(5);
      if (path.size() >= sizeof(sa.sun_path)) return nullptr;
      memcpy(sa.sun_path, path.data(), path.size());
      fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (fd < 0) return nullptr;
      if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) < 0) {
        close(fd);
        return nullptr;
      }
    } else {
      std::string hostport = address.compare(0, 5, "ipv4:") == 0 ? address.substr(5) : address;
      size_t colon = hostport.rfind(':');
      if (colon == std::string::npos) return nullptr;
      std::string host = hostport.substr(0, colon), port = hostport.substr(colon + 1);
      if (host == "localhost") host = "127.0.0.1";
      sockaddr_in sa{};
      sa.sin_family = AF_INET;
      sa.sin_port = htons(static_cast<uint16_t>(atoi(port.c_str())));
      if (inet_pton(AF_INET, host.c_str(), &sa.sin_addr) != 1) return nullptr;  // the slow path copes
      fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (fd < 0) return nullptr;
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) < 0) {
        if (errno != EINPROGRESS) {
          close(fd);
          return nullptr;
        }
        connecting = true;
      }
    }
    Conn* c = Add(fd, false, address);
    c->connecting = connecting;
    return c;
  }

  Conn* Upstream(const std::string& address) {
    auto it = upstreams.find(address);
    if (it != upstreams.end()) {
      Conn* c = it->second;
      if (!c->dead && (c->framed || nghttp2_session_check_request_allowed(c->session))) return c;
      upstreams.erase(it);  // it drains its streams, then closes
    }
    Conn* c = Connect(address);
    if (c) upstreams[address] = c;
    return c;
  }

  void Kill(Conn* c) {
    if (c->dead) return;
    c->dead = true;
    auto it = upstreams.find(c->address);
    if (!c->server && it != upstreams.end() && it->second == c) upstreams.erase(it);
    epoll_ctl(epoll, EPOLL_CTL_DEL, c->fd, nullptr);
    conns.erase(c->fd);
    close(c->fd);
    // Its sent groups: each member ends as a broken call (below), the groups here.
    std::vector<std::string> flush;
    for (auto& [id, g] : c->groups) {
      for (Exchange* m : g->members)
        if (m) m->group = nullptr;
      batch_rpcs[g->address]--;
      flush.push_back(g->address);
      delete g;
    }
    c->groups.clear();
    // Its streams end as if reset.
    std::vector<Exchange*> xs(c->exchanges.begin(), c->exchanges.end());
    for (Exchange* x : xs) {
      if (c->server)
        DownClosed(x, NGHTTP2_CANCEL);
      else
        UpClosed(x, NGHTTP2_INTERNAL_ERROR);
    }
    for (const auto& address : flush) FlushOpen(address);
    graveyard.push_back(c);
  }

  void Readable(Conn* c) {
    uint8_t buf[65536];
    for (int i = 0; i < 16 && !c->dead; i++) {
      ssize_t n = read(c->fd, buf, sizeof(buf));
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return Kill(c);
      if (n < 0) break;
      if (c->framed) {
        c->in.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
        if (!FramedReplies(c)) return Kill(c);
        if (n < static_cast<ssize_t>(sizeof(buf))) break;
        continue;
      }
      if (nghttp2_session_mem_recv(c->session, buf, static_cast<size_t>(n)) < 0) return Kill(c);
      dirty.insert(c);
      if (n < static_cast<ssize_t>(sizeof(buf))) break;
    }
  }

  // Writes what the session has to send: every frame it has queued in one
  // write where the socket takes it (a reply's HEADERS, DATA and trailers
  // would otherwise cost a system call each).
  void Flush(Conn* c) {
    if (c->dead || c->connecting) return;
    for (;;) {
      Compact(&c->out, &c->out_off);
      // Some frames are queued by callbacks of the writes themselves: loop until nothing is left.
      for (; !c->framed;) {
        const uint8_t* data;
        ssize_t n = nghttp2_session_mem_send(c->session, &data);
        if (n < 0) return Kill(c);
        if (n == 0) break;
        c->out.append(reinterpret_cast<const char*>(data), static_cast<size_t>(n));
        if (c->out.size() - c->out_off > (1 << 20)) break;  // the rest once this is out
      }
      if (c->out_off == c->out.size()) break;
      ssize_t w = send(c->fd, c->out.data() + c->out_off, c->out.size() - c->out_off, MSG_NOSIGNAL);
      if (w < 0 && errno != EAGAIN && errno != EINTR) return Kill(c);
      if (w > 0) c->out_off += static_cast<size_t>(w);
      if (c->out_off < c->out.size()) break;  // the socket is full: EPOLLOUT
      c->out.clear();
      c->out_off = 0;
    }
    bool want_out = c->out_off < c->out.size();
    if (want_out != c->want_out) {
      c->want_out = want_out;
      Watch(c);
    }
    if (!c->framed && !want_out && !nghttp2_session_want_read(c->session) && !nghttp2_session_want_write(c->session))
      Kill(c);
  }

  // --- streams ---

  void Attach(Exchange* x, Conn* c, int32_t id) {
    x->up = c;
    x->up_id = id;
    c->exchanges.insert(x);
    c->used = epoch;
  }

  void MaybeDelete(Exchange* x) {
    if (!x->down && !x->up && !x->rest) delete x;
  }

  // The request's headers are in.
  void RequestHeaders(Exchange* x) {
    x->started = Clock::now();
    std::chrono::nanoseconds timeout;
    const std::string* grpc_timeout = Find(x->request_headers, "grpc-timeout");
    if (grpc_timeout && ParseTimeout(*grpc_timeout, &timeout)) x->deadline = x->started + timeout;
    const std::string* path = Find(x->request_headers, ":path");
    x->path = path ? *path : "";
    const std::string* encoding = Find(x->request_headers, "grpc-encoding");
    x->whole = IsForwarded(x->path, &x->api) && (!encoding || *encoding == "identity");
    if (!x->whole) Relay(x);
  }

  void RequestData(Exchange* x, const uint8_t* data, size_t len) {
    x->body.append(reinterpret_cast<const char*>(data), len);
    if (x->whole) {
      nghttp2_session_consume(x->down->session, x->down_id, len);
      x->charged += len;
      x->down->whole_bytes += len;
      // Larger than any model call is allowed to be (the gRPC side answers
      // it), or more than a connection may hold read whole.
      if (x->body.size() > plane.options.max_request_bytes + 5 || x->down->whole_bytes > kMaxWholeBytes) {
        x->whole = false;
        Relay(x);
      }
      return;
    }
    x->down_unconsumed += len;
    if (x->up) nghttp2_session_resume_data(x->up->session, x->up_id), dirty.insert(x->up);
  }

  void RequestEnded(Exchange* x) {
    x->request_ended = true;
    if (x->whole) return Route(x);
    if (x->up) nghttp2_session_resume_data(x->up->session, x->up_id), dirty.insert(x->up);
  }

  // A model call read whole: straight to a replica if its route is cached.
  void Route(Exchange* x) {
    // One uncompressed message: the 5-byte gRPC prefix, then the request.
    if (x->body.size() < 5 || x->body[0] != 0) return Relay(x);
    uint32_t len = (uint8_t(x->body[1]) << 24) | (uint8_t(x->body[2]) << 16) | (uint8_t(x->body[3]) << 8) |
                   uint8_t(x->body[4]);
    if (len != x->body.size() - 5) return Relay(x);
    if (plane.options.front()) {
      // A replica's front: every model call straight to it (a batching
      // replica's Predict calls coalesced over its framed socket); it checks
      // the model_spec itself.
      x->bare = true;
      x->frame = plane.options.front_frame;
      x->coalesce_max = plane.options.coalesce_max;
      x->batch_timeout_us = plane.options.batch_timeout_us;
      x->limit = plane.options.max_request_bytes;
      return Fast(x, plane.options.front_for);
    }
    std::string request = x->body.substr(5);
    Spec spec;
    if (!ParseSpec(x->api, request, &spec)) return Relay(x);
    std::string auth;
    int auths = 0;
    for (const auto& h : x->request_headers)
      if (h.name == kAuthorization) auth = h.value, auths++;
    if (auths > 1) return Relay(x);
    x->key = CacheKey(auth, spec);
    FastRoute r;
    if (!plane.Lookup(x->key, spec, x->api, rng, &r)) return Relay(x);
    uint64_t limit = plane.options.max_request_bytes;
    if (r.max_request_bytes) limit = std::min(limit, r.max_request_bytes);
    if (request.size() > limit) return Relay(x);  // the gRPC side answers RESOURCE_EXHAUSTED
    x->model = spec.name;
    x->version = r.version;
    x->bare = r.bare;
    std::vector<const std::string*> candidates;
    for (const auto& a : r.addresses) candidates.push_back(&a);
    const std::string* picked = PickTwo(
        candidates, [this](size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng); },
        [this](const std::string& a) { return outstanding[a]; });
    if (!picked) return Relay(x);
    x->frame = FrameOf(r.addresses, r.frames, picked);
    if (r.coalesce_max > 1) {
      // A batching replica: coalesced here over its framed socket, else by the gRPC side.
      if (x->frame.empty() || !plane.options.frames) return Relay(x);
      x->coalesce_max = r.coalesce_max;
      x->batch_timeout_us = r.batch_timeout_us;
      x->limit = limit;
    }
    Fast(x, *picked);
  }

  void Fast(Exchange* x, const std::string& address) override {
    if (!x->frame.empty() && plane.options.frames && !x->to_grpc_side) {
      if (x->coalesce_max > 1 && x->api == "Predict") {
        if (Coalesce(x, address)) return;
        // Its framed socket cannot be reached: the gRPC side coalesces it.
        if (!x->key.empty()) plane.Forget(x->key);
        return x->rest ? rest->Slow(x) : Relay(x);
      }
      if (Framed(x, address)) return;
    }
    Conn* c = Upstream(address);
    if (!c) {
      if (!x->key.empty()) plane.Forget(x->key);
      return x->rest ? rest->Slow(x) : Relay(x);
    }
    std::vector<Nv> headers = {{":method", "POST"}, {":scheme", "http"}, {":path", x->path},
                               {":authority", "cloudml"}, {kContentType, "application/grpc"},
                               {kTe, "trailers"}, {kUserAgent, kAgent}};
    if (x->deadline != Clock::time_point::max()) {
      // The time left now (reading the request took some), never what has passed.
      auto left = TimeLeft(x);
      if (left <= 0) return Answer(x, 4, "Deadline Exceeded");
      // At most 8 digits (gRPC's wire format): microseconds up to ~100 s,
      // milliseconds up to ~27 hours, then seconds.
      int64_t ms = (left + 999) / 1000, s = (left + 999999) / 1000000;
      headers.push_back({"grpc-timeout", left <= 99999999 ? std::to_string(left) + "u"
                                         : ms <= 99999999 ? std::to_string(ms) + "m"
                                                          : std::to_string(std::min<int64_t>(s, 99999999)) + "S"});
    }
    for (const auto& h : x->request_headers)
      if (!IsHopHeader(h.name) && (h.name != kAuthorization || x->to_grpc_side)) headers.push_back(h);
    if (!x->bare) headers.push_back({kResolvedVersion, std::to_string(x->version)});
    x->fast = true;
    x->address = address;
    x->body_sent = 0;
    outstanding[address]++;
    Submit(x, c, headers);
    if (!x->to_grpc_side) plane.Count(&Plane::fast_calls);  // the gRPC side counts its own
  }

  static int64_t TimeLeft(const Exchange* x) {
    return std::chrono::duration_cast<std::chrono::microseconds>(x->deadline - Clock::now()).count();
  }

  // --- a replica's framed socket (frame.h) ---

  // Sends `x` (routed to the replica at `address`) over the replica's framed
  // socket x->frame; false if it cannot (no connection: the caller then takes
  // the gRPC path to the same replica).
  bool Framed(Exchange* x, const std::string& address) {
    int method = frame::MethodOf(x->api);
    if (method < 0 || x->body.size() < 5) return false;
    Conn* c = Upstream(kFramedScheme + x->frame);
    if (!c) return false;
    uint64_t timeout_us = 0;
    if (x->deadline != Clock::time_point::max()) {
      int64_t left = TimeLeft(x);
      if (left <= 0) {
        Answer(x, 4, "Deadline Exceeded");
        return true;
      }
      timeout_us = static_cast<uint64_t>(left);
    }
    uint64_t id = c->next_id++;
    frame::AppendCall(&c->out, id, static_cast<frame::Method>(method), x->bare ? 0 : x->version, timeout_us,
                      x->body.data() + 5, x->body.size() - 5);
    c->calls[id] = x;
    x->frame_id = id;
    x->fast = true;
    x->address = address;
    outstanding[address]++;
    Attach(x, c, -1);
    dirty.insert(c);
    plane.Count(&Plane::fast_calls);
    plane.Count(&Plane::frame_calls);
    return true;
  }

  // The caller of a framed call went away: the replica is told to stop it,
  // and it is no longer the connection's (a late REPLY is ignored).
  void CancelFramed(Exchange* x) {
    Conn* c = x->up;
    if (!c->dead) {
      frame::AppendCancel(&c->out, x->frame_id);
      dirty.insert(c);
    }
    c->calls.erase(x->frame_id);
    c->exchanges.erase(x);
    x->up = nullptr;
    outstanding[x->address]--;
    if (x->batching) BatchReturned(x);
    MaybeDelete(x);
  }

  // Every whole REPLY in c->in, each to its call; false if the replica sent
  // bytes that are not (the connection then closes).
  bool FramedReplies(Conn* c) {
    size_t at = 0;
    frame::Reply reply;
    for (;;) {
      size_t used = 0;
      int r = frame::ParseReply(c->in.data() + at, c->in.size() - at, &reply, &used);
      if (r < 0) return false;
      if (r == 0) break;
      at += used;
      auto group = c->groups.find(reply.id);
      if (group != c->groups.end()) {
        FrameGroup* g = group->second;
        c->groups.erase(group);
        GroupReplied(g, reply);
        continue;
      }
      auto it = c->calls.find(reply.id);
      if (it == c->calls.end()) continue;  // cancelled meanwhile
      Exchange* x = it->second;
      c->calls.erase(it);
      c->exchanges.erase(x);
      x->up = nullptr;
      FramedAnswer(x, reply.code, reply.message, reply.response, {});
    }
    c->in.erase(0, at);
    return true;
  }

  // A framed call's answer, as the gRPC path reads one from a replica's stream.
  void FramedAnswer(Exchange* x, uint32_t code, const std::string& message, const std::string& response,
                    std::vector<Nv> trailers) {
    x->response_headers = {{":status", "200"}, {kContentType, "application/grpc"}};
    if (code == 0) {
      x->response = GrpcMessage(response);
      x->trailers = {{"grpc-status", "0"}};
      for (auto& t : trailers) x->trailers.push_back(std::move(t));
    } else {
      x->trailers_only = true;
      x->response_headers.push_back({"grpc-status", std::to_string(code)});
      x->response_headers.push_back({"grpc-message", PercentEncode(message)});
      for (auto& t : trailers) x->response_headers.push_back(std::move(t));
    }
    FastDone(x, true);
  }

  // --- coalescing for a batching replica's framed socket (frame.h) ---

  // A Predict call to a batching replica: alone if nothing is in flight to
  // it, else into its waiting group (a new one if there is none or the call
  // does not fit), which goes at the first of: full, its batch timeout
  // (TimerFired), or the return of any call to the replica (FlushOpen).
  // false if the framed socket cannot be reached.
  bool Coalesce(Exchange* x, const std::string& address) {
    auto open = open_groups.find(address);
    int& rpcs = batch_rpcs[address];
    if (rpcs < kRpcsBeforeCoalescing && open == open_groups.end()) {
      if (!Framed(x, address)) return false;
      x->batching = true;
      rpcs++;
      return true;
    }
    if (!Upstream(kFramedScheme + x->frame)) return false;
    FrameGroup* g = open == open_groups.end() ? nullptr : open->second;
    size_t size = MemberBytes(x);
    if (g && (g->members.size() >= g->coalesce_max || g->bytes + size > g->limit)) {
      SendGroup(g);
      g = nullptr;
    }
    if (!g) {
      g = new FrameGroup();
      g->address = address;
      g->frame = x->frame;
      g->version = x->version;
      g->coalesce_max = x->coalesce_max;
      g->limit = x->limit;
      g->due = Clock::now() + std::chrono::microseconds(x->batch_timeout_us);
      open_groups[address] = g;
      if (g->due < armed) Arm(g->due);
    }
    g->members.push_back(x);
    g->bytes += size;
    x->group = g;
    x->fast = true;
    x->address = address;
    outstanding[address]++;
    plane.Count(&Plane::fast_calls);
    if (g->members.size() >= g->coalesce_max) SendGroup(g);
    return true;
  }

  // What a member adds to a PredictBatchRequest (counted against the group's limit).
  static size_t MemberBytes(const Exchange* x) {
    size_t n = x->body.size() + 16;
    for (const auto& h : x->request_headers) n += h.name.size() + h.value.size() + 8;
    return n;
  }

  // Sends a waiting group: members whose deadline has passed are answered
  // DEADLINE_EXCEEDED instead; each other carries its time left and its
  // caller's metadata; the CALL's timeout is the latest member's.
  void SendGroup(FrameGroup* g) {
    auto open = open_groups.find(g->address);
    if (open != open_groups.end() && open->second == g) open_groups.erase(open);
    auto now = Clock::now();
    cloudml::internal::v1::PredictBatchRequest request;
    request.set_resolved_version(g->version);
    std::vector<Exchange*> members, expired;
    int64_t timeout_us = 0;
    bool unbounded = false;
    for (Exchange* m : g->members) {
      if (m->deadline != Clock::time_point::max() && m->deadline <= now) {
        expired.push_back(m);
        continue;
      }
      members.push_back(m);
      auto* member = request.add_members();
      member->set_request(m->body.data() + 5, m->body.size() - 5);
      if (m->deadline == Clock::time_point::max()) {
        unbounded = true;
      } else {
        int64_t left = std::max<int64_t>(1, TimeLeft(m));
        member->set_timeout_micros(left);
        timeout_us = std::max(timeout_us, left);
      }
      for (const auto& h : m->request_headers) {
        if (h.name.empty() || h.name[0] == ':' || IsHopHeader(h.name) || h.name == kAuthorization) continue;
        auto* entry = member->add_metadata();
        entry->set_key(h.name);
        entry->set_value(h.value);
      }
    }
    g->members = members;
    for (Exchange* m : expired) {
      m->group = nullptr;
      FramedAnswer(m, 4, "Deadline Exceeded", "", {});
    }
    Conn* c = members.empty() ? nullptr : Upstream(kFramedScheme + g->frame);
    if (!c) {
      // Nothing left, or the socket went: each member the way a broken call goes (the slow path).
      for (Exchange* m : members) {
        m->group = nullptr;
        FastDone(m, false);
      }
      delete g;
      return;
    }
    std::string bytes = request.SerializeAsString();
    g->conn = c;
    g->id = c->next_id++;
    frame::AppendCall(&c->out, g->id, frame::kPredictBatch, g->version, unbounded ? 0 : timeout_us, bytes.data(),
                      bytes.size());
    c->groups[g->id] = g;
    for (Exchange* m : members) Attach(m, c, -1);
    batch_rpcs[g->address]++;
    dirty.insert(c);
    plane.Count(&Plane::coalesced_calls, members.size());
    plane.Count(&Plane::frame_calls, members.size());
  }

  // A sent group's REPLY: each member its own result, status and trailers.
  void GroupReplied(FrameGroup* g, const frame::Reply& reply) {
    cloudml::internal::v1::PredictBatchResponse response;
    bool parsed = reply.code == 0 && response.ParseFromString(reply.response) &&
                  response.results_size() == static_cast<int>(g->members.size());
    for (size_t i = 0; i < g->members.size(); i++) {
      Exchange* m = g->members[i];
      if (!m) continue;
      g->conn->exchanges.erase(m);
      m->up = nullptr;
      m->group = nullptr;
      if (!parsed) {
        FramedAnswer(m, reply.code ? reply.code : 13, reply.code ? reply.message : kMalformedBatch,
                     "", {});
        continue;
      }
      const auto& r = response.results(static_cast<int>(i));
      std::vector<Nv> trailers;
      for (const auto& t : r.trailers())
        if (!IsHopHeader(t.key()) && ValidMetadata(t.key(), t.value())) trailers.push_back({t.key(), t.value()});
      uint32_t code = r.code() <= 16 ? static_cast<uint32_t>(r.code()) : 2;
      FramedAnswer(m, code, r.message().substr(0, frame::kMaxMessage), code ? "" : r.response(),
                   std::move(trailers));
    }
    std::string address = g->address;
    delete g;
    batch_rpcs[address]--;
    FlushOpen(address);
  }

  // A member's caller went away: out of its waiting group; or, once sent, its
  // slot empties (the group is cancelled when no member is left).
  void LeaveGroup(Exchange* x) {
    FrameGroup* g = x->group;
    x->group = nullptr;
    auto it = std::find(g->members.begin(), g->members.end(), x);
    outstanding[x->address]--;
    if (!g->conn) {
      if (it != g->members.end()) g->members.erase(it);
      g->bytes -= std::min(g->bytes, MemberBytes(x));
      if (g->members.empty()) {
        auto open = open_groups.find(g->address);
        if (open != open_groups.end() && open->second == g) open_groups.erase(open);
        delete g;
      }
    } else {
      if (it != g->members.end()) *it = nullptr;
      g->conn->exchanges.erase(x);
      x->up = nullptr;
      if (std::all_of(g->members.begin(), g->members.end(), [](Exchange* m) { return m == nullptr; })) {
        Conn* c = g->conn;
        frame::AppendCancel(&c->out, g->id);
        dirty.insert(c);
        c->groups.erase(g->id);
        std::string address = g->address;
        delete g;
        batch_rpcs[address]--;
        FlushOpen(address);
      }
    }
    MaybeDelete(x);
  }

  // A Predict call sent alone to a batching replica returned.
  void BatchReturned(Exchange* x) {
    x->batching = false;
    batch_rpcs[x->address]--;
    FlushOpen(x->address);
  }

  // A call to the replica returned: its waiting group goes now.
  void FlushOpen(const std::string& address) {
    auto open = open_groups.find(address);
    if (open != open_groups.end()) SendGroup(open->second);
  }

  void Arm(Clock::time_point due) {
    armed = due;
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(due.time_since_epoch()).count();
    itimerspec spec{};
    spec.it_value.tv_sec = ns / 1000000000;
    spec.it_value.tv_nsec = ns % 1000000000;
    if (spec.it_value.tv_sec == 0 && spec.it_value.tv_nsec == 0) spec.it_value.tv_nsec = 1;
    timerfd_settime(timer, TFD_TIMER_ABSTIME, &spec, nullptr);
  }

  // The timer: every waiting group that is due goes; then the next due time.
  void TimerFired() {
    uint64_t expirations;
    while (read(timer, &expirations, sizeof(expirations)) > 0) {
    }
    armed = Clock::time_point::max();
    auto now = Clock::now();
    std::vector<FrameGroup*> due;
    auto next = Clock::time_point::max();
    for (auto& [address, g] : open_groups) {
      if (g->due <= now)
        due.push_back(g);
      else
        next = std::min(next, g->due);
    }
    for (FrameGroup* g : due) SendGroup(g);
    if (next != Clock::time_point::max()) Arm(next);
  }

  // On to the gRPC side as it came, frame by frame.
  void Relay(Exchange* x) {
    x->fast = false;
    x->body_sent = 0;
    Conn* c = Upstream(internal);
    if (!c) return Answer(x, 14, "the data plane cannot reach its own gRPC server");
    x->relayed_started = true;
    Submit(x, c, x->request_headers);
  }

  void Submit(Exchange* x, Conn* c, const std::vector<Nv>& headers) {
    // Pseudo headers first, as HTTP/2 requires; the caller's came first too.
    auto nva = Nva(headers);
    nghttp2_data_provider provider;
    provider.source.ptr = x;
    provider.read_callback = &Impl::ReadRequest;
    int32_t id = nghttp2_submit_request(c->session, nullptr, nva.data(), nva.size(), &provider, x);
    if (id < 0) {
      if (x->fast) outstanding[x->address]--;
      return Answer(x, 14, "the data plane could not open a stream upstream");
    }
    Attach(x, c, id);
    dirty.insert(c);
  }

  static ssize_t ReadRequest(nghttp2_session*, int32_t, uint8_t* buf, size_t length, uint32_t* flags,
                             nghttp2_data_source* source, void*) {
    auto* x = static_cast<Exchange*>(source->ptr);
    Impl* self = x->up->front;
    size_t n = std::min(length, x->body.size() - x->body_sent);
    memcpy(buf, x->body.data() + x->body_sent, n);
    x->body_sent += n;
    if (!x->whole && !x->fast && x->down && n) {
      // Relayed: the caller may send more once this much is on its way.
      size_t give = std::min(n, x->down_unconsumed);
      x->down_unconsumed -= give;
      nghttp2_session_consume(x->down->session, x->down_id, give);
      self->dirty.insert(x->down);
      if (!x->request_ended) Compact(&x->body, &x->body_sent);
    }
    if (x->body_sent == x->body.size() && x->request_ended) {
      *flags |= NGHTTP2_DATA_FLAG_EOF;
      return static_cast<ssize_t>(n);
    }
    return n ? static_cast<ssize_t>(n) : NGHTTP2_ERR_DEFERRED;
  }

  static ssize_t ReadResponse(nghttp2_session* session, int32_t id, uint8_t* buf, size_t length, uint32_t* flags,
                              nghttp2_data_source* source, void*) {
    auto* x = static_cast<Exchange*>(source->ptr);
    Impl* self = x->down->front;
    size_t n = std::min(length, x->response.size() - x->response_sent);
    memcpy(buf, x->response.data() + x->response_sent, n);
    x->response_sent += n;
    if (!x->fast && x->up && n) {
      size_t give = std::min(n, x->up_unconsumed);
      x->up_unconsumed -= give;
      nghttp2_session_consume(x->up->session, x->up_id, give);
      self->dirty.insert(x->up);
    }
    if (x->response_sent == x->response.size()) {
      if (x->response_ended) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        if (!x->trailers.empty()) {
          *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
          auto nva = Nva(x->trailers);
          nghttp2_submit_trailer(session, id, nva.data(), nva.size());
        }
        return static_cast<ssize_t>(n);
      }
    }
    Compact(&x->response, &x->response_sent);
    return n ? static_cast<ssize_t>(n) : NGHTTP2_ERR_DEFERRED;
  }

  // A trailers-only reply with this status, if the caller is still there and has had no reply.
  void Answer(Exchange* x, int code, const std::string& message) {
    if (x->rest) return rest->Failed(x, code, message);
    if (!x->down || x->response_submitted) return;
    std::vector<Nv> headers = {{":status", "200"}, {kContentType, "application/grpc"},
                               {"grpc-status", std::to_string(code)}, {"grpc-message", message}};
    auto nva = Nva(headers);
    x->response_submitted = true;
    nghttp2_submit_response(x->down->session, x->down_id, nva.data(), nva.size(), nullptr);
    dirty.insert(x->down);
  }

  // Starts the reply to the caller with what has come back so far.
  void Respond(Exchange* x) {
    if (!x->down || x->response_submitted) return;
    x->response_submitted = true;
    auto nva = Nva(x->response_headers);
    if (x->trailers_only) {
      nghttp2_submit_response(x->down->session, x->down_id, nva.data(), nva.size(), nullptr);
    } else {
      nghttp2_data_provider provider;
      provider.source.ptr = x;
      provider.read_callback = &Impl::ReadResponse;
      nghttp2_submit_response(x->down->session, x->down_id, nva.data(), nva.size(), &provider);
    }
    dirty.insert(x->down);
  }

  // Headers from a replica: only what may cross a hop, and the status.
  static std::vector<Nv> FromReplica(const std::vector<Nv>& in, bool trailers) {
    std::vector<Nv> out;
    for (const auto& h : in) {
      bool status = h.name == "grpc-status" || h.name == "grpc-message" || h.name == "grpc-status-details-bin";
      if (status || (!trailers && (h.name == ":status" || h.name == kContentType)) || !IsHopHeader(h.name))
        out.push_back(h);
    }
    return out;
  }

  void UpHeaders(Exchange* x, bool end_stream) {
    if (x->in_trailers || x->response_headers.empty()) return;
    if (end_stream && !x->trailers_only) x->trailers_only = true;
    if (x->fast) return;  // read whole (UpClosed)
    Respond(x);
  }

  void UpData(Exchange* x, const uint8_t* data, size_t len) {
    x->response.append(reinterpret_cast<const char*>(data), len);
    if (x->fast) {
      nghttp2_session_consume(x->up->session, x->up_id, len);
      return;
    }
    x->up_unconsumed += len;
    if (x->down && x->response_submitted) nghttp2_session_resume_data(x->down->session, x->down_id), dirty.insert(x->down);
  }

  void UpClosed(Exchange* x, uint32_t error) {
    Conn* c = x->up;
    c->exchanges.erase(x);
    if (x->up_unconsumed && !c->dead) nghttp2_session_consume_connection(c->session, x->up_unconsumed);
    x->up_unconsumed = 0;
    x->up = nullptr;
    x->up_id = -1;
    bool complete = error == NGHTTP2_NO_ERROR && (x->trailers_only || !x->trailers.empty());
    if (x->fast) return FastDone(x, complete);
    if (!complete) {
      if (!x->response_submitted) {
        Answer(x, 14, "the call's stream upstream broke");
      } else if (x->trailers.empty()) {
        x->trailers = {{"grpc-status", "14"}, {"grpc-message", "the call's stream upstream broke"}};
      }
    }
    x->response_ended = true;
    if (x->down && x->response_submitted && !x->trailers_only)
      nghttp2_session_resume_data(x->down->session, x->down_id), dirty.insert(x->down);
    MaybeDelete(x);
  }

  void FastDone(Exchange* x, bool complete) {
    outstanding[x->address]--;
    if (x->batching) BatchReturned(x);
    if (!x->down && !x->rest) return MaybeDelete(x);
    const std::string* status = Find(x->trailers_only ? x->response_headers : x->trailers, "grpc-status");
    int code = complete && status ? atoi(status->c_str()) : 14;
    int64_t served;
    bool front = plane.options.front();
    bool stale = !front && code == 0 && x->bare && !(ResponseVersion(x->response.size() >= 5 ? x->response.substr(5) : "",
                                                            &served) && served == x->version);
    if ((code == 14 && !x->retried && !front) || stale) {
      // The replica set or the version may have changed: the control plane routes it.
      x->retried = true;
      plane.Forget(x->key);
      x->response_headers.clear();
      x->trailers.clear();
      x->response.clear();
      x->trailers_only = x->in_trailers = false;
      return x->rest ? rest->Slow(x) : Relay(x);
    }
    if (!front && !x->to_grpc_side)  // the gRPC side records its own
      plane.Record(x->model, std::to_string(x->version), x->api, static_cast<grpc::StatusCode>(code),
                   std::chrono::duration<double>(Clock::now() - x->started).count());
    if (!complete) return Answer(x, 14, "the replica's stream broke");
    if (x->rest) return rest->Replied(x, code);
    x->response_headers = FromReplica(x->response_headers, false);
    x->trailers = FromReplica(x->trailers, true);
    x->response_ended = true;
    Respond(x);
  }

  void DownClosed(Exchange* x, uint32_t error) {
    Conn* c = x->down;
    c->exchanges.erase(x);
    c->whole_bytes -= x->charged;
    x->charged = 0;
    if (x->down_unconsumed && !c->dead) nghttp2_session_consume_connection(c->session, x->down_unconsumed);
    x->down_unconsumed = 0;
    x->down = nullptr;
    // The caller went away (or its stream ended before the reply did): the upstream stream too.
    if (x->group) return LeaveGroup(x);
    if (x->up && x->up->framed) return CancelFramed(x);
    if (x->up && !x->response_ended) {
      nghttp2_submit_rst_stream(x->up->session, NGHTTP2_FLAG_NONE, x->up_id, NGHTTP2_CANCEL);
      dirty.insert(x->up);
    }
    (void)error;
    MaybeDelete(x);
  }

  // --- nghttp2 callbacks ---

  static int OnBeginHeaders(nghttp2_session* session, const nghttp2_frame* frame, void* user) {
    auto* c = static_cast<Conn*>(user);
    if (!c->server || frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
    if (c->front->stopping) {
      nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame->hd.stream_id, NGHTTP2_REFUSED_STREAM);
      return 0;
    }
    auto* x = new Exchange();
    x->down = c;
    x->down_id = frame->hd.stream_id;
    c->exchanges.insert(x);
    nghttp2_session_set_stream_user_data(session, frame->hd.stream_id, x);
    return 0;
  }

  static int OnHeader(nghttp2_session* session, const nghttp2_frame* frame, const uint8_t* name, size_t namelen,
                      const uint8_t* value, size_t valuelen, uint8_t, void* user) {
    auto* c = static_cast<Conn*>(user);
    auto* x = static_cast<Exchange*>(nghttp2_session_get_stream_user_data(session, frame->hd.stream_id));
    if (!x || frame->hd.type != NGHTTP2_HEADERS) return 0;
    Nv nv{std::string(reinterpret_cast<const char*>(name), namelen),
          std::string(reinterpret_cast<const char*>(value), valuelen)};
    if (c->server) {
      x->header_bytes += namelen + valuelen + 32;  // HPACK's per-entry overhead
      if (x->header_bytes > kMaxHeaderBytes) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
      x->request_headers.push_back(std::move(nv));
    } else if (frame->headers.cat == NGHTTP2_HCAT_RESPONSE) {
      x->response_headers.push_back(std::move(nv));
    } else {
      x->in_trailers = true;
      x->trailers.push_back(std::move(nv));
    }
    return 0;
  }

  static int OnFrameRecv(nghttp2_session* session, const nghttp2_frame* frame, void* user) {
    auto* c = static_cast<Conn*>(user);
    if (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) return 0;
    auto* x = static_cast<Exchange*>(nghttp2_session_get_stream_user_data(session, frame->hd.stream_id));
    if (!x) return 0;
    bool end = frame->hd.flags & NGHTTP2_FLAG_END_STREAM;
    Impl* self = c->front;
    if (c->server) {
      if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST) self->RequestHeaders(x);
      if (end && x->down) self->RequestEnded(x);
    } else if (frame->hd.type == NGHTTP2_HEADERS) {
      self->UpHeaders(x, end);
    }
    return 0;
  }

  static int OnData(nghttp2_session* session, uint8_t, int32_t id, const uint8_t* data, size_t len, void* user) {
    auto* c = static_cast<Conn*>(user);
    auto* x = static_cast<Exchange*>(nghttp2_session_get_stream_user_data(session, id));
    if (!x) {
      nghttp2_session_consume(session, id, len);
      return 0;
    }
    if (c->server)
      c->front->RequestData(x, data, len);
    else
      c->front->UpData(x, data, len);
    return 0;
  }

  static int OnStreamClose(nghttp2_session* session, int32_t id, uint32_t error, void* user) {
    auto* c = static_cast<Conn*>(user);
    auto* x = static_cast<Exchange*>(nghttp2_session_get_stream_user_data(session, id));
    if (!x) return 0;
    if (c->server && x->down == c && x->down_id == id)
      c->front->DownClosed(x, error);
    else if (!c->server && x->up == c && x->up_id == id)
      c->front->UpClosed(x, error);
    return 0;
  }

  void Callbacks() {
    for (auto** cb : {&server_callbacks, &client_callbacks}) {
      nghttp2_session_callbacks_new(cb);
      nghttp2_session_callbacks_set_on_begin_headers_callback(*cb, OnBeginHeaders);
      nghttp2_session_callbacks_set_on_header_callback(*cb, OnHeader);
      nghttp2_session_callbacks_set_on_frame_recv_callback(*cb, OnFrameRecv);
      nghttp2_session_callbacks_set_on_data_chunk_recv_callback(*cb, OnData);
      nghttp2_session_callbacks_set_on_stream_close_callback(*cb, OnStreamClose);
    }
    nghttp2_option_new(&option);
    nghttp2_option_set_no_auto_window_update(option, 1);
    // gRPC peers send grpc-message values that may end in a space (a
    // replica's error text); RFC 9113's strict check would reset the stream.
    nghttp2_option_set_no_rfc9113_leading_and_trailing_ws_validation(option, 1);
  }

  // On each new routing generation, as the gRPC side drops its channels
  // (Plane::Sweep): connections to replicas with no stream open that were
  // not used in this generation or the one before close, so replica churn
  // never grows this process.
  void Sweep() {
    uint64_t now = plane.epochs.load();
    if (now == epoch) return;
    epoch = now;
    std::vector<Conn*> idle;
    for (auto& [address, c] : upstreams)
      if (address != internal && c->exchanges.empty() && c->used + 1 < epoch) idle.push_back(c);
    for (Conn* c : idle) Kill(c);
    for (auto it = outstanding.begin(); it != outstanding.end();)
      it = it->second == 0 && !upstreams.count(it->first) ? outstanding.erase(it) : std::next(it);
    for (auto it = batch_rpcs.begin(); it != batch_rpcs.end();)
      it = it->second == 0 && !open_groups.count(it->first) ? batch_rpcs.erase(it) : std::next(it);
  }

  void Accept() {
    for (;;) {
      int fd = accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return PauseOnExhaustion(epoll, listener, &pause);
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      Add(fd, true, "");
    }
  }
};

H2Front::H2Front(Plane& plane) : impl_(std::make_unique<Impl>(plane)) {
  impl_->Callbacks();
}

H2Front::~H2Front() = default;

void PauseOnExhaustion(int epoll, int fd, ListenerPause* pause) {
  if (errno != EMFILE && errno != ENFILE) return;
  epoll_ctl(epoll, EPOLL_CTL_DEL, fd, nullptr);
  pause->paused = true;
  pause->until = std::chrono::steady_clock::now() + std::chrono::milliseconds(100);
}

void ResumeListener(int epoll, int fd, void* tag, ListenerPause* pause) {
  if (!pause->paused || std::chrono::steady_clock::now() < pause->until) return;
  pause->paused = false;
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = tag;
  epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &ev);
}

int Bind(const std::string& address, int* port) {
  int fd = -1;
  if (address.compare(0, 5, "unix:") == 0) {
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::string path = address.substr(5);
    if (path.size() >= sizeof(sa.sun_path)) return -1;
    memcpy(sa.sun_path, path.data(), path.size());
    unlink(path.c_str());
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0 || listen(fd, 1024) != 0) {
      if (fd >= 0) close(fd);
      return -1;
    }
    *port = 1;
    return fd;
  }
  size_t colon = address.rfind(':');
  if (colon == std::string::npos) return -1;
  std::string host = address.substr(0, colon);
  if (host == "localhost") host = "127.0.0.1";
  if (!host.empty() && host.front() == '[') host = host.substr(1, host.size() - 2);
  addrinfo hints{}, *res = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST;
  if (getaddrinfo(host.empty() ? nullptr : host.c_str(), address.substr(colon + 1).c_str(), &hints, &res) != 0)
    return -1;
  fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  bool ok = fd >= 0 && bind(fd, res->ai_addr, res->ai_addrlen) == 0 && listen(fd, 1024) == 0;
  freeaddrinfo(res);
  if (!ok) {
    if (fd >= 0) close(fd);
    return -1;
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  *port = bound.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                                      : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  return fd;
}

bool H2Front::Setup() {
  Impl& m = *impl_;
  if (m.epoll >= 0) return true;
  m.epoll = epoll_create1(EPOLL_CLOEXEC);
  if (m.epoll < 0 || pipe2(m.wake, O_NONBLOCK | O_CLOEXEC) != 0) return false;
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = &m.wake;
  epoll_ctl(m.epoll, EPOLL_CTL_ADD, m.wake[0], &ev);
  m.timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (m.timer < 0) return false;
  ev.data.ptr = &m.timer;
  epoll_ctl(m.epoll, EPOLL_CTL_ADD, m.timer, &ev);
  return true;
}

int H2Front::Listen(const std::string& address) {
  Impl& m = *impl_;
  int port = 0;
  if (!Setup()) return 0;
  m.listener = Bind(address, &port);
  if (m.listener < 0) return 0;
  if (address.compare(0, 5, "unix:") == 0) m.listen_path = address.substr(5);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = &m.listener;
  epoll_ctl(m.epoll, EPOLL_CTL_ADD, m.listener, &ev);
  return port;
}

int H2Front::ListenRest(const std::string& address, const std::string& upstream) {
  Impl& m = *impl_;
  if (!Setup()) return 0;
  m.rest = std::make_unique<RestFront>(m.plane, m, upstream);
  return m.rest->Listen(address);
}

void H2Front::Stop() {
  impl_->stopping = true;
  if (write(impl_->wake[1], "x", 1) < 0) {
  }
}

void H2Front::Run(double grace) {
  Impl& m = *impl_;
  epoll_event events[64];
  Clock::time_point stop_by{};
  bool draining = false;
  for (;;) {
    if (m.stopping && !draining) {
      draining = true;
      stop_by = Clock::now() + std::chrono::milliseconds(static_cast<int>(grace * 1000));
      if (m.listener >= 0) {
        epoll_ctl(m.epoll, EPOLL_CTL_DEL, m.listener, nullptr);
        close(m.listener);
        // Its socket file goes with it, as gRPC's servers remove theirs.
        if (!m.listen_path.empty()) unlink(m.listen_path.c_str());
      }
      for (auto& [fd, c] : m.conns)
        if (c->server) nghttp2_submit_goaway(c->session, NGHTTP2_FLAG_NONE,
                                             nghttp2_session_get_last_proc_stream_id(c->session), NGHTTP2_NO_ERROR,
                                             nullptr, 0), m.dirty.insert(c);
    }
    if (draining) {
      bool busy = false;
      for (auto& [fd, c] : m.conns) busy = busy || !c->exchanges.empty();
      if (m.rest && !m.rest->Drained()) busy = true;
      if (!busy || Clock::now() > stop_by) break;
    }
    int n = epoll_wait(m.epoll, events, 64, draining ? 50 : kLoopMs);
    for (int i = 0; i < n; i++) {
      void* p = events[i].data.ptr;
      if (m.rest && m.rest->Event(p, events[i].events)) continue;
      if (p == &m.listener) {
        m.Accept();
        continue;
      }
      if (p == &m.timer) {
        m.TimerFired();
        continue;
      }
      if (p == &m.wake) {
        char buf[16];
        while (read(m.wake[0], buf, sizeof(buf)) > 0) {
        }
        continue;
      }
      auto* c = static_cast<Conn*>(p);
      if (c->dead) continue;
      if (c->connecting && (events[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
        int err = 0;
        socklen_t len = sizeof(err);
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
          m.Kill(c);
          continue;
        }
        c->connecting = false;
      }
      if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) m.Readable(c);
      m.dirty.insert(c);
    }
    while (!m.dirty.empty()) {
      std::vector<Conn*> batch(m.dirty.begin(), m.dirty.end());
      m.dirty.clear();
      for (Conn* c : batch) m.Flush(c);
    }
    for (Conn* c : m.graveyard) {
      nghttp2_session_del(c->session);
      delete c;
    }
    m.graveyard.clear();
    if (m.rest) m.rest->Tick();
    if (!draining && m.listener >= 0) ResumeListener(m.epoll, m.listener, &m.listener, &m.pause);
    m.Sweep();
  }
  // Every connection closes (the gRPC server's shutdown waits for its peers to go).
  if (m.rest) m.rest->CloseAll();
  std::vector<Conn*> open;
  for (auto& [fd, c] : m.conns) open.push_back(c);
  for (Conn* c : open) m.Kill(c);
  for (Conn* c : m.graveyard) {
    nghttp2_session_del(c->session);
    delete c;
  }
  m.graveyard.clear();
}

}  // namespace cloudml::dataplane
