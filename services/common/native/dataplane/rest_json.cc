// TF Serving's REST JSON <-> the Predict, Classify and Regress protos, in C++
// (rest_json.h has the contract: the Python codec's result exactly, or a
// decline).
//
// Requests: a strict RFC 8259 parser lays the body out as a flat array of
// nodes whose numbers and strings stay spans of the body; they are converted
// only once the input's dtype is known, straight into that input's
// tensor_content or string_val. The PredictRequest is written by hand: it is
// a handful of fields around the values, and generated classes would copy
// every value once more. Classify and Regress bodies go the same way into
// tf.Examples (a feature's kind follows its JSON values, as in Python).
// Responses: the PredictResponse wire format is read by hand as well (values
// stay in the response's bytes until they are printed), then written in the
// PrettyWriter layout of services/gateway/tfs_json/predict_response.py.
#include "rest_json.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace cloudml::dataplane {
namespace {

// tensorflow.DataType values this codec handles.
enum : int {
  kFloat = 1, kDouble = 2, kInt32 = 3, kUInt8 = 4, kInt16 = 5, kInt8 = 6, kString = 7, kInt64 = 9,
  kBool = 10, kBFloat16 = 14, kHalf = 19, kUInt32 = 22, kUInt64 = 23,
};

constexpr int kMaxDepth = 64;
constexpr double kFltMax = 3.4028234663852886e38;  // float's largest finite value, as Python's FLT_MAX
constexpr uint64_t kFloatMaxInt = (1ull << 24) - 1;  // IsLosslessDecimal<float>
constexpr uint64_t kDoubleMaxInt = (1ull << 53) - 1;
// Python's json turns longer integers into a ValueError (int_max_str_digits,
// 4300), wherever they are in the body; far below that, any integer is out
// of every range but float's and double's. The parser declines longer ones.
constexpr size_t kMaxIntDigits = 300;
// Responses larger than this (in values, or in brackets for zero-size
// tensors) are left to Python, which may not manage them either.
constexpr uint64_t kMaxResponseValues = 1ull << 27;

// ---------------------------------------------------------------------------
// UTF-8
// ---------------------------------------------------------------------------

// Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF), as
// Python decodes and protobuf checks proto3 strings.
bool ValidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    unsigned c = *p;
    if (c < 0x80) { ++p; continue; }
    int more;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      more = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
      more = 2;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      more = 3;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return false;
    }
    if (end - p <= more) return false;
    if (p[1] < lo || p[1] > hi) return false;
    for (int i = 2; i <= more; ++i)
      if ((p[i] & 0xC0) != 0x80) return false;
    p += more + 1;
  }
  return true;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The four hex digits at s[0..3] (already checked by the parser).
uint32_t Hex4(const char* s) {
  return static_cast<uint32_t>(HexDigit(s[0]) << 12 | HexDigit(s[1]) << 8 | HexDigit(s[2]) << 4 | HexDigit(s[3]));
}

// ---------------------------------------------------------------------------
// JSON: a flat DOM over the body
// ---------------------------------------------------------------------------

enum class Kind : uint8_t { kNull, kFalse, kTrue, kInt, kReal, kString, kArray, kObject };

// Nodes are in document order; an array's elements follow it, an object's
// members follow it as (key string, value) pairs; `end` skips a subtree.
struct Node {
  Kind kind;
  bool escaped;     // a string holding backslash escapes
  uint32_t count;   // elements of an array, members of an object
  uint32_t end;     // index one past this node's subtree
  uint32_t begin;   // a number's literal, a string's contents (quotes excluded): span of the body
  uint32_t size;
};

class Json {
 public:
  explicit Json(std::string_view text) : text_(text) {}

  // The whole body: one object, whitespace around it. false: anything
  // Python's json.loads would refuse, and what this parser does not take
  // although Python does (NaN and Infinity tokens, a BOM, deep nesting,
  // duplicate keys, which Python resolves as the last one wins).
  bool Parse() {
    if (text_.size() >= 0xFFFFFFF0u) return false;
    nodes_.reserve(text_.size() / 8 + 16);
    Space();
    if (pos_ >= text_.size() || text_[pos_] != '{') return false;
    if (!Value(0)) return false;
    Space();
    return pos_ == text_.size();
  }

  const Node& operator[](uint32_t i) const { return nodes_[i]; }

  std::string_view Span(const Node& n) const { return text_.substr(n.begin, n.size); }

  // A string node's value as bytes: raw bytes as they are (Python reads the
  // body with surrogateescape and writes the str back the same way), escapes
  // decoded, surrogate pairs joined.
  void Decode(const Node& n, std::string* out) const {
    std::string_view s = Span(n);
    if (!n.escaped) { out->append(s); return; }
    size_t i = 0;
    while (i < s.size()) {
      size_t slash = s.find('\\', i);
      if (slash == std::string_view::npos) slash = s.size();
      out->append(s.data() + i, slash - i);
      if (slash == s.size()) break;
      char e = s[slash + 1];
      i = slash + 2;
      switch (e) {
        case 'b': out->push_back('\b'); break;
        case 'f': out->push_back('\f'); break;
        case 'n': out->push_back('\n'); break;
        case 'r': out->push_back('\r'); break;
        case 't': out->push_back('\t'); break;
        case 'u': {
          uint32_t cp = Hex4(s.data() + i);
          i += 4;
          if (cp >= 0xD800 && cp <= 0xDBFF) {  // the parser checked the low half follows
            cp = 0x10000 + ((cp - 0xD800) << 10) + (Hex4(s.data() + i + 2) - 0xDC00);
            i += 6;
          }
          AppendUtf8(cp, out);
          break;
        }
        default: out->push_back(e);  // " \ /
      }
    }
  }

  bool KeyIs(const Node& key, std::string_view literal) const {
    if (!key.escaped) return Span(key) == literal;
    std::string decoded;
    Decode(key, &decoded);
    return decoded == literal;
  }

