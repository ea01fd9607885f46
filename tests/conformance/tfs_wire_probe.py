"""The probe of tests/conformance/test_tfs_protos_wire_compat.py: run in a
subprocess with either our TF Serving modules (`project`) or the official
ones (`official`) loaded, never both, it describes every definition of the
copied files, serializes the sample messages and re-parses the other side's
bytes, and prints it all as one JSON line.

    PYTHONPATH=. python tests/conformance/tfs_wire_probe.py project|official < request.json

Importing it loads neither set of generated modules (the test process does,
for its constants).
"""
from __future__ import annotations

import base64
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
TFS_PROTO_ROOT = ROOT / "protos" / "cloudml" / "tfs"
PROJECT_PREFIX = "cloudml/tfs/"

# Official modules that (transitively) load every official file we copy.
OFFICIAL_MODULES = [
    "tensorflow_serving.apis.prediction_service_pb2",
    "tensorflow_serving.apis.model_service_pb2",
    "tensorflow_serving.apis.prediction_service_pb2_grpc",
    "tensorflow_serving.apis.model_service_pb2_grpc",
]
GRPC_MODULES = {
    "PredictionService": "tensorflow_serving/apis/prediction_service_pb2_grpc",
    "ModelService": "tensorflow_serving/apis/model_service_pb2_grpc",
}

# Official file -> top-level definitions our copy leaves out on purpose
# (documented in the header of our copy).
TRIMMED = {
    "tensorflow/core/protobuf/meta_graph.proto": {
        "tensorflow.MetaGraphDef",
        "tensorflow.CollectionDef",
        "tensorflow.AssetFileDef",
    },
}

_SCALAR_TYPES = {
    "TYPE_DOUBLE", "TYPE_FLOAT", "TYPE_INT64", "TYPE_UINT64", "TYPE_INT32",
    "TYPE_FIXED64", "TYPE_FIXED32", "TYPE_BOOL", "TYPE_UINT32", "TYPE_ENUM",
    "TYPE_SFIXED32", "TYPE_SFIXED64", "TYPE_SINT32", "TYPE_SINT64",
}


# ---------------------------------------------------------------------------
# Probe side: runs in a subprocess, with either our modules or the official
# ones loaded (never both).
# ---------------------------------------------------------------------------

def _project_files() -> list[str]:
    """Our .proto files, as official-relative paths (e.g. tensorflow/...)."""
    return sorted(str(p.relative_to(TFS_PROTO_ROOT)) for p in TFS_PROTO_ROOT.rglob("*.proto"))


