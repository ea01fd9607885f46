// See rest.h. Every socket non-blocking, driven by the HTTP/2 front's epoll
// loop. A caller's connection (RestConn) handles one request at a time; its
// relay to the Python gateway (RestUp) is a connection of its own, so
// answers never need to be matched across callers.
#include "rest.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "cloudml/internal/v1/dataplane.pb.h"
#include "exchange.h"
#include "h2front.h"
#include "picking.h"
#include "plane.h"
#include "protocol.h"
#include "rest_json.h"
#include "wire.h"

namespace cloudml::dataplane {

namespace {

constexpr size_t kMaxHead = 64 << 10;          // a request's or response's head
constexpr size_t kAiohttpLine = 8190;          // aiohttp's longest request line or header
constexpr size_t kBacklog = 1 << 20;           // buffered for a slow peer before reading from the other stops
constexpr auto kHeadTime = std::chrono::seconds(10);
constexpr auto kIdleTime = std::chrono::seconds(75);  // aiohttp's keep-alive
constexpr auto kBodyTime = std::chrono::seconds(5);   // rest.py BODY_READ_TIMEOUT
constexpr auto kLingerTime = std::chrono::seconds(1);  // rest.py's lingering_time
constexpr auto kResolveTime = std::chrono::seconds(5);  // then the call is relayed as it came
constexpr auto kPredictTimeout = std::chrono::seconds(60);  // rest.py DEFAULT_TIMEOUT

// The model calls converted here: TF Serving's REST verbs and their gRPC methods.
enum Verb { kPredict, kClassify, kRegress };
constexpr const char* kVerbs[] = {":predict", ":classify", ":regress"};
constexpr const char* kApis[] = {"Predict", "Classify", "Regress"};

bool IEquals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); i++)
    if (tolower(static_cast<unsigned char>(a[i])) != tolower(static_cast<unsigned char>(b[i]))) return false;
  return true;
}

bool IStartsWith(std::string_view s, std::string_view prefix) {
  return s.size() >= prefix.size() && IEquals(s.substr(0, prefix.size()), prefix);
}

// Whether a comma-separated header value lists `token` (case-insensitive).
bool HasToken(std::string_view value, std::string_view token) {
  size_t pos = 0;
  while (pos <= value.size()) {
    size_t comma = value.find(',', pos);
    if (comma == std::string_view::npos) comma = value.size();
    std::string_view item = value.substr(pos, comma - pos);
    while (!item.empty() && (item.front() == ' ' || item.front() == '\t')) item.remove_prefix(1);
    while (!item.empty() && (item.back() == ' ' || item.back() == '\t')) item.remove_suffix(1);
    if (IEquals(item, token)) return true;
    pos = comma + 1;
  }
  return false;
}

struct Header {
  std::string name, value;
};

// A request's or response's head, parsed as far as the front needs.
struct Head {
  std::string first;  // the request or status line
  std::vector<Header> headers;
  const std::string* Get(std::string_view name) const {
    for (const auto& h : headers)
      if (IEquals(h.name, name)) return &h.value;
    return nullptr;
  }
  int Count(std::string_view name) const {
    int n = 0;
    for (const auto& h : headers) n += IEquals(h.name, name);
    return n;
  }
};

// Parses `text` (without its final blank line) into `head`; false if it is
// not plain HTTP/1.1 header syntax (obsolete line folding, a line without a
// colon...): the Python gateway then sees the bytes as they came.
bool ParseHead(std::string_view text, Head* head) {
  size_t eol = text.find("\r\n");
  head->first = std::string(text.substr(0, eol));
  size_t pos = eol == std::string_view::npos ? text.size() : eol + 2;
  while (pos < text.size()) {
    eol = text.find("\r\n", pos);
    if (eol == std::string_view::npos) eol = text.size();
    std::string_view line = text.substr(pos, eol - pos);
    pos = eol + 2;
    size_t colon = line.find(':');
    if (colon == std::string_view::npos || colon == 0 || line[0] == ' ' || line[0] == '\t') return false;
    std::string_view name = line.substr(0, colon), value = line.substr(colon + 1);
    for (char ch : name)
      if (ch == ' ' || ch == '\t') return false;
    while (!value.empty() && (value.front() == ' ' || value.front() == '\t')) value.remove_prefix(1);
    while (!value.empty() && (value.back() == ' ' || value.back() == '\t')) value.remove_suffix(1);
    head->headers.push_back({std::string(name), std::string(value)});
  }
  return true;
}

bool ParseLength(const std::string& v, uint64_t* out) {
  if (v.empty() || v.size() > 18) return false;
  uint64_t n = 0;
  for (char ch : v) {
    if (ch < '0' || ch > '9') return false;
    n = n * 10 + static_cast<uint64_t>(ch - '0');
  }
  *out = n;
  return true;
}

