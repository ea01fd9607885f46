"""The data plane's native REST JSON codec (services/common/native/dataplane/rest_json.cc)
against the Python codec it stands in for (services/gateway/tfs_json/).

The rule, case by case: where the C++ codec answers, Python succeeds and its
answer is the same (a request: the same PredictRequest; a response: the same
bytes). The C++ codec may decline anything, and Python then answers; but the
ordinary requests and responses (MUST_CONVERT below) must not be declined.
The cases: every body and response of test_tfs_json_predict_request.py and
test_tfs_json_predict_response.py (recorded by running those tests), and a
few thousand seeded random ones, mutated bodies among them.

The C++ side runs as build/native/cloudml-tfs-json (scripts/build_native.sh
builds it), one process per module; its record format is described at the
top of services/common/native/tfs_json_check/main.cc.
"""
from __future__ import annotations

import base64
import inspect
import itertools
import json
import math
import os
import random
import struct
import subprocess
from collections.abc import Mapping

import numpy as np
import pytest

from cloudml.tfs.tensorflow.core.framework import tensor_pb2, types_pb2
from cloudml.tfs.tensorflow.core.protobuf import meta_graph_pb2
from cloudml.tfs.tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2
from services.gateway import tfs_json as tj
from services.gateway.tfs_json import predict_request as tj_predict_request

from tests.unit import test_tfs_json_predict_request, test_tfs_json_predict_response
from tests.unit.tfs_json_helpers import response, tensor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.path.join(ROOT, "build", "native", "cloudml-tfs-json")
DT = types_pb2.DataType
REQUEST_DTYPES = ["DT_FLOAT", "DT_DOUBLE", "DT_INT32", "DT_INT64", "DT_INT8", "DT_INT16", "DT_UINT8",
                  "DT_UINT32", "DT_UINT64", "DT_BOOL", "DT_STRING"]
OTHER_DTYPES = ["DT_HALF", "DT_BFLOAT16", "DT_COMPLEX64", "DT_UINT16", "DT_INVALID", "DT_RESOURCE"]


def blob(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


class Codec:
    """The driver process: one record in, one answer out."""

    def __init__(self):
        self.process = subprocess.Popen([BINARY], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.calls = self.declines = 0

    def _call(self, payload: bytes) -> bytes:
        self.process.stdin.write(struct.pack("<I", len(payload)) + payload)
        self.process.stdin.flush()
        head = self.process.stdout.read(4)
        assert len(head) == 4, f"the driver died (status {self.process.poll()})"
        answer = self.process.stdout.read(struct.unpack("<I", head)[0])
        self.calls += 1
        self.declines += answer[:1] == b"D"
        return answer

    def request(self, body: bytes, signatures: dict[str, dict[str, int]], model: str, version: int):
        """None (declined) or (row_format, serialized PredictRequest)."""
        parts = [b"Q", blob(body), struct.pack("<q", version), blob(model.encode()),
                 struct.pack("<I", len(signatures))]
        for name, inputs in signatures.items():
            parts += [blob(name.encode()), struct.pack("<I", len(inputs))]
            for input_name in sorted(inputs):
                parts += [blob(input_name.encode()), struct.pack("<i", inputs[input_name])]
        answer = self._call(b"".join(parts))
        if answer[:1] == b"D":
            return None
        assert answer[:1] == b"R", answer[:20]
        return answer[1] == 1, answer[2:]

    def response(self, response: bytes, row: bool):
        """None (declined) or the JSON."""
        return self._json(self._call(b"S" + bytes([row]) + response))

    def examples_request(self, mode: bytes, body: bytes, model: str, version: int):
        """mode b"C" (classify) or b"G" (regress): None (declined) or the serialized request."""
        answer = self._call(mode + blob(body) + struct.pack("<q", version) + blob(model.encode()))
        if answer[:1] == b"D":
            return None
        assert answer[:1] == b"R", answer[:20]
        return answer[1:]

    def examples_response(self, mode: bytes, response: bytes):
        """mode b"c" (a ClassificationResponse) or b"g" (a RegressionResponse): None (declined) or the JSON."""
        return self._json(self._call(mode + response))

    @staticmethod
    def _json(answer: bytes):
        if answer[:1] == b"D":
            return None
        assert answer[:1] == b"J", answer[:20]
        return answer[1:]

    def close(self):
        self.process.stdin.close()
        assert self.process.wait(timeout=10) == 0


@pytest.fixture(scope="module")
def codec():
    # Idempotent: a no-op when the binaries match the sources.
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "build_native.sh")], check=True, cwd=ROOT)
    assert os.access(BINARY, os.X_OK), f"scripts/build_native.sh did not build {BINARY}"
    c = Codec()
    yield c
    c.close()


# ---------------------------------------------------------------------------
# The two codecs, side by side
# ---------------------------------------------------------------------------

