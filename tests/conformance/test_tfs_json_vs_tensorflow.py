"""The gateway's TF-free REST codec (services/gateway/tfs_json/) agrees with TensorFlow.

Requests: for a set of REST bodies, the codec builds PredictRequests (and
Classification/Regression requests); a subprocess that imports TensorFlow and
the official `tensorflow_serving.apis` parses those bytes with the official
classes and checks each input against `tf.make_tensor_proto` of the same
values and dtype (compared after `tf.make_ndarray`: values, dtype, shape;
the byte encodings differ on purpose, tensor_content vs typed fields), and
each tf.Example through `tf.io.parse_example`.

Responses: the subprocess builds PredictResponses the way TensorFlow encodes
tensors (`tf.make_tensor_proto`, and the typed `*_val` fields TF Serving's
`Tensor::AsProtoField` writes) for many dtypes; the codec turns them into
JSON here, and the values must equal TensorFlow's `make_ndarray` exactly.

The official modules and ours define the same protobuf symbols, so only the
subprocess imports TensorFlow; this process imports only ours. One subprocess
for everything keeps it to TensorFlow's import time.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (case name, {input name: dtype}, REST body)
PREDICT_CASES = [
    ("row_float_scalars", {"x": "float32"}, '{"instances": [1.0, 2.0, 5.0]}'),
    ("row_float_mixed_ints", {"x": "float32"}, '{"instances": [1, 2.0, 3, 4, 5.003, 0.007, 0.0, -16777215]}'),
    ("row_float_nonfinite", {"x": "float32"}, '{"instances": [[NaN, Infinity], [-Infinity, 3.4e38]]}'),
    ("row_float_matrix", {"x": "float32"},
     json.dumps({"instances": np.random.default_rng(0).standard_normal((4, 3, 2)).tolist()})),
    ("row_double", {"x": "float64"}, '{"instances": [0.1, 1e-300, 1.7976931348623157e308, 9007199254740991]}'),
    ("row_int32", {"x": "int32"}, '{"instances": [[1,2],[3,4],[5,6]]}'),
    ("row_int64", {"x": "int64"}, '{"instances": [-9223372036854775808, 9223372036854775807, 0]}'),
    ("row_int8", {"x": "int8"}, '{"instances": [-128, 0, 127]}'),
    ("row_uint8", {"x": "uint8"}, '{"instances": [[0, 255], [7, 8]]}'),
    ("row_int16", {"x": "int16"}, '{"instances": [-32768, 32767]}'),
    ("row_uint32", {"x": "uint32"}, '{"instances": [0, 4294967295]}'),
    ("row_uint64", {"x": "uint64"}, '{"instances": [0, 18446744073709551615]}'),
    ("row_bool", {"x": "bool"}, '{"instances": [[true, false], [false, false]]}'),
    ("row_half", {"x": "float16"}, '{"instances": [1.5, -2.0, 65504, 0.1]}'),
    ("row_bfloat16", {"x": "bfloat16"}, '{"instances": [1.5, -2.0, 3.140625, 0.1]}'),
    ("row_strings", {"x": "string"}, '{"instances": ["foo", "h\\u00e9llo", ""]}'),
    ("row_b64", {"x": "string"}, '{"instances": [{"b64": "aGVsbG8="}, {"b64": "/wD+"}]}'),
    ("row_b64_lists", {"x": "string"}, '{"instances": [[{"b64": "aGVsbG8="}], [{"b64": "d29ybGQ="}]]}'),
    ("row_empty_items", {"x": "float32"}, '{"instances": [[], []]}'),
    ("row_named_objects", {"int_tensor": "int32", "str_tensor": "string", "float_tensor": "float32",
                           "dbl_tensor": "float64"},
     '{"instances": [{"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"], '
     '"float_tensor": [1.0, NaN], "dbl_tensor": [NaN]}, '
     '{"int_tensor": [[7,8],[9,0],[1,2]], "str_tensor": ["baz", "bat"], '
     '"float_tensor": [2.0, Infinity], "dbl_tensor": [2.0]}]}'),
    ("row_named_single_input", {"x": "float32"}, '{"instances": [{"x": 1.5}, {"x": 2.5}]}'),
    ("col_single_unnamed", {"x": "int32"}, '{"inputs": [[[1,2],[3,4],[5,6]]]}'),
    ("col_single_named", {"x": "int32"}, '{"inputs": {"x": [[[1,2],[3,4],[5,6]]]}}'),
    ("col_scalar", {"x": "float32"}, '{"inputs": 3.5}'),
    ("col_b64_scalar", {"x": "string"}, '{"inputs": {"b64": "aGVsbG8="}}'),
    ("col_multi", {"tag": "string", "signal": "int64", "sensor": "float32"},
     '{"inputs": {"tag": ["foo", "bar"], "signal": [[1, 2, 3, 4, 5], [3, 4, 1, 2, 5]], '
     '"sensor": [[[1, 2], [3, 4]], [[4, 5], [6, 8]]]}}'),
    ("col_signature_name", {"x": "float32"}, '{"signature_name": "serving_default", "inputs": [3.0, 4.0]}'),
]

CLASSIFY_CASES = [
    ("no_context", '{"examples": [{"names": ["foo", "bar"], "ratings": [8.0, 9.0], "age": 20}, '
                   '{"names": ["baz", "qux"], "ratings": [6.0, 7.5], "age": -3}]}',
     {"names": ("string", [2]), "ratings": ("float32", [2]), "age": ("int64", [1])}),
    ("with_context", '{"context": {"query": "pizza"}, "examples": [{"x": 80.0, "flags": [1, true, false], '
                     '"img": {"b64": "aGVsbG8="}}, {"x": NaN, "flags": [0, 0, 1], "img": "raw"}]}',
     {"x": ("float32", [1]), "flags": ("int64", [3]), "img": ("string", [1])}),
]

OUTPUT_CASES_CODE = r'''
rng = np.random.default_rng(7)
cases = [
    ("float32", rng.standard_normal((3, 4)).astype(np.float32)),
    ("float32", np.array([0.1, 1 / 3, 1e-45, 3.4028235e38, -0.0, 16777216, 9e6, 3e-5, np.nan, np.inf, -np.inf],
                         np.float32)),
    ("float64", np.array([0.1, 1 / 3, 1e-300, 1e300, -2.5, 1e100, np.nan], np.float64)),
    ("int32", rng.integers(-2**31, 2**31 - 1, (2, 3), dtype=np.int32)),
    ("int64", np.array([-2**63, 2**63 - 1, 0], np.int64)),
    ("int8", np.array([-128, 127], np.int8)),
    ("uint8", np.array([[0, 255]], np.uint8)),
    ("int16", np.array([-32768, 32767], np.int16)),
    ("uint32", np.array([0, 2**32 - 1], np.uint32)),
    ("uint64", np.array([0, 2**64 - 1], np.uint64)),
    ("bool", np.array([[True, False]], np.bool_)),
    ("float16", np.array([1.5, -0.25, 65504, 0.1], np.float16)),
    ("bfloat16", np.array([1.5, 3.140625, -2.0, 0.1], np.float32)),
    ("string", np.array([[b"foo", "h\u00e9".encode()], [b"", b"x"]], dtype=object)),
    ("string_bytes", np.array([b"\x00\xff\xfe", b"png"], dtype=object)),
    ("float32", np.float32(2.5)),
    ("float32", np.zeros((2, 0), np.float32)),
    ("float32", np.array([[7.0]], np.float32)),
]
'''

PROBE = r'''
import base64, json, sys
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, classification_pb2, regression_pb2
from tensorflow.core.framework import tensor_pb2, types_pb2

job = json.load(sys.stdin)
out = {"predict": [], "classify": [], "outputs": []}

def unb64(v):
    if isinstance(v, dict) and set(v) == {"b64"}:
        return base64.b64decode(v["b64"])
    if isinstance(v, list):
        return [unb64(x) for x in v]
    if isinstance(v, str):
        return v.encode()
    return v

def expected_values(doc, names):
    if "instances" in doc:
        inst = doc["instances"]
        if isinstance(inst[0], dict) and set(inst[0]) != {"b64"}:
            return {n: [e[n] for e in inst] for n in names}
        return {names[0]: inst}
    inputs = doc["inputs"]
    if isinstance(inputs, dict) and set(inputs) != {"b64"}:
        return {n: inputs[n] for n in names}
    return {names[0]: inputs}

def same(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == object:
        return a.tolist() == b.tolist()
    if a.dtype.kind == "f" or str(a.dtype) == "bfloat16":
        return np.array_equal(a.astype(np.float64), b.astype(np.float64), equal_nan=True) and \
            np.array_equal(np.signbit(a.astype(np.float64)), np.signbit(b.astype(np.float64)))
    return np.array_equal(a, b)

for case in job["predict"]:
    req = predict_pb2.PredictRequest.FromString(base64.b64decode(case["request"]))
    doc = json.loads(case["body"])
    names = list(case["dtypes"])
    vals = expected_values(doc, names)
    problems = []
    if set(req.inputs) != set(names):
        problems.append(f"inputs {sorted(req.inputs)} != {sorted(names)}")
    for n in names:
        dtype = tf.as_dtype(case["dtypes"][n])
        v = unb64(vals[n])
        if dtype == tf.string:
            ref = tf.make_tensor_proto(np.array(v, dtype=object), dtype=dtype)
        elif dtype == tf.uint64:
            # make_tensor_proto turns a Python list holding 2**64-1 into zeros.
            ref = tf.make_tensor_proto(np.array(v, dtype=np.uint64), dtype=dtype)
        else:
            ref = tf.make_tensor_proto(v, dtype=dtype)
        ours = req.inputs[n]
        a, b = tf.make_ndarray(ours), tf.make_ndarray(ref)
        if ours.dtype != ref.dtype:
            problems.append(f"{n}: dtype {ours.dtype} != {ref.dtype}")
        if list(ours.tensor_shape.dim) != list(ref.tensor_shape.dim):
            problems.append(f"{n}: shape {a.shape} != {b.shape}")
        if not same(a, b):
            problems.append(f"{n}: {a!r} != {b!r}")
    out["predict"].append({"name": case["name"], "problems": problems})

for case in job["classify"]:
    problems = []
    for cls in (classification_pb2.ClassificationRequest, regression_pb2.RegressionRequest):
        req = cls.FromString(base64.b64decode(case["request"][cls.__name__]))
        doc = json.loads(case["body"])
        kind = req.input.WhichOneof("kind")
        examples = getattr(req.input, kind).examples
        spec = {}
        for name, (dt, shape) in case["features"].items():
            spec[name] = tf.io.FixedLenFeature(shape, tf.as_dtype(dt))
        parsed = tf.io.parse_example([e.SerializeToString() for e in examples], spec)
        for name, (dt, shape) in case["features"].items():
            got = parsed[name].numpy()
            want = []
            for ex in doc["examples"]:
                v = ex[name]
                v = v if isinstance(v, list) else [v]
                v = [unb64(x) if not isinstance(x, bool) else int(x) for x in v]
                want.append(v)
            want = np.array(want, dtype=object if dt == "string" else dt)
            if not same(got if dt != "string" else got.astype(object), want):
                problems.append(f"{cls.__name__} {name}: {got!r} != {want!r}")
        if "context" in doc:
            ctx = req.input.example_list_with_context.context
            q = tf.io.parse_single_example(ctx.SerializeToString(),
                                           {"query": tf.io.FixedLenFeature([1], tf.string)})
            if q["query"].numpy().tolist() != [doc["context"]["query"].encode()]:
                problems.append("context")
    out["classify"].append({"name": case["name"], "problems": problems})

OUTPUTS

def typed(a, dtype):
    """A TensorProto with the typed *_val fields, as Tensor::AsProtoField writes it."""
    t = tensor_pb2.TensorProto(dtype=dtype.as_datatype_enum)
    for d in np.shape(a):
        t.tensor_shape.dim.add().size = d
    flat = np.asarray(a).ravel()
    if dtype == tf.string:
        t.string_val.extend(flat.tolist())
    elif dtype in (tf.float16, tf.bfloat16):
        t.half_val.extend(np.asarray(a, dtype=dtype.as_numpy_dtype).ravel().view(np.uint16).tolist())
    else:
        field = {tf.float32: "float_val", tf.float64: "double_val", tf.int32: "int_val",
                 tf.int8: "int_val", tf.uint8: "int_val", tf.int16: "int_val", tf.int64: "int64_val",
                 tf.uint32: "uint32_val", tf.uint64: "uint64_val", tf.bool: "bool_val"}[dtype]
        getattr(t, field).extend(flat.tolist())
    return t

for i, (dt, a) in enumerate(cases):
    name = "out_bytes" if dt == "string_bytes" else f"out{i}"
    dtype = tf.string if dt.startswith("string") else tf.as_dtype(dt)
    for enc, proto in (("make_tensor_proto", tf.make_tensor_proto(a, dtype=dtype)), ("typed", typed(a, dtype))):
        ref = tf.make_ndarray(proto)
        if dtype == tf.string:
            expect = [base64.b64encode(x).decode() for x in ref.ravel().tolist()]
        else:
            expect = ref.astype(np.float64).ravel().tolist() if ref.dtype.kind in "fV" or dt == "bfloat16" \
                else ref.ravel().tolist()
        resp = predict_pb2.PredictResponse()
        resp.outputs[name].CopyFrom(proto)
        out["outputs"].append({"case": f"{dt}#{i}/{enc}", "name": name, "dtype": dt, "shape": list(ref.shape),
                               "response": base64.b64encode(resp.SerializeToString()).decode(),
                               "expect": json.dumps(expect)})

json.dump(out, sys.stdout)
'''.replace("OUTPUTS", OUTPUT_CASES_CODE)


def _flatten(v):
    if isinstance(v, list):
        for x in v:
            yield from _flatten(x)
    else:
        yield v


@pytest.fixture(scope="module")
def probe():
    from cloudml.tfs.tensorflow.core.framework import types_pb2
    from cloudml.tfs.tensorflow.core.protobuf import meta_graph_pb2
    from services.gateway import tfs_json as tj

    tf_names = {"float32": "DT_FLOAT", "float64": "DT_DOUBLE", "int32": "DT_INT32", "int64": "DT_INT64",
                "int8": "DT_INT8", "uint8": "DT_UINT8", "int16": "DT_INT16", "uint32": "DT_UINT32",
                "uint64": "DT_UINT64", "bool": "DT_BOOL", "float16": "DT_HALF", "bfloat16": "DT_BFLOAT16",
                "string": "DT_STRING"}
    job = {"predict": [], "classify": []}
    for name, dtypes, body in PREDICT_CASES:
        sig = meta_graph_pb2.SignatureDef()
        for n, dt in dtypes.items():
            sig.inputs[n].dtype = types_pb2.DataType.Value(tf_names[dt])
        req = tj.predict_request_from_json(body.encode(), {"serving_default": sig}, model_name="m")
        job["predict"].append({"name": name, "dtypes": dtypes, "body": body,
                               "request": base64.b64encode(req.SerializeToString()).decode()})
    for name, body, features in CLASSIFY_CASES:
        job["classify"].append({"name": name, "body": body, "features": features, "request": {
            "ClassificationRequest": base64.b64encode(
                tj.classification_request_from_json(body, model_name="m").SerializeToString()).decode(),
            "RegressionRequest": base64.b64encode(
                tj.regression_request_from_json(body, model_name="m").SerializeToString()).decode(),
        }})
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", PROBE], input=json.dumps(job), capture_output=True,
                          text=True, cwd="/", env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_predict_requests_match_make_tensor_proto(probe):
    names = [c["name"] for c in probe["predict"]]
    assert names == [c[0] for c in PREDICT_CASES]
    bad = {c["name"]: c["problems"] for c in probe["predict"] if c["problems"]}
    assert not bad, bad


def test_classify_regress_examples_parse_in_tensorflow(probe):
    assert [c["name"] for c in probe["classify"]] == [c[0] for c in CLASSIFY_CASES]
    bad = {c["name"]: c["problems"] for c in probe["classify"] if c["problems"]}
    assert not bad, bad


def test_responses_from_tensorflow_encodings(probe):
    from cloudml.tfs.tensorflow_serving.apis import predict_pb2
    from services.gateway import tfs_json as tj

    assert len(probe["outputs"]) >= 30
    for case in probe["outputs"]:
        resp = predict_pb2.PredictResponse.FromString(base64.b64decode(case["response"]))
        expect = json.loads(case["expect"])
        got = json.loads(tj.predict_response_to_json(resp, row_format=False))["outputs"]
        shape = case["shape"]
        assert np.shape(got) == tuple(shape) or (not shape and not isinstance(got, list)), case["case"]
        flat = list(_flatten(got)) if isinstance(got, list) else [got]
        if case["dtype"] == "string_bytes":
            assert [x["b64"] for x in flat] == expect, case["case"]
        elif case["dtype"] == "string":
            assert [base64.b64encode(x.encode()).decode() for x in flat] == expect, case["case"]
        elif case["dtype"] in ("float32", "float16", "bfloat16"):
            # Each printed decimal reads back as the same float32 value.
            np.testing.assert_array_equal(np.array(flat, np.float64).astype(np.float32),
                                          np.array(expect, np.float64).astype(np.float32), err_msg=case["case"])
        elif case["dtype"] == "float64":
            np.testing.assert_array_equal(np.array(flat, np.float64), np.array(expect, np.float64),
                                          err_msg=case["case"])
        else:
            assert flat == expect, case["case"]
        if shape and shape[0] > 0:
            rows = json.loads(tj.predict_response_to_json(resp, row_format=True))["predictions"]
            assert len(rows) == shape[0], case["case"]
