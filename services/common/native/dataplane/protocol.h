// Generated from services/common/native/protocol.py by
//   .venv/bin/python -m services.common.native.protocol
// Do not edit: change the Python module and regenerate
// (tests/unit/test_native_constants.py fails when they differ).
#pragma once

namespace cloudml::dataplane {

constexpr char kSecretHeader[] = "x-cloudml-dataplane";
constexpr char kDecisionHeader[] = "x-cloudml-route-bin";
constexpr char kAuthHeader[] = "x-cloudml-auth-bin";
constexpr char kResolvedVersion[] = "x-cloudml-resolved-version";
constexpr char kAuthorization[] = "authorization";
constexpr char kUserAgent[] = "user-agent";
constexpr char kTe[] = "te";
constexpr char kContentType[] = "content-type";
constexpr char kSecretEnv[] = "CLOUDML_DATAPLANE_SECRET";
constexpr char kRestDecisionHeader[] = "x-cloudml-rest-route";
constexpr char kRestResolveHeader[] = "x-cloudml-rest-resolve";
constexpr char kPlatformPrefix[] = "x-cloudml-";

// Metadata never forwarded: these keys and keys with these prefixes (IsHopHeader).
constexpr const char* kHopHeaders[] = { "user-agent", "te", "content-type", "host", "accept-encoding",
    "x-cloudml-dataplane", "x-cloudml-route-bin", "x-cloudml-auth-bin", "x-cloudml-resolved-version", };
constexpr const char* kHopPrefixes[] = { ":", "grpc-", };

constexpr char kPredictionService[] = "/tensorflow.serving.PredictionService/";
// PredictionService methods routed to replicas (model calls).
constexpr const char* kForwardedMethods[] = { "Predict", "Classify", "Regress", "MultiInference",
    "GetModelMetadata", };
constexpr char kDataplaneService[] = "/cloudml.internal.v1.Dataplane/";
constexpr char kAttach[] = "/cloudml.internal.v1.Dataplane/Attach";

}  // namespace cloudml::dataplane