def signature_defs(signatures: dict[str, dict[str, int]]) -> dict[str, meta_graph_pb2.SignatureDef]:
    out = {}
    for name, inputs in signatures.items():
        s = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
        for input_name, dtype in inputs.items():
            s.inputs[input_name].dtype = dtype
        out[name] = s
    return out


def python_request(body: bytes, signatures, model: str, version: int):
    """services/gateway/rest.py RestServer._predict's conversion; the exception where it fails."""
    try:
        doc, signame = tj.load_request_json(body)
        parsed = tj.parse_predict_request(doc, signature_defs(signatures), model_name=model, version=version)
        parsed.request.model_spec.signature_name = signame
        return parsed
    except Exception as e:  # noqa: BLE001 - any failure means the C++ side must decline
        return e


def check_request(codec: Codec, body, signatures, model="model", version=3) -> bool:
    """True if the C++ codec converted `body` (and then exactly as Python)."""
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    got = codec.request(body, signatures, model, version)
    if got is None:
        return False
    want = python_request(body, signatures, model, version)
    assert not isinstance(want, Exception), f"C++ converted what Python refuses ({want!r}): {body[:300]!r}"
    row, raw = got
    request = predict_pb2.PredictRequest.FromString(raw)
    assert row == want.row_format, body[:300]
    assert request == want.request, f"{body[:300]!r}\nC++: {request}\nPython: {want.request}"
    assert request.SerializeToString(deterministic=True) == want.request.SerializeToString(deterministic=True)
    return True


def check_response(codec: Codec, response, row: bool) -> bool:
    raw = response if isinstance(response, bytes) else response.SerializeToString()
    got = codec.response(raw, row)
    if got is None:
        return False
    try:
        with np.errstate(all="ignore"):
            want = tj.predict_response_to_json(predict_pb2.PredictResponse.FromString(raw), row)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"C++ converted what Python refuses ({e!r}): {raw[:300]!r}")
    assert got == want, f"{raw[:300]!r} row={row}\nC++:    {got[:600]!r}\nPython: {want[:600]!r}"
    return True


# ---------------------------------------------------------------------------
# The Python codec's own test cases
# ---------------------------------------------------------------------------

def _as_signature_map(source, body) -> dict[str, dict[str, int]] | None:
    if isinstance(source, get_model_metadata_pb2.GetModelMetadataResponse):
        source = tj.signature_map_from_metadata(source)
    elif isinstance(source, get_model_metadata_pb2.SignatureDefMap):
        source = source.signature_def
    if isinstance(source, meta_graph_pb2.SignatureDef) or callable(source):
        try:
            _, name = tj.load_request_json(body)
        except tj.JsonError:
            name = "serving_default"
        source = {name: source if isinstance(source, meta_graph_pb2.SignatureDef) else source(name)}
        if source[name] is None:
            return {}
    if not isinstance(source, Mapping) and not hasattr(source, "keys"):
        return None
    return {name: {k: v.dtype for k, v in sig.inputs.items()} for name, sig in source.items()}


def _run_module_tests(module, monkeypatch, name: str, record, targets=(tj, tj_predict_request)) -> None:
    """Runs every test of `module` with the `name` function of the `targets` modules wrapped by
    record(original); a test taking arguments once per value of its one-name parametrize marks
    (tests taking fixtures are left out)."""
    for target in targets:
        if hasattr(target, name):
            monkeypatch.setattr(target, name, record(getattr(target, name)))
    for test_name, test in inspect.getmembers(module, inspect.isfunction):
        if not test_name.startswith("test_"):
            continue
        marks = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]
        if {m.args[0] for m in marks} != set(inspect.signature(test).parameters):
            continue
        for values in itertools.product(*(m.args[1] for m in marks)):
            test(**{m.args[0]: v for m, v in zip(marks, values)})
    monkeypatch.undo()


def test_request_bodies_of_the_python_codec_tests(codec, monkeypatch):
    seen = []

    def record(original):
        def wrapped(body, signature, **kwargs):
            if isinstance(body, (bytes, str)):
                seen.append((body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body, signature))
            return original(body, signature, **kwargs)
        return wrapped

    _run_module_tests(test_tfs_json_predict_request, monkeypatch, "parse_predict_request", record)
    assert len(seen) > 80
    declined = []
    for body, source in seen:
        signatures = _as_signature_map(source, body)
        if signatures is None or check_request(codec, body, signatures):
            continue
        # Declining is right where Python fails, and taken on NaN/Infinity
        # tokens and on dtypes the fast path leaves to Python.
        dtypes = {DT.Name(d) for inputs in signatures.values() for d in inputs.values()}
        if (isinstance(python_request(body, signatures, "model", 3), Exception) or b"NaN" in body
                or b"Inf" in body or not dtypes <= set(REQUEST_DTYPES)):
            continue
        declined.append(body)
    assert not declined