 private:
  void Space() {
    while (pos_ < text_.size()) {
      char c = text_[pos_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') return;
      ++pos_;
    }
  }

  uint32_t Add(Kind kind) {
    nodes_.push_back(Node{kind, false, 0, 0, static_cast<uint32_t>(pos_), 0});
    return static_cast<uint32_t>(nodes_.size() - 1);
  }

  bool Literal(std::string_view word, Kind kind) {
    if (text_.substr(pos_, word.size()) != word) return false;
    uint32_t i = Add(kind);
    pos_ += word.size();
    nodes_[i].end = i + 1;
    return true;
  }

  bool Value(int depth) {
    if (pos_ >= text_.size()) return false;
    char c = text_[pos_];
    switch (c) {
      case '{': return Object(depth + 1);
      case '[': return Array(depth + 1);
      case '"': return String();
      case 't': return Literal("true", Kind::kTrue);
      case 'f': return Literal("false", Kind::kFalse);
      case 'n': return Literal("null", Kind::kNull);
      default: return Number();
    }
  }

  bool Number() {
    size_t start = pos_, n = text_.size();
    bool real = false;
    if (pos_ < n && text_[pos_] == '-') ++pos_;
    if (pos_ >= n) return false;
    if (text_[pos_] == '0') {
      ++pos_;
    } else if (text_[pos_] >= '1' && text_[pos_] <= '9') {
      while (pos_ < n && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
    } else {
      return false;  // also NaN, Infinity, -Infinity
    }
    if (pos_ < n && text_[pos_] == '.') {
      real = true;
      ++pos_;
      size_t digits = pos_;
      while (pos_ < n && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
      if (pos_ == digits) return false;
    }
    if (pos_ < n && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
      real = true;
      ++pos_;
      if (pos_ < n && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
      size_t digits = pos_;
      while (pos_ < n && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
      if (pos_ == digits) return false;
    }
    if (!real && pos_ - start > kMaxIntDigits) return false;
    nodes_.push_back(Node{real ? Kind::kReal : Kind::kInt, false, 0, static_cast<uint32_t>(nodes_.size() + 1),
                          static_cast<uint32_t>(start), static_cast<uint32_t>(pos_ - start)});
    return true;
  }

  static bool IsLowSurrogateEscape(std::string_view s, size_t i) {
    if (i + 6 > s.size() || s[i] != '\\' || s[i + 1] != 'u') return false;
    for (size_t k = i + 2; k < i + 6; ++k)
      if (HexDigit(s[k]) < 0) return false;
    uint32_t cp = Hex4(s.data() + i + 2);
    return cp >= 0xDC00 && cp <= 0xDFFF;
  }

  bool String() {
    ++pos_;  // opening quote
    uint32_t i = Add(Kind::kString);
    size_t start = pos_, n = text_.size();
    bool escaped = false;
    while (true) {
      if (pos_ >= n) return false;
      unsigned char c = static_cast<unsigned char>(text_[pos_]);
      if (c == '"') break;
      if (c < 0x20) return false;  // json.loads(strict=True)
      if (c != '\\') { ++pos_; continue; }
      escaped = true;
      if (pos_ + 1 >= n) return false;
      char e = text_[pos_ + 1];
      if (e == 'u') {
        if (pos_ + 6 > n) return false;
        for (size_t k = pos_ + 2; k < pos_ + 6; ++k)
          if (HexDigit(text_[k]) < 0) return false;
        uint32_t cp = Hex4(text_.data() + pos_ + 2);
        pos_ += 6;
        if (cp >= 0xDC00 && cp <= 0xDFFF) return false;  // lone low half: the gateway refuses it
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          if (!IsLowSurrogateEscape(text_, pos_)) return false;
          pos_ += 6;
        }
      } else if (e == '"' || e == '\\' || e == '/' || e == 'b' || e == 'f' || e == 'n' || e == 'r' || e == 't') {
        pos_ += 2;
      } else {
        return false;
      }
    }
    nodes_[i].begin = static_cast<uint32_t>(start);
    nodes_[i].size = static_cast<uint32_t>(pos_ - start);
    nodes_[i].escaped = escaped;
    nodes_[i].end = i + 1;
    ++pos_;  // closing quote
    return true;
  }

  // An array's elements or an object's members, `item` reading one.
  template <typename Item>
  bool Container(Kind kind, char close, int depth, Item item) {
    if (depth > kMaxDepth) return false;
    uint32_t i = Add(kind);
    ++pos_;
    Space();
    uint32_t count = 0;
    if (pos_ < text_.size() && text_[pos_] == close) {
      ++pos_;
    } else {
      while (true) {
        if (!item()) return false;
        ++count;
        Space();
        if (pos_ >= text_.size()) return false;
        char c = text_[pos_++];
        if (c == close) break;
        if (c != ',') return false;
        Space();
      }
    }
    nodes_[i].count = count;
    nodes_[i].end = static_cast<uint32_t>(nodes_.size());
    return kind != Kind::kObject || count < 2 || UniqueKeys(i);
  }

  bool Array(int depth) { return Container(Kind::kArray, ']', depth, [&] { return Value(depth); }); }

  bool Object(int depth) {
    return Container(Kind::kObject, '}', depth, [&] {
      if (pos_ >= text_.size() || text_[pos_] != '"' || !String()) return false;
      Space();
      if (pos_ >= text_.size() || text_[pos_] != ':') return false;
      ++pos_;
      Space();
      return Value(depth);
    });
  }

  bool UniqueKeys(uint32_t object) const {
    std::vector<std::string> keys;
    keys.reserve(nodes_[object].count);
    for (uint32_t k = object + 1; k < nodes_[object].end; k = nodes_[k + 1].end) {
      keys.emplace_back();
      Decode(nodes_[k], &keys.back());
    }
    std::sort(keys.begin(), keys.end());
    return std::adjacent_find(keys.begin(), keys.end()) == keys.end();
  }

  std::string_view text_;
  size_t pos_ = 0;
  std::vector<Node> nodes_;
};

// ---------------------------------------------------------------------------
// Requests: JSON values -> tensor values (tfs_json/values.py)
// ---------------------------------------------------------------------------

// A JSON integer literal: Python reads it as an int of any size.
struct IntLiteral {
  bool negative = false;
  bool big = false;  // magnitude >= 2**64
  uint64_t magnitude = 0;
};

IntLiteral ReadInt(std::string_view s) {
  IntLiteral v;
  size_t i = 0;
  if (s[0] == '-') { v.negative = true; i = 1; }
  for (; i < s.size(); ++i) {
    uint64_t digit = static_cast<uint64_t>(s[i] - '0');
    if (v.magnitude > (UINT64_MAX - digit) / 10) { v.big = true; return v; }
    v.magnitude = v.magnitude * 10 + digit;
  }
  return v;
}

// Python's int range checks, on sign and magnitude.
bool InInt64(const IntLiteral& v) {
  return !v.big && (v.negative ? v.magnitude <= (1ull << 63) : v.magnitude <= static_cast<uint64_t>(INT64_MAX));
}
bool InUInt64(const IntLiteral& v) { return !v.big && (!v.negative || v.magnitude == 0); }
bool InInt32(const IntLiteral& v) {
  return !v.big && (v.negative ? v.magnitude <= (1ull << 31) : v.magnitude <= static_cast<uint64_t>(INT32_MAX));
}
int64_t AsInt64(const IntLiteral& v) {
  return v.negative ? static_cast<int64_t>(0 - v.magnitude) : static_cast<int64_t>(v.magnitude);
}

// A literal as the correctly rounded double Python's float() makes of it,
// infinite past the range, zero or subnormal below it.
double ReadDouble(std::string_view s) {
  double d;
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), d);
  if (ec == std::errc() && ptr == s.data() + s.size()) return d;
  // Out of range (from_chars leaves d unset there): strtod rounds as Python does.
  return std::strtod(std::string(s).c_str(), nullptr);
}

template <typename T>
void PutLittle(T value, std::string* out) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));  // the data plane runs on little-endian hosts only
  out->append(bytes, sizeof(T));
}

void PutVarint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>(v | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

void PutLengthDelimited(int field, std::string_view bytes, std::string* out) {
  PutVarint(static_cast<uint64_t>(field) << 3 | 2, out);
  PutVarint(bytes.size(), out);
  out->append(bytes);
}

bool Base64Value(int c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' || c == '/';
}

int Base64Index(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  return c == '+' ? 62 : 63;
}

}  // namespace

// parse.py _b64decode (absl::Base64Unescape): trailing '=' dropped, the
// standard alphabet only, bits past the last whole byte ignored.
bool Base64Decode(std::string_view s, std::string* out) {
  while (!s.empty() && s.back() == '=') s.remove_suffix(1);
  if (s.size() % 4 == 1) return false;
  for (char c : s)
    if (!Base64Value(static_cast<unsigned char>(c))) return false;
  size_t i = 0;
  for (; i + 4 <= s.size(); i += 4) {
    uint32_t v = Base64Index(s[i]) << 18 | Base64Index(s[i + 1]) << 12 | Base64Index(s[i + 2]) << 6 |
                 Base64Index(s[i + 3]);
    out->push_back(static_cast<char>(v >> 16));
    out->push_back(static_cast<char>(v >> 8));
    out->push_back(static_cast<char>(v));
  }
  size_t rest = s.size() - i;
  if (rest >= 2) {
    uint32_t v = Base64Index(s[i]) << 18 | Base64Index(s[i + 1]) << 12 | (rest == 3 ? Base64Index(s[i + 2]) << 6 : 0);
    out->push_back(static_cast<char>(v >> 16));
    if (rest == 3) out->push_back(static_cast<char>(v >> 8));
  }
  return true;
}

namespace {

bool Supported(int dtype) {
  switch (dtype) {
    case kFloat: case kDouble: case kInt32: case kUInt8: case kInt16: case kInt8: case kString: case kInt64:
    case kBool: case kUInt32: case kUInt64:
      return true;
    default:
      return false;
  }
}

// One input's tensor as it is being filled.
struct InputTensor {
  std::string_view name;
  int dtype = 0;
  std::vector<int64_t> shape;  // of one instance in the row format
  std::string values;          // tensor_content, or the string_val fields already encoded
};

class RequestBuilder {
 public:
  explicit RequestBuilder(const Json& json) : json_(json) {}