def _describe(pool, file_names: list[str], strip_prefix: str) -> dict:
    """JSON-able summary of the given files and, for wire decoding, their deps."""
    from google.protobuf import descriptor_pb2

    fdp = descriptor_pb2.FieldDescriptorProto
    out = {"files": {}, "messages": {}, "enums": {}, "services": {}, "all_messages": {}}
    seen: set[str] = set()

    def enum_sig(e) -> dict:
        return {
            "values": sorted([v.name, v.number] for v in e.value),
            "reserved": sorted([r.start, r.end] for r in e.reserved_range),
        }

    def msg_sig(m, syntax: str) -> dict:
        fields = {}
        for f in m.field:
            type_name = fdp.Type.Name(f.type)
            label = fdp.Label.Name(f.label)
            if label == "LABEL_REPEATED" and type_name in _SCALAR_TYPES:
                packed = f.options.packed if f.options.HasField("packed") else syntax == "proto3"
            else:
                packed = False
            fields[str(f.number)] = {
                "number": f.number,
                "name": f.name,
                "type": type_name,
                "label": label,
                "type_name": f.type_name,
                "oneof": m.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None,
                "proto3_optional": f.proto3_optional,
                "packed": packed,
                "json_name": f.json_name if f.HasField("json_name") else "",
            }
        return {
            "fields": fields,
            "map_entry": m.options.map_entry,
            "oneofs": [o.name for o in m.oneof_decl],
            "reserved": sorted([r.start, r.end] for r in m.reserved_range),
            "reserved_names": sorted(m.reserved_name),
        }

    def walk(prefix: str, messages, enums, syntax: str, file_key: str | None, names: list):
        for e in enums:
            full = f"{prefix}.{e.name}"
            names.append(full)
            if file_key is not None:
                out["enums"][full] = dict(enum_sig(e), file=file_key)
        for m in messages:
            full = f"{prefix}.{m.name}"
            names.append(full)
            sig = msg_sig(m, syntax)
            out["all_messages"][full] = sig
            if file_key is not None:
                out["messages"][full] = dict(sig, file=file_key)
            walk(full, m.nested_type, m.enum_type, syntax, file_key, names)

    primaries = set(file_names)

    def visit(name: str):
        if name in seen:
            return
        seen.add(name)
        primary = name in primaries
        fd = pool.FindFileByName(name)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        key = name[len(strip_prefix):] if strip_prefix and name.startswith(strip_prefix) else name
        names: list[str] = []
        walk(proto.package, proto.message_type, proto.enum_type, proto.syntax,
             key if primary else None, names)
        if primary:
            out["files"][key] = {
                "package": proto.package,
                "dependencies": list(proto.dependency),
                "definitions": names,
            }
            for s in proto.service:
                out["services"][f"{proto.package}.{s.name}"] = {
                    m.name: {
                        "input": m.input_type,
                        "output": m.output_type,
                        "client_streaming": m.client_streaming,
                        "server_streaming": m.server_streaming,
                    }
                    for m in s.method
                }
        for dep in fd.dependencies:
            visit(dep.name)

    for name in file_names:
        visit(name)
    return out