def test_responses_of_the_python_codec_tests(codec, monkeypatch):
    seen = []

    def record(original):
        def wrapped(response, row_format):
            seen.append((response.SerializeToString(), row_format))
            return original(response, row_format)
        return wrapped

    _run_module_tests(test_tfs_json_predict_response, monkeypatch, "predict_response_to_json", record)
    assert len(seen) > 30
    converted = sum(check_response(codec, raw, row) for raw, row in seen)
    assert converted > 20


# ---------------------------------------------------------------------------
# The ordinary cases: the fast path must take them
# ---------------------------------------------------------------------------

def dt(name: str) -> int:
    return DT.Value(name)


MUST_CONVERT_REQUESTS = [
    (b'{"instances": [1.5, 2, -3.25e-2]}', {"x": "DT_FLOAT"}),
    (b'{"instances": [[1.0, 2.0], [3.0, 4.0]]}', {"x": "DT_DOUBLE"}),
    (b'{"inputs": [[1, 2], [3, 4]]}', {"x": "DT_INT32"}),
    (b'{"inputs": {"x": 5}}', {"x": "DT_INT64"}),
    (b'{"inputs": 7}', {"x": "DT_INT8"}),
    (b'{"instances": [{"a": [1, 2], "b": "hi"}, {"a": [3, 4], "b": "yo"}]}', {"a": "DT_INT16", "b": "DT_STRING"}),
    (b'{"instances": [{"a": 1}, {"a": 2}]}', {"a": "DT_UINT8"}),
    (b'{"inputs": {"a": [4294967295], "b": [18446744073709551615], "c": [true, false]}, "extra": [1, {}]}',
     {"a": "DT_UINT32", "b": "DT_UINT64", "c": "DT_BOOL"}),
    (b'{"signature_name": "other", "instances": [[[[1]]], [[[2]]]]}', {"x": "DT_FLOAT"}),
    (b'{"instances": [{"b64": "aGVsbG8="}, "w\\u00f6rld \\ud83d\\ude00 \\"q\\" \\\\ \\n\\t\\/", "\xc3\xa9\xe2\x98\x83"]}',
     {"s": "DT_STRING"}),
    (b'{"inputs": {"s": [[{"b64": "AAEC"}, {"b64": ""}], [{"b64": "/w"}, {"b64": "+/+/"}]]}}', {"s": "DT_STRING"}),
    (b'{"instances": [[], []]}', {"x": "DT_FLOAT"}),
    (b'{"inputs": []}', {"x": "DT_INT32"}),
    (b'{"inputs": {"x": [[[]]]}}', {"x": "DT_STRING"}),
    (b' \n{ "instances" : [ 16777215 , -16777215 , 3.4e38 , -0 , -0.0 , 1e-45 ] }\r\n\t', {"x": "DT_FLOAT"}),
    (b'{"instances": [9007199254740991, -9007199254740991, 1e308, 0.1000000000000000055511151231257827]}',
     {"x": "DT_DOUBLE"}),
    (b'{"instances": [-128, 127, 300, -2147483648, 2147483647]}', {"x": "DT_INT8"}),
    (b'{"instances": [-9223372036854775808, 9223372036854775807]}', {"x": "DT_INT64"}),
    (b'{"instances": [100000000000000000000000000000]}', {"x": "DT_DOUBLE"}),
    (b'{"\\u0069nputs": {"x\\u00e9": [1.25]}}', {"x\u00e9": "DT_FLOAT"}),
    (b'{"instances": ["a\xff\xfeb", "\\u0000"]}', {"s": "DT_STRING"}),
]


def _sigs(inputs: dict[str, str], body: bytes) -> dict[str, dict[str, int]]:
    name = "other" if b'"other"' in body else "serving_default"
    return {name: {k: dt(v) for k, v in inputs.items()}, "unused": {"z": dt("DT_FLOAT")}}


def test_ordinary_requests_are_converted(codec):
    declined = [body for body, inputs in MUST_CONVERT_REQUESTS if not check_request(codec, body, _sigs(inputs, body))]
    assert not declined


def _response(**tensors) -> predict_pb2.PredictResponse:
    """A response as the model server sends it: outputs and the model_spec it served."""
    r = response(**tensors)
    r.model_spec.name = "m"
    r.model_spec.version.value = 4
    r.model_spec.signature_name = "serving_default"
    return r