  // values.py _fill_slow: the shape follows the first elements, every list
  // at a level has that level's size, every leaf sits at the last level.
  // Its values are appended to t->values; *shape gets the shape.
  bool Fill(uint32_t v, int dtype, std::vector<int64_t>* shape, std::string* out) {
    shape->clear();
    for (uint32_t u = v; json_[u].kind == Kind::kArray; ++u) {
      shape->push_back(json_[u].count);
      if (json_[u].count == 0) break;
    }
    return Walk(v, 0, *shape, dtype, out);
  }

  // parse.py _is_b64_object: exactly one member, "b64", holding a string.
  bool IsB64Object(uint32_t v) const {
    const Node& n = json_[v];
    return n.kind == Kind::kObject && n.count == 1 && json_.KeyIs(json_[v + 1], "b64") &&
           json_[v + 2].kind == Kind::kString;
  }
  bool IsElementObject(uint32_t v) const { return json_[v].kind == Kind::kObject && !IsB64Object(v); }

  // float/double inputs (values.py _lossless): ints within int64..uint64 must
  // fit the mantissa; larger ones, and decimals, must fit the range.
  bool Real(const Node& n, bool single, double* out) const {
    std::string_view s = json_.Span(n);
    if (n.kind == Kind::kInt) {
      IntLiteral v = ReadInt(s);
      if (!v.big && (!v.negative || v.magnitude <= (1ull << 63))) {
        if (v.magnitude > (single ? kFloatMaxInt : kDoubleMaxInt)) return false;
        double d = static_cast<double>(v.magnitude);
        *out = v.negative && v.magnitude ? -d : d;  // Python's -0 is the int 0
        return true;
      }
      *out = ReadDouble(s);
      if (!std::isfinite(*out)) return false;  // float(int) raises OverflowError
    } else if (n.kind == Kind::kReal) {
      *out = ReadDouble(s);
      if (!std::isfinite(*out)) return true;  // 1e400: inf, which _lossless lets through
    } else {
      return false;
    }
    return !single || (*out >= -kFltMax && *out <= kFltMax);
  }

 private:
  bool Walk(uint32_t v, size_t level, const std::vector<int64_t>& shape, int dtype, std::string* out) {
    const Node& n = json_[v];
    if (n.kind != Kind::kArray) return level == shape.size() && Leaf(v, dtype, out);
    if (level >= shape.size() || static_cast<int64_t>(n.count) != shape[level]) return false;
    uint32_t child = v + 1;
    for (uint32_t i = 0; i < n.count; ++i) {
      if (!Walk(child, level + 1, shape, dtype, out)) return false;
      child = json_[child].end;
    }
    return true;
  }

  bool Leaf(uint32_t v, int dtype, std::string* out) {
    const Node& n = json_[v];
    switch (dtype) {
      case kFloat: {
        double d;
        if (!Real(n, true, &d)) return false;
        PutLittle(static_cast<float>(d), out);
        return true;
      }
      case kDouble: {
        double d;
        if (!Real(n, false, &d)) return false;
        PutLittle(d, out);
        return true;
      }
      case kBool:
        if (n.kind != Kind::kTrue && n.kind != Kind::kFalse) return false;
        out->push_back(n.kind == Kind::kTrue ? 1 : 0);
        return true;
      case kString: {
        scratch_.clear();
        if (n.kind == Kind::kString) {
          json_.Decode(n, &scratch_);
        } else if (IsB64Object(v)) {
          std::string text;
          json_.Decode(json_[v + 2], &text);
          if (!Base64Decode(text, &scratch_)) return false;
        } else {
          return false;
        }
        PutLengthDelimited(8, scratch_, out);
        return true;
      }
      default: break;
    }
    if (n.kind != Kind::kInt) return false;
    IntLiteral i = ReadInt(json_.Span(n));
    switch (dtype) {
      // values.py _to_content: int32-range values, cast as numpy's astype.
      case kInt32: if (!InInt32(i)) return false; PutLittle(static_cast<int32_t>(AsInt64(i)), out); return true;
      case kInt16: if (!InInt32(i)) return false; PutLittle(static_cast<int16_t>(AsInt64(i)), out); return true;
      case kInt8: if (!InInt32(i)) return false; PutLittle(static_cast<int8_t>(AsInt64(i)), out); return true;
      case kUInt8: if (!InInt32(i)) return false; PutLittle(static_cast<uint8_t>(AsInt64(i)), out); return true;
      case kInt64: if (!InInt64(i)) return false; PutLittle(AsInt64(i), out); return true;
      case kUInt32:
        if (!InUInt64(i) || i.magnitude > UINT32_MAX) return false;
        PutLittle(static_cast<uint32_t>(i.magnitude), out);
        return true;
      case kUInt64: if (!InUInt64(i)) return false; PutLittle(i.magnitude, out); return true;
      default: return false;
    }
  }

  const Json& json_;
  std::string scratch_;
};

// values.py _make_tensor, serialized.
void PutTensor(const InputTensor& t, int64_t batch, std::string* out) {
  std::string shape;
  auto dim = [&](int64_t size) {
    std::string d;
    if (size) {
      d.push_back(0x08);
      PutVarint(static_cast<uint64_t>(size), &d);
    }
    PutLengthDelimited(2, d, &shape);
  };
  if (batch >= 0) dim(batch);
  for (int64_t size : t.shape) dim(size);
  std::string tensor;
  tensor.reserve(t.values.size() + shape.size() + 16);
  tensor.push_back(0x08);
  PutVarint(static_cast<uint64_t>(t.dtype), &tensor);
  if (batch >= 0 || !t.shape.empty()) PutLengthDelimited(2, shape, &tensor);
  if (t.dtype == kString) {
    tensor.append(t.values);
  } else if (!t.values.empty()) {
    PutLengthDelimited(4, t.values, &tensor);
  }
  std::string entry;
  entry.reserve(tensor.size() + t.name.size() + 16);
  PutLengthDelimited(1, t.name, &entry);
  PutLengthDelimited(2, tensor, &entry);
  PutLengthDelimited(2, entry, out);
}

// http_rest_api_util.cc FillModelSpecWithNameVersionAndLabel (fill_model_spec
// with the version always set) and the signature name, serialized; an empty
// signature name is proto3's default, not written.
void PutModelSpec(const std::string& model_name, int64_t version, const std::string& signame, std::string* out) {
  std::string spec, wrapped;
  if (!model_name.empty()) PutLengthDelimited(1, model_name, &spec);
  if (version) {
    wrapped.push_back(0x08);
    PutVarint(static_cast<uint64_t>(version), &wrapped);
  }
  PutLengthDelimited(2, wrapped, &spec);
  if (!signame.empty()) PutLengthDelimited(3, signame, &spec);
  PutLengthDelimited(1, spec, out);
}

// predict_request.py _fill_signature_name: the body's "signature_name" must
// be a string; false too where it is not UTF-8 (protobuf refuses it).
bool SignatureName(const Json& json, uint32_t node, std::string* out) {
  if (json[node].kind != Kind::kString) return false;
  json.Decode(json[node], out);
  return ValidUtf8(*out);
}

}  // namespace

