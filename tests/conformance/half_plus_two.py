"""Regenerates TF Serving's `half_plus_two` test model with TensorFlow.

The same graph as TF Serving's `saved_model_half_plus_two.py` (the model its
own tests and `saved_model_cli` tests use), written as a TF1-style
`SavedModelBuilder` export:

    y  = a*x  + b   (a = 0.5, b = 2)
    y2 = a*x  + c   (c = 3)
    y3 = a2*x2 + c2 (a2 = 0.5, c2 = 3)

where x and x2 are parsed from serialized tf.Examples (feature "x" required,
"x2" defaulting to 0), and x, x2 are also fed directly as float tensors.
Signatures:

    serving_default    predict   inputs {x: float [-1,1] "x:0"}         outputs {y}
    regress_x_to_y     regress   inputs {inputs: string "tf_example:0"} outputs {outputs: y}
    regress_x_to_y2    regress   inputs {inputs: string}                outputs {outputs: y2}
    regress_x2_to_y3   regress   inputs {inputs: float [-1,1] "x2:0"}   outputs {outputs: y3}
    classify_x_to_y    classify  inputs {inputs: string}                outputs {scores: y}
    classify_x2_to_y3  classify  inputs {inputs: float [-1,1] "x2:0"}   outputs {scores: y3}

With `warmup=True`, `assets.extra/tf_serving_warmup_requests` holds
`WARMUP_RECORDS` PredictionLog records (predict, regress and classify).

    python tests/conformance/half_plus_two.py OUT_DIR [--version 123] [--warmup]
"""
from __future__ import annotations

import argparse
import os
import shutil

WARMUP_RECORDS = 3


def build_half_plus_two(directory: str, version: int = 123, warmup: bool = False) -> str:
    """Writes the model to `directory/<version>` and returns that path."""
    import tensorflow as tf

    v1 = tf.compat.v1
    export_dir = os.path.join(directory, str(version))
    if os.path.exists(export_dir):
        shutil.rmtree(export_dir)
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as sess:
        a = v1.Variable(0.5, name="a")
        b = v1.Variable(2.0, name="b")
        c = v1.Variable(3.0, name="c")
        serialized_tf_example = v1.placeholder(tf.string, name="tf_example", shape=[None])
        feature_configs = {
            "x": v1.FixedLenFeature([1], dtype=tf.float32),
            "x2": v1.FixedLenFeature([1], dtype=tf.float32, default_value=[0.0]),
        }
        tf_example = v1.parse_example(serialized_tf_example, feature_configs)
        x = tf.identity(tf_example["x"], name="x")
        y = tf.identity(tf.add(tf.multiply(a, x), b), name="y")
        y2 = tf.identity(tf.add(tf.multiply(a, x), c), name="y2")
        x2 = tf.identity(tf_example["x2"], name="x2")
        a2 = v1.Variable(0.5, name="a2")
        c2 = v1.Variable(3.0, name="c2")
        y3 = tf.identity(tf.add(tf.multiply(a2, x2), c2), name="y3")

        info = v1.saved_model.utils.build_tensor_info
        build = v1.saved_model.signature_def_utils.build_signature_def
        consts = v1.saved_model.signature_constants

        def regression(inp, out):
            return build({consts.REGRESS_INPUTS: info(inp)}, {consts.REGRESS_OUTPUTS: info(out)},
                         consts.REGRESS_METHOD_NAME)

        def classification(inp, scores):
            return build({consts.CLASSIFY_INPUTS: info(inp)}, {consts.CLASSIFY_OUTPUT_SCORES: info(scores)},
                         consts.CLASSIFY_METHOD_NAME)

        signatures = {
            "regress_x_to_y": regression(serialized_tf_example, y),
            "regress_x_to_y2": regression(serialized_tf_example, y2),
            "regress_x2_to_y3": regression(x2, y3),
            "classify_x_to_y": classification(serialized_tf_example, y),
            "classify_x2_to_y3": classification(x2, y3),
            consts.DEFAULT_SERVING_SIGNATURE_DEF_KEY: build(
                {"x": info(x)}, {"y": info(y)}, consts.PREDICT_METHOD_NAME),
        }
        sess.run(v1.global_variables_initializer())
        builder = v1.saved_model.builder.SavedModelBuilder(export_dir)
        builder.add_meta_graph_and_variables(sess, [v1.saved_model.tag_constants.SERVING],
                                             signature_def_map=signatures)
        builder.save()
    if warmup:
        write_warmup_requests(export_dir)
    return export_dir


def write_warmup_requests(export_dir: str, model_name: str = "half_plus_two") -> str:
    """Writes WARMUP_RECORDS PredictionLog records as TF Serving documents them."""
    import tensorflow as tf
    from tensorflow_serving.apis import (
        classification_pb2,
        predict_pb2,
        prediction_log_pb2,
        regression_pb2,
    )

    path = os.path.join(export_dir, "assets.extra", "tf_serving_warmup_requests")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    predict = predict_pb2.PredictRequest()
    predict.model_spec.name = model_name
    predict.inputs["x"].CopyFrom(tf.make_tensor_proto([[1.0], [2.0]], dtype=tf.float32))
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name = model_name
    regress.model_spec.signature_name = "regress_x_to_y"
    regress.input.example_list.examples.add().features.feature["x"].float_list.value.append(2.0)
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = model_name
    classify.model_spec.signature_name = "classify_x_to_y"
    classify.input.example_list.examples.add().features.feature["x"].float_list.value.append(4.0)
    logs = [
        prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=predict)),
        prediction_log_pb2.PredictionLog(regress_log=prediction_log_pb2.RegressLog(request=regress)),
        prediction_log_pb2.PredictionLog(classify_log=prediction_log_pb2.ClassifyLog(request=classify)),
    ]
    assert len(logs) == WARMUP_RECORDS
    with tf.io.TFRecordWriter(path) as writer:
        for entry in logs:
            writer.write(entry.SerializeToString())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--version", type=int, default=123)
    parser.add_argument("--warmup", action="store_true")
    args = parser.parse_args()
    print(build_half_plus_two(args.directory, args.version, args.warmup))


if __name__ == "__main__":
    main()
