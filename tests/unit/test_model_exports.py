"""Export records and the converter's error lines (issue 16), without
TensorFlow: ids per format and options, request checks, the JSON record, and
how the TFLite converter's many-line refusals become one line naming the ops
(the texts are TF 2.21's, captured from real conversions)."""
from __future__ import annotations

import pytest

from cloudml.models.v1 import models_service_pb2 as pb
from services.common import errors
from services.models.export_records import E, ExportRecord, check_options, export_id
from services.models.tflite_export import one_line_reason

SELECT = """Could not translate MLIR to FlatBuffer.<unknown>:0: error: loc(callsite(fused["StaticRegexReplace:", ...
<unknown>:0: note: see current operation: %1 = "tf.StaticRegexReplace"(%arg0) {device = ""}
<unknown>:0: error: failed while converting: 'main':
Some ops are not supported by the native TFLite runtime, you can enable TF kernels fallback using TF Select. See instructions: https://www.tensorflow.org/lite/guide/ops_select
TF Select ops: StaticRegexReplace, StringToNumber
Details:
\ttf.StaticRegexReplace(tensor<?x!tf_type.string>) -> (tensor<?x!tf_type.string>)
"""
CUSTOM = """<unknown>:0: error: loc(...): 'tf.EagerPyFunc' op is neither a custom op nor a flex op
Some ops in the model are custom ops, See instructions to implement custom ops: https://www.tensorflow.org/lite/guide/ops_custom
Custom ops: EagerPyFunc
Details:
\ttf.EagerPyFunc(tensor<?x1xf32>) -> (tensor<*xf32>)
"""


def test_converter_refusals_become_one_line_naming_the_ops():
    select = one_line_reason(SELECT)
    assert "\n" not in select and select.endswith("StaticRegexReplace, StringToNumber") and "TF Select" in select
    custom = one_line_reason(CUSTOM)
    assert "\n" not in custom and "custom ops): EagerPyFunc" in custom
    bare = one_line_reason("error: 'tf.Foo' op is neither a custom op nor a flex op\nmore")
    assert bare.endswith("unsupported ops: Foo")
    assert one_line_reason("x" * 5000).endswith("...") and len(one_line_reason("x" * 5000)) == 400


def test_export_ids_follow_format_and_options():
    assert export_id("none", "") == export_id("none", "serving_default") == "tflite"
    assert export_id("float16", "") == "tflite-float16"
    assert export_id("dynamic-range", "other").startswith("tflite-dynamic-range-s")
    assert export_id("none", "a") != export_id("none", "b")


@pytest.mark.parametrize("fmt, options", [
    (0, pb.ExportOptions()), (7, pb.ExportOptions()),
    (pb.EXPORT_FORMAT_TFLITE, pb.ExportOptions(optimization=9)),
    (pb.EXPORT_FORMAT_TFLITE, pb.ExportOptions(signature="a b")),
    (pb.EXPORT_FORMAT_TFLITE, pb.ExportOptions(signature="x" * 200)),
])
def test_bad_export_requests_are_invalid_argument(fmt, options):
    with pytest.raises(errors.InvalidArgument):
        check_options(fmt, options)


def test_record_round_trips_and_shows_its_artifact_only_once_succeeded():
    record = ExportRecord(tenant="t", model="m", version=3, id="tflite-float16", optimization="float16",
                          signature="", created=10.0, updated=11.0, size_bytes=5, sha256="ab" * 32, finished=12.0)
    assert ExportRecord.decode(record.encode()) == record
    shown = record.to_pb()
    assert shown.options.optimization == pb.EXPORT_OPTIMIZATION_FLOAT16 and not shown.HasField("artifact")
    record.state = E.EXPORT_STATE_SUCCEEDED
    shown = record.to_pb()
    assert shown.artifact.size_bytes == 5 and shown.artifact.file == "model.tflite"
    assert shown.artifact.create_time.seconds == 12
    assert ExportRecord.decode(b'{"tenant": "t", "model": "m", "version": 1, "id": "tflite", '
                               b'"optimization": "none", "signature": "", "future": 1}').id == "tflite"