bool PredictRequestFromJson(std::string_view body, const Signatures& signatures, const std::string& model_name,
                            int64_t version, std::string* request, bool* row_format) {
  if (!ValidUtf8(model_name)) return false;
  Json json(body);
  if (!json.Parse()) return false;

  uint32_t instances = 0, inputs = 0, signame_node = 0;
  const Node& root = json[0];
  for (uint32_t k = 1; k < root.end; k = json[k + 1].end) {
    if (json.KeyIs(json[k], "instances")) instances = k + 1;
    else if (json.KeyIs(json[k], "inputs")) inputs = k + 1;
    else if (json.KeyIs(json[k], "signature_name")) signame_node = k + 1;
  }
  std::string signame;
  if (signame_node && !SignatureName(json, signame_node, &signame)) return false;
  if (signame.empty()) signame = "serving_default";
  auto sig = signatures.find(signame);
  if (sig == signatures.end() || sig->second.empty()) return false;
  if ((instances != 0) == (inputs != 0)) return false;  // both, or neither: errors

  std::vector<InputTensor> tensors(sig->second.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    tensors[i].name = sig->second[i].first;
    tensors[i].dtype = sig->second[i].second;
    if (!Supported(tensors[i].dtype) || !ValidUtf8(tensors[i].name)) return false;
    if (i && !(tensors[i - 1].name < tensors[i].name)) return false;  // not the sorted map the header promises
  }
  RequestBuilder builder(json);
  int64_t batch = -1;
  std::vector<int64_t> shape;

  if (instances) {
    // predict_request.py _row_tensors.
    const Node& list = json[instances];
    if (list.kind != Kind::kArray || list.count == 0) return false;
    batch = list.count;
    bool objects = builder.IsElementObject(instances + 1);
    // A plain first instance with several inputs: an error, or (a b64
    // object first) a corner where Python fills only one of them.
    if (!objects && tensors.size() > 1) return false;
    uint32_t elem = instances + 1;
    for (uint32_t i = 0; i < list.count; ++i, elem = json[elem].end) {
      if (objects) {
        if (!builder.IsElementObject(elem) || json[elem].count != tensors.size()) return false;
        // Keys are unique and as many as the inputs: all found means equal sets.
        for (uint32_t k = elem + 1; k < json[elem].end; k = json[k + 1].end) {
          InputTensor* t = nullptr;
          for (auto& candidate : tensors)
            if (json.KeyIs(json[k], candidate.name)) t = &candidate;
          if (!t) return false;
          if (!builder.Fill(k + 1, t->dtype, i ? &shape : &t->shape, &t->values)) return false;
          if (i && shape != t->shape) return false;
        }
      } else {
        InputTensor& t = tensors[0];
        if (builder.IsElementObject(elem)) return false;
        if (!builder.Fill(elem, t.dtype, i ? &shape : &t.shape, &t.values)) return false;
        if (i && shape != t.shape) return false;
      }
    }
    *row_format = true;
  } else {
    // predict_request.py _columnar_tensors: extra keys are ignored.
    if (!builder.IsElementObject(inputs)) {
      if (tensors.size() > 1) return false;
      if (!builder.Fill(inputs, tensors[0].dtype, &tensors[0].shape, &tensors[0].values)) return false;
    } else {
      for (auto& t : tensors) {
        uint32_t value = 0;
        for (uint32_t k = inputs + 1; k < json[inputs].end; k = json[k + 1].end)
          if (json.KeyIs(json[k], t.name)) value = k + 1;
        if (!value || !builder.Fill(value, t.dtype, &t.shape, &t.values)) return false;
      }
    }
    *row_format = false;
  }

  request->clear();
  size_t total = 64 + model_name.size() + signame.size();
  for (const auto& t : tensors) total += t.values.size() + t.name.size() + 16 * (t.shape.size() + 4);
  request->reserve(total);
  PutModelSpec(model_name, version, signame, request);
  for (const auto& t : tensors) PutTensor(t, batch, request);
  return true;
}

namespace {

// ---------------------------------------------------------------------------
// Requests: Classify and Regress bodies -> tf.Examples (tfs_json/classify.py)
// ---------------------------------------------------------------------------

// tensorflow.Feature's oneof, by field number.
enum FeatureKind : int { kNoKind = 0, kBytesList = 1, kFloatList = 2, kInt64List = 3 };

// classify.py _example_from_json: the JSON object at node v as a serialized
// tensorflow.Example in *example (empty for an object without members:
// Python then never touches `features`, which stays unset). A feature's values
// are all of one kind: strings and {"b64": ...} objects are bytes, true and
// false int64 1 and 0, integers in int64 int64, other numbers floats (held
// losslessly, as values.py _lossless); an empty list is a feature with no
// kind. false: anything else (the reference raises), a name protobuf would
// refuse (not UTF-8).
bool ExampleFromJson(const Json& json, const RequestBuilder& builder, uint32_t v, std::string* example) {
  const Node& obj = json[v];
  if (obj.kind != Kind::kObject) return false;
  std::string features, name, entry, feature, values, scratch;
  for (uint32_t k = v + 1; k < obj.end; k = json[k + 1].end) {
    name.clear();
    json.Decode(json[k], &name);
    if (!ValidUtf8(name)) return false;
    uint32_t content = k + 1;
    bool list = json[content].kind == Kind::kArray;
    uint32_t count = list ? json[content].count : 1;
    uint32_t e = list ? content + 1 : content;
    int kind = kNoKind;
    values.clear();
    for (uint32_t i = 0; i < count; ++i, e = json[e].end) {
      const Node& n = json[e];
      int want;
      switch (n.kind) {
        case Kind::kTrue: case Kind::kFalse:
          want = kInt64List;
          PutVarint(n.kind == Kind::kTrue ? 1 : 0, &values);
          break;
        case Kind::kString: case Kind::kObject:
          want = kBytesList;
          scratch.clear();
          if (n.kind == Kind::kString) {
            json.Decode(n, &scratch);
          } else {
            if (!builder.IsB64Object(e)) return false;
            std::string text;
            json.Decode(json[e + 2], &text);
            if (!Base64Decode(text, &scratch)) return false;
          }
          PutLengthDelimited(1, scratch, &values);
          break;
        case Kind::kInt: case Kind::kReal: {
          // text.py _num_kind: integers within int64..uint64 stay integers,
          // and past int64 they are an error ("uint64 element").
          IntLiteral i = n.kind == Kind::kInt ? ReadInt(json.Span(n)) : IntLiteral{};
          if (n.kind == Kind::kInt && !i.big) {
            if (!InInt64(i)) return false;
            want = kInt64List;
            PutVarint(static_cast<uint64_t>(AsInt64(i)), &values);
            break;
          }
          double d;
          if (!builder.Real(n, true, &d)) return false;
          want = kFloatList;
          PutLittle(static_cast<float>(d), &values);  // protobuf's float field: C's cast
          break;
        }
        default: return false;  // null, and lists within the list
      }
      if (kind != kNoKind && kind != want) return false;
      kind = want;
    }
    feature.clear();
    if (kind == kBytesList) {
      PutLengthDelimited(kind, values, &feature);
    } else if (kind != kNoKind) {
      std::string packed;
      PutLengthDelimited(1, values, &packed);
      PutLengthDelimited(kind, packed, &feature);
    }
    entry.clear();
    PutLengthDelimited(1, name, &entry);
    PutLengthDelimited(2, feature, &entry);
    PutLengthDelimited(1, entry, &features);
  }
  example->clear();
  if (obj.count) PutLengthDelimited(1, features, example);
  return true;
}

// classify.py _fill_classify_regress after fill_model_spec; the two requests
// share their layout (model_spec = 1, input = 2).
bool ExamplesRequestFromJson(std::string_view body, const std::string& model_name, int64_t version,
                             std::string* request) {
  if (!ValidUtf8(model_name)) return false;
  Json json(body);
  if (!json.Parse()) return false;
  uint32_t examples = 0, context = 0, signame_node = 0;
  const Node& root = json[0];
  for (uint32_t k = 1; k < root.end; k = json[k + 1].end) {
    if (json.KeyIs(json[k], "examples")) examples = k + 1;
    else if (json.KeyIs(json[k], "context")) context = k + 1;
    else if (json.KeyIs(json[k], "signature_name")) signame_node = k + 1;
  }
  std::string signame;
  if (signame_node && !SignatureName(json, signame_node, &signame)) return false;
  if (!examples || json[examples].kind != Kind::kArray || json[examples].count == 0) return false;

  // tensorflow.serving.Input: example_list = 1 {examples = 1}, or
  // example_list_with_context = 2 {examples = 1, context = 2}.
  RequestBuilder builder(json);
  std::string list, example;
  list.reserve(body.size() + 64);
  for (uint32_t e = examples + 1; e < json[examples].end; e = json[e].end) {
    if (!ExampleFromJson(json, builder, e, &example)) return false;
    PutLengthDelimited(1, example, &list);
  }
  if (context) {
    if (!ExampleFromJson(json, builder, context, &example)) return false;
    if (!example.empty()) PutLengthDelimited(2, example, &list);  // else unset, as in Python
  }
  std::string input;
  PutLengthDelimited(context ? 2 : 1, list, &input);
  request->clear();
  request->reserve(input.size() + model_name.size() + signame.size() + 32);
  PutModelSpec(model_name, version, signame, request);
  PutLengthDelimited(2, input, request);
  return true;
}

}  // namespace

bool ClassifyRequestFromJson(std::string_view body, const std::string& model_name, int64_t version,
                             std::string* request) {
  return ExamplesRequestFromJson(body, model_name, version, request);
}