// `/v1/models/NAME[/versions/N|/labels/L]:predict|:classify|:regress[/]`
// (rest.py _MODEL_PATH, whose literal parts after /v1/models/ match
// case-insensitively), the query dropped; false for any other path, and for
// what the Python gateway would decode first (percent-escapes) or read as a
// version in ways of its own (not plain digits).
bool ModelCallPath(std::string_view target, Spec* spec, Verb* verb) {
  target = target.substr(0, target.find('?'));
  // aiohttp routes /v1/models/ case-sensitively; the rest of the path is rest.py's regex.
  if (target.find('%') != std::string_view::npos || target.compare(0, 11, "/v1/models/") != 0) return false;
  target.remove_prefix(11);
  if (!target.empty() && target.back() == '/') target.remove_suffix(1);
  size_t colon = target.rfind(':');
  if (colon == std::string_view::npos) return false;
  std::string_view suffix = target.substr(colon);
  int found = -1;
  for (int i = 0; i < 3; i++)
    if (IEquals(suffix, kVerbs[i])) found = i;
  if (found < 0) return false;
  *verb = static_cast<Verb>(found);
  target.remove_suffix(suffix.size());
  size_t slash = target.find('/');
  std::string_view name = target.substr(0, slash);
  if (name.empty() || name.find(':') != std::string_view::npos) return false;
  spec->name = std::string(name);
  if (slash == std::string_view::npos) return true;
  std::string_view rest = target.substr(slash);
  std::string_view value;
  bool version = IStartsWith(rest, "/versions/");
  if (version)
    value = rest.substr(10);
  else if (IStartsWith(rest, "/labels/"))
    value = rest.substr(8);
  else
    return false;
  if (value.empty() || value.find('/') != std::string_view::npos || value.find(':') != std::string_view::npos)
    return false;
  if (!version) {
    spec->label = std::string(value);
    return true;
  }
  uint64_t n;
  if (!ParseLength(std::string(value), &n)) return false;
  spec->has_version = true;
  spec->version = static_cast<int64_t>(n);
  return true;
}

// tfs_json.http_status_for_grpc.
int HttpStatus(int code) {
  static const int statuses[] = {200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500, 401};
  return code >= 0 && code < 17 ? statuses[code] : 500;
}

const char* Reason(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 429: return "Too Many Requests";
    case 499: return "Client Closed Request";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "Internal Server Error";
  }
}

// tfs_json.error_json: {"error": message} as TF Serving lays it out.
std::string ErrorJson(const std::string& message) {
  std::string out = "{\n    \"error\": ";
  AppendJsonString(message, &out);
  out += "\n}";
  return out;
}

}  // namespace

struct RestConn;

// A caller's connection to the Python gateway's REST server.
struct RestUp {
  int fd = -1;
  RestConn* down = nullptr;
  std::string out;
  size_t out_off = 0;
  bool want_out = false, reading = true, dead = false;
  // Reading the answer: its head, then its body as framed.
  // kResolve: the answer to a route question (Resolve), which never reaches the caller.
  enum State { kHead, kLength, kChunkLine, kChunkData, kChunkEnd, kTrailers, kUntilClose, kTunnel, kResolve } state =
      kHead;
  std::string in;  // a head or a chunk-size line being read
  uint64_t left = 0;
  bool close = false;  // the gateway closes it after this answer
};

// A REST predict call on its way to a replica.
struct RestCall {
  RestConn* conn = nullptr;
  Verb verb = kPredict;
  bool row_format = true;
};

struct RestConn {
  int fd = -1;
  std::string in;  // received, not yet handled
  std::string out;
  size_t out_off = 0;
  bool want_out = false, reading = true, dead = false;
  // kHead: reading a request's head; kBody: a predict call's body, read
  // whole; kCall: at a replica; kRelay: at the Python gateway; kTunnel: bytes
  // both ways for the rest of the connection.
  // kLinger: answered and half-closed; what the caller still sends is read
  // and dropped for a second (closing with unread bytes would reset the
  // connection and lose the answer: an early 413 or 408).
  // kResolve: a model call with no cached route, while the Python gateway
  // is asked for one (Resolve); its body waits unread.
  enum State { kHead, kBody, kCall, kRelay, kTunnel, kLinger, kResolve } state = kHead;
  Head head;
  std::string raw_head;  // as it came, for the relay
  std::string target;    // its request target
  bool resolve = false;   // Candidate: no cached route, ask for one
  bool resolved = false;  // this request's route was asked for already
  std::string method;
  bool http10 = false;  // an HTTP/1.0 request
  uint64_t length = 0;  // the request's Content-Length
  std::string body;
  std::string key;  // a predict call's RestCacheKey ("" for other requests)
  Spec spec;
  Verb verb = kPredict;
  FastRoute route;
  std::string x_request_id;
  Exchange* call = nullptr;
  RestCall rest_call;
  RestUp* up = nullptr;
  uint64_t relay_left = 0;      // request body bytes still to pass on (kRelay)
  bool answered = false;        // kRelay: the gateway's answer is complete
  bool answer_started = false;  // kRelay: some of it was passed on
  bool close_after = false;     // close once this request is answered (its Connection: close)
  bool closing = false;         // close once `out` is written
  Clock::time_point since;      // the state's start (timeouts)
};

struct RestFront::Impl {
  Plane& plane;
  RestHost& host;
  std::string upstream;
  int listener = -1;
  ListenerPause pause;  // while descriptors run out (h2front.h)
  bool stopping = false;
  // What each of this front's epoll data pointers is (closed ones stay until
  // Tick deletes them: an event for them may still be in the loop's batch).
  enum Kind { kListener, kConn, kUp };
  std::unordered_map<void*, Kind> mine;
  std::unordered_set<RestConn*> conns;  // open
  std::vector<RestConn*> graveyard;
  std::vector<RestUp*> up_graveyard;

  Impl(Plane& p, RestHost& h, std::string u) : plane(p), host(h), upstream(std::move(u)) {}

  // --- sockets ---