MUST_CONVERT_RESPONSES = [
    _response(y=tensor("DT_FLOAT", [3], content=np.array([2.5, 3.0, 4.5], np.float32).tobytes())),
    _response(y=tensor("DT_FLOAT", [2, 3], content=np.random.default_rng(5).standard_normal(6).astype(
        np.float32).tobytes())),
    _response(y=tensor("DT_DOUBLE", [2, 1], "double_val", [0.1, 12345.5])),
    _response(scores=tensor("DT_FLOAT", [2, 2], "float_val", [0.25, 0.75, 0.5, 0.5]),
              classes=tensor("DT_INT64", [2], "int64_val", [1, 0]),
              names=tensor("DT_STRING", [2], "string_val", [b"cat", b"d\"o\\g\x01"]),
              image_bytes=tensor("DT_STRING", [2, 1], "string_val", [b"\x00\xff", b""])),
    _response(b=tensor("DT_BOOL", [3], "bool_val", [True, False, True]),
              i=tensor("DT_INT32", [3], "int_val", [1, -2, 3]),
              u=tensor("DT_UINT8", [3], content=bytes([0, 128, 255]))),
    _response(e=tensor("DT_FLOAT", [0, 3])),
    _response(h=tensor("DT_HALF", [2], "half_val", [0x3E00, 0xBC00])),
]


def test_ordinary_responses_are_converted(codec):
    for i, r in enumerate(MUST_CONVERT_RESPONSES):
        for row in (True, False):
            assert check_response(codec, r, row), f"response {i} (row={row}) declined"
    # A scalar has no batch: columnar only.
    assert check_response(codec, _response(s=tensor("DT_DOUBLE", [], "double_val", [7])), False)


# ---------------------------------------------------------------------------
# Seeded random requests
# ---------------------------------------------------------------------------

class Raw:
    """A JSON token written as it is."""

    def __init__(self, text: bytes):
        self.text = text


class Obj:
    """A JSON object as (key, value) pairs: duplicate keys possible."""

    def __init__(self, pairs):
        self.pairs = list(pairs)


INT_LIMITS = [-(1 << 7), (1 << 7) - 1, (1 << 8) - 1, -(1 << 15), (1 << 15) - 1, -(1 << 31), (1 << 31) - 1,
              (1 << 32) - 1, -(1 << 63), (1 << 63) - 1, (1 << 64) - 1, (1 << 24) - 1, 1 << 24, (1 << 53) - 1,
              1 << 53, 10 ** 30, -(10 ** 30), 10 ** 400, 0]
INT_EDGES = sorted({v + d for v in INT_LIMITS for d in (-1, 0, 1)})
FLOAT_LITERALS = [b"1e-45", b"3.4028235e38", b"3.4028234663852886e38", b"-3.4028234663852886e38", b"3.4e38",
                  b"1.7976931348623157e308", b"1e400", b"-1e400", b"1e-400", b"4.9e-324", b"2.2250738585072014e-308",
                  b"-0.0", b"0.0", b"0e0", b"1E5", b"1e+5", b"-2.5E-3", b"0.1000000000000000055511151231257827",
                  b"16777217.0", b"16777216.5", b"9007199254740993.0", b"123456789.123456789e-3", b"0.30000000000000004",
                  b"1.00000000000000000000000000000000000001"]
BAD_TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"Inf", b"-Inf", b"01", b"1.", b".5", b"+1", b"-", b"1e", b"0x10",
              b"tru", b"nul", b"'a'", b"[1,]", b"{}", b"{\"b64\": 1}", b"[]"]
STRING_PIECES = ["a", "xyz", "\u00e9", "\u2603", "\U0001F600", "\"", "\\", "/", "\b", "\f", "\n", "\r", "\t",
                 "\x00", "\x01", "\x1f", "\x7f", "b64", " "]


def rand_string(rng: random.Random, noise: float) -> bytes:
    """A JSON string literal, with escapes, raw UTF-8 and now and then raw invalid bytes."""
    out = bytearray(b'"')
    for _ in range(rng.randint(0, 6)):
        r = rng.random()
        if r < 0.08:
            out += rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"])
            continue
        if r < 0.08 + noise:
            out += rng.choice([b"\\ud800", b"\\udc00", b"\\ud83d\\u0041", b"\\ud83d\\ude00", b"\\uDBFF\\uDFFF",
                               b"\\x41", b"\\u12", b"\x01", b"\x1f"])
            continue
        s = rng.choice(STRING_PIECES)
        for ch in s:
            cp = ord(ch)
            if ch in "\"\\":
                out += b"\\" + ch.encode()
            elif cp < 0x20:
                out += rng.choice([json.dumps(ch).encode()[1:-1], b"\\u%04x" % cp, b"\\u%04X" % cp])
            elif rng.random() < 0.2:
                esc = json.dumps(ch, ensure_ascii=True).encode()[1:-1]
                out += esc if esc.startswith(b"\\") else b"\\u%04x" % cp
            else:
                out += ch.encode()
    return bytes(out) + b'"'