bool RegressRequestFromJson(std::string_view body, const std::string& model_name, int64_t version,
                            std::string* request) {
  return ExamplesRequestFromJson(body, model_name, version, request);
}

namespace {

// ---------------------------------------------------------------------------
// Responses: the PredictResponse wire format
// ---------------------------------------------------------------------------

class Wire {
 public:
  explicit Wire(std::string_view d) : p_(d.data()), end_(d.data() + d.size()) {}

  bool Done() const { return p_ >= end_; }

  // At most ten bytes, the tenth holding one bit: longer or wider varints
  // are for protobuf's parser to judge.
  bool Varint(uint64_t* out) {
    uint64_t v = 0;
    for (int i = 0; i < 10 && p_ < end_; ++i) {
      uint8_t b = static_cast<uint8_t>(*p_++);
      if (i == 9 && b > 1) return false;
      v |= static_cast<uint64_t>(b & 0x7F) << (7 * i);
      if (!(b & 0x80)) { *out = v; return true; }
    }
    return false;
  }

  // Five bytes at most, as protobuf reads tags.
  bool Tag(uint32_t* field, int* wire) {
    uint64_t tag;
    const char* start = p_;
    if (!Varint(&tag) || tag > UINT32_MAX || p_ - start > 5) return false;
    *field = static_cast<uint32_t>(tag >> 3);
    *wire = static_cast<int>(tag & 7);
    return *field != 0;
  }

  bool Bytes(std::string_view* out) {
    uint64_t n;
    if (!Varint(&n) || n > static_cast<uint64_t>(end_ - p_)) return false;
    *out = std::string_view(p_, n);
    p_ += n;
    return true;
  }

  bool Fixed(size_t n, const char** at) {
    if (static_cast<size_t>(end_ - p_) < n) return false;
    *at = p_;
    p_ += n;
    return true;
  }

  // An unknown field; groups are left to protobuf.
  bool Skip(int wire) {
    uint64_t v;
    std::string_view s;
    const char* at;
    switch (wire) {
      case 0: return Varint(&v);
      case 1: return Fixed(8, &at);
      case 2: return Bytes(&s);
      case 5: return Fixed(4, &at);
      default: return false;
    }
  }

