// See frame.h.
#include "frame.h"

#include <cstring>

#include "protocol.h"

namespace cloudml::dataplane::frame {
namespace {

void Put(std::string* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; i++) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

uint64_t Get(const char* in, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; i++) v |= static_cast<uint64_t>(static_cast<uint8_t>(in[i])) << (8 * i);
  return v;
}

}  // namespace

int MethodOf(const std::string& api) {
  int i = 0;
  for (const char* m : kForwardedMethods) {
    if (api == m) return i;
    i++;
  }
  return -1;
}

void AppendCall(std::string* out, uint64_t id, Method method, int64_t resolved_version, uint64_t timeout_us,
                const char* request, size_t request_size) {
  Put(out, 1 + 8 + kCallHeader + request_size, 4);
  Put(out, kCall, 1);
  Put(out, id, 8);
  Put(out, method, 1);
  Put(out, static_cast<uint64_t>(resolved_version), 8);
  Put(out, timeout_us, 8);
  out->append(request, request_size);
}

void AppendCancel(std::string* out, uint64_t id) {
  Put(out, 1 + 8, 4);
  Put(out, kCancel, 1);
  Put(out, id, 8);
}

int ParseReply(const char* in, size_t size, Reply* out, size_t* used) {
  if (size < 4) return 0;
  uint64_t length = Get(in, 4);
  if (length < 1 + 8 + kReplyHeader || length > kMaxReply) return -1;
  if (size < 4 + length) return 0;
  const char* p = in + 4;
  if (static_cast<uint8_t>(p[0]) != kReply) return -1;
  out->id = Get(p + 1, 8);
  out->code = static_cast<uint32_t>(Get(p + 9, 4));
  uint64_t message = Get(p + 13, 4);
  size_t fixed = 1 + 8 + kReplyHeader;
  if (out->code > 16 || message > kMaxMessage || message > length - fixed) return -1;
  out->message.assign(p + fixed, message);
  out->response.assign(p + fixed + message, length - fixed - message);
  *used = 4 + length;
  return 1;
}

}  // namespace cloudml::dataplane::frame