def _sample_builders(M, E) -> dict:
    """Builders of populated sample messages, run identically on both sides.

    M(full_name) -> message class; E(enum_full_name, value_name) -> number.
    Returns {sample name: zero-argument builder}; each builder is separate so
    that one failing sample does not hide the others.
    """
    builders = {}

    def sample(name):
        def register(fn):
            builders[name] = fn
            return fn
        return register

    def float_tensor(t, shape, values):
        t.dtype = E("tensorflow.DataType", "DT_FLOAT")
        for size in shape:
            t.tensor_shape.dim.add(size=size)
        t.float_val.extend(values)

    def example(e, age, height, name):
        e.features.feature["age"].int64_list.value.append(age)
        e.features.feature["height"].float_list.value.append(height)
        e.features.feature["name"].bytes_list.value.append(name)

    @sample("PredictRequest")
    def _():
        req = M("tensorflow.serving.PredictRequest")()
        req.model_spec.name = "mnist"
        req.model_spec.version.value = 3
        req.model_spec.signature_name = "serving_default"
        float_tensor(req.inputs["images"], [2, 3], [0.0, 1.5, -2.25, 3.0e-8, 1.0e30, 7.0])
        tokens = req.inputs["tokens"]
        tokens.dtype = E("tensorflow.DataType", "DT_STRING")
        tokens.tensor_shape.dim.add(size=2, name="batch")
        tokens.string_val.extend([b"hello", b"\x00\xff\xfe"])
        ids = req.inputs["ids"]
        ids.dtype = E("tensorflow.DataType", "DT_INT64")
        ids.tensor_shape.dim.add(size=-1)
        ids.int64_val.extend([-1, 2**40, 0])
        req.output_filter.extend(["scores", "classes"])
        return req

    @sample("PredictRequest.versionLabelAndOptions")
    def _():
        req = M("tensorflow.serving.PredictRequest")()
        req.model_spec.name = "bert"
        req.model_spec.version_label = "stable"
        raw = req.inputs["raw"]
        raw.dtype = E("tensorflow.DataType", "DT_HALF")
        raw.tensor_shape.dim.add(size=2)
        raw.half_val.extend([15360, 0])
        scalar = req.inputs["scalar"]
        scalar.dtype = E("tensorflow.DataType", "DT_DOUBLE")
        scalar.tensor_shape.SetInParent()
        scalar.tensor_content = b"\x00\x00\x00\x00\x00\x00\xf0\x3f"
        flags = req.inputs["flags"]
        flags.dtype = E("tensorflow.DataType", "DT_BOOL")
        flags.bool_val.extend([True, False, True])
        flags.tensor_shape.unknown_rank = True
        req.client_id = b"client-7"
        req.predict_streamed_options.request_state = E(
            "tensorflow.serving.PredictStreamedOptions.RequestState", "END_SPLIT")
        req.predict_streamed_options.split_dimensions["raw"] = 1
        req.predict_streamed_options.return_single_response = True
        opts = req.request_options
        opts.client_id = b""  # proto3 `optional`: present although empty
        opts.deterministic_mode = E(
            "tensorflow.serving.PredictRequest.RequestOptions.DeterministicMode",
            "FIXED_DECODER_SLOT")
        opts.return_additional_arrays_from_prefill = False
        opts.return_stoptokens.extend([1, 2, 50256])
        opts.return_all_stoptokens = True
        opts.max_cache_length = 0
        opts.handshake.estimated_payload_bytes = 1 << 20
        return req

    @sample("PredictResponse")
    def _():
        resp = M("tensorflow.serving.PredictResponse")()
        resp.model_spec.name = "mnist"
        resp.model_spec.version.value = 3
        resp.model_spec.signature_name = "serving_default"
        float_tensor(resp.outputs["scores"], [2, 2], [0.25, 0.75, 0.5, 0.5])
        return resp

    @sample("ClassificationRequest")
    def _():
        req = M("tensorflow.serving.ClassificationRequest")()
        req.model_spec.name = "iris"
        req.model_spec.signature_name = "classify"
        example(req.input.example_list.examples.add(), 42, 1.75, b"alice")
        example(req.input.example_list.examples.add(), -3, 0.0, b"")
        return req

    @sample("ClassificationResponse")
    def _():
        resp = M("tensorflow.serving.ClassificationResponse")()
        resp.model_spec.name = "iris"
        resp.model_spec.version.value = 1
        classes = resp.result.classifications.add()
        classes.classes.add(label="setosa", score=0.9)
        classes.classes.add(label="virginica", score=0.1)
        return resp

    @sample("RegressionRequest")
    def _():
        req = M("tensorflow.serving.RegressionRequest")()
        req.model_spec.name = "housing"
        ctx = req.input.example_list_with_context
        example(ctx.context, 1, 2.5, b"ctx")
        example(ctx.examples.add(), 7, 3.5, b"row")
        return req

    @sample("RegressionResponse")
    def _():
        resp = M("tensorflow.serving.RegressionResponse")()
        resp.model_spec.name = "housing"
        resp.result.regressions.add(value=123.5)
        return resp

    @sample("MultiInferenceRequest")
    def _():
        req = M("tensorflow.serving.MultiInferenceRequest")()
        req.tasks.add(method_name="tensorflow/serving/classify").model_spec.name = "multi"
        req.tasks.add(method_name="tensorflow/serving/regress").model_spec.name = "multi"
        example(req.input.example_list.examples.add(), 5, 1.0, b"x")
        return req

    @sample("MultiInferenceResponse")
    def _():
        resp = M("tensorflow.serving.MultiInferenceResponse")()
        r = resp.results.add()
        r.model_spec.name = "multi"
        r.classification_result.classifications.add().classes.add(label="a", score=1.0)
        resp.results.add().regression_result.regressions.add(value=-1.0)
        return resp

    @sample("GetModelMetadataRequest")
    def _():
        req = M("tensorflow.serving.GetModelMetadataRequest")()
        req.model_spec.name = "mnist"
        req.model_spec.version.value = 3
        req.metadata_field.append("signature_def")
        return req

    @sample("SignatureDefMap")
    def signature_def_map():
        sig_map = M("tensorflow.serving.SignatureDefMap")()
        sig = sig_map.signature_def["serving_default"]
        sig.method_name = "tensorflow/serving/predict"
        x = sig.inputs["images"]
        x.name = "serving_default_images:0"
        x.dtype = E("tensorflow.DataType", "DT_FLOAT")
        x.tensor_shape.dim.add(size=-1)
        x.tensor_shape.dim.add(size=784)
        y = sig.outputs["scores"]
        y.coo_sparse.values_tensor_name = "v:0"
        y.coo_sparse.indices_tensor_name = "i:0"
        y.coo_sparse.dense_shape_tensor_name = "s:0"
        y.dtype = E("tensorflow.DataType", "DT_FLOAT")
        z = sig.outputs["ragged"]
        z.composite_tensor.type_spec.type_spec_class = E(
            "tensorflow.TypeSpecProto.TypeSpecClass", "RAGGED_TENSOR_SPEC")
        z.composite_tensor.type_spec.type_state.tuple_value.values.add().int64_value = -2
        z.composite_tensor.type_spec.num_flat_components = 2
        z.composite_tensor.components.add(name="flat_values:0")
        float_tensor(sig.defaults["temperature"], [], [0.7])
        return sig_map

    @sample("GetModelMetadataResponse")
    def _():
        resp = M("tensorflow.serving.GetModelMetadataResponse")()
        resp.model_spec.name = "mnist"
        resp.model_spec.version.value = 3
        packed = resp.metadata["signature_def"]
        packed.type_url = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
        packed.value = signature_def_map().SerializeToString(deterministic=True)
        return resp

    @sample("GetModelStatusRequest")
    def _():
        req = M("tensorflow.serving.GetModelStatusRequest")()
        req.model_spec.name = "mnist"
        req.model_spec.version.value = 3
        return req

    @sample("GetModelStatusResponse")
    def _():
        resp = M("tensorflow.serving.GetModelStatusResponse")()
        ok = resp.model_version_status.add(version=3)
        ok.state = E("tensorflow.serving.ModelVersionStatus.State", "AVAILABLE")
        ok.status.error_code = E("tensorflow.error.Code", "OK")
        failed = resp.model_version_status.add(version=2)
        failed.state = E("tensorflow.serving.ModelVersionStatus.State", "END")
        failed.status.error_code = E("tensorflow.error.Code", "NOT_FOUND")
        failed.status.error_message = "Could not find base path /models/mnist/2"
        return resp

    @sample("ReloadConfigRequest")
    def _():
        req = M("tensorflow.serving.ReloadConfigRequest")()
        first = req.config.model_config_list.config.add(
            name="mnist", base_path="/models/mnist", model_platform="tensorflow")
        first.model_version_policy.specific.versions.extend([1, 3])
        first.version_labels["stable"] = 1
        first.logging_config.log_collector_config.type = "file"
        first.logging_config.log_collector_config.filename_prefix = "/logs/mnist"
        first.logging_config.sampling_config.sampling_rate = 0.25
        first.logging_config.sampling_config.per_task_sampling_configs.add(
            dc="local", task_index=0, sampling_rate=1.0)
        second = req.config.model_config_list.config.add(name="bert", base_path="/models/bert")
        second.model_version_policy.latest.num_versions = 2
        third = req.config.model_config_list.config.add(name="all", base_path="/models/all")
        third.model_version_policy.all.SetInParent()
        req.metric_names.append("/tensorflow/serving/model_load_count")
        return req

    @sample("ReloadConfigResponse")
    def _():
        resp = M("tensorflow.serving.ReloadConfigResponse")()
        resp.status.error_code = E("tensorflow.error.Code", "INVALID_ARGUMENT")
        resp.status.error_message = "bad config"
        resp.metric.add(name="/tensorflow/serving/model_load_count", int64_value_increase=2)
        return resp

    return builders