  void Interest(int fd, void* ptr, bool in, bool out) {
    epoll_event ev{};
    ev.events = (in ? EPOLLIN : 0) | (out ? EPOLLOUT : 0) | EPOLLRDHUP;
    ev.data.ptr = ptr;
    epoll_ctl(host.Epoll(), EPOLL_CTL_MOD, fd, &ev);
  }

  void Update(RestConn* c) {
    if (c->dead) return;
    bool want_out = c->out_off < c->out.size();
    // Stop reading a caller whose bytes its relay cannot take yet.
    bool reading = !(c->up && c->up->out.size() - c->up->out_off > kBacklog) &&
                   c->in.size() < kBacklog + (c->state == RestConn::kResolve ? 0 : c->length);
    if (want_out != c->want_out || reading != c->reading) {
      c->want_out = want_out;
      c->reading = reading;
      Interest(c->fd, c, reading, want_out);
    }
    if (c->up && !c->up->dead) {
      RestUp* u = c->up;
      bool up_out = u->out_off < u->out.size();
      bool up_in = c->out.size() - c->out_off <= kBacklog;
      if (up_out != u->want_out || up_in != u->reading) {
        u->want_out = up_out;
        u->reading = up_in;
        Interest(u->fd, u, up_in, up_out);
      }
    }
  }

  void Close(RestConn* c) {
    if (c->dead) return;
    c->dead = true;
    epoll_ctl(host.Epoll(), EPOLL_CTL_DEL, c->fd, nullptr);
    close(c->fd);
    conns.erase(c);
    if (c->call) {  // the replica's answer goes nowhere
      c->call->rest = nullptr;
      host.Cancel(c->call);
      c->call = nullptr;
    }
    if (c->up) CloseUp(c->up);
    graveyard.push_back(c);
  }

  void CloseUp(RestUp* u) {
    if (u->dead) return;
    u->dead = true;
    epoll_ctl(host.Epoll(), EPOLL_CTL_DEL, u->fd, nullptr);
    close(u->fd);
    if (u->down && u->down->up == u) u->down->up = nullptr;
    up_graveyard.push_back(u);
  }

  // Writes what it can of `out`; false if the connection broke.
  template <typename T>
  bool Flush(T* s) {
    while (s->out_off < s->out.size()) {
      ssize_t w = send(s->fd, s->out.data() + s->out_off, s->out.size() - s->out_off, MSG_NOSIGNAL);
      if (w < 0 && (errno == EAGAIN || errno == EINTR)) break;
      if (w <= 0) return false;
      s->out_off += static_cast<size_t>(w);
    }
    if (s->out_off == s->out.size()) {
      s->out.clear();
      s->out_off = 0;
    } else if (s->out_off > (64 << 10) && s->out_off * 2 > s->out.size()) {
      s->out.erase(0, s->out_off);
      s->out_off = 0;
    }
    return true;
  }

  void Accept() {
    for (;;) {
      int fd = accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return PauseOnExhaustion(host.Epoll(), listener, &pause);
      if (stopping) {
        close(fd);
        continue;
      }
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      auto* c = new RestConn();
      c->fd = fd;
      c->since = Clock::now();
      mine[c] = kConn;
      conns.insert(c);
      epoll_event ev{};
      ev.events = EPOLLIN | EPOLLRDHUP;
      ev.data.ptr = c;
      epoll_ctl(host.Epoll(), EPOLL_CTL_ADD, fd, &ev);
    }
  }

  // --- a caller's connection ---

  void Readable(RestConn* c) {
    char buf[65536];
    for (int i = 0; i < 16; i++) {
      ssize_t n = read(c->fd, buf, sizeof(buf));
      // A caller that closed (or half-closed) gets nothing more.
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return Close(c);
      if (n < 0) break;
      if (c->state == RestConn::kLinger) continue;
      if (c->state == RestConn::kHead && c->in.empty()) c->since = Clock::now();  // a head's first bytes
      c->in.append(buf, static_cast<size_t>(n));
      if (n < static_cast<ssize_t>(sizeof(buf))) break;
    }
    Advance(c);
  }

  // Handles what has come in, as far as it can.
  void Advance(RestConn* c) {
    while (!c->dead) {
      if (c->state == RestConn::kHead) {
        if (!NextHead(c)) break;
      } else if (c->state == RestConn::kBody) {
        if (c->in.size() < c->length) break;
        c->body = c->in.substr(0, c->length);
        c->in.erase(0, c->length);
        Convert(c);
      } else if (c->state == RestConn::kRelay || c->state == RestConn::kTunnel) {
        PassOn(c);
        if (c->state != RestConn::kHead) break;
      } else {
        break;  // kCall: the replica's answer comes first; kLinger: nothing more
      }
    }
    Finish(c);
  }

  void Finish(RestConn* c) {
    if (c->dead) return;
    if (!Flush(c)) return Close(c);
    if (c->up && !c->up->dead && !Flush(c->up)) return UpBroke(c->up);
    if ((c->closing || (c->close_after && c->state == RestConn::kHead)) && c->out_off == c->out.size() &&
        c->state != RestConn::kLinger) {
      shutdown(c->fd, SHUT_WR);
      if (c->up) CloseUp(c->up);
      c->state = RestConn::kLinger;
      c->in.clear();
      c->since = Clock::now();
    }
    Update(c);
  }