def rand_b64(rng: random.Random, noise: float = 0.05):
    raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 7)))
    text = base64.b64encode(raw)
    r = rng.random()
    if r < 0.2:
        text = text.rstrip(b"=")
    elif r < 0.3:
        text = text + b"="
    elif r < 0.3 + 2 * noise:
        text = rng.choice([b"!!!", b"a", b"ab=c", b"QR==", b"QUJD\\u0045", b"====", b"\xc3\xa9"])
    pairs = [(b'"b64"', Raw(b'"' + text + b'"'))]
    if rng.random() < noise:
        pairs.append((b'"x"', 1))
    return Obj(pairs)


def rand_leaf(rng: random.Random, dtype: str, noise: float):
    if rng.random() < noise:  # another type altogether
        return rng.choice([None, True, False, 1, 2.5, Raw(b'"s"'), rand_b64(rng), Obj([]), Raw(rng.choice(BAD_TOKENS))])
    if dtype == "DT_STRING":
        return rand_b64(rng, noise) if rng.random() < 0.3 else Raw(rand_string(rng, noise))
    if dtype == "DT_BOOL":
        return rng.random() < 0.5
    if dtype in ("DT_FLOAT", "DT_DOUBLE", "DT_HALF", "DT_BFLOAT16"):
        r = rng.random()
        if r < 0.1 + noise:
            return Raw(rng.choice(FLOAT_LITERALS))
        if r < 0.15 + 2 * noise:
            return rng.choice(INT_EDGES)
        if r < 0.6:
            return rng.randint(-1000, 1000)
        if r < 0.8:
            return float(np.float32(rng.gauss(0, 10 ** rng.randint(-5, 5))))
        return rng.gauss(0, 1) * 10.0 ** rng.randint(-300, 300)
    r = rng.random()
    if r < 0.05 + 4 * noise:
        return rng.choice(INT_EDGES)
    if r < 0.1:
        return Raw(b"-0")
    return rng.randint(-200, 200)


def rand_value(rng: random.Random, dtype: str, shape, noise: float):
    if not shape:
        return rand_leaf(rng, dtype, noise)
    return [rand_value(rng, dtype, shape[1:], noise) for _ in range(shape[0])]


def rand_shape(rng: random.Random, max_rank=4):
    shape = []
    for _ in range(rng.randint(0, max_rank)):
        shape.append(rng.choice([0, 1, 1, 2, 2, 3, 4]) if rng.random() < 0.2 else rng.randint(1, 3))
        if math.prod(shape) > 24:
            break
    return shape


def ragged(rng: random.Random, v):
    """The value with one list somewhere made one element shorter or longer, or a leaf made a list."""
    if isinstance(v, list) and v and rng.random() < 0.6:
        i = rng.randrange(len(v))
        v = list(v)
        v[i] = ragged(rng, v[i])
        return v
    if isinstance(v, list):
        return v[:-1] if v and rng.random() < 0.5 else v + [v[0] if v else 1]
    return [v]


def dump(v, rng: random.Random) -> bytes:
    """JSON text, with random whitespace; floats in several spellings."""
    ws = (lambda: rng.choice([b"", b"", b" ", b"\n  ", b"\t", b"\r\n"])) if rng.random() < 0.3 else (lambda: b"")
    if isinstance(v, Raw):
        return v.text
    if v is None:
        return b"null"
    if v is True:
        return b"true"
    if v is False:
        return b"false"
    if isinstance(v, int):
        return str(v).encode()
    if isinstance(v, float):
        if not math.isfinite(v):
            return b"1e999" if v > 0 else b"-1e999"
        return rng.choice([repr(v), "%.17g" % v if "." in "%.17g" % v or "e" in "%.17g" % v else repr(v),
                           "%.9e" % v]).encode()
    if isinstance(v, list):
        return b"[" + ws() + (b"," + ws()).join(dump(x, rng) for x in v) + ws() + b"]"
    if isinstance(v, Obj):
        return b"{" + ws() + (b"," + ws()).join(k + ws() + b":" + ws() + dump(x, rng) for k, x in v.pairs) + ws() + b"}"
    raise TypeError(type(v))


def key(name: str) -> bytes:
    return json.dumps(name, ensure_ascii=False).encode()


NAMES = ["x", "y", "images", "in_2", "\u00e9t\u00e9", "a\"b", "b64"]