def _unknown_field_paths(msg, path: str = "") -> list[str]:
    """Paths (within msg) of messages that carry unknown fields."""
    from google.protobuf import unknown_fields

    found = []
    if len(unknown_fields.UnknownFieldSet(msg)):
        numbers = sorted({f.field_number for f in unknown_fields.UnknownFieldSet(msg)})
        found.append(f"{path or msg.DESCRIPTOR.full_name}: unknown field numbers {numbers}")
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        here = f"{path}.{fd.name}" if path else fd.name
        if fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            if value_fd.message_type is not None:
                for key, item in value.items():
                    found += _unknown_field_paths(item, f"{here}[{key!r}]")
        elif fd.is_repeated:
            for i, item in enumerate(value):
                found += _unknown_field_paths(item, f"{here}[{i}]")
        else:
            found += _unknown_field_paths(value, here)
    return found


def _reparse(M, encoded: dict, names_to_types: dict) -> tuple[dict, dict]:
    """Parses foreign bytes with this side's classes and re-serializes them.

    Returns ({name: base64 bytes or None}, {name: [problems]}).
    """
    reserialized, problems = {}, {}
    for name, data in encoded.items():
        reserialized[name], problems[name] = None, []
        if data is None or name not in names_to_types:
            continue  # the build failure is reported separately
        try:
            msg = M(names_to_types[name])()
            msg.ParseFromString(base64.b64decode(data))
            reserialized[name] = base64.b64encode(
                msg.SerializeToString(deterministic=True)).decode()
            problems[name] = [f"unknown fields: {p}" for p in _unknown_field_paths(msg)]
            if names_to_types[name] == "tensorflow.serving.GetModelMetadataResponse":
                # The Any payload must parse cleanly as well.
                inner = M("tensorflow.serving.SignatureDefMap")()
                inner.ParseFromString(msg.metadata["signature_def"].value)
                problems[name] += [f"unknown fields: metadata['signature_def'] -> {p}"
                                   for p in _unknown_field_paths(inner)]
        except Exception as exc:  # noqa: BLE001 - reported per sample
            problems[name].append(f"parse failed: {type(exc).__name__}: {exc}")
    return reserialized, problems


