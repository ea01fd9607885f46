"""The data plane's native REST JSON codec for Classify and Regress
(services/common/native/dataplane/rest_json.cc) against the Python codec it
stands in for (services/gateway/tfs_json/classify.py).

The rule, as for Predict (test_native_tfs_json.py, whose driver process and
random JSON pieces these tests share): where the C++ codec answers, Python
succeeds and its answer is the same (a request: the same
ClassificationRequest or RegressionRequest, presence of every submessage
included; a response: the same bytes). The C++ codec may decline anything,
but not the ordinary requests and responses (MUST_CONVERT below). The cases:
every body and response of test_tfs_json_classify.py, and a few thousand
seeded random ones, hostile ones among them.
"""
from __future__ import annotations

import math
import random
import struct

import numpy as np
import pytest

from cloudml.tfs.tensorflow_serving.apis import classification_pb2, regression_pb2
from services.gateway import tfs_json as tj
from services.gateway.tfs_json import classify as tj_classify

from tests.unit import test_tfs_json_classify
from tests.unit.test_native_tfs_json import (  # noqa: F401 - codec: the shared driver fixture
    BAD_TOKENS, FLOAT_LITERALS, INT_EDGES, NAMES, Codec, Obj, Raw, _run_module_tests, codec, dump, key, mangle,
    mutate, rand_b64, rand_reals, rand_string)

# Per request mode: the request message, the Python conversion; per response mode likewise.
REQUESTS = {b"C": (classification_pb2.ClassificationRequest, tj.classification_request_from_json),
            b"G": (regression_pb2.RegressionRequest, tj.regression_request_from_json)}
RESPONSES = {b"c": (classification_pb2.ClassificationResponse, tj.classification_response_to_json),
             b"g": (regression_pb2.RegressionResponse, tj.regression_response_to_json)}


# ---------------------------------------------------------------------------
# The two codecs, side by side
# ---------------------------------------------------------------------------

def python_request(mode: bytes, body: bytes, model: str, version: int):
    """services/gateway/rest.py RestServer._classify_or_regress's conversion; the exception where it fails."""
    try:
        return REQUESTS[mode][1](body, model_name=model, version=version)
    except Exception as e:  # noqa: BLE001 - any failure means the C++ side must decline
        return e


def check_request(codec: Codec, mode: bytes, body, model="model", version=3) -> bool:
    """True if the C++ codec converted `body` (and then exactly as Python)."""
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    got = codec.examples_request(mode, body, model, version)
    if got is None:
        return False
    want = python_request(mode, body, model, version)
    assert not isinstance(want, Exception), f"C++ converted what Python refuses ({want!r}): {body[:300]!r}"
    request = REQUESTS[mode][0].FromString(got)
    assert request == want, f"{body[:300]!r}\nC++: {request}\nPython: {want}"
    # Deterministic serialization sorts the feature maps and tells unset submessages from empty ones.
    assert request.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True), body[:300]
    return True


def check_response(codec: Codec, mode: bytes, raw: bytes) -> bool:
    got = codec.examples_response(mode, raw)
    if got is None:
        return False
    message, convert = RESPONSES[mode]
    try:
        with np.errstate(all="ignore"):
            want = convert(message.FromString(raw))
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"C++ converted what Python refuses ({e!r}): {raw[:300]!r}")
    assert got == want, f"{raw[:300]!r}\nC++:    {got[:600]!r}\nPython: {want[:600]!r}"
    return True


# ---------------------------------------------------------------------------
# The Python codec's own test cases
# ---------------------------------------------------------------------------

def test_request_bodies_of_the_python_codec_tests(codec, monkeypatch):
    seen = []

    def record(original):
        def wrapped(body, request):
            if isinstance(body, (bytes, str)):
                mode = b"C" if isinstance(request, classification_pb2.ClassificationRequest) else b"G"
                seen.append((mode, body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body))
            return original(body, request)
        return wrapped

    _run_module_tests(test_tfs_json_classify, monkeypatch, "_fill_classify_regress", record, (tj_classify,))
    assert len(seen) > 20 and {mode for mode, _ in seen} == {b"C", b"G"}
    declined = []
    for mode, body in seen:
        if check_request(codec, mode, body):
            continue
        # Declining is right where Python fails, and taken on NaN/Infinity tokens.
        if isinstance(python_request(mode, body, "model", 3), Exception) or b"NaN" in body or b"Inf" in body:
            continue
        declined.append(body)
    assert not declined