 private:
  const char* p_;
  const char* end_;
};

// A repeated scalar field, packed or not: each value goes to fn(raw).
template <typename Fn>
bool Repeated(Wire* w, int wire, int scalar_wire, Fn fn) {
  if (wire == scalar_wire) {
    if (scalar_wire == 0) {
      uint64_t v;
      if (!w->Varint(&v)) return false;
      fn(v);
      return true;
    }
    const char* at;
    size_t n = scalar_wire == 1 ? 8 : 4;
    if (!w->Fixed(n, &at)) return false;
    uint64_t v = 0;
    std::memcpy(&v, at, n);
    fn(v);
    return true;
  }
  if (wire != 2) return false;
  std::string_view packed;
  if (!w->Bytes(&packed)) return false;
  if (scalar_wire == 0) {
    Wire inner(packed);
    while (!inner.Done()) {
      uint64_t v;
      if (!inner.Varint(&v)) return false;
      fn(v);
    }
    return true;
  }
  size_t n = scalar_wire == 1 ? 8 : 4;
  if (packed.size() % n) return false;
  for (size_t i = 0; i < packed.size(); i += n) {
    uint64_t v = 0;
    std::memcpy(&v, packed.data() + i, n);
    fn(v);
  }
  return true;
}

struct OutputTensor {
  std::string_view name;
  int dtype = 0;
  std::vector<int64_t> dims;
  std::string_view content;
  std::vector<float> float_val;
  std::vector<double> double_val;
  std::vector<int32_t> int_val, half_val;
  std::vector<int64_t> int64_val;
  std::vector<uint64_t> uint64_val;  // uint32_val and uint64_val: only one is read per dtype
  std::vector<uint32_t> uint32_val;
  std::vector<uint8_t> bool_val;
  std::vector<std::string_view> string_val;
};

// What a message's field reader made of one field.
enum class Read { kDone, kMalformed, kUnknown };

// Reads message `d` field by field: read(&wire, field, wire_type) reads the
// fields it knows; the unknown ones are skipped, as protobuf does. Below the
// response's top level, an unknown field is taken as malformed: protobuf
// drops a whole map entry holding one, and TF Serving never sends any.
template <typename Fn>
bool Fields(std::string_view d, Fn read) {
  Wire w(d);
  while (!w.Done()) {
    uint32_t field;
    int wire;
    if (!w.Tag(&field, &wire)) return false;
    Read r = read(&w, field, wire);
    if (r == Read::kMalformed || (r == Read::kUnknown && !w.Skip(wire))) return false;
  }
  return true;
}

Read Done(bool ok) { return ok ? Read::kDone : Read::kMalformed; }

// A proto3 string field: protobuf refuses invalid UTF-8.
Read Utf8Field(Wire* w, int wire, std::string_view* out) {
  return Done(wire == 2 && w->Bytes(out) && ValidUtf8(*out));
}

bool ParseDim(std::string_view d, OutputTensor* t) {
  int64_t size = 0;
  bool ok = Fields(d, [&](Wire* w, uint32_t field, int wire) {
    uint64_t v;
    std::string_view name;
    if (field == 1) {
      if (wire != 0 || !w->Varint(&v)) return Read::kMalformed;
      size = static_cast<int64_t>(v);
      return Read::kDone;
    }
    return field == 2 ? Utf8Field(w, wire, &name) : Read::kMalformed;
  });
  t->dims.push_back(size);
  return ok;
}

bool ParseShape(std::string_view d, OutputTensor* t) {
  return Fields(d, [&](Wire* w, uint32_t field, int wire) {
    uint64_t v;
    std::string_view dim;
    if (field == 2) return Done(wire == 2 && w->Bytes(&dim) && ParseDim(dim, t));
    if (field == 3) return Done(wire == 0 && w->Varint(&v));  // unknown_rank
    return Read::kMalformed;
  });
}

float FloatBits(uint64_t raw) {
  float f;
  uint32_t bits = static_cast<uint32_t>(raw);
  std::memcpy(&f, &bits, 4);
  return f;
}

double DoubleBits(uint64_t raw) {
  double d;
  std::memcpy(&d, &raw, 8);
  return d;
}

bool ParseTensor(std::string_view d, OutputTensor* t) {
  return Fields(d, [&](Wire* w, uint32_t field, int wire) {
    uint64_t v = 0;
    std::string_view bytes;
    bool ok;
    switch (field) {
      case 1:  // dtype, an open enum read as int32
        ok = wire == 0 && w->Varint(&v);
        t->dtype = static_cast<int32_t>(static_cast<uint32_t>(v));
        break;
      case 2: ok = wire == 2 && w->Bytes(&bytes) && ParseShape(bytes, t); break;
      case 3: ok = wire == 0 && w->Varint(&v); break;
      case 4: ok = wire == 2 && w->Bytes(&t->content); break;
      case 5: ok = Repeated(w, wire, 5, [&](uint64_t r) { t->float_val.push_back(FloatBits(r)); }); break;
      case 6: ok = Repeated(w, wire, 1, [&](uint64_t r) { t->double_val.push_back(DoubleBits(r)); }); break;
      case 7:
        ok = Repeated(w, wire, 0, [&](uint64_t r) { t->int_val.push_back(static_cast<int32_t>(r)); });
        break;
      case 8:
        ok = wire == 2 && w->Bytes(&bytes);
        t->string_val.push_back(bytes);
        break;
      case 9: ok = Repeated(w, wire, 5, [](uint64_t) {}); break;
      case 10:
        ok = Repeated(w, wire, 0, [&](uint64_t r) { t->int64_val.push_back(static_cast<int64_t>(r)); });
        break;
      case 11: ok = Repeated(w, wire, 0, [&](uint64_t r) { t->bool_val.push_back(r != 0); }); break;
      case 12: ok = Repeated(w, wire, 1, [](uint64_t) {}); break;
      case 13:
        ok = Repeated(w, wire, 0, [&](uint64_t r) { t->half_val.push_back(static_cast<int32_t>(r)); });
        break;
      case 14: case 15: ok = false; break;  // resource handles and variants: no JSON for them anyway
      case 16:
        ok = Repeated(w, wire, 0, [&](uint64_t r) { t->uint32_val.push_back(static_cast<uint32_t>(r)); });
        break;
      case 17: ok = Repeated(w, wire, 0, [&](uint64_t r) { t->uint64_val.push_back(r); }); break;
      case 18: ok = wire == 2 && w->Bytes(&bytes); break;
      default: ok = false;
    }
    return Done(ok);
  });
}

bool ParseEntry(std::string_view d, OutputTensor* t) {
  bool has_key = false, has_value = false;
  return Fields(d, [&](Wire* w, uint32_t field, int wire) {
    std::string_view bytes;
    if (field == 1) {
      if (has_key) return Read::kMalformed;
      has_key = true;
      return Utf8Field(w, wire, &t->name);
    }
    if (field != 2) return Read::kMalformed;
    // A repeated value would be merged into the first: left to protobuf.
    if (has_value) return Read::kMalformed;
    has_value = true;
    return Done(wire == 2 && w->Bytes(&bytes) && ParseTensor(bytes, t));
  });
}

// The response's model_spec is not printed, but a malformed one fails
// protobuf's parse in Python.
bool ValidModelSpec(std::string_view d) {
  return Fields(d, [&](Wire* w, uint32_t field, int wire) {
    std::string_view bytes;
    if (field == 1 || field == 3 || field == 4) return Utf8Field(w, wire, &bytes);
    if (field != 2) return Read::kUnknown;
    return Done(wire == 2 && w->Bytes(&bytes) && Fields(bytes, [](Wire* v, uint32_t f, int type) {
      uint64_t value;  // google.protobuf.Int64Value
      return f == 1 ? Done(type == 0 && v->Varint(&value)) : Read::kUnknown;
    }));
  });
}

// ---------------------------------------------------------------------------
// Responses: tensors -> JSON text (tfs_json/predict_response.py, text.py)
// ---------------------------------------------------------------------------

// text.py _float_tokens's estimate of whether six significant digits can
// hold `v`: floor(log10|v|), a scale of 10**(5 - that), round half to even.
bool SixDigitCandidate(double v, bool single, double scale) {
  double est = std::nearbyint(v * scale) / scale;
  if (single) {
    float e = static_cast<float>(est);
    return !std::isfinite(e) || e == static_cast<float>(v);
  }
  return !std::isfinite(est) || est == v;
}

// The candidate decision; false in *sure where it could depend on the last
// bit of log10 or pow, in which numpy's SIMD versions and libm differ (a
// float32 value too: its six digits may fall halfway between two floats,
// where the estimate's last bit picks the side).
bool Candidate(double v, bool single, bool* sure) {
  *sure = true;
  if (v == 0) return true;
  double l = std::log10(std::fabs(v));
  double exp10 = std::floor(l);
  bool cand = SixDigitCandidate(v, single, std::pow(10.0, 5.0 - exp10));
  double exps[2] = {exp10, exp10};
  double nearest = std::nearbyint(l);
  bool near_power = std::fabs(l - nearest) < 1e-9;
  if (!near_power && exp10 <= 5 && exp10 >= -17) return cand;  // 10**(5 - exp10) exact: nothing to vary
  if (near_power) exps[0] = nearest - 1, exps[1] = nearest;
  for (double e : exps) {
    double k = 5.0 - e;
    double scale = std::pow(10.0, k);
    double scales[3] = {scale, scale, scale};
    if (k < 0 || k > 22) {  // 10**k is inexact: either neighbour may be numpy's
      scales[1] = std::nextafter(scale, 0.0);
      scales[2] = std::nextafter(scale, HUGE_VAL);
    }
    for (double s : scales)
      if (SixDigitCandidate(v, single, s) != cand) *sure = false;
  }
  return cand;
}

bool ParseBack(const char* s, size_t n, double* out) {
  auto [ptr, ec] = std::from_chars(s, s + n, *out);
  if (ec == std::errc() && ptr == s + n) return true;
  char buf[40];
  std::memcpy(buf, s, n);
  buf[n] = 0;
  *out = std::strtod(buf, nullptr);  // subnormals, which from_chars may call out of range
  return true;
}

// "%.6g" of v in buf when it reads back as v (as a float when single), else 0.
size_t SixDigits(double v, bool single, char* buf, size_t size) {
  size_t n = static_cast<size_t>(std::to_chars(buf, buf + size, v, std::chars_format::general, 6).ptr - buf);
  double back;
  ParseBack(buf, n, &back);
  return (single ? static_cast<float>(back) == static_cast<float>(v) : back == v) ? n : 0;
}

// text.py _write_decimal's writing: the n characters of buf, or (n == 0) v
// with 9 (float) or 17 (double) significant digits; ".0" on whole numbers;
// NaN and infinities as tokens.
void AppendDigits(double v, bool single, char* buf, size_t size, size_t n, std::string* out) {
  if (std::isnan(v)) { out->append("NaN"); return; }
  if (std::isinf(v)) { out->append(v < 0 ? "-Infinity" : "Infinity"); return; }
  if (!n) {
    n = static_cast<size_t>(std::to_chars(buf, buf + size, v, std::chars_format::general, single ? 9 : 17).ptr - buf);
  }
  out->append(buf, n);
  if (!std::memchr(buf, '.', n) && !std::memchr(buf, 'e', n)) out->append(".0");
}

// text.py _float_tokens for one value (a tensor's, or a regression's): six
// significant digits where numpy's estimate picks them and they read back as
// the same value. false where the estimate is not certain and six digits
// would do (see Candidate).
bool AppendDecimal(double v, bool single, std::string* out) {
  char buf[48];
  size_t n = 0;
  if (std::isfinite(v)) {
    bool sure;
    bool candidate = Candidate(v, single, &sure);
    // Not a candidate here: whether it is one for numpy matters only if six digits would do.
    if (candidate || !sure) n = SixDigits(v, single, buf, sizeof buf);
    if (!sure && n) return false;
  }
  AppendDigits(v, single, buf, sizeof buf, n, out);
  return true;
}

// text.py _write_decimal itself (a class's score): no estimate, six
// significant digits whenever they read back as the same value.
void AppendScalarDecimal(double v, bool single, std::string* out) {
  char buf[48];
  size_t n = std::isfinite(v) ? SixDigits(v, single, buf, sizeof buf) : 0;
  AppendDigits(v, single, buf, sizeof buf, n, out);
}

}  // namespace

// strings.py _jstr over raw bytes: quotes, backslashes and control
// characters escaped, everything else (invalid UTF-8 too) as it is.
void AppendJsonString(std::string_view s, std::string* out) {
  static const char kHex[] = "0123456789ABCDEF";
  out->push_back('"');
  size_t run = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c != '"' && c != '\\') continue;
    out->append(s.data() + run, i - run);
    run = i + 1;
    switch (c) {
      case '"': out->append("\\\""); break;
      case '\\': out->append("\\\\"); break;
      case '\b': out->append("\\b"); break;
      case '\t': out->append("\\t"); break;
      case '\n': out->append("\\n"); break;
      case '\f': out->append("\\f"); break;
      case '\r': out->append("\\r"); break;
      default:
        out->append("\\u00");
        out->push_back(kHex[c >> 4]);
        out->push_back(kHex[c & 15]);
    }
  }
  out->append(s.data() + run, s.size() - run);
  out->push_back('"');
}

namespace {

void AppendBase64(std::string_view s, std::string* out) {
  static const char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  size_t i = 0;
  auto byte = [&](size_t k) { return static_cast<uint32_t>(static_cast<unsigned char>(s[k])); };
  for (; i + 3 <= s.size(); i += 3) {
    uint32_t v = byte(i) << 16 | byte(i + 1) << 8 | byte(i + 2);
    for (int shift = 18; shift >= 0; shift -= 6) out->push_back(kAlphabet[(v >> shift) & 63]);
  }
  if (s.size() - i == 1) {
    uint32_t v = byte(i) << 16;
    out->push_back(kAlphabet[v >> 18]);
    out->push_back(kAlphabet[(v >> 12) & 63]);
    out->append("==");
  } else if (s.size() - i == 2) {
    uint32_t v = byte(i) << 16 | byte(i + 1) << 8;
    out->push_back(kAlphabet[v >> 18]);
    out->push_back(kAlphabet[(v >> 12) & 63]);
    out->push_back(kAlphabet[(v >> 6) & 63]);
    out->push_back('=');
  }
}

float HalfToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(mant), -24);  // zero and subnormals, exact
    return sign ? -f : f;
  }
  uint32_t bits = exp == 31 ? sign | 0x7F800000u | (mant << 13) : sign | ((exp + 112) << 23) | (mant << 13);
  std::memcpy(&f, &bits, 4);
  return f;
}

