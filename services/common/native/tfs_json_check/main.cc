// cloudml-tfs-json: the data plane's REST JSON codec (dataplane/rest_json.h)
// behind stdin and stdout, so tests/unit/test_native_tfs_json*.py can hold
// thousands of cases against the Python codec through one process.
//
// Every record, both ways, is a 4-byte little-endian length and that many
// bytes. A request record:
//   'Q', u32 body length, body, i64 version, u32 model name length, model name,
//   u32 signature count, then per signature: u32 name length, name,
//   u32 input count, then per input: u32 name length, name, i32 dtype
// or a response record:
//   'S', u8 row format (0/1), the serialized PredictResponse (the rest);
// or a classify ('C') or regress ('G') request record:
//   'C' or 'G', u32 body length, body, i64 version, u32 model name length,
//   model name;
// or a classify ('c') or regress ('g') response record:
//   'c' or 'g', the serialized ClassificationResponse or RegressionResponse
//   (the rest).
// Each answer: 'D' (declined), 'R' u8 row format + the serialized
// PredictRequest, 'R' + the serialized ClassificationRequest or
// RegressionRequest, or 'J' + the JSON. A malformed record ends the process
// with status 2.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>

#include "../dataplane/rest_json.h"

namespace {

using cloudml::dataplane::Signatures;

bool ReadExactly(void* buf, size_t n) { return n == 0 || std::fread(buf, 1, n, stdin) == n; }

class Record {
 public:
  explicit Record(std::string_view d) : d_(d) {}

  template <typename T>
  bool Fixed(T* out) {
    if (d_.size() - pos_ < sizeof(T)) return false;
    std::memcpy(out, d_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }

  bool Bytes(std::string_view* out) {
    uint32_t n;
    if (!Fixed(&n) || d_.size() - pos_ < n) return false;
    *out = d_.substr(pos_, n);
    pos_ += n;
    return true;
  }

  std::string_view Rest() const { return d_.substr(pos_); }
  bool Done() const { return pos_ == d_.size(); }

 private:
  std::string_view d_;
  size_t pos_ = 0;
};

bool Request(Record* r, std::string* answer) {
  std::string_view body, model, name;
  int64_t version;
  uint32_t count;
  if (!r->Bytes(&body) || !r->Fixed(&version) || !r->Bytes(&model) || !r->Fixed(&count)) return false;
  Signatures signatures;
  for (uint32_t i = 0; i < count; ++i) {
    uint32_t inputs;
    if (!r->Bytes(&name) || !r->Fixed(&inputs)) return false;
    auto& sig = signatures[std::string(name)];
    for (uint32_t j = 0; j < inputs; ++j) {
      std::string_view input;
      int32_t dtype;
      if (!r->Bytes(&input) || !r->Fixed(&dtype)) return false;
      sig.emplace_back(std::string(input), dtype);
    }
  }
  if (!r->Done()) return false;
  std::string request;
  bool row = false;
  if (!cloudml::dataplane::PredictRequestFromJson(body, signatures, std::string(model), version, &request, &row)) {
    *answer = "D";
  } else {
    *answer = row ? std::string("R\1", 2) : std::string("R\0", 2);
    *answer += request;
  }
  return true;
}

bool ExamplesRequest(bool classify, Record* r, std::string* answer) {
  std::string_view body, model;
  int64_t version;
  if (!r->Bytes(&body) || !r->Fixed(&version) || !r->Bytes(&model) || !r->Done()) return false;
  std::string request;
  bool ok = classify ? cloudml::dataplane::ClassifyRequestFromJson(body, std::string(model), version, &request)
                     : cloudml::dataplane::RegressRequestFromJson(body, std::string(model), version, &request);
  *answer = ok ? "R" + request : "D";
  return true;
}

bool Response(Record* r, std::string* answer) {
  uint8_t row;
  if (!r->Fixed(&row) || row > 1) return false;
  std::string json;
  if (!cloudml::dataplane::PredictResponseToJson(r->Rest(), row == 1, &json)) {
    *answer = "D";
  } else {
    *answer = "J" + json;
  }
  return true;
}

bool ExamplesResponse(bool classify, Record* r, std::string* answer) {
  std::string json;
  bool ok = classify ? cloudml::dataplane::ClassificationResponseToJson(r->Rest(), &json)
                     : cloudml::dataplane::RegressionResponseToJson(r->Rest(), &json);
  *answer = ok ? "J" + json : "D";
  return true;
}

}  // namespace

int main() {
  std::string record, answer;
  while (true) {
    uint32_t n;
    if (std::fread(&n, 1, 4, stdin) != 4) return 0;
    record.resize(n);
    if (!ReadExactly(record.data(), n) || n == 0) return 2;
    Record r(std::string_view(record).substr(1));
    bool ok;
    switch (record[0]) {
      case 'Q': ok = Request(&r, &answer); break;
      case 'S': ok = Response(&r, &answer); break;
      case 'C': case 'G': ok = ExamplesRequest(record[0] == 'C', &r, &answer); break;
      case 'c': case 'g': ok = ExamplesResponse(record[0] == 'c', &r, &answer); break;
      default: ok = false;
    }
    if (!ok) return 2;
    uint32_t size = static_cast<uint32_t>(answer.size());
    std::fwrite(&size, 1, 4, stdout);
    std::fwrite(answer.data(), 1, answer.size(), stdout);
    std::fflush(stdout);
  }
}
