"""Our TF Serving protos (protos/cloudml/tfs) are wire-identical to the official ones.

The gateway and CLI use `cloudml.tfs.*_pb2` instead of `tensorflow_serving.apis`
so they never import TensorFlow. Both sets of modules define the same protobuf
full names (tensorflow.serving.PredictRequest, ...), so they can never share a
descriptor pool: this test loads each side in its own subprocess (the probe,
tests/conformance/tfs_wire_probe.py) and only compares JSON/bytes in the
pytest process, which imports neither.

Checked:
  * every message/enum/service of our copies against the official descriptor:
    field numbers, names, types, labels, type names, oneofs, packed-ness, explicit
    json_name, reserved ranges; enum values; RPC names, request/response types
    and gRPC method paths;
  * our files define everything the official file of the same path defines
    (except what the trimmed meta_graph.proto leaves out on purpose);
  * populated sample messages serialize to the same bytes on both sides, and
    bytes from one side parse on the other with no unknown fields and
    re-serialize byte-for-byte;
  * our modules import without TensorFlow.
"""
from __future__ import annotations

import base64
import difflib
import json
import os
import subprocess
import sys

import pytest

from tests.conformance import tfs_wire_probe
from tests.conformance.tfs_wire_probe import PROJECT_PREFIX, ROOT, TRIMMED

# ---------------------------------------------------------------------------
# Test side: only compares; imports neither set of generated modules.
# ---------------------------------------------------------------------------