  // Reads the next request's head; false if it is not all in yet.
  bool NextHead(RestConn* c) {
    // Stray CRLFs between requests are allowed (RFC 9112 2.2).
    size_t skip = 0;
    while (skip + 1 < c->in.size() && c->in[skip] == '\r' && c->in[skip + 1] == '\n') skip += 2;
    if (skip) c->in.erase(0, skip);
    size_t end = c->in.find("\r\n\r\n");
    if (end == std::string::npos) {
      if (c->in.size() > kMaxHead) {
        Respond(c, 400, ErrorJson("the request's headers are larger than 64 KiB"), true);
        return false;
      }
      return false;
    }
    c->raw_head = c->in.substr(0, end + 4);
    c->in.erase(0, end + 4);
    c->since = Clock::now();
    c->head = Head();
    c->key.clear();
    c->body.clear();
    c->length = 0;
    c->resolved = false;
    if (!ParseHead(std::string_view(c->raw_head).substr(0, end), &c->head)) return Tunnel(c), true;
    const std::string& line = c->head.first;
    size_t sp1 = line.find(' '), sp2 = line.rfind(' ');
    if (sp1 == std::string::npos || sp2 == sp1) return Tunnel(c), true;
    std::string_view version = std::string_view(line).substr(sp2 + 1);
    if (version != "HTTP/1.1" && version != "HTTP/1.0") return Tunnel(c), true;  // the Python gateway's rules
    c->http10 = version == "HTTP/1.0";
    c->method = line.substr(0, sp1);
    std::string target = line.substr(sp1 + 1, sp2 - sp1 - 1);
    const Head& h = c->head;
    const std::string* cl = h.Get("content-length");
    const std::string* connection = h.Get("connection");
    if (h.Get("transfer-encoding") || h.Get("upgrade") || (connection && HasToken(*connection, "upgrade")) ||
        h.Count("content-length") > 1 || (cl && !ParseLength(*cl, &c->length)))
      return Tunnel(c), true;
    // HTTP/1.0 connections close after each answer unless the caller asks to keep them (ab -k does).
    c->close_after = c->http10 ? !(connection && HasToken(*connection, "keep-alive"))
                               : connection && HasToken(*connection, "close");
    c->target = target;
    if (!stopping && Candidate(c, target)) return ReadBody(c), true;
    if (!stopping && c->resolve) return Resolve(c), true;
    Relay(c, false);
    return true;
  }

  void ReadBody(RestConn* c) {
    c->state = RestConn::kBody;
    c->since = Clock::now();
    const std::string* expect = c->head.Get("expect");
    if (expect && IEquals(*expect, "100-continue") && c->in.size() < c->length && !c->http10)
      c->out += "HTTP/1.1 100 Continue\r\n\r\n";
  }

  // A predict call this process may answer: its route is cached and its body within the model's limit.
  bool Candidate(RestConn* c, const std::string& target) {
    const Head& h = c->head;
    // aiohttp refuses a request line or header longer than 8190 bytes (400):
    // such heads always get the Python gateway's answer.
    c->resolve = false;
    if (c->raw_head.size() > kAiohttpLine || c->method != "POST" || !h.Get("content-length") || c->length == 0)
      return false;
    const std::string* encoding = h.Get("content-encoding");
    if (encoding && !IEquals(*encoding, "identity")) return false;
    const std::string* expect = h.Get("expect");
    if (expect && !IEquals(*expect, "100-continue")) return false;
    if (h.Count(kAuthorization) > 1 || h.Count("x-request-id") > 1) return false;
    c->spec = Spec();
    if (!ModelCallPath(target, &c->spec, &c->verb)) return false;
    const std::string* rid = h.Get("x-request-id");
    c->x_request_id = rid ? *rid : "";
    for (char ch : c->x_request_id)
      if (ch < 0x20 || ch > 0x7e) return false;  // not valid gRPC metadata: the Python gateway's rules
    const std::string* auth = h.Get(kAuthorization);
    std::string key = RestCacheKey(auth ? *auth : "", c->spec);
    // A predict call's tensors need the version's signatures; classify and regress build tf.Examples.
    if (!plane.Lookup(key, c->spec, kApis[c->verb], host.Rng(), &c->route) ||
        (c->verb == kPredict && !c->route.signatures)) {
      c->key = key;  // the Python gateway's answer may bring the decision
      c->resolve = !c->resolved;
      return false;
    }
    c->key = key;
    uint64_t limit = plane.options.max_request_bytes;
    if (c->route.max_request_bytes) limit = std::min(limit, c->route.max_request_bytes);
    return c->length <= limit;  // else the Python gateway answers 413
  }

