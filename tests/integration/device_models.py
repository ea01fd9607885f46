"""TensorFlow side of the device tests (tests/integration/test_models_devices.py),
run as a subprocess so that the pytest process never imports TensorFlow.

    python tests/integration/device_models.py build OUTDIR
        OUTDIR/linear    the seed's linear model, trained by its own trainer (examples/trainers/linear,
                         one short epoch) and exported by it, plus a 5 MiB file in assets.extra/ (a
                         file large enough to be cut mid-way by a download)
        OUTDIR/strings   serving_default on string ops (StaticRegexReplace, StringToNumber)
        OUTDIR/pyfunc    serving_default on a tf.py_function (EagerPyFunc)
    python tests/integration/device_models.py refusals DIR...
        converts each SavedModel as the export process does (services.models.tflite_export) and
        prints {DIR: the one-line reason, or "converted"} as JSON (one TensorFlow import for all)
    python tests/integration/device_models.py run-tflite '[["FILE", {"X": [[1.0]], ...}], ...]'
        prints the outputs of the TFLite interpreter's serving_default signature runner for each
        file and its inputs, as a JSON list (one TensorFlow import for all)
    python tests/integration/device_models.py run-saved-model DIR '{"X": [[1.0]], ...}'
        prints the outputs of the SavedModel's serving_default, called in process, as JSON
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PADDING_BYTES = 5 << 20


def build(out: str) -> None:
    sys.path.insert(0, os.path.join(ROOT, "examples", "trainers", "linear"))
    from trainer import task

    task.main(["--max_epochs", "2", "--samples", "256", "--output_path", os.path.join(out, "linear-job")])
    os.rename(os.path.join(out, "linear-job", "model", "1"), os.path.join(out, "linear"))
    os.makedirs(os.path.join(out, "linear", "assets.extra"), exist_ok=True)
    with open(os.path.join(out, "linear", "assets.extra", "padding.bin"), "wb") as f:
        f.write(os.urandom(PADDING_BYTES))


def build_refused(out: str) -> None:
    """Two SavedModels TF 2.21's converter refuses without TF Select."""
    import tensorflow as tf

    class Strings(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="s")])
        def serve(self, s):
            return {"y": tf.strings.to_number(tf.strings.regex_replace(s, "a", "1"))}

    class PyFunc(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.reshape(tf.py_function(lambda a: a * 2.0, [x], tf.float32), [-1, 1])}

    for name, cls in (("strings", Strings), ("pyfunc", PyFunc)):
        module = cls()
        tf.saved_model.save(module, os.path.join(out, name), signatures={"serving_default": module.serve})


def refusals(paths: list[str]) -> dict:
    sys.path.insert(0, ROOT)
    from services.models.tflite_export import convert, one_line_reason

    answers = {}
    for path in paths:
        try:
            convert(path, "", "none")
            answers[path] = "converted"
        except Exception as err:  # noqa: BLE001 - the refusal is the answer
            answers[path] = one_line_reason(str(err))
    return answers


def _numpy_inputs(inputs: dict, dtypes: dict) -> dict:
    import numpy as np

    return {k: np.asarray(v, dtype=dtypes[k]) for k, v in inputs.items()}


def run_tflite(path: str, inputs: dict, signature: str = "serving_default") -> dict:
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=path)
    runner = interpreter.get_signature_runner(signature)
    details = runner.get_input_details()
    answer = runner(**_numpy_inputs(inputs, {k: details[k]["dtype"] for k in inputs}))
    return {k: v.tolist() for k, v in answer.items()}


def run_saved_model(path: str, inputs: dict) -> dict:
    import tensorflow as tf

    fn = tf.saved_model.load(path).signatures["serving_default"]
    specs = fn.structured_input_signature[1]
    answer = fn(**{k: tf.constant(v, dtype=specs[k].dtype) for k, v in inputs.items()})
    return {k: v.numpy().tolist() for k, v in answer.items()}


def main(argv: list[str]) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if argv[0] == "build":
        build(argv[1])
        build_refused(argv[1])
        print(json.dumps({"built": argv[1]}))
    elif argv[0] == "refusals":
        print(json.dumps(refusals(argv[1:])))
    elif argv[0] == "run-tflite":
        print(json.dumps([run_tflite(path, inputs) for path, inputs in json.loads(argv[1])]))
    elif argv[0] == "run-saved-model":
        print(json.dumps(run_saved_model(argv[1], json.loads(argv[2]))))
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
