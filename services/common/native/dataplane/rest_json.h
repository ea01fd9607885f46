// TF Serving's REST JSON for the data plane's native REST path (rest.h):
// a Predict body to a serialized tensorflow.serving.PredictRequest, and a
// serialized PredictResponse back to TF Serving's JSON, in C++; likewise for
// Classify and Regress (tf.Examples in, classes or values out).
//
// The Python gateway's codec (services/gateway/tfs_json/) is the reference:
// for every input this code accepts, its result is the reference's, byte for
// byte (a response's JSON) or field for field (a request's proto). Where the
// reference answers an error, or where this code is not certain to match it
// (a dtype or a shape it does not handle, a number it cannot classify as
// Python's json does, ...), it declines: the call then takes the Python
// gateway's path, which answers it (errors included) exactly as before.
// tests/unit/test_native_tfs_json.py holds the two to that, case by case.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace cloudml::dataplane {

// A version's signatures, as its GetModelMetadata reports them: signature
// name -> its inputs as (input name, tensorflow.DataType value), sorted by
// input name.
using SignatureInputs = std::vector<std::pair<std::string, int>>;
using Signatures = std::map<std::string, SignatureInputs>;

// A REST predict body -> the PredictRequest the Python gateway's path sends
// (services/gateway/rest.py RestServer._predict: load_request_json, then
// parse_predict_request(doc, signatures, model_name=model_name,
// version=version), then model_spec.signature_name = the body's
// "signature_name" or "serving_default"), serialized into *request;
// *row_format: the body used "instances" (the answer is "predictions").
// false: declined (see above); *request is then unspecified.
bool PredictRequestFromJson(std::string_view body, const Signatures& signatures, const std::string& model_name,
                            int64_t version, std::string* request, bool* row_format);

// A serialized PredictResponse -> the JSON the Python gateway answers
// (tfs_json.predict_response_to_json(response, row_format)), byte for byte.
// false: declined (the reference would raise, or this code does not handle
// a dtype); *json is then unspecified.
bool PredictResponseToJson(std::string_view response, bool row_format, std::string* json);

// A REST classify or regress body -> the ClassificationRequest or
// RegressionRequest the Python gateway's path sends
// (services/gateway/rest.py RestServer._classify_or_regress:
// tfs_json.classification_request_from_json(body, model_name=model_name,
// version=version), regression_request_from_json likewise), serialized into
// *request: tf.Examples from "examples" and the optional "context", the
// body's "signature_name" if it has one. false: declined; *request is then
// unspecified.
bool ClassifyRequestFromJson(std::string_view body, const std::string& model_name, int64_t version,
                             std::string* request);
bool RegressRequestFromJson(std::string_view body, const std::string& model_name, int64_t version,
                            std::string* request);

// A serialized ClassificationResponse or RegressionResponse -> the JSON the
// Python gateway answers (tfs_json.classification_response_to_json,
// regression_response_to_json), byte for byte. false: declined (the
// reference would raise, or this code is not certain to match it); *json is
// then unspecified.
bool ClassificationResponseToJson(std::string_view response, std::string* json);
bool RegressionResponseToJson(std::string_view response, std::string* json);

// Shared with the REST front (rest.cc): a JSON string literal as the Python
// codec writes one (strings.py _jstr: raw bytes, the JSON escapes, \u00XX
// upper-case), and base64 as parse.py reads it (padding optional; false if
// not base64).
void AppendJsonString(std::string_view s, std::string* out);
bool Base64Decode(std::string_view s, std::string* out);

}  // namespace cloudml::dataplane