  // The body is in: converted here, straight to a replica.
  void Convert(RestConn* c) {
    std::string request;
    bool row = true, converted = false;
    uint64_t limit = plane.options.max_request_bytes;
    if (c->route.max_request_bytes) limit = std::min(limit, c->route.max_request_bytes);
    switch (c->verb) {
      case kPredict:
        converted = PredictRequestFromJson(c->body, *c->route.signatures, c->spec.name, c->route.version, &request,
                                           &row);
        break;
      case kClassify:
        converted = ClassifyRequestFromJson(c->body, c->spec.name, c->route.version, &request);
        break;
      case kRegress:
        converted = RegressRequestFromJson(c->body, c->spec.name, c->route.version, &request);
        break;
    }
    if (!converted || request.size() > limit) return Relay(c, true);
    std::vector<const std::string*> candidates;
    for (const auto& a : c->route.addresses) candidates.push_back(&a);
    const std::string* picked = PickTwo(
        candidates, [this](size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(host.Rng()); },
        [this](const std::string& a) { return host.Outstanding(a); });
    if (!picked) return Relay(c, true);
    std::string frame = FrameOf(c->route.addresses, c->route.frames, picked);
    // A batching replica's Predict calls are coalesced: by the HTTP/2 front
    // over its framed socket (h2front.cc), else by the gRPC side.
    bool batching = c->verb == kPredict && c->route.coalesce_max > 1;
    bool framed = !frame.empty() && plane.options.frames;
    bool coalesce = batching && !framed && !host.GrpcSide().empty();
    if (coalesce) picked = &host.GrpcSide();
    auto* x = new Exchange();
    c->rest_call.conn = c;
    c->rest_call.row_format = row;
    c->rest_call.verb = c->verb;
    x->rest = &c->rest_call;
    x->api = kApis[c->verb];
    x->path = std::string(kPredictionService) + x->api;
    x->key = c->key;
    x->model = c->spec.name;
    x->version = c->route.version;
    x->bare = c->route.bare || coalesce;  // the gRPC side routes it itself
    x->to_grpc_side = coalesce;
    x->started = Clock::now();
    x->deadline = x->started + kPredictTimeout;
    if (!c->x_request_id.empty()) x->request_headers.push_back({"x-request-id", c->x_request_id});
    if (coalesce && c->head.Get(kAuthorization)) x->request_headers.push_back({kAuthorization, *c->head.Get(kAuthorization)});
    x->body = GrpcMessage(request);
    x->request_ended = true;
    x->whole = true;
    c->call = x;
    c->state = RestConn::kCall;
    plane.Count(&Plane::rest_calls);
    if (!coalesce) x->frame = frame;
    if (batching && framed) {
      x->coalesce_max = c->route.coalesce_max;
      x->batch_timeout_us = c->route.batch_timeout_us;
      x->limit = limit;
    }
    host.Fast(x, *picked);
  }

  // Answers the current request with a JSON body and goes on to the next.
  void Respond(RestConn* c, int status, const std::string& body, bool close = false) {
    c->closing = c->closing || close;
    c->close_after = c->close_after || close;
    c->out += "HTTP/1.1 " + std::to_string(status) + " " + Reason(status) +
              "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
              (c->close_after ? "\r\nConnection: close\r\n\r\n"
               : c->http10  ? "\r\nConnection: keep-alive\r\n\r\n"
                            : "\r\n\r\n");
    c->out += body;
    c->state = RestConn::kHead;
    c->since = Clock::now();
    c->body.clear();
  }

  // --- the relay to the Python gateway ---