def rand_request(rng: random.Random):
    n_inputs = rng.choice([1, 1, 1, 2, 2, 3])
    names = sorted(rng.sample(NAMES, n_inputs))
    pool = REQUEST_DTYPES * 6 + OTHER_DTYPES
    dtypes = {n: rng.choice(pool) for n in names}
    shapes = {n: rand_shape(rng, 3) for n in names}
    noise = rng.choice([0, 0, 0, 0.01, 0.05])  # the chance of a wrong or edge value, per value
    row = rng.random() < 0.55
    named = n_inputs > 1 or rng.random() < 0.5
    if rng.random() < 0.03:
        named = not named
    if row:
        batch = rng.randint(1, 3) if rng.random() < 0.95 else 0
        instances = []
        for _ in range(batch):
            if named:
                pairs = [(key(n), rand_value(rng, dtypes[n], shapes[n], noise)) for n in names]
                rng.shuffle(pairs)
                instances.append(Obj(pairs))
            else:
                instances.append(rand_value(rng, dtypes[names[0]], shapes[names[0]], noise))
        payload = instances
        top = b'"instances"'
    else:
        if named:
            payload = Obj([(key(n), rand_value(rng, dtypes[n], shapes[n], noise)) for n in names])
        else:
            payload = rand_value(rng, dtypes[names[0]], [rng.randint(0, 3)] + shapes[names[0]], noise)
        top = b'"inputs"'
    r = rng.random()
    if r < 0.05:
        payload = ragged(rng, payload if not isinstance(payload, Obj) else payload.pairs[0][1])
    elif r < 0.08 and isinstance(payload, Obj):
        payload.pairs.append((key(rng.choice(NAMES)), rand_value(rng, "DT_FLOAT", [1], 0)))
    elif r < 0.10 and isinstance(payload, list) and payload and isinstance(payload[-1], Obj) and payload[-1].pairs:
        payload[-1].pairs.pop()
    elif r < 0.12 and isinstance(payload, list) and payload and isinstance(payload[0], Obj):
        payload[0].pairs.append(payload[0].pairs[0])  # a duplicate key
    pairs = [(top, payload)]
    signame = "serving_default"
    r = rng.random()
    if r < 0.15:
        signame = rng.choice(["serving_default", "other", "", "missing", "\u00e9"])
        pairs.append((b'"signature_name"', Raw(key(signame))))
    elif r < 0.17:
        pairs.append((b'"signature_name"', 5))
    if rng.random() < 0.05:
        pairs.append((rng.choice([b'"inputs"', b'"instances"', b'"extra"']), [1]))
    if rng.random() < 0.03:
        pairs.append((top, payload))
    rng.shuffle(pairs)
    body = mangle(rng, dump(Obj(pairs), rng))
    signatures = {"serving_default": {n: dt(d) for n, d in dtypes.items()},
                  "other": {n: dt(d) for n, d in dtypes.items()}}
    if rng.random() < 0.02:
        signatures["serving_default"] = {}
    return body, signatures


def mangle(rng: random.Random, body: bytes) -> bytes:
    """Now and then the body with random bytes changed, cut short, or another body altogether."""
    r = rng.random()
    if r < 0.08:  # byte mutations
        b = bytearray(body)
        for _ in range(rng.randint(1, 3)):
            op = rng.random()
            i = rng.randrange(len(b) + 1)
            if op < 0.4 and i < len(b):
                b[i] = rng.randrange(256)
            elif op < 0.7 and i < len(b):
                del b[i]
            else:
                b[i:i] = bytes([rng.choice(b' ,:[]{}"\\0123456789-.eE\x00\xff')])
        body = bytes(b)
    elif r < 0.10:
        body = body[:rng.randrange(len(body) + 1)]
    elif r < 0.11:
        body = rng.choice([b"", b"   ", b"[1, 2]", b"\xef\xbb\xbf" + body, b"not json", body + b" x", b"null"])
    return body


def test_random_requests(codec):
    rng = random.Random(20240611)
    converted = total = 0
    for _ in range(3000):
        body, signatures = rand_request(rng)
        converted += check_request(codec, body, signatures, model=rng.choice(["m", "", "\u00e9"]),
                                   version=rng.choice([1, 0, 7, 1 << 40]))
        total += 1
    print(f"\nrandom requests: {total - converted} of {total} declined ({100 * (total - converted) / total:.1f}%)")
    assert converted > total // 3


def test_deep_nesting_is_declined(codec):
    sigs = {"serving_default": {"x": dt("DT_FLOAT")}}
    deep = b'{"inputs": ' + b"[" * 70 + b"1" + b"]" * 70 + b"}"
    assert codec.request(deep, sigs, "m", 1) is None
    ok = b'{"inputs": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}"
    assert check_request(codec, ok, sigs)


def test_integers_python_cannot_read_are_declined(codec):
    # json.loads raises ValueError past 4300 digits, even in a member the request ignores.
    sigs = {"serving_default": {"x": dt("DT_FLOAT")}}
    body = b'{"inputs": [1.5], "extra": ' + b"7" * 4301 + b"}"
    assert type(python_request(body, sigs, "m", 1)) is ValueError
    assert codec.request(body, sigs, "m", 1) is None
    assert check_request(codec, b'{"inputs": [1.5], "extra": ' + b"7" * 300 + b"}", sigs)


# ---------------------------------------------------------------------------
# Seeded random responses
# ---------------------------------------------------------------------------

