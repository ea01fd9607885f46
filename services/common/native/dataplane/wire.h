// Reading a model call's model_spec, and a response's served version, off
// the wire (proto3 wire format), without parsing the whole message.
#pragma once

#include <grpcpp/support/byte_buffer.h>

#include <cstdint>
#include <string>

namespace cloudml::dataplane {

// The bytes of `buffer` in one string.
std::string Flatten(const grpc::ByteBuffer& buffer);
// One-slice buffer holding a copy of `bytes`.
grpc::ByteBuffer ToBuffer(const std::string& bytes);

// `message` as one uncompressed gRPC message on an HTTP/2 stream: the 5-byte
// prefix (flag 0, big-endian length), then the bytes.
std::string GrpcMessage(const char* message, size_t size);
inline std::string GrpcMessage(const std::string& message) { return GrpcMessage(message.data(), message.size()); }

// A status message as the grpc-message header carries it (percent-encoded:
// every byte outside printable ASCII, and '%'), and back.
std::string PercentEncode(const std::string& message);
std::string PercentDecode(const std::string& value);

inline bool Varint(const std::string& d, size_t* pos, uint64_t* out) {
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

// A tensorflow.serving.ModelSpec's routing fields.
struct Spec {
  std::string name, label;
  bool has_version = false;
  int64_t version = 0;
};

bool ParseModelSpec(const std::string& bytes, Spec* spec);

// The ModelSpec of a forwarded call to `api` (a PredictionService method);
// false if absent, nameless or malformed (the control plane then answers
// with TF Serving's error).
bool ParseSpec(const std::string& api, const std::string& request, Spec* spec);

// The served version in a PredictResponse's model_spec; false if absent.
bool ResponseVersion(const grpc::ByteBuffer& response, int64_t* version);
bool ResponseVersion(const std::string& response, int64_t* version);

}  // namespace cloudml::dataplane