  RestUp* Up(RestConn* c) {
    if (c->up && !c->up->dead && !c->up->close) return c->up;
    if (c->up) CloseUp(c->up);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::string path = upstream.substr(5);
    if (path.size() >= sizeof(sa.sun_path)) return nullptr;
    memcpy(sa.sun_path, path.data(), path.size());
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return nullptr;
    if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) < 0) {
      close(fd);
      return nullptr;
    }
    auto* u = new RestUp();
    u->fd = fd;
    u->down = c;
    c->up = u;
    mine[u] = kUp;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.ptr = u;
    epoll_ctl(host.Epoll(), EPOLL_CTL_ADD, fd, &ev);
    return u;
  }

  // The request's head (a caller's x-cloudml-* headers dropped, the secret
  // added) for the Python gateway.
  std::string RelayHead(const RestConn* c) {
    std::string out = c->head.first + "\r\n";
    for (const auto& h : c->head.headers) {
      if (IStartsWith(h.name, kPlatformPrefix)) continue;
      out += h.name + ": " + h.value + "\r\n";
    }
    out += std::string(kSecretHeader) + ": " + plane.options.secret + "\r\n\r\n";
    return out;
  }

  // A model call with no cached route (a token's first): asks the Python
  // gateway for the route alone (its head, kRestResolveHeader, no body). With
  // one, the call is converted here like a repeat call (Resumed), and the
  // Python gateway converts JSON only for what this codec declines; without,
  // the call is relayed as it came and the Python gateway answers it.
  void Resolve(RestConn* c) {
    RestUp* u = Up(c);
    if (!u) return Relay(c, false);  // which answers 503
    u->state = RestUp::kResolve;
    u->in.clear();
    std::string out = "POST " + c->target + " HTTP/1.1\r\n";
    for (const auto& h : c->head.headers) {
      if (IStartsWith(h.name, kPlatformPrefix) || IEquals(h.name, "content-length") || IEquals(h.name, "expect") ||
          IEquals(h.name, "content-encoding") || IEquals(h.name, "connection") || IEquals(h.name, "keep-alive"))
        continue;
      out += h.name + ": " + h.value + "\r\n";
    }
    u->out += out + kRestResolveHeader + ": 1\r\ncontent-length: 0\r\n" + kSecretHeader + ": " +
              plane.options.secret + "\r\n\r\n";
    c->resolved = true;
    c->state = RestConn::kResolve;
    c->since = Clock::now();
  }

  // The Python gateway's answer to Resolve: 204, with the decision or not.
  void Resolved(RestUp* u, RestConn* c, const std::string& text, bool more) {
    Head head;
    bool keep = !more && ParseHead(text, &head) && head.first.size() >= 12 && atoi(head.first.c_str() + 9) == 204;
    if (keep) {
      for (const auto& h : head.headers)
        if (IEquals(h.name, kRestDecisionHeader) && !c->key.empty()) Learn(c->key, h.value);
      const std::string* connection = head.Get("connection");
      keep = !(connection && HasToken(*connection, "close"));
    }
    if (keep)
      u->state = RestUp::kHead;
    else
      CloseUp(u);  // an answer with a body, or none the front understands: the relay takes a new connection
    Resumed(c);
  }

  // After Resolve: converted here if the route is cached now, else relayed.
  void Resumed(RestConn* c) {
    if (c->dead || c->state != RestConn::kResolve) return;
    if (!stopping && Candidate(c, c->target)) return ReadBody(c);
    Relay(c, false);
  }

  // Sends the current request to the Python gateway; `whole`: its body has been read (c->body).
  void Relay(RestConn* c, bool whole) {
    RestUp* u = Up(c);
    if (!u) {
      c->in.clear();  // the rest of this request cannot be framed: the connection ends
      return Respond(c, 503, ErrorJson("the gateway's REST server is not reachable"), true);
    }
    u->state = RestUp::kHead;
    u->in.clear();
    u->out += RelayHead(c);
    if (whole) {
      u->out += c->body;
      c->relay_left = 0;
    } else {
      c->relay_left = c->length;
    }
    c->body.clear();
    c->answered = false;
    c->answer_started = false;
    c->state = RestConn::kRelay;
    c->since = Clock::now();
  }

  // Everything from here on goes to the Python gateway as it comes.
  void Tunnel(RestConn* c) {
    RestUp* u = Up(c);
    if (!u) {
      c->in.clear();
      return Respond(c, 503, ErrorJson("the gateway's REST server is not reachable"), true);
    }
    u->out += c->raw_head;
    u->state = RestUp::kTunnel;
    c->state = RestConn::kTunnel;
  }

  // Passes the caller's body bytes on (kRelay: up to the request's end; kTunnel: all).
  void PassOn(RestConn* c) {
    if (!c->up) return;
    if (c->state == RestConn::kTunnel) {
      c->up->out += c->in;
      c->in.clear();
      return;
    }
    size_t n = static_cast<size_t>(std::min<uint64_t>(c->relay_left, c->in.size()));
    c->up->out.append(c->in, 0, n);
    c->in.erase(0, n);
    c->relay_left -= n;
    Done(c);
  }

  // A relayed request is over once its body is passed on and its answer is back.
  void Done(RestConn* c) {
    if (c->state != RestConn::kRelay || !c->answered || c->relay_left) return;
    c->state = RestConn::kHead;
    c->since = Clock::now();
  }

  void UpReadable(RestUp* u) {
    char buf[65536];
    RestConn* c = u->down;
    for (int i = 0; i < 16 && !u->dead; i++) {
      ssize_t n = read(u->fd, buf, sizeof(buf));
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return UpBroke(u);
      if (n < 0) break;
      if (!c) continue;
      Answer(u, c, std::string_view(buf, static_cast<size_t>(n)));
      if (n < static_cast<ssize_t>(sizeof(buf))) break;
    }
    if (c && !c->dead) Advance(c);
  }

  // The Python gateway closed the connection (or it broke).
  void UpBroke(RestUp* u) {
    RestConn* c = u->down;
    RestUp::State state = u->state;
    CloseUp(u);
    if (!c || c->dead) return;
    if (c->state == RestConn::kTunnel) {
      c->closing = true;
    } else if (c->state == RestConn::kResolve) {
      Resumed(c);  // relayed on a new connection
      return Advance(c);
    } else if (c->state == RestConn::kRelay && !c->answered) {
      if (state == RestUp::kUntilClose) {  // the answer's end
        c->answered = true;
        Done(c);
      } else if (!c->answer_started) {
        c->in.clear();
        Respond(c, 502, ErrorJson("the gateway's REST server closed the connection"), true);
      } else {
        c->closing = true;  // a cut answer: the caller sees the connection close
      }
    }
    Finish(c);
  }

  // Bytes of the Python gateway's answer: on to the caller, framing tracked.
  void Answer(RestUp* u, RestConn* c, std::string_view data) {
    while (!data.empty() && !u->dead) {
      switch (u->state) {
        case RestUp::kResolve: {
          size_t before = u->in.size();
          u->in.append(data);
          size_t end = u->in.find("\r\n\r\n", before > 3 ? before - 3 : 0);
          if (end == std::string::npos) {
            if (u->in.size() > kMaxHead) Resolved(u, c, "", true);
            return;
          }
          bool more = u->in.size() > end + 4;
          std::string text = u->in.substr(0, end);
          u->in.clear();
          return Resolved(u, c, text, more);
        }
        case RestUp::kTunnel:
        case RestUp::kUntilClose:
          c->out.append(data);
          return;
        case RestUp::kHead: {
          size_t before = u->in.size();
          u->in.append(data);
          size_t end = u->in.find("\r\n\r\n", before > 3 ? before - 3 : 0);
          if (end == std::string::npos) {
            if (u->in.size() > kMaxHead) return UpBroke(u);
            return;
          }
          size_t used = end + 4 - before;
          data.remove_prefix(used);
          std::string text = u->in.substr(0, end);
          u->in.clear();
          AnswerHead(u, c, text);
          break;
        }
        case RestUp::kLength: {
          size_t n = static_cast<size_t>(std::min<uint64_t>(u->left, data.size()));
          c->out.append(data.substr(0, n));
          data.remove_prefix(n);
          u->left -= n;
          if (!u->left) Answered(u, c);
          break;
        }
        case RestUp::kChunkLine:
        case RestUp::kTrailers: {
          size_t eol = data.find('\n');
          size_t n = eol == std::string_view::npos ? data.size() : eol + 1;
          c->out.append(data.substr(0, n));
          u->in.append(data.substr(0, n));
          data.remove_prefix(n);
          if (u->in.size() > 4096) return UpBroke(u);
          if (eol == std::string_view::npos) break;
          std::string line = u->in;
          u->in.clear();
          while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
          if (u->state == RestUp::kTrailers) {
            if (line.empty()) Answered(u, c);
            break;
          }
          u->left = strtoull(line.c_str(), nullptr, 16);
          u->state = u->left ? RestUp::kChunkData : RestUp::kTrailers;
          break;
        }
        case RestUp::kChunkData: {
          size_t n = static_cast<size_t>(std::min<uint64_t>(u->left, data.size()));
          c->out.append(data.substr(0, n));
          data.remove_prefix(n);
          u->left -= n;
          if (!u->left) u->state = RestUp::kChunkEnd, u->left = 2;
          break;
        }
        case RestUp::kChunkEnd: {
          size_t n = static_cast<size_t>(std::min<uint64_t>(u->left, data.size()));
          c->out.append(data.substr(0, n));
          data.remove_prefix(n);
          u->left -= n;
          if (!u->left) u->state = RestUp::kChunkLine;
          break;
        }
      }
    }
  }

  void AnswerHead(RestUp* u, RestConn* c, const std::string& text) {
    Head head;
    if (!ParseHead(text, &head) || head.first.size() < 12) {
      c->out += text + "\r\n\r\n";
      u->state = RestUp::kUntilClose;
      c->close_after = true;
      return;
    }
    int status = atoi(head.first.c_str() + 9);
    c->answer_started = true;
    std::string out = head.first + "\r\n";
    for (const auto& h : head.headers) {
      if (IEquals(h.name, kRestDecisionHeader)) {
        if (status == 200 && !c->key.empty()) Learn(c->key, h.value);
        continue;
      }
      out += h.name + ": " + h.value + "\r\n";
    }
    c->out += out + "\r\n";
    const std::string* connection = head.Get("connection");
    u->close = connection && HasToken(*connection, "close");
    if (status == 101) {
      u->state = RestUp::kTunnel;
      c->state = RestConn::kTunnel;
      return;
    }
    if (status >= 100 && status < 200) return;  // 100 Continue: the answer's head is still to come
    const std::string* te = head.Get("transfer-encoding");
    const std::string* cl = head.Get("content-length");
    uint64_t length = 0;
    if (c->method == "HEAD" || status == 204 || status == 304) {
      Answered(u, c);
    } else if (te && HasToken(*te, "chunked")) {
      u->state = RestUp::kChunkLine;
    } else if (cl && ParseLength(*cl, &length)) {
      u->left = length;
      u->state = RestUp::kLength;
      if (!length) Answered(u, c);
    } else {
      u->state = RestUp::kUntilClose;
      c->close_after = true;
    }
  }

  void Answered(RestUp* u, RestConn* c) {
    u->state = RestUp::kHead;
    c->answered = true;
    // An answer before the whole request was passed on (an early 413, 408):
    // the rest of the request cannot be told from the next one.
    if (c->relay_left) c->closing = true, c->in.clear(), c->relay_left = 0;
    if (u->close) CloseUp(u);
    Done(c);
  }

  // Caches the RestDecision the Python gateway sent for `key`.
  void Learn(const std::string& key, const std::string& encoded) {
    cloudml::internal::v1::RestDecision msg;
    std::string bytes;
    if (!Base64Decode(encoded, &bytes) || bytes.empty() || !msg.ParseFromString(bytes)) return;
    Decision d = DecisionOf(msg.route());
    for (auto& choice : d.choices)
      for (const auto& v : msg.versions()) {
        if (v.version() != choice.version) continue;
        auto sigs = std::make_shared<Signatures>();
        for (const auto& [name, inputs] : v.signatures()) {
          SignatureInputs& list = (*sigs)[name];
          for (const auto& [input, dtype] : inputs.dtypes()) list.emplace_back(input, dtype);
          std::sort(list.begin(), list.end());
        }
        choice.signatures = std::move(sigs);
      }
    plane.Cache(key, std::move(d));
  }

  // --- the replica's answer ---

  static bool ResponseToJson(const RestCall& call, std::string_view response, std::string* json) {
    switch (call.verb) {
      case kPredict: return PredictResponseToJson(response, call.row_format, json);
      case kClassify: return ClassificationResponseToJson(response, json);
      case kRegress: return RegressionResponseToJson(response, json);
    }
    return false;
  }

  void Replied(Exchange* x, int code) {
    RestConn* c = x->rest->conn;
    c->call = nullptr;
    x->rest = nullptr;
    if (code != 0) {
      const std::string* message = nullptr;
      for (const auto* list : {&x->trailers, &x->response_headers})
        for (const auto& h : *list)
          if (h.name == "grpc-message") message = &h.value;
      std::string text = message ? PercentDecode(*message) : "";
      if (text.empty()) text = CodeName(static_cast<grpc::StatusCode>(code));
      Respond(c, HttpStatus(code), ErrorJson(text));
    } else {
      std::string json;
      const std::string& r = x->response;
      uint32_t len = r.size() >= 5 ? (uint8_t(r[1]) << 24) | (uint8_t(r[2]) << 16) | (uint8_t(r[3]) << 8) |
                                         uint8_t(r[4])
                                   : 0;
      if (r.size() < 5 || r[0] != 0 || len != r.size() - 5 ||
          !ResponseToJson(c->rest_call, std::string_view(r).substr(5), &json)) {
        // The Python gateway answers it (an error of TF Serving's, or a dtype the codec leaves to it).
        delete x;
        Relay(c, true);
        return Advance(c);
      }
      Respond(c, 200, json);
    }
    delete x;
    Advance(c);
  }

  void Slow(Exchange* x) {
    RestConn* c = x->rest->conn;
    c->call = nullptr;
    x->rest = nullptr;
    plane.Forget(c->key);
    delete x;
    Relay(c, true);
    Advance(c);
  }

  void Failed(Exchange* x, int code, const std::string& message) {
    RestConn* c = x->rest->conn;
    c->call = nullptr;
    x->rest = nullptr;
    delete x;
    Respond(c, HttpStatus(code), ErrorJson(message));
    Advance(c);
  }

  // --- timeouts ---

  void Tick() {
    auto now = Clock::now();
    if (!stopping && listener >= 0) ResumeListener(host.Epoll(), listener, &listener, &pause);
    std::vector<RestConn*> expired;
    for (RestConn* c : conns) {
      if (c->state == RestConn::kHead && now - c->since > (c->in.empty() ? kIdleTime : kHeadTime))
        expired.push_back(c);
      else if (c->state == RestConn::kBody && now - c->since > kBodyTime)
        expired.push_back(c);
      else if (c->state == RestConn::kLinger && now - c->since > kLingerTime)
        expired.push_back(c);
      else if (c->state == RestConn::kResolve && now - c->since > kResolveTime)
        expired.push_back(c);
    }
    for (RestConn* c : expired) {
      if (c->dead) continue;
      if (c->state == RestConn::kResolve) {
        if (c->up) CloseUp(c->up);
        Resumed(c);  // relayed as it came (no route was learnt)
        Advance(c);
      } else if (c->state == RestConn::kBody) {
        c->in.clear();
        Respond(c, 408, ErrorJson("the request body did not arrive within 5 seconds"), true);
        Finish(c);
      } else {
        Close(c);
      }
    }
    for (RestConn* c : graveyard) mine.erase(c), delete c;
    graveyard.clear();
    for (RestUp* u : up_graveyard) mine.erase(u), delete u;
    up_graveyard.clear();
  }
};