def _method_paths(module) -> dict:
    """gRPC method paths a generated stub calls, per service."""

    class _RecordingChannel:
        def __init__(self):
            self.paths = []

        def _record(self, path, *args, **kwargs):
            self.paths.append(path)

        unary_unary = unary_stream = stream_unary = stream_stream = _record

    out = {}
    for service in GRPC_MODULES:
        stub_cls = getattr(module[service], f"{service}Stub", None)
        if stub_cls is None:
            continue
        channel = _RecordingChannel()
        stub_cls(channel)
        out[service] = sorted(channel.paths)
    return out


def _probe_main(side: str) -> None:
    import importlib

    from google.protobuf import descriptor_pool, message_factory

    request = json.loads(sys.stdin.read() or "{}")
    pool = descriptor_pool.Default()
    files = _project_files()

    if side == "official":
        for name in OFFICIAL_MODULES:
            importlib.import_module(name)
        pool_files = files
        strip = ""
        grpc_prefix = ""
    else:
        for rel in files:
            importlib.import_module("cloudml.tfs." + rel[: -len(".proto")].replace("/", ".") + "_pb2")
        pool_files = [PROJECT_PREFIX + f for f in files]
        strip = PROJECT_PREFIX
        grpc_prefix = "cloudml/tfs/"

    grpc_modules = {
        service: importlib.import_module((grpc_prefix + path).replace("/", "."))
        for service, path in GRPC_MODULES.items()
    }

    def M(full_name):
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))

    def E(enum_name, value_name):
        return pool.FindEnumTypeByName(enum_name).values_by_name[value_name].number

    samples, types, build_errors = {}, {}, {}
    for name, build in _sample_builders(M, E).items():
        try:
            msg = build()
            samples[name] = base64.b64encode(msg.SerializeToString(deterministic=True)).decode()
            types[name] = msg.DESCRIPTOR.full_name
        except Exception as exc:  # noqa: BLE001 - reported per sample
            samples[name] = None
            build_errors[name] = f"{type(exc).__name__}: {exc}"
    out = {
        "side": side,
        "describe": _describe(pool, pool_files, strip),
        "method_paths": _method_paths(grpc_modules),
        "samples": samples,
        "types": types,
        "build_errors": build_errors,
    }
    if "foreign" in request:
        out["reserialized"], out["parse_problems"] = _reparse(M, request["foreign"], types)
    out["tensorflow_loaded"] = sorted(
        m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_serving"))
    print(json.dumps(out))


if __name__ == "__main__":
    _probe_main(sys.argv[1])