RESPONSE_DTYPES = REQUEST_DTYPES + ["DT_HALF", "DT_BFLOAT16", "DT_UINT16", "DT_COMPLEX64", "DT_COMPLEX128",
                                    "DT_INVALID", "DT_RESOURCE", "DT_VARIANT"]
TYPED_FIELD = {"DT_FLOAT": "float_val", "DT_DOUBLE": "double_val", "DT_INT32": "int_val", "DT_UINT8": "int_val",
               "DT_INT16": "int_val", "DT_INT8": "int_val", "DT_UINT16": "int_val", "DT_INT64": "int64_val",
               "DT_BOOL": "bool_val", "DT_UINT32": "uint32_val", "DT_UINT64": "uint64_val", "DT_HALF": "half_val",
               "DT_BFLOAT16": "half_val", "DT_COMPLEX64": "scomplex_val", "DT_COMPLEX128": "dcomplex_val",
               "DT_STRING": "string_val"}
WIDTH = {"DT_FLOAT": 4, "DT_DOUBLE": 8, "DT_INT32": 4, "DT_UINT8": 1, "DT_INT16": 2, "DT_INT8": 1, "DT_UINT16": 2,
         "DT_INT64": 8, "DT_BOOL": 1, "DT_UINT32": 4, "DT_UINT64": 8, "DT_HALF": 2, "DT_BFLOAT16": 2,
         "DT_COMPLEX64": 8, "DT_COMPLEX128": 16}


def rand_reals(rng: random.Random, n: int, single: bool) -> list[float]:
    with np.errstate(all="ignore"):
        return _rand_reals(rng, n, single)


def _rand_reals(rng: random.Random, n: int, single: bool) -> list[float]:
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.1:
            v = rng.choice([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, 0.5, 1e6, 999999.5, 9999995.0])
        elif r < 0.3:  # bit patterns
            bits = rng.getrandbits(32 if single else 64)
            v = float(np.frombuffer(struct.pack("<I" if single else "<Q", bits), np.float32 if single else np.float64)[0])
        elif r < 0.6:  # six digits, and a neighbour (round-trip boundaries)
            v = float("%.6g" % (rng.uniform(1, 10) * 10.0 ** rng.randint(-40 if single else -310, 38 if single else 305)))
            if single:
                v = float(np.float32(v))
                if rng.random() < 0.5:
                    v = float(np.nextafter(np.float32(v), np.float32(rng.choice([-np.inf, np.inf]))))
            elif rng.random() < 0.5:
                v = float(np.nextafter(v, rng.choice([-math.inf, math.inf])))
        elif r < 0.7:
            v = float(rng.randint(-10 ** 7, 10 ** 7)) * 10.0 ** rng.randint(-3, 3)
        else:
            v = rng.gauss(0, 10 ** rng.randint(-8, 8))
        out.append(float(np.float32(v)) if single else v)
    return out


def rand_ints(rng: random.Random, dtype: str, n: int) -> list[int]:
    lo, hi = {"DT_INT8": (-128, 127), "DT_UINT8": (0, 255), "DT_INT16": (-32768, 32767), "DT_UINT16": (0, 65535),
              "DT_INT32": (-(1 << 31), (1 << 31) - 1), "DT_INT64": (-(1 << 63), (1 << 63) - 1),
              "DT_UINT32": (0, (1 << 32) - 1), "DT_UINT64": (0, (1 << 64) - 1), "DT_HALF": (0, 65535),
              "DT_BFLOAT16": (0, 65535)}[dtype]
    wide = {"int_val": (-(1 << 31), (1 << 31) - 1), "half_val": (-(1 << 31), (1 << 31) - 1)}.get(TYPED_FIELD[dtype])
    if wide == (lo, hi):
        wide = None
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            out.append(rng.choice([lo, hi, 0]))
        elif r < 0.36 and wide:
            out.append(rng.choice([max(lo - 1, wide[0]), min(hi + 1, wide[1]), wide[0], wide[1]]))
        else:
            out.append(rng.randint(lo, hi))
    return out


