"""The rules the Python gateway and the native data plane share, in one place.

Both sides of the Python/C++ boundary forward the same TF Serving calls, drop
the same per-hop metadata, talk to each other through the same `x-cloudml-*`
headers, and pick versions and replicas by the same rules. The names live
here; the C++ side reads them from `dataplane/protocol.h`, which is generated
from this module and checked in:

    .venv/bin/python -m services.common.native.protocol   # rewrites protocol.h

tests/unit/test_native_constants.py fails when protocol.h and this module
disagree, when a C++ or gateway source spells an `x-cloudml-*` name itself,
and when the C++ picking rules (dataplane/picking.h, compiled there with a
small driver) choose differently from `pick_weighted` and `pick_two` below.
"""
from __future__ import annotations

import os
import random
from typing import Callable, Sequence, TypeVar

# --- headers --------------------------------------------------------------------------

#: The data plane marks the calls it sends the Python gateway with its secret
#: (the process's CLOUDML_DATAPLANE_SECRET), Attach calls included.
SECRET_HEADER = "x-cloudml-dataplane"
#: Trailing metadata from the gateway: its RouteDecision for a model call.
ROUTE_DECISION_HEADER = "x-cloudml-route-bin"
#: Trailing metadata from the gateway: its AuthDecision for a platform call's token.
AUTH_DECISION_HEADER = "x-cloudml-auth-bin"
#: The version the gateway resolved (a label, the traffic split, a qualified
#: `<tenant>.<model>` name...); replicas trust it from the gateway only.
RESOLVED_VERSION_HEADER = "x-cloudml-resolved-version"
#: HTTP response header from the gateway to the data plane on a REST predict
#: it relayed: the RestDecision, base64 (never passed on to the caller).
REST_DECISION_HEADER = "x-cloudml-rest-route"
#: HTTP request header from the data plane to the gateway (with its secret):
#: "1" asks only for the RestDecision of a REST model call the data plane
#: has no route for, answered 204 with REST_DECISION_HEADER (or without it:
#: then the data plane relays the call itself). The body is not sent.
REST_RESOLVE_HEADER = "x-cloudml-rest-resolve"
#: Only the platform sets these: a caller's own values are always dropped.
PLATFORM_HEADERS = (SECRET_HEADER, ROUTE_DECISION_HEADER, AUTH_DECISION_HEADER, RESOLVED_VERSION_HEADER)
#: The prefix of every platform header: on the REST port, the data plane
#: drops a caller's headers that start with it.
PLATFORM_PREFIX = "x-cloudml-"

#: The caller's token: forwarded to platform services, never to replicas.
AUTHORIZATION = "authorization"

#: Metadata that belongs to one hop and is never forwarded: these keys, every
#: key starting with one of HOP_PREFIXES (pseudo-headers and gRPC's own), and
#: the platform's headers.
USER_AGENT, TE, CONTENT_TYPE = "user-agent", "te", "content-type"
HOP_HEADERS = (USER_AGENT, TE, CONTENT_TYPE, "host", "accept-encoding") + PLATFORM_HEADERS
HOP_PREFIXES = (":", "grpc-")
_HOP_SET = frozenset(HOP_HEADERS)


def is_hop_header(key: str) -> bool:
    """True for metadata that must not be forwarded (see HOP_HEADERS)."""
    return not key or key in _HOP_SET or key.startswith(HOP_PREFIXES)


#: The environment variable that hands the data plane the gateway's secret.
SECRET_ENV = "CLOUDML_DATAPLANE_SECRET"

# --- methods --------------------------------------------------------------------------

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
#: PredictionService methods routed to replicas (the data plane's model calls).
FORWARDED_METHODS = ("Predict", "Classify", "Regress", "MultiInference", "GetModelMetadata")
#: The control plane's own service, which the public port refuses.
DATAPLANE_SERVICE = "cloudml.internal.v1.Dataplane"
ATTACH = f"/{DATAPLANE_SERVICE}/Attach"

# --- picking --------------------------------------------------------------------------

T = TypeVar("T")


