#include "wire.h"

#include <cctype>
#include <vector>

namespace cloudml::dataplane {

std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  out.reserve(buffer.Length());
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

std::string GrpcMessage(const char* message, size_t size) {
  std::string out;
  out.reserve(size + 5);
  out.push_back('\0');
  uint32_t n = static_cast<uint32_t>(size);
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<char>((n >> shift) & 0xff));
  out.append(message, size);
  return out;
}

std::string PercentEncode(const std::string& message) {
  static const char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(message.size());
  for (unsigned char c : message) {
    if (c >= 0x20 && c <= 0x7e && c != '%') {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

std::string PercentDecode(const std::string& value) {
  std::string out;
  out.reserve(value.size());
  for (size_t i = 0; i < value.size(); i++) {
    if (value[i] == '%' && i + 2 < value.size() && isxdigit(static_cast<unsigned char>(value[i + 1])) &&
        isxdigit(static_cast<unsigned char>(value[i + 2]))) {
      out += static_cast<char>(std::stoi(value.substr(i + 1, 2), nullptr, 16));
      i += 2;
    } else {
      out += value[i];
    }
  }
  return out;
}

grpc::ByteBuffer ToBuffer(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

namespace {

bool Field1(const std::string& d, std::string* out, bool* found) {
  *found = false;
  return Fields(d, [&](int number, int wire, uint64_t, const std::string& bytes) {
    if (number == 1 && wire == 2) { *out = bytes; *found = true; return false; }
    return true;
  });
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

}  // namespace

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

namespace {
// The version in model_spec when it is the message's first field (true only then).
bool HeadVersion(const std::string& head, int64_t* version) {
  size_t pos = 0;
  uint64_t tag, len;
  if (!(Varint(head, &pos, &tag) && tag == ((2 << 3) | 2) && Varint(head, &pos, &len) && len <= head.size() - pos))
    return false;
  Spec spec;
  if (!ParseModelSpec(head.substr(pos, len), &spec) || !spec.has_version) return false;
  *version = spec.version;
  return true;
}
}  // namespace

// The model server writes model_spec first, so the response's first bytes
// usually hold it; other layouts are read whole.
bool ResponseVersion(const grpc::ByteBuffer& response, int64_t* version) {
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return false;
  std::string head;
  for (const auto& slice : slices) {
    head.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
    if (head.size() >= 512) break;
  }
  return HeadVersion(head, version) || SpecVersion(Flatten(response), version);
}

bool ResponseVersion(const std::string& response, int64_t* version) {
  return HeadVersion(response, version) || SpecVersion(response, version);
}

}  // namespace cloudml::dataplane