def rand_output(rng: random.Random, name: str, shape) -> tensor_pb2.TensorProto:
    dtype = rng.choice(RESPONSE_DTYPES * 2 + ["DT_FLOAT"] * 4 + ["DT_STRING"] * 2)
    t = tensor_pb2.TensorProto(dtype=dt(dtype))
    if rng.random() < 0.03:
        shape = list(shape) + [-1]
    for d in shape:
        t.tensor_shape.dim.add().size = d
    n = math.prod(shape) if shape else 1
    n = max(n, 0)
    if dtype not in TYPED_FIELD:
        if rng.random() < 0.5:
            t.int_val.extend([1] * n)
        return t
    count = rng.choice([n, n, n, 0, 1, max(n - 1, 0), n + 1])
    if dtype != "DT_STRING" and rng.random() < 0.4:
        size = n * WIDTH[dtype]
        if rng.random() < 0.05:
            size += rng.choice([-1, 1])
        if dtype in ("DT_FLOAT", "DT_DOUBLE") and rng.random() < 0.5:
            reals = rand_reals(rng, n, dtype == "DT_FLOAT")
            content = np.array(reals, np.float32 if dtype == "DT_FLOAT" else np.float64).tobytes()[:max(size, 0)]
        else:
            content = bytes(rng.randrange(256) for _ in range(max(size, 0)))
        t.tensor_content = content
        return t
    field = TYPED_FIELD[dtype]
    if dtype == "DT_STRING":
        vals = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 5))) for _ in range(count)]
        if vals and rng.random() < 0.2:
            vals[0] = bytes(range(256))
        t.string_val.extend(vals)
    elif dtype in ("DT_FLOAT", "DT_DOUBLE", "DT_COMPLEX64", "DT_COMPLEX128"):
        getattr(t, field).extend(rand_reals(rng, count, dtype in ("DT_FLOAT", "DT_COMPLEX64")))
    elif dtype == "DT_BOOL":
        t.bool_val.extend(rng.random() < 0.5 for _ in range(count))
    else:
        getattr(t, field).extend(rand_ints(rng, dtype, count))
    return t


OUTPUT_NAMES = ["y", "scores", "classes", "out_bytes", "\u00e9\"\\n", "a\x01b", "z_bytes", "probabilities"]


def rand_response(rng: random.Random) -> bytes:
    r = predict_pb2.PredictResponse()
    if rng.random() < 0.7:
        r.model_spec.name = "m"
        r.model_spec.version.value = rng.randint(0, 10)
        r.model_spec.signature_name = "serving_default"
    n_outputs = rng.choice([0, 1, 1, 1, 2, 2, 3]) if rng.random() < 0.98 else 0
    batch = rng.choice([0, 1, 2, 3])
    for name in rng.sample(OUTPUT_NAMES, n_outputs):
        shape = rand_shape(rng, 3)
        if rng.random() < 0.8:
            shape = [batch] + shape[:2]
        r.outputs[name].CopyFrom(rand_output(rng, name, shape))
    return mutate(rng, r.SerializeToString())


def mutate(rng: random.Random, raw: bytes) -> bytes:
    """Now and then the serialized message with a byte or two changed or dropped."""
    if raw and rng.random() < 0.08:
        b = bytearray(raw)
        for _ in range(rng.randint(1, 2)):
            i = rng.randrange(len(b))
            if rng.random() < 0.5:
                b[i] = rng.randrange(256)
            else:
                del b[i]
        raw = bytes(b)
    return raw


def test_random_responses(codec):
    rng = random.Random(77)
    converted = total = 0
    for _ in range(2500):
        raw = rand_response(rng)
        row = rng.random() < 0.5
        converted += check_response(codec, raw, row)
        total += 1
    print(f"\nrandom responses: {total - converted} of {total} declined ({100 * (total - converted) / total:.1f}%)")
    assert converted > total // 4


def test_float_tokens_at_scale(codec):
    """Many float32 and float64 values in few responses: every token checked against Python's.
    Values far from 1 with six digits may decline (numpy's pow and log10 are not libm's); a
    model's ordinary float32 outputs must not."""
    rng = random.Random(3)
    for single in (True, False):
        dtype, npdt = ("DT_FLOAT", np.float32) if single else ("DT_DOUBLE", np.float64)
        for _ in range(4):
            content = np.array(rand_reals(rng, 2000, single), npdt).tobytes()
            check_response(codec, _response(y=tensor(dtype, [2000], content=content)), False)
    np_rng = np.random.default_rng(3)
    ordinary = np.concatenate([np_rng.standard_normal(3000), np.round(np_rng.uniform(-1e4, 1e4, 1000), 2),
                               np_rng.uniform(0, 1, 1000)]).astype(np.float32)
    assert check_response(codec, _response(y=tensor("DT_FLOAT", [5000], content=ordinary.tobytes())), False)


def test_cases_the_random_sweeps_found(codec):
    # Six digits exactly halfway between two float32s: the estimate's last bit picks the side.
    halfway = np.array([5.04256e10, 6.6016e10, -5.04256e10], np.float32)
    for row in (True, False):
        check_response(codec, _response(y=tensor("DT_FLOAT", [3], content=halfway.tobytes())), row)
    # A map entry holding an unknown field: protobuf drops the entry.
    for raw in (b'\n\x11b\x07classes\x12\x06\x08\x08\x12\x02\x12\x00',
                b'\n\x17\n\x01y\xfd\x12\x08\x01\x12\x04\x12\x02\x08\x02*\x08V\xfa\xb4\x1b\xf8#tI'):
        assert codec.response(raw, False) is None
