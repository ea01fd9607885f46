"""The data plane's native REST JSON codec for Classify and Regress
(services/common/native/dataplane/rest_json.cc) against the Python codec it
stands in for (services/gateway/tfs_json/classify.py).

The rule, as for Predict (test_native_tfs_json.py, whose driver process and
random JSON pieces these tests share): where the C++ codec answers, Python
succeeds and its answer is the same (the same
ClassificationRequest or RegressionRequest, presence of every submessage
included). The C++ codec may decline anything,
but not the ordinary requests (MUST_CONVERT below). The cases:
every body of test_tfs_json_classify.py, and a few thousand
seeded random ones, hostile ones among them.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from cloudml.tfs.tensorflow_serving.apis import classification_pb2, regression_pb2
from services.gateway import tfs_json as tj
from services.gateway.tfs_json import classify as tj_classify

from tests.unit import test_tfs_json_classify
from tests.unit.test_native_tfs_json import (  # noqa: F401 - codec: the shared driver fixture
    BAD_TOKENS, FLOAT_LITERALS, INT_EDGES, NAMES, Codec, Obj, Raw, _run_module_tests, codec, dump, key, mangle,
    rand_b64, rand_string)

# Per request mode: the request message and the Python conversion.
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