def test_responses_of_the_python_codec_tests(codec, monkeypatch):
    seen = []

    def record(mode, original):
        def wrapped(response):
            # The Python function takes a bare result too; the data plane always has a whole response.
            message = RESPONSES[mode][0]
            if not isinstance(response, message):
                response = message(result=response)
            seen.append((mode, response.SerializeToString()))
            return original(response)
        return wrapped

    for mode, name in ((b"c", "classification_response_to_json"), (b"g", "regression_response_to_json")):
        _run_module_tests(test_tfs_json_classify, monkeypatch, name, lambda original, m=mode: record(m, original),
                          (tj,))
    assert len(seen) > 6
    converted = sum(check_response(codec, mode, raw) for mode, raw in seen)
    assert converted == len(seen) - 2  # the two empty results, which Python refuses


# ---------------------------------------------------------------------------
# The ordinary cases: the fast path must take them
# ---------------------------------------------------------------------------

MUST_CONVERT_REQUESTS = [
    b'{"examples": [{"names": ["foo", "bar"], "ratings": [8.0, 9.0], "age": 20}, {"names": ["baz"], "ratings": 6.0}]}',
    b'{"signature_name": "custom", "context": {"query": "pizza", "location": ["sfo"]}, '
    b'"examples": [{"names": ["baz", {"b64": "aGVsbG8="}], "ratings": 6.0, "intboolmix": [1, true, false]}, '
    b'{"names": "bar", "ratings": -1.5e-3, "empty": []}]}',
    b'{"examples": [{}], "context": {}}',
    b'{"examples": [{}, {"x": []}]}',
    b'{"examples": [{"f": 16777215, "g": -9223372036854775808, "h": 9223372036854775807, "i": [-0, 0]}]}',
    b'{"examples": [{"f": [3.4e38, -3.4028234663852886e38, 1e-45, 0.1, -0.0, 1e400, 1e30]}]}',
    b'{"examples": [{"big": [100000000000000000000000000000, 1.5]}]}',
    b'{"examples": [{"s": ["w\\u00f6rld \\ud83d\\ude00 \\"q\\" \\\\ \\n\\t\\/", "\xc3\xa9\xe2\x98\x83", "a\xff\xfeb", ""]}]}',
    b'{"examples": [{"b": [{"b64": "AAEC"}, {"b64": ""}, {"b64": "/w"}, {"b64": "+/+/"}], "c": {"b64": "QQ=="}}]}',
    b'{"examples": [{"t": true}, {"t": [false]}], "signature_name": ""}',
    b' \n{ "\\u0065xamples" : [ { "\\u00e9t\\u00e9" : [ 1 , 2 ] , "" : "x" } ] , "extra" : [ null, {} ] }\r\n\t',
    b'{"examples": [{"b64": "not a b64 object: a plain feature named b64"}]}',
]


@pytest.mark.parametrize("mode", [b"C", b"G"])
def test_ordinary_requests_are_converted(codec, mode):
    declined = [body for body in MUST_CONVERT_REQUESTS if not check_request(codec, mode, body)]
    assert not declined
    # The model name and the version as the caller gives them.
    for model, version in (("", 0), ("m\u00e9", 1 << 40), ("m", -1)):
        assert check_request(codec, mode, MUST_CONVERT_REQUESTS[0], model, version)


def classification(*rows, spec=True) -> bytes:
    r = classification_pb2.ClassificationResponse()
    if spec:
        r.model_spec.name = "m"
        r.model_spec.version.value = 4
        r.model_spec.signature_name = "serving_default"
    for row in rows:
        c = r.result.classifications.add()
        for label, score in row:
            c.classes.add(label=label, score=score)
    return r.SerializeToString()


def regression(*values, spec=True) -> bytes:
    r = regression_pb2.RegressionResponse()
    if spec:
        r.model_spec.name = "m"
        r.model_spec.version.value = 4
    for v in values:
        r.result.regressions.add(value=v)
    return r.SerializeToString()