// One output's values, decoded (ndarray.py tensor_to_ndarray): numbers in
// one of the vectors, with TF's fill rule applied on access.
class Values {
 public:
  // false: Python raises, or decodes in a way not reproduced here.
  bool Load(const OutputTensor& t, uint64_t n) {
    dtype_ = t.dtype;
    if (dtype_ == kString) {
      strings_ = &t.string_val;
      return true;
    }
    size_t width = Width(dtype_);
    if (!width) return false;
    if (!t.content.empty()) {
      if (t.content.size() != n * width) return false;
      return FromContent(t.content, n);
    }
    switch (dtype_) {
      case kFloat: reals_.assign(t.float_val.begin(), t.float_val.end()); return true;
      case kDouble: reals_ = t.double_val; return true;
      case kInt32: ints_.assign(t.int_val.begin(), t.int_val.end()); return true;
      // int_val values outside the narrow type: numpy wraps or refuses them,
      // depending on how protobuf's container reaches it; left to Python.
      case kInt16: return Narrow(t.int_val, INT16_MIN, INT16_MAX);
      case kInt8: return Narrow(t.int_val, INT8_MIN, INT8_MAX);
      case kUInt8: return Narrow(t.int_val, 0, UINT8_MAX);
      case kInt64: ints_ = t.int64_val; return true;
      case kUInt32: uints_.assign(t.uint32_val.begin(), t.uint32_val.end()); return true;
      case kUInt64: uints_ = t.uint64_val; return true;
      case kBool: ints_.assign(t.bool_val.begin(), t.bool_val.end()); return true;
      case kHalf: case kBFloat16:
        for (int32_t h : t.half_val) {
          if (h < 0 || h > UINT16_MAX) return false;
          reals_.push_back(Half(static_cast<uint16_t>(h)));
        }
        return true;
      default: return false;
    }
  }

  bool Append(uint64_t k, std::string* out) const {
    switch (dtype_) {
      case kFloat: case kHalf: case kBFloat16: return AppendDecimal(Pick(reals_, k), true, out);
      case kDouble: return AppendDecimal(Pick(reals_, k), false, out);
      case kBool: out->append(Pick(ints_, k) ? "true" : "false"); return true;
      case kUInt32: case kUInt64: AppendNumber(Pick(uints_, k), out); return true;
      default: AppendNumber(Pick(ints_, k), out); return true;
    }
  }

  std::string_view String(uint64_t k) const {
    if (strings_->empty()) return {};
    return (*strings_)[std::min<uint64_t>(k, strings_->size() - 1)];
  }

 private:
  static size_t Width(int dtype) {
    switch (dtype) {
      case kFloat: case kInt32: case kUInt32: return 4;
      case kDouble: case kInt64: case kUInt64: return 8;
      case kInt16: case kHalf: case kBFloat16: return 2;
      case kInt8: case kUInt8: case kBool: return 1;
      default: return 0;
    }
  }

  float Half(uint16_t bits) const {
    if (dtype_ == kHalf) return HalfToFloat(bits);
    uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &wide, 4);
    return f;
  }

  bool Narrow(const std::vector<int32_t>& vals, int32_t lo, int32_t hi) {
    for (int32_t v : vals) {
      if (v < lo || v > hi) return false;
      ints_.push_back(v);
    }
    return true;
  }

  template <typename T>
  static T Read(const char* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
  }

  bool FromContent(std::string_view c, uint64_t n) {
    const char* p = c.data();
    for (uint64_t i = 0; i < n; ++i) {
      switch (dtype_) {
        case kFloat: reals_.push_back(Read<float>(p + 4 * i)); break;
        case kDouble: reals_.push_back(Read<double>(p + 8 * i)); break;
        case kInt32: ints_.push_back(Read<int32_t>(p + 4 * i)); break;
        case kInt16: ints_.push_back(Read<int16_t>(p + 2 * i)); break;
        case kInt8: ints_.push_back(Read<int8_t>(p + i)); break;
        case kUInt8: ints_.push_back(Read<uint8_t>(p + i)); break;
        case kInt64: ints_.push_back(Read<int64_t>(p + 8 * i)); break;
        case kUInt32: uints_.push_back(Read<uint32_t>(p + 4 * i)); break;
        case kUInt64: uints_.push_back(Read<uint64_t>(p + 8 * i)); break;
        case kBool: ints_.push_back(p[i] != 0); break;
        case kHalf: case kBFloat16: reals_.push_back(Half(Read<uint16_t>(p + 2 * i))); break;
        default: return false;
      }
    }
    return true;
  }

  // TF's fill rule: past the end of a short field, its last value; an empty
  // field, zeros.
  template <typename T>
  static T Pick(const std::vector<T>& v, uint64_t k) {
    if (v.empty()) return T{};
    return v[std::min<uint64_t>(k, v.size() - 1)];
  }

  template <typename T>
  static void AppendNumber(T v, std::string* out) {
    char buf[24];
    out->append(buf, std::to_chars(buf, buf + sizeof buf, v).ptr - buf);
  }

  int dtype_ = 0;
  std::vector<double> reals_;
  std::vector<int64_t> ints_;
  std::vector<uint64_t> uints_;
  const std::vector<std::string_view>* strings_ = nullptr;
};

const char kIndent[] = "    ";

void Indent(int depth, std::string* out) {
  for (int i = 0; i < depth; ++i) out->append(kIndent, 4);
}

// One output being written.
struct Printed {
  const OutputTensor* t;
  uint64_t n;  // values
  Values values;
  bool bytes;  // a DT_STRING output named *_bytes: {"b64": ...} objects
};

class ResponseWriter {
 public:
  explicit ResponseWriter(std::string* out) : out_(out) {}

  // predict_response.py _leaf_tokens: value k, `depth` containers deep.
  bool Leaf(const Printed& p, uint64_t k, int depth) {
    if (p.t->dtype != kString) return p.values.Append(k, out_);
    if (!p.bytes) {
      AppendJsonString(p.values.String(k), out_);
      return true;
    }
    out_->append("{\n");
    Indent(depth + 1, out_);
    out_->append("\"b64\": \"");
    AppendBase64(p.values.String(k), out_);
    out_->append("\"\n");
    Indent(depth, out_);
    out_->push_back('}');
    return true;
  }

  // An array on one line ([a, b], the row format's layout below the batch),
  // from dimension `level`; *k counts the values written.
  bool Line(const Printed& p, size_t level, uint64_t* k, int leaf_depth) {
    const auto& dims = p.t->dims;
    out_->push_back('[');
    for (int64_t i = 0; i < dims[level]; ++i) {
      if (i) out_->append(", ");
      if (!Item(p, level + 1, k, leaf_depth, -1)) return false;
    }
    out_->push_back(']');
    return true;
  }

  // The PrettyWriter layout (the columnar format): one element a line,
  // `depth` containers deep.
  bool Block(const Printed& p, size_t level, uint64_t* k, int leaf_depth, int depth) {
    const auto& dims = p.t->dims;
    if (dims[level] == 0) {
      out_->append("[]");
      return true;
    }
    out_->push_back('[');
    for (int64_t i = 0; i < dims[level]; ++i) {
      out_->append(i ? ",\n" : "\n");
      Indent(depth + 1, out_);
      if (!Item(p, level + 1, k, leaf_depth, depth + 1)) return false;
    }
    out_->push_back('\n');
    Indent(depth, out_);
    out_->push_back(']');
    return true;
  }

  // The element at dimension `level`: a value past the last dimension, else
  // an array (on one line when depth < 0).
  bool Item(const Printed& p, size_t level, uint64_t* k, int leaf_depth, int depth) {
    if (level == p.t->dims.size()) return Leaf(p, (*k)++, leaf_depth);
    return depth < 0 ? Line(p, level, k, leaf_depth) : Block(p, level, k, leaf_depth, depth);
  }