def pick_weighted(choices: Sequence[tuple[T, float]], draw: Callable[[float], float] | None = None) -> T:
    """One of (item, weight) choices, by weight (the traffic split): a uniform
    draw in [0, total weight), and the first item whose running sum reaches it.
    `draw(total)` is the draw (random.uniform(0, total) by default).
    The data plane's PickWeighted (dataplane/picking.h) is the same rule."""
    if len(choices) == 1:
        return choices[0][0]
    pick = (draw or (lambda total: random.uniform(0, total)))(sum(w for _, w in choices))
    for item, weight in choices:
        pick -= weight
        if pick <= 0:
            return item
    return choices[-1][0]


def pick_two(candidates: Sequence[T], load: Callable[[T], int],
             sample: Callable[[int], tuple[int, int]] | None = None) -> T | None:
    """Least load of two different random candidates (power of two choices),
    the first on a tie; None without candidates. `sample(n)` draws the two
    indices (random.sample by default). The data plane's PickTwo
    (dataplane/picking.h) is the same rule."""
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    i, j = (sample or (lambda n: tuple(random.sample(range(n), 2))))(len(candidates))
    a, b = candidates[i], candidates[j]
    return a if load(a) <= load(b) else b


# --- the C++ side ---------------------------------------------------------------------

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dataplane", "protocol.h")


def _c(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_header() -> str:
    """dataplane/protocol.h as this module defines it."""
    def array(name: str, values: Sequence[str]) -> str:
        lines, line = [], f"constexpr const char* {name}[] = {{"
        for v in values:  # packed, at most 110 characters a line
            item = f" {_c(v)},"
            if len(line) + len(item) > 110:
                lines.append(line)
                line = "   "
            line += item
        return "\n".join([*lines, line + " };"])

    return "\n".join([
        "// Generated from services/common/native/protocol.py by",
        "//   .venv/bin/python -m services.common.native.protocol",
        "// Do not edit: change the Python module and regenerate",
        "// (tests/unit/test_native_constants.py fails when they differ).",
        "#pragma once",
        "",
        "namespace cloudml::dataplane {",
        "",
        f"constexpr char kSecretHeader[] = {_c(SECRET_HEADER)};",
        f"constexpr char kDecisionHeader[] = {_c(ROUTE_DECISION_HEADER)};",
        f"constexpr char kAuthHeader[] = {_c(AUTH_DECISION_HEADER)};",
        f"constexpr char kResolvedVersion[] = {_c(RESOLVED_VERSION_HEADER)};",
        f"constexpr char kAuthorization[] = {_c(AUTHORIZATION)};",
        f"constexpr char kUserAgent[] = {_c(USER_AGENT)};",
        f"constexpr char kTe[] = {_c(TE)};",
        f"constexpr char kContentType[] = {_c(CONTENT_TYPE)};",
        f"constexpr char kSecretEnv[] = {_c(SECRET_ENV)};",
        f"constexpr char kRestDecisionHeader[] = {_c(REST_DECISION_HEADER)};",
        f"constexpr char kRestResolveHeader[] = {_c(REST_RESOLVE_HEADER)};",
        f"constexpr char kPlatformPrefix[] = {_c(PLATFORM_PREFIX)};",
        "",
        "// Metadata never forwarded: these keys and keys with these prefixes (IsHopHeader).",
        array("kHopHeaders", HOP_HEADERS),
        array("kHopPrefixes", HOP_PREFIXES),
        "",
        f"constexpr char kPredictionService[] = {_c('/' + PREDICTION_SERVICE + '/')};",
        "// PredictionService methods routed to replicas (model calls).",
        array("kForwardedMethods", FORWARDED_METHODS),
        f"constexpr char kDataplaneService[] = {_c('/' + DATAPLANE_SERVICE + '/')};",
        f"constexpr char kAttach[] = {_c(ATTACH)};",
        "",
        "}  // namespace cloudml::dataplane",
        "",
    ])


if __name__ == "__main__":
    with open(HEADER, "w") as f:
        f.write(render_header())
    print(HEADER)