def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def _run_probe(side: str, request: dict | None = None) -> dict:
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('_tfs_wire_probe', sys.argv[1])\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        "mod._probe_main(sys.argv[2])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, tfs_wire_probe.__file__, side],
        input=json.dumps(request or {}),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(),
        timeout=240,
    )
    if proc.returncode != 0:
        pytest.fail(f"{side} probe failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probes() -> dict:
    project = _run_probe("project")
    official = _run_probe("official", {"foreign": project["samples"]})
    project_reparse = _run_probe("project", {"foreign": official["samples"]})
    return {"project": project, "official": official, "project_reparse": project_reparse}


# -- wire decoding, for readable failure messages ----------------------------

def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def _wire_lines(data: bytes, type_name: str, messages: dict, path: str = "") -> list[str]:
    """One line per field occurrence, e.g. `model_spec(1).name(1) = b'mnist'`."""
    lines = []
    pos = 0
    fields = messages.get(type_name, {}).get("fields", {})
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            field = fields.get(str(number))
            label = f"{path}{field['name'] if field else '?'}({number})"
            if wire_type == 0:
                value, pos = _varint(data, pos)
                lines.append(f"{label} = varint {value}")
            elif wire_type == 1:
                lines.append(f"{label} = fixed64 {data[pos:pos + 8].hex()}")
                pos += 8
            elif wire_type == 5:
                lines.append(f"{label} = fixed32 {data[pos:pos + 4].hex()}")
                pos += 4
            elif wire_type == 2:
                size, pos = _varint(data, pos)
                chunk = data[pos:pos + size]
                pos += size
                sub = field["type_name"].lstrip(".") if field and field["type"] == "TYPE_MESSAGE" else None
                if sub is not None:
                    lines.append(f"{label} {{ ({size} bytes)")
                    lines += _wire_lines(chunk, sub, messages, label + ".")
                    lines.append(f"{label} }}")
                else:
                    lines.append(f"{label} = len {size} {chunk!r}")
            else:
                lines.append(f"{label} = wire type {wire_type} (unsupported); rest {data[pos:]!r}")
                break
    except ValueError as exc:
        lines.append(f"{path}<undecodable: {exc}>")
    return lines


def _bytes_diff(name: str, type_name: str, expected: str, actual: str,
                expected_side: tuple[str, dict], actual_side: tuple[str, dict]) -> str:
    """Field-by-field diff; each side's bytes are decoded with that side's schema."""
    expected_label, expected_schema = expected_side
    actual_label, actual_schema = actual_side
    exp_lines = _wire_lines(base64.b64decode(expected), type_name, expected_schema)
    act_lines = _wire_lines(base64.b64decode(actual), type_name, actual_schema)
    diff = "\n".join(difflib.unified_diff(
        exp_lines, act_lines, expected_label, actual_label, lineterm="", n=2))
    return f"{name} ({type_name}) bytes differ:\n{diff or '(same fields, different encoding/order)'}"


# -- the tests ---------------------------------------------------------------

def test_project_modules_import_without_tensorflow():
    code = (
        "import sys\n"
        "import cloudml.tfs.tensorflow_serving.apis.prediction_service_pb2_grpc\n"
        "import cloudml.tfs.tensorflow_serving.apis.model_service_pb2_grpc\n"
        "bad = sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] in ('tensorflow', 'tensorflow_serving'))\n"
        "assert 'tensorflow' not in sys.modules, bad\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_project_probe_loaded_no_tensorflow(probes):
    assert probes["project"]["tensorflow_loaded"] == []
    assert probes["project_reparse"]["tensorflow_loaded"] == []
    # Sanity: the official side really used the official modules.
    assert "tensorflow_serving.apis.predict_pb2" in probes["official"]["tensorflow_loaded"]


def test_files_packages_and_imports(probes):
    project = probes["project"]["describe"]["files"]
    official = probes["official"]["describe"]["files"]
    assert project, "no .proto files under protos/cloudml/tfs"
    problems = []
    for name, info in sorted(project.items()):
        if name not in official:
            problems.append(f"{name}: no official file with this path")
            continue
        if info["package"] != official[name]["package"]:
            problems.append(f"{name}: package {info['package']!r} != official "
                            f"{official[name]['package']!r}")
        for dep in info["dependencies"]:
            if not (dep.startswith(PROJECT_PREFIX) or dep.startswith("google/protobuf/")):
                problems.append(f"{name}: imports {dep!r}, which is not under {PROJECT_PREFIX}")
    assert not problems, "\n".join(problems)


def test_every_official_definition_is_copied(probes):
    project = probes["project"]["describe"]["files"]
    official = probes["official"]["describe"]["files"]
    problems = []
    for name, info in sorted(project.items()):
        if name not in official:
            continue  # reported by test_files_packages_and_imports
        left_out = TRIMMED.get(name, set())
        expected = {
            d for d in official[name]["definitions"]
            if not any(d == t or d.startswith(t + ".") for t in left_out)
        }
        ours = set(info["definitions"])
        for missing in sorted(expected - ours):
            problems.append(f"{name}: missing {missing}")
        for extra in sorted(ours - set(official[name]["definitions"])):
            problems.append(f"{name}: defines {extra}, which the official file does not")
    assert not problems, "\n".join(problems)


def test_message_fields_identical(probes):
    project = probes["project"]["describe"]["messages"]
    official = probes["official"]["describe"]["all_messages"]
    assert "tensorflow.serving.PredictRequest" in project
    problems = []
    for full_name, ours in sorted(project.items()):
        theirs = official.get(full_name)
        if theirs is None:
            problems.append(f"{full_name}: not defined by the official protos")
            continue
        for attr in ("map_entry", "oneofs", "reserved", "reserved_names"):
            if ours[attr] != theirs[attr]:
                problems.append(f"{full_name}: {attr} ours={ours[attr]} official={theirs[attr]}")
        numbers = sorted(set(ours["fields"]) | set(theirs["fields"]), key=int)
        for number in numbers:
            a, b = ours["fields"].get(number), theirs["fields"].get(number)
            if a is None:
                problems.append(f"{full_name}: field {number} ({b['name']}) missing in ours")
            elif b is None:
                problems.append(f"{full_name}: field {number} ({a['name']}) not in official")
            else:
                for key in sorted(a):
                    if a[key] != b[key]:
                        problems.append(f"{full_name}.{a['name']} (field {number}): "
                                        f"{key} ours={a[key]!r} official={b[key]!r}")
    assert not problems, "\n".join(problems)


def test_enums_identical(probes):
    project = probes["project"]["describe"]["enums"]
    official_files = probes["official"]["describe"]["enums"]
    assert "tensorflow.DataType" in project and "tensorflow.error.Code" in project
    problems = []
    for full_name, ours in sorted(project.items()):
        theirs = official_files.get(full_name)
        if theirs is None:
            problems.append(f"{full_name}: not defined by the official protos")
            continue
        a = {n: v for n, v in ours["values"]}
        b = {n: v for n, v in theirs["values"]}
        for value in sorted(set(a) | set(b)):
            if a.get(value) != b.get(value):
                problems.append(f"{full_name}.{value}: ours={a.get(value)} official={b.get(value)}")
        if ours["reserved"] != theirs["reserved"]:
            problems.append(f"{full_name}: reserved ours={ours['reserved']} "
                            f"official={theirs['reserved']}")
    assert not problems, "\n".join(problems)


def test_services_identical(probes):
    project = probes["project"]["describe"]["services"]
    official = probes["official"]["describe"]["services"]
    assert set(project) == {"tensorflow.serving.PredictionService",
                            "tensorflow.serving.ModelService"}, sorted(project)
    problems = []
    for service, methods in sorted(project.items()):
        theirs = official.get(service, {})
        for method in sorted(set(methods) | set(theirs)):
            if methods.get(method) != theirs.get(method):
                problems.append(f"{service}.{method}: ours={methods.get(method)} "
                                f"official={theirs.get(method)}")
    assert not problems, "\n".join(problems)
    ours_paths = probes["project"]["method_paths"]
    assert ours_paths == probes["official"]["method_paths"]
    assert "/tensorflow.serving.PredictionService/Predict" in ours_paths["PredictionService"]


def _build_problems(probes) -> list[str]:
    return [
        f"{name}: building the sample with {side} classes failed: {error}"
        for side, key in (("our", "project"), ("the official", "official"))
        for name, error in sorted(probes[key]["build_errors"].items())
    ]


def test_samples_serialize_identically(probes):
    """The same sample, built with our classes and the official ones, is the same bytes."""
    ours, theirs = probes["project"], probes["official"]
    assert set(ours["samples"]) == set(theirs["samples"])
    problems = _build_problems(probes)
    for name in sorted(ours["samples"]):
        a, b = ours["samples"][name], theirs["samples"][name]
        if a is not None and b is not None and a != b:
            problems.append(_bytes_diff(
                name, ours["types"][name], b, a,
                ("official-built", _schema(probes, "official")),
                ("ours-built", _schema(probes, "project"))))
    assert not problems, "\n\n".join(problems)


def _schema(probes, side: str) -> dict:
    return probes[side]["describe"]["all_messages"]


def _round_trip_problems(probes, sent_by: str, parsed_by: str, labels: tuple[str, str]):
    sender, parser = probes[sent_by], probes[parsed_by]
    problems = _build_problems(probes)
    for name, data in sorted(sender["samples"].items()):
        if data is None:
            continue
        problems += [f"{name}: {p}" for p in parser["parse_problems"][name]]
        again = parser["reserialized"][name]
        if again is not None and again != data:
            problems.append(_bytes_diff(name, sender["types"][name], data, again,
                                        (labels[0], _schema(probes, sent_by)),
                                        (labels[1], _schema(probes, parsed_by))))
    return problems


def test_our_bytes_parse_with_official_classes(probes):
    """Ours -> official parse -> official serialize gives back the very same bytes."""
    problems = _round_trip_problems(probes, "project", "official",
                                    ("ours", "official re-serialized"))
    assert not problems, "\n\n".join(problems)


def test_official_bytes_parse_with_our_classes(probes):
    """Official -> our parse -> our serialize gives back the very same bytes."""
    problems = _round_trip_problems(probes, "official", "project_reparse",
                                    ("official", "ours re-serialized"))
    assert not problems, "\n\n".join(problems)