MUST_CONVERT_RESPONSES = [
    (b"c", classification([("car", 0.2), ("bike", 0.7), ("bus", 0.1)], [("car", 0.7), ("bike", 0.1), ("bus", 0.2)])),
    (b"c", classification([("", 12.0)], spec=False)),
    (b"c", classification([], [("0", 0.999999), ("1", 1e-7)], [("\u00e9\"\\\n\x01\x7f", -0.0)])),
    (b"c", classification([("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf), ("max", 3.4028234663852886e38)])),
    (b"g", regression(0.2, 0.9, 1.0)),
    (b"g", regression(0.2, math.inf, 1.0, -math.inf, math.nan, -0.0, 1e-45, 123456.789, spec=False)),
    (b"g", regression(*np.random.default_rng(5).standard_normal(200).astype(np.float32).tolist())),
]


def test_ordinary_responses_are_converted(codec):
    for i, (mode, raw) in enumerate(MUST_CONVERT_RESPONSES):
        assert check_response(codec, mode, raw), f"response {i} declined"
    rng = np.random.default_rng(9)
    scores = rng.uniform(0, 1, (50, 10)).astype(np.float32).tolist()
    assert check_response(codec, b"c", classification(*([(str(k), s) for k, s in enumerate(row)] for row in scores)))


# ---------------------------------------------------------------------------
# What must be declined
# ---------------------------------------------------------------------------

MUST_DECLINE_REQUESTS = [
    b'{"examples": [{"x": NaN}]}', b'{"examples": [{"x": [1.0, Infinity]}]}',  # Python takes these; the fast path not
    b'{"examples": [{"x": 1}], "examples": [{"x": 2}]}', b'{"examples": [{"x": 1, "x": 2}]}',  # duplicate keys
    b'{"examples": [{"x": [1, 1.5]}]}', b'{"examples": [{"x": ["a", 1]}]}', b'{"examples": [{"x": [true, "a"]}]}',
    b'{"examples": [{"x": [1.5, false]}]}', b'{"examples": [{"x": [{"b64": "QQ=="}, 2]}]}',
    b'{"examples": [{"x": null}]}', b'{"examples": [{"x": [[1]]}]}', b'{"examples": [{"x": {"a": 1}}]}',
    b'{"examples": [{"x": {"b64": "QQ==", "y": 1}}]}', b'{"examples": [{"x": {"b64": 1}}]}',
    b'{"examples": [{"x": {"b64": "%%%"}}]}', b'{"examples": [{"x": {"b64": "QUJDR"}}]}',
    b'{"examples": [{"x": 9223372036854775808}]}', b'{"examples": [{"x": 18446744073709551615}]}',
    b'{"examples": [{"x": 3.5e38}]}', b'{"examples": [{"x": 1' + b"0" * 39 + b'}]}',
    b'{"examples": [{"x": 1' + b"0" * 400 + b'}]}', b'{"examples": [{"x": 1}], "y": 1' + b"0" * 5000 + b'}',
    b'{"examples": [{"x\xff": 1}]}', b'{"examples": [{"x": 1}], "signature_name": "s\xff"}',
    b'{"examples": [{"x": 1}], "signature_name": 5}', b'{"examples": []}', b'{"examples": {"x": 1}}',
    b'{"context": {"x": 1}}', b'{"examples": [[{"x": 1}]]}', b'{"examples": [1]}',
    b'{"examples": [{"x": 1}], "context": []}', b'{"examples": [{"x": 1}], "context": {"y": null}}',
    b'{"examples": [{"x": "\\ud800"}]}', b'\xef\xbb\xbf{"examples": [{"x": 1}]}', b'{"examples": [{"x": 01}]}',
    b'[{"examples": [{"x": 1}]}]', b'', b'{"examples": [{"x": 1}]} x', b'{"examples": [{"x": 1}],}',
]


@pytest.mark.parametrize("mode", [b"C", b"G"])
def test_unusual_requests_are_declined(codec, mode):
    converted = [body for body in MUST_DECLINE_REQUESTS if codec.examples_request(mode, body, "m", 1) is not None]
    assert not converted


def field(number: int, wire: int, payload: bytes) -> bytes:
    """One protobuf field, by hand: a varint tag, then a length for wire type 2."""
    tag, out = number << 3 | wire, b""
    for v in ([tag, len(payload)] if wire == 2 else [tag]):
        while v >= 0x80:
            out += bytes([v & 0x7F | 0x80])
            v >>= 7
        out += bytes([v])
    return out + payload


def klass(label: bytes, score: float, extra: bytes = b"") -> bytes:
    return field(1, 2, field(1, 2, label) + field(2, 5, struct.pack("<f", score)) + extra)


MUST_DECLINE_RESPONSES = [
    (b"c", classification()), (b"g", regression()),  # Python: "Cannot convert empty ...Results to JSON"
    (b"c", field(1, 2, field(1, 2, klass(b"a\xffb", 1.0)))),  # not UTF-8: protobuf refuses it
    (b"c", field(1, 2, field(1, 2, klass(b"a", 1.0, field(1, 2, b"b"))))),  # the label twice
    (b"c", field(1, 2, field(1, 2, klass(b"a", 1.0, field(2, 0, b"\x01"))))),  # the score with another wire type
    (b"c", field(1, 2, b"\x0a\x05\x0a\x03")),  # cut short
    (b"g", field(1, 2, field(1, 2, field(1, 5, b"\0\0\0\0") + field(1, 5, b"\0\0\0\0")))),
    (b"g", field(1, 2, field(1, 2, field(1, 1, b"\0" * 8)))),
    (b"g", field(2, 2, field(1, 2, b"\xff")) + field(1, 2, field(1, 2, b""))),  # a model name not UTF-8
    (b"g", field(1, 3, b"")),  # a group
]


def test_unusual_responses_are_declined(codec):
    for i, (mode, raw) in enumerate(MUST_DECLINE_RESPONSES):
        assert codec.examples_response(mode, raw) is None, f"response {i} converted"
    # A repeated result: protobuf merges the two.
    assert check_response(codec, b"c", field(1, 2, field(1, 2, b"")) + classification([("a", 1.0)]))
    assert check_response(codec, b"g", regression(1.0, 2.0) + regression(3.0, spec=False))
    # Unknown fields are skipped, as protobuf skips them.
    assert check_response(codec, b"c", field(1, 2, field(1, 2, klass(b"a", 0.5, field(9, 0, b"\x01")))) +
                          field(7, 2, b"xyz"))
    assert check_response(codec, b"g", field(1, 2, field(1, 2, field(1, 5, struct.pack("<f", 2.5)) +
                                                         field(3, 0, b"\x05"))))


# ---------------------------------------------------------------------------
# Seeded random requests
# ---------------------------------------------------------------------------

def rand_feature_value(rng: random.Random, noise: float):
    """One feature's value: a list of one kind (or, with noise, mixed or wrong), or a single value."""
    kind = rng.choice(["bytes", "b64", "float", "int", "bool"])

    def one():
        if rng.random() < noise:
            return rng.choice([None, [1], Obj([]), Obj([(b'"a"', 1)]), rand_b64(rng, 0.5), True, 1, 1.5,
                               Raw(rng.choice(BAD_TOKENS)), Raw(rng.choice(FLOAT_LITERALS)), rng.choice(INT_EDGES),
                               Raw(rand_string(rng, 0.2))])
        if kind == "bytes":
            return Raw(rand_string(rng, noise))
        if kind == "b64":
            return rand_b64(rng, noise) if rng.random() < 0.7 else Raw(rand_string(rng, noise))
        if kind == "float":
            r = rng.random()
            if r < 0.1 + noise:
                return Raw(rng.choice(FLOAT_LITERALS))
            return float(np.float32(rng.gauss(0, 10 ** rng.randint(-5, 5)))) if r < 0.8 else rng.uniform(-1, 1)
        if kind == "int":
            return rng.choice(INT_EDGES) if rng.random() < 0.1 + noise else rng.randint(-10 ** 6, 10 ** 6)
        return rng.random() < 0.5 if rng.random() < 0.8 else rng.randint(-3, 3)

    if rng.random() < 0.25:
        return one()
    return [one() for _ in range(rng.choice([0, 1, 1, 2, 3, 5]))]


def rand_example(rng: random.Random, noise: float):
    if rng.random() < noise:
        return rng.choice([None, 1, Raw(b'"x"'), [Obj([])], []])
    names = rng.sample(NAMES + ["", "age", "ratings"], rng.randint(0, 4))
    pairs = [(key(n), rand_feature_value(rng, noise)) for n in names]
    if pairs and rng.random() < noise:
        pairs.append(pairs[0])  # a duplicate key
    if rng.random() < noise:
        pairs.append((rand_string(rng, 0.5), 1))  # a name with escapes, maybe not UTF-8
    return Obj(pairs)


def rand_body(rng: random.Random) -> bytes:
    noise = rng.choice([0, 0, 0, 0.01, 0.05])  # the chance of a wrong or edge value, per value
    pairs = []
    if rng.random() < 0.97:
        examples = [rand_example(rng, noise) for _ in range(rng.choice([1, 1, 2, 3, 4] + [0] * (noise > 0)))]
        pairs.append((b'"examples"', examples if rng.random() > noise else Obj([])))
    if rng.random() < 0.3:
        pairs.append((b'"context"', rand_example(rng, noise)))
    r = rng.random()
    if r < 0.2:
        pairs.append((b'"signature_name"', Raw(key(rng.choice(["serving_default", "", "\u00e9", "classify"])))))
    elif r < 0.2 + noise:
        pairs.append((b'"signature_name"', rng.choice([5, None, Raw(b'"\xff"')])))
    if rng.random() < 0.05:
        pairs.append((rng.choice([b'"instances"', b'"extra"', b'"examples"']), [1]))
    rng.shuffle(pairs)
    return mangle(rng, dump(Obj(pairs), rng))


def test_random_requests(codec):
    rng = random.Random(20240612)
    converted = total = 0
    for _ in range(3000):
        mode = rng.choice([b"C", b"G"])
        converted += check_request(codec, mode, rand_body(rng), model=rng.choice(["m", "", "\u00e9"]),
                                   version=rng.choice([1, 0, 7, 1 << 40]))
        total += 1
    print(f"\nrandom classify/regress requests: {total - converted} of {total} declined "
          f"({100 * (total - converted) / total:.1f}%)")
    assert converted > total // 2


# ---------------------------------------------------------------------------
# Seeded random responses
# ---------------------------------------------------------------------------

LABELS = ["car", "", "\u00e9\u2603", "a\"b\\c", "\x00\x01\x1f\x7f", "\n\t\r\b\f", "\U0001F600", "0"]


def rand_classification_response(rng: random.Random) -> bytes:
    rows = []
    for _ in range(rng.choice([0, 1, 1, 2, 3, 5])):
        n = rng.choice([0, 1, 2, 3, 5])
        labels = [rng.choice(LABELS) + rng.choice(LABELS) for _ in range(n)]
        rows.append(list(zip(labels, rand_reals(rng, n, True))))
    raw = classification(*rows, spec=rng.random() < 0.7)
    r = rng.random()
    if r < 0.03 and rows:  # a label not UTF-8, or an unknown field in a class
        raw += field(1, 2, field(1, 2, klass(rng.choice([b"\xff", b"\xc3", b"ok"]), 1.0,
                                             rng.choice([b"", field(5, 0, b"\x01")]))))
    return mutate(rng, raw)


def rand_regression_response(rng: random.Random) -> bytes:
    return mutate(rng, regression(*rand_reals(rng, rng.choice([0, 1, 1, 2, 3, 8, 40]), True),
                                  spec=rng.random() < 0.7))


def test_random_responses(codec):
    rng = random.Random(78)
    converted = total = 0
    for _ in range(3000):
        mode = rng.choice([b"c", b"g"])
        raw = rand_classification_response(rng) if mode == b"c" else rand_regression_response(rng)
        converted += check_response(codec, mode, raw)
        total += 1
    print(f"\nrandom classify/regress responses: {total - converted} of {total} declined "
          f"({100 * (total - converted) / total:.1f}%)")
    assert converted > total // 2
