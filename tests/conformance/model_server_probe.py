"""The stock-client helper process of tests/conformance/test_model_server.py
(`python model_server_probe.py --probe`, through `stock_client.Probe`): it
imports TensorFlow and the official `tensorflow_serving` stubs, which the
pytest process never does, and answers JSON commands on stdin with JSON
lines (stock_client.serve's commands, and this file's own: build the test
models, list the model server's imports, check its tensor codec).
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
VERSION = 123


def _probe_handlers():  # pragma: no cover - runs in the helper process
    """This file's own probe commands: build the test models, list the
    model server's imports, check its tensor codec against TensorFlow's."""
    import numpy as np
    import tensorflow as tf

    def build(cmd):
        import half_plus_two

        base = cmd["dir"]
        out = {"hpt": half_plus_two.build_half_plus_two(os.path.join(base, "hpt"), VERSION, warmup=True),
               "hpt_plain": half_plus_two.build_half_plus_two(os.path.join(base, "hpt_plain"), VERSION)}
        # A Keras 3 model written with tf.saved_model.save.
        inp = tf.keras.Input(shape=(3,), name="features")
        dense = tf.keras.layers.Dense(2, name="dense")
        model = tf.keras.Model(inp, dense(inp))
        dense.set_weights([np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32),
                           np.array([0.5, -0.5], np.float32)])
        keras_dir = os.path.join(base, "keras", "1")
        tf.saved_model.save(model, keras_dir)
        out["keras"] = keras_dir
        # tf.saved_model.save names a Keras model's input itself ("inputs").
        signature = tf.saved_model.load(keras_dir).signatures["serving_default"]
        out["keras_alias"] = next(iter(signature.structured_input_signature[1]))
        sample = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], np.float32)
        out["keras_input"] = sample.tolist()
        out["keras_expected"] = model(sample).numpy().tolist()

        # A tf.Module with an explicit signature.
        class Affine(tf.Module):
            def __init__(self):
                super().__init__()
                self.w = tf.Variable([[2.0], [-1.0]])
                self.b = tf.Variable([1.0])

            @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
            def serve(self, x):
                return {"y": tf.matmul(x, self.w) + self.b, "argmax": tf.argmax(x, axis=1)}

        module = Affine()
        module_dir = os.path.join(base, "module", "1")
        tf.saved_model.save(module, module_dir, signatures={"serving_default": module.serve})
        out["module"] = module_dir
        broken = os.path.join(base, "broken", "1")
        os.makedirs(broken, exist_ok=True)
        with open(os.path.join(broken, "saved_model.pb"), "wb") as f:
            f.write(b"this is not a SavedModel")
        out["broken"] = broken
        return out

    def imports(_cmd):
        # The model server's modules beside the official TF Serving ones (this
        # process has them loaded): no descriptor conflict, no project copies.
        import services.models.model_server.server  # noqa: F401

        loaded = sorted(m for m in sys.modules if m.startswith(("cloudml", "services")))
        return {"modules": loaded}

    def codec(_cmd):
        # services/models/model_server/tensors.py against TensorFlow's own codec.
        from tensorflow.core.framework import tensor_pb2

        from services.models.model_server.tensors import TensorParseError, tensor_bytes, to_ndarray

        failures = []
        rng = np.random.default_rng(0)
        for name in ("float32", "float64", "int32", "int64", "uint8", "int8", "int16", "uint16", "uint32",
                     "uint64", "bool", "float16", "bfloat16", "complex64", "complex128", "string"):
            dtype = getattr(tf, name)
            if name == "string":
                arr = np.array([[b"a", b"", "\u00e9".encode()], [b"xyz", b"\x00\xff", b"q"]], dtype=object)
            elif name == "bool":
                arr = rng.random((2, 3)) > 0.5
            elif name.startswith("complex"):
                arr = (rng.standard_normal((2, 3)) + 1j * rng.standard_normal((2, 3))).astype(dtype.as_numpy_dtype)
            else:
                arr = (rng.standard_normal((2, 3)) * 100).astype(dtype.as_numpy_dtype)
                if name.startswith("int"):
                    arr[0, 0] = np.iinfo(arr.dtype).min
            for content in (False, True):
                tp = tensor_pb2.TensorProto.FromString(tensor_bytes(arr, content))
                back = tf.make_ndarray(tp)
                if tp.dtype != dtype.as_datatype_enum or back.shape != arr.shape or not np.array_equal(back, arr):
                    failures.append(f"encode {name} content={content}: {tp}")
                decoded = to_ndarray(tp)
                if decoded.dtype != arr.dtype or not np.array_equal(decoded, arr):
                    failures.append(f"decode {name} content={content}: {decoded!r}")
            official = tf.make_tensor_proto(arr, dtype=dtype)
            if not np.array_equal(to_ndarray(official), arr):
                failures.append(f"decode make_tensor_proto {name}")
        filled = tensor_pb2.TensorProto(dtype=1, float_val=[7.0])
        filled.tensor_shape.dim.add(size=3)
        if to_ndarray(filled).tolist() != [7.0, 7.0, 7.0]:
            failures.append("last value does not fill the shape")
        zeros = tensor_pb2.TensorProto(dtype=3)
        zeros.tensor_shape.dim.add(size=2)
        if to_ndarray(zeros).tolist() != [0, 0]:
            failures.append("no values is not zeros")
        bad = tensor_pb2.TensorProto(dtype=1, tensor_content=b"\0" * 6)
        bad.tensor_shape.dim.add(size=2)
        try:
            to_ndarray(bad)
            failures.append("short tensor_content accepted")
        except TensorParseError:
            pass
        return {"failures": failures}


    return {"build": build, "imports": imports, "codec": codec}


if __name__ == "__main__" and "--probe" in sys.argv:
    sys.path[:0] = [ROOT, HERE]
    from tests.conformance.stock_client import serve

    serve(_probe_handlers())
    sys.exit(0)