RestFront::RestFront(Plane& plane, RestHost& host, std::string upstream)
    : impl_(std::make_unique<Impl>(plane, host, std::move(upstream))) {}

RestFront::~RestFront() = default;

int RestFront::Listen(const std::string& address) {
  Impl& m = *impl_;
  int port = 0;
  if (address.compare(0, 5, "unix:") == 0 || (m.listener = Bind(address, &port)) < 0) return 0;
  m.mine[&m.listener] = Impl::kListener;
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = &m.listener;
  epoll_ctl(m.host.Epoll(), EPOLL_CTL_ADD, m.listener, &ev);
  return port;
}

bool RestFront::Event(void* p, uint32_t events) {
  Impl& m = *impl_;
  auto it = m.mine.find(p);
  if (it == m.mine.end()) return false;
  if (it->second == Impl::kListener) {
    m.Accept();
    return true;
  }
  if (it->second == Impl::kConn) {
    auto* c = static_cast<RestConn*>(p);
    if (!c->dead && (events & EPOLLOUT)) m.Finish(c);
    if (!c->dead && (events & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP))) m.Readable(c);
    return true;
  }
  auto* u = static_cast<RestUp*>(p);
  if (u->dead) return true;
  if (events & EPOLLOUT) {
    if (!m.Flush(u)) {
      m.UpBroke(u);
      return true;
    }
    if (u->down) m.Update(u->down);
  }
  if (!u->dead && (events & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP))) m.UpReadable(u);
  return true;
}