 private:
  std::string* out_;
};

// The number of values of a shape; false for negative dimensions and for
// shapes too large to print here.
bool Count(const std::vector<int64_t>& dims, uint64_t* n) {
  uint64_t nonzero = 1;
  bool zero = false;
  for (int64_t d : dims) {
    if (d < 0) return false;
    if (d == 0) { zero = true; continue; }
    if (static_cast<uint64_t>(d) > kMaxResponseValues / nonzero) return false;
    nonzero *= static_cast<uint64_t>(d);
  }
  *n = zero ? 0 : nonzero;
  return true;
}

}  // namespace

bool PredictResponseToJson(std::string_view response, bool row_format, std::string* json) {
  std::vector<OutputTensor> outputs;
  bool parsed = Fields(response, [&](Wire* w, uint32_t field, int wire) {
    std::string_view bytes;
    if (field == 1) {
      if (wire != 2 || !w->Bytes(&bytes)) return Read::kMalformed;
      outputs.emplace_back();
      return Done(ParseEntry(bytes, &outputs.back()));
    }
    if (field == 2) return Done(wire == 2 && w->Bytes(&bytes) && ValidModelSpec(bytes));
    return Read::kUnknown;
  });
  if (!parsed || outputs.empty()) return false;
  std::sort(outputs.begin(), outputs.end(),
            [](const OutputTensor& a, const OutputTensor& b) { return a.name < b.name; });
  for (size_t i = 1; i < outputs.size(); ++i)
    if (outputs[i].name == outputs[i - 1].name) return false;  // the last would win in Python

  std::vector<Printed> printed(outputs.size());
  uint64_t total = 0;
  for (size_t i = 0; i < outputs.size(); ++i) {
    Printed& p = printed[i];
    p.t = &outputs[i];
    if (!Count(p.t->dims, &p.n)) return false;
    // No values: no dtype check either (TF Serving checks each value it writes).
    if (p.n && !p.values.Load(*p.t, p.n)) return false;
    p.bytes = p.t->dtype == kString && p.t->name.size() >= 6 &&
              p.t->name.compare(p.t->name.size() - 6, 6, "_bytes") == 0;
    total += p.n + p.t->dims.size();
  }
  bool multi = outputs.size() > 1;
  json->clear();
  json->reserve(64 + total * 12);
  ResponseWriter writer(json);

  if (row_format) {
    int64_t batch = -1;
    for (const auto& p : printed) {
      if (p.t->dims.empty()) return false;
      if (batch >= 0 && batch != p.t->dims[0]) return false;
      batch = p.t->dims[0];
    }
    // Each output's items below the batch dimension, in turn.
    std::vector<uint64_t> next(printed.size(), 0);
    json->append("{\n    \"predictions\": [");
    for (int64_t i = 0; i < batch; ++i) {
      if (!multi) {
        const Printed& p = printed[0];
        if (i) json->append(", ");
        if (!writer.Item(p, 1, &next[0], static_cast<int>(p.t->dims.size()) + 1, -1)) return false;
        continue;
      }
      json->append(i ? ",\n        {" : "\n        {");
      for (size_t j = 0; j < printed.size(); ++j) {
        const Printed& p = printed[j];
        if (j) json->push_back(',');
        json->append("\n            ");
        AppendJsonString(p.t->name, json);
        json->append(": ");
        if (!writer.Item(p, 1, &next[j], static_cast<int>(p.t->dims.size()) + 2, -1)) return false;
      }
      json->append("\n        }");
    }
    json->append(batch > 0 ? "\n    ]\n}" : "]\n}");
    return true;
  }

  json->append("{\n    \"outputs\": ");
  int base = multi ? 2 : 1;
  if (multi) json->push_back('{');
  for (size_t j = 0; j < printed.size(); ++j) {
    const Printed& p = printed[j];
    if (multi) {
      if (j) json->push_back(',');
      json->append("\n        ");
      AppendJsonString(p.t->name, json);
      json->append(": ");
    }
    uint64_t k = 0;
    if (!writer.Item(p, 0, &k, base + static_cast<int>(p.t->dims.size()), base)) return false;
  }
  if (multi) json->append("\n    }");
  json->append("\n}");
  return true;
}

namespace {

// ---------------------------------------------------------------------------
// Responses: Classify and Regress results (tfs_json/classify.py)
// ---------------------------------------------------------------------------
// A label, a score or a value comes once from TF Serving; a repeat (protobuf
// keeps the last one) is left to Python. Unknown fields are skipped, as
// protobuf skips them.

// A ClassificationResponse's or RegressionResponse's top level: the result
// (field 1), handed to read_result, and the model_spec (2), checked only.
// A repeated result is read in turn: protobuf merges it into the first,
// appending its classifications or regressions.
template <typename Fn>
bool ResultResponse(std::string_view response, Fn read_result) {
  return Fields(response, [&](Wire* w, uint32_t field, int wire) {
    std::string_view bytes;
    if (field == 1) return Done(wire == 2 && w->Bytes(&bytes) && read_result(bytes));
    if (field == 2) return Done(wire == 2 && w->Bytes(&bytes) && ValidModelSpec(bytes));
    return Read::kUnknown;
  });
}

// Each element of message d's repeated message field 1, handed to fn.
template <typename Fn>
bool Elements(std::string_view d, Fn fn) {
  return Fields(d, [&](Wire* w, uint32_t field, int wire) {
    std::string_view bytes;
    if (field != 1) return Read::kUnknown;
    return Done(wire == 2 && w->Bytes(&bytes) && fn(bytes));
  });
}

// A float field, once.
Read FloatOnce(Wire* w, int wire, bool* seen, float* out) {
  const char* at;
  if (*seen || wire != 5 || !w->Fixed(4, &at)) return Read::kMalformed;
  *seen = true;
  std::memcpy(out, at, 4);
  return Read::kDone;
}

// tensorflow.serving.Class: label = 1, score = 2.
bool ParseClass(std::string_view d, std::string_view* label, float* score) {
  bool has_label = false, has_score = false;
  return Fields(d, [&](Wire* w, uint32_t field, int wire) {
    if (field == 1) {
      if (has_label) return Read::kMalformed;
      has_label = true;
      return Utf8Field(w, wire, label);
    }
    return field == 2 ? FloatOnce(w, wire, &has_score, score) : Read::kUnknown;
  });
}

}  // namespace

// classify.py classification_response_to_json: each Classifications a line
// of [label, score] pairs, scores as text.py _write_decimal writes one float.
bool ClassificationResponseToJson(std::string_view response, std::string* json) {
  json->clear();
  json->append("{\n    \"results\": [");
  size_t rows = 0;
  bool parsed = ResultResponse(response, [&](std::string_view result) {
    return Elements(result, [&](std::string_view classifications) {
      json->append(rows++ ? ", [" : "[");
      size_t classes = 0;
      bool ok = Elements(classifications, [&](std::string_view c) {
        std::string_view label;
        float score = 0;
        if (!ParseClass(c, &label, &score)) return false;
        json->append(classes++ ? ", [" : "[");
        AppendJsonString(label, json);
        json->append(", ");
        AppendScalarDecimal(score, true, json);
        json->push_back(']');
        return true;
      });
      json->push_back(']');
      return ok;
    });
  });
  if (!parsed || !rows) return false;  // no classifications: Python raises
  json->append("\n    ]\n}");
  return true;
}

// classify.py regression_response_to_json: the values on one line, as
// text.py _float_tokens writes a float32 array.
bool RegressionResponseToJson(std::string_view response, std::string* json) {
  json->clear();
  json->append("{\n    \"results\": [");
  size_t values = 0;
  bool parsed = ResultResponse(response, [&](std::string_view result) {
    return Elements(result, [&](std::string_view regression) {
      float value = 0;
      bool has_value = false;
      bool ok = Fields(regression, [&](Wire* w, uint32_t field, int wire) {
        return field == 1 ? FloatOnce(w, wire, &has_value, &value) : Read::kUnknown;
      });
      if (values++) json->append(", ");
      return ok && AppendDecimal(value, true, json);
    });
  });
  if (!parsed || !values) return false;  // no regressions: Python raises
  json->append("]\n}");
  return true;
}

}  // namespace cloudml::dataplane