void RestFront::Tick() { impl_->Tick(); }

bool RestFront::Drained() {
  Impl& m = *impl_;
  if (!m.stopping) {
    m.stopping = true;
    if (m.listener >= 0) {
      epoll_ctl(m.host.Epoll(), EPOLL_CTL_DEL, m.listener, nullptr);
      close(m.listener);
      m.mine.erase(&m.listener);
      m.listener = -1;
    }
  }
  std::vector<RestConn*> idle;
  bool busy = false;
  for (RestConn* c : m.conns) {
    // Idle connections close at once, and tunnels too (a WebSocket has no
    // end to wait for; aiohttp closes its own at shutdown as well); a
    // request in progress gets the grace period to finish.
    if ((c->state == RestConn::kHead && c->in.empty() && c->out_off == c->out.size()) ||
        c->state == RestConn::kTunnel)
      idle.push_back(c);
    else
      busy = true;
  }
  for (RestConn* c : idle) m.Close(c);
  return !busy;
}

void RestFront::CloseAll() {
  Impl& m = *impl_;
  std::vector<RestConn*> all(m.conns.begin(), m.conns.end());
  for (RestConn* c : all) m.Close(c);
  m.Tick();
}

void RestFront::Replied(Exchange* x, int code) { impl_->Replied(x, code); }
void RestFront::Slow(Exchange* x) { impl_->Slow(x); }
void RestFront::Failed(Exchange* x, int code, const std::string& message) { impl_->Failed(x, code, message); }

}  // namespace cloudml::dataplane
