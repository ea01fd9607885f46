"""Trained models for devices (issue 16): `models download` and TensorFlow
Lite exports, against the models service as a real process with the real
auth service, a real gateway, real model-server replicas and real export
processes (TensorFlow's converter, run as the tenant) on the session's etcd
(tests/integration/models_stack.py). Every call goes through the gateway.

The models: the seed's linear model, trained by its own trainer (with a
5 MiB file added so that a download can be cut inside a file), and TF
Serving's half_plus_two, whose classify_x_to_y signature parses tf.Example
(ParseExampleV2), an op TensorFlow Lite's builtins lack: the converter in
TF 2.21 refuses it (an export through the platform), as it refuses string
ops (StaticRegexReplace, StringToNumber) and tf.py_function (EagerPyFunc, a
custom op), checked on SavedModels built for it. TensorFlow runs only in
subprocesses (tests/integration/device_models.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import pwd
import signal
import urllib.error
import urllib.request
import subprocess
import sys

import grpc
import pytest

import cloudml
from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml import errors
from cloudml.download import MANIFEST_FILE, part_dir
from cloudml.models.v1 import models_service_pb2 as pb
from cloudml.models.v1 import models_service_pb2_grpc as pb_grpc
from services.common import tenancy
from tests.integration.cli_result import Result
from tests.integration.models_stack import LOAD_TIMEOUT, ROOT, expect_code, open_stack, wait_for

HELPER = os.path.join(ROOT, "tests", "integration", "device_models.py")
LINEAR_INPUTS = {"keys": [[1], [2], [3]], "X": [[10.0], [30.0], [-4.5]]}
HP_INPUTS = {"x": [[1.0], [2.0], [-7.25]]}
EXPORT_TIMEOUT = 120
#: float16 exports: |TFLite - Predict| <= this x the largest |output| of the batch (README: "Devices")
FLOAT16_TOLERANCE = 1e-3


def tf_helper(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, HELPER, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("device-models"))
    tf_helper("build", out)
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory, etcd_server, half_plus_two):
    with open_stack(str(tmp_path_factory.mktemp("models-devices")), etcd_server.endpoint, half_plus_two) as stack:
        yield stack


@pytest.fixture(scope="module")
def team(stack):
    """A tenant with the linear model (v1) and half_plus_two (v1) deployed, and its SDK client."""
    tenant = stack.new_tenant()
    client = cloudml.Client(stack.gateway.address, tenant.client.access_key_id, tenant.client.secret_key)
    tenant.sdk = client
    yield tenant
    client.close()


@pytest.fixture(scope="module")
def deployed(stack, team, models_dir):
    models = team.sdk.models
    for name, source in (("linear", os.path.join(models_dir, "linear")), ("hp", stack.saved_model)):
        models.create(name, source, version=1, cpu="100m", memory="1Gi")
    for name in ("linear", "hp"):
        models.wait(name, 1, timeout=LOAD_TIMEOUT)
    return models


def rest(stack) -> str:
    return f"http://127.0.0.1:{stack.rest_port}"


def close(a, b, rtol: float = 0.0, atol: float = 1e-5) -> bool:
    flat_a, flat_b = _flat(a), _flat(b)
    return len(flat_a) == len(flat_b) and all(abs(x - y) <= atol + rtol * abs(y) for x, y in zip(flat_a, flat_b))


def _flat(value) -> list[float]:
    if isinstance(value, list):
        return [x for item in value for x in _flat(item)]
    return [float(value)]


def gateway_stub(stack):
    channel = grpc.insecure_channel(stack.gateway.address)
    return channel, pb_grpc.ModelsServiceStub(channel)


# --- exports -------------------------------------------------------------------------------

def test_tflite_exports_answer_as_predict_through_the_gateway(stack, team, deployed, tmp_path):
    """The seed's linear model (no optimization, and dynamic-range) and
    half_plus_two (float16), exported to TFLite: the interpreter's outputs
    equal the gateway's Predict within 1e-5, with the optimizations within
    their documented tolerances; the artifacts are listed with size and
    SHA-256, and asking again returns the same export."""
    models = deployed
    wanted = [("linear", "none"), ("linear", "dynamic-range"), ("hp", "float16")]
    started = {(name, opt): models.export(name, 1, optimize=opt) for name, opt in wanted}
    assert all(e.created and e.state in ("PENDING", "RUNNING") for e in started.values()), started
    done = {key: models.wait_export(key[0], 1, e.id, timeout=EXPORT_TIMEOUT) for key, e in started.items()}
    assert {key: e.id for key, e in done.items()} == {
        ("linear", "none"): "tflite", ("linear", "dynamic-range"): "tflite-dynamic-range",
        ("hp", "float16"): "tflite-float16"}
    again = models.export("hp", 1, optimize="float16")
    assert again.created is False and again.proto == done[("hp", "float16")].proto

    listed = models.exports("linear", 1)
    assert [e.id for e in listed] == ["tflite", "tflite-dynamic-range"]
    for export in listed:
        assert export.state == "SUCCEEDED" and export.size_bytes > 0 and len(export.sha256) == 64, export.proto
        assert export.proto.artifact.file == "model.tflite" and export.proto.attempts == 1

    expected = {
        "linear": models.predict("linear", inputs=LINEAR_INPUTS, version=1,
                                 rest_endpoint=rest(stack))["prediction"].tolist(),
        "hp": models.predict("hp", inputs=HP_INPUTS, version=1, rest_endpoint=rest(stack)).tolist(),
    }
    runs = []
    for (name, opt), export in done.items():
        target = tmp_path / f"{name}-{export.id}"
        got = models.download(name, str(target), version=1, artifact=export.id)
        assert got.files == 1 and got.sha256 and (target / "model.tflite").stat().st_size == export.size_bytes
        runs.append([str(target / "model.tflite"), LINEAR_INPUTS if name == "linear" else HP_INPUTS])
    outputs = tf_helper("run-tflite", json.dumps(runs))
    for ((name, opt), _), answer in zip(done.items(), outputs):
        mine, theirs = answer["prediction" if name == "linear" else "y"], expected[name]
        if name == "linear":
            assert answer["keys"] == LINEAR_INPUTS["keys"]
        if opt == "float16":
            # float16 keeps 11 significant bits (a relative step of 2^-11 ~ 4.9e-4) of every weight and
            # constant: outputs move by up to ~1e-3 of the outputs' scale.
            scale = max(abs(v) for v in _flat(theirs))
            assert close(mine, theirs, atol=FLOAT16_TOLERANCE * scale), (name, opt, mine, theirs)
        else:
            # dynamic-range quantizes only weight tensors of >= 1024 elements to int8; the linear model's
            # two scalar weights stay float32, so it answers as the SavedModel does.
            assert close(mine, theirs), (name, opt, mine, theirs)


def test_export_that_cannot_convert_fails_with_the_converters_reason(stack, team, deployed):
    """half_plus_two's classify_x_to_y signature parses tf.Example
    (ParseExampleV2), which TFLite's builtins lack: FAILED with one line
    naming the op, never INTERNAL; asking again returns the FAILED export."""
    models = deployed
    export = models.export("hp", 1, signature="classify_x_to_y")
    assert export.id.startswith("tflite-s") and export.created
    with pytest.raises(errors.FailedPrecondition) as err:
        models.wait_export("hp", 1, export.id, timeout=EXPORT_TIMEOUT)
    failed = models.get_export("hp", 1, export.id)
    assert failed.state == "FAILED" and "\n" not in failed.message
    assert "ParseExampleV2" in failed.message and "TF Select" in failed.message, failed.message
    assert "ParseExampleV2" in err.value.message
    again = models.export("hp", 1, signature="classify_x_to_y")
    assert again.created is False and again.state == "FAILED"
    # An artifact that did not succeed cannot be downloaded.
    with pytest.raises(errors.FailedPrecondition):
        models.download("hp", "/nonexistent/x", version=1, artifact=export.id)


def test_the_converter_refuses_string_ops_and_py_function_naming_them(models_dir):
    """What TF 2.21's converter refuses without TF Select, as the export
    process words it: string ops (TF Select ops) and tf.py_function (a custom
    op), each in one line naming the ops."""
    reasons = tf_helper("refusals", *(os.path.join(models_dir, name) for name in ("strings", "pyfunc")))
    strings, pyfunc = (reasons[os.path.join(models_dir, name)] for name in ("strings", "pyfunc"))
    assert strings.endswith("(they need TF Select, which the export does not enable): StaticRegexReplace, "
                            "StringToNumber"), strings
    assert pyfunc.endswith("ops TensorFlow Lite does not have (custom ops): EagerPyFunc"), pyfunc
    assert "\n" not in strings + pyfunc


def test_export_and_download_bad_input_and_other_tenants(stack, team, deployed):
    """Unknown format or optimization: INVALID_ARGUMENT; no such model or
    version: NOT_FOUND; a version that is not AVAILABLE: FAILED_PRECONDITION;
    another tenant's member cannot download, export or list artifacts of the
    model (NOT_FOUND, as for a missing one), the admin can."""
    channel, stub = gateway_stub(stack)
    md = team.md
    with channel:
        good = dict(model="linear", version=1)
        expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.ExportVersion,
                    pb.ExportVersionRequest(**good, format=7), metadata=md, timeout=10)
        expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.ExportVersion,
                    pb.ExportVersionRequest(**good, format=pb.EXPORT_FORMAT_TFLITE,
                                            options=pb.ExportOptions(optimization=9)), metadata=md, timeout=10)
        expect_code(grpc.StatusCode.NOT_FOUND, stub.ExportVersion,
                    pb.ExportVersionRequest(model="nope", version=1, format=pb.EXPORT_FORMAT_TFLITE),
                    metadata=md, timeout=10)
        expect_code(grpc.StatusCode.NOT_FOUND, stub.ExportVersion,
                    pb.ExportVersionRequest(model="linear", version=9, format=pb.EXPORT_FORMAT_TFLITE),
                    metadata=md, timeout=10)
        with pytest.raises(errors.SpecError):
            deployed.export("linear", 1, optimize="int4")
        # A version that is not AVAILABLE: one waiting in START for quota (the tenant's whole CPU
        # limit while its replicas use some), so no process starts for it.
        admin = stack.auth.admin
        limits = admin.call("GetQuota", auth_pb.GetQuotaRequest(tenant=team.name)).limits
        cpu = limits.cpu_millis
        limits.cpu_millis = 1500
        admin.call("SetQuota", auth_pb.SetQuotaRequest(tenant=team.name, limits=limits))
        try:
            deployed.create("waiting", stack.saved_model, version=1, cpu="1500m", memory="1Gi")
            detail = expect_code(grpc.StatusCode.FAILED_PRECONDITION, stub.ExportVersion,
                                 pb.ExportVersionRequest(model="waiting", version=1, format=pb.EXPORT_FORMAT_TFLITE),
                                 metadata=md, timeout=10)
            assert "is START, not AVAILABLE" in detail, detail
            deployed.delete("waiting")
        finally:
            limits.cpu_millis = cpu
            admin.call("SetQuota", auth_pb.SetQuotaRequest(tenant=team.name, limits=limits))
        expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: list(stub.DownloadVersion(
            pb.DownloadVersionRequest(model="linear", version=1, label="stable"), metadata=md, timeout=10)))
        expect_code(grpc.StatusCode.NOT_FOUND, lambda: list(stub.DownloadVersion(
            pb.DownloadVersionRequest(model="linear", label="nope"), metadata=md, timeout=10)))

        other = stack.new_tenant()
        for tenant in ("", team.name):
            calls = [
                (stub.ExportVersion, pb.ExportVersionRequest(tenant=tenant, **good, format=pb.EXPORT_FORMAT_TFLITE)),
                (stub.ListExports, pb.ListExportsRequest(tenant=tenant, **good)),
                (stub.GetExport, pb.GetExportRequest(tenant=tenant, **good, id="tflite")),
            ]
            for method, request in calls:
                expect_code(grpc.StatusCode.NOT_FOUND, method, request, metadata=other.md, timeout=10)
            expect_code(grpc.StatusCode.NOT_FOUND, lambda: list(stub.DownloadVersion(
                pb.DownloadVersionRequest(tenant=tenant, **good), metadata=other.md, timeout=10)))
            expect_code(grpc.StatusCode.NOT_FOUND, lambda: list(stub.DownloadVersion(
                pb.DownloadVersionRequest(tenant=tenant, **good, artifact="tflite"), metadata=other.md, timeout=10)))
        manifest = next(iter(stub.DownloadVersion(pb.DownloadVersionRequest(
            tenant=team.name, **good, manifest_only=True), metadata=admin.md, timeout=10))).manifest
        assert manifest.version == 1 and any(f.path == "saved_model.pb" for f in manifest.files)


# --- downloads -------------------------------------------------------------------------------

def test_download_round_trip_serves_as_the_original(stack, team, deployed, models_dir, tmp_path):
    """The downloaded SavedModel is the uploaded tree (same files, same tree
    SHA-256 as UploadModel's), and deployed again as version 2 it answers
    as version 1; a label picks the version."""
    models = deployed
    models.label("linear", "stable", 1)
    got = models.download("linear", str(tmp_path / "lin"), label="stable")
    assert got.version == 1 and not os.path.exists(part_dir(str(tmp_path / "lin")))
    source = os.path.join(models_dir, "linear")
    for folder, _, files in os.walk(source):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), source)
            with open(os.path.join(source, rel), "rb") as a, open(tmp_path / "lin" / rel, "rb") as b:
                assert a.read() == b.read(), rel
    assert (tmp_path / "lin" / "assets").is_dir()  # the empty directory too
    uri = models.get_version("linear", 1).uri
    assert os.path.basename(uri.rstrip("/")) == got.sha256[:16]  # UploadModel's tree hash
    again = models.download("linear", str(tmp_path / "lin"), version=1)
    assert again.already_there

    models.deploy("linear", str(tmp_path / "lin"), version=2, cpu="100m", memory="1Gi", wait=True,
                  timeout=LOAD_TIMEOUT)
    one = models.predict("linear", inputs=LINEAR_INPUTS, version=1, rest_endpoint=rest(stack))
    two = models.predict("linear", inputs=LINEAR_INPUTS, version=2, rest_endpoint=rest(stack))
    assert one["prediction"].tolist() == two["prediction"].tolist()
    models.delete_version("linear", 2)


class _Cut(Exception):
    pass


def test_interrupted_download_resumes_and_sha256_catches_a_corrupted_file(team, deployed, tmp_path):
    """A download cut inside the 5 MiB file leaves only `.NAME.part` (no
    directory that looks whole); the same call again resumes from the bytes
    it has, and a file changed on disk meanwhile is caught by its SHA-256 and
    fetched again; the result is complete and verified."""
    models = deployed
    target = str(tmp_path / "model")
    seen = []

    def cut_at(limit):
        def progress(done, total):
            seen.append(done)
            if done > limit:
                raise _Cut()
        return progress

    with pytest.raises(_Cut):
        models.download("linear", target, version=1, progress=cut_at(2 << 20))
    part = part_dir(target)
    assert not os.path.exists(target) and os.path.isfile(os.path.join(part, MANIFEST_FILE))
    padding = os.path.join(part, "assets.extra", "padding.bin")
    assert 2 << 20 < os.path.getsize(padding) < 5 << 20  # cut inside the file
    # Bounded chunks: at most 1 MiB between progress calls.
    assert all(b - a <= 1 << 20 for a, b in zip(seen, seen[1:]))

    # Again, cut after the 5 MiB file is complete (within the next file).
    with pytest.raises(_Cut):
        models.download("linear", target, version=1, progress=cut_at(5 << 20))
    assert os.path.getsize(padding) == 5 << 20 and not os.path.exists(target)
    # Corrupt the complete file (same size, other bytes): its SHA-256 tells.
    with open(padding, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))

    got = models.download("linear", target, version=1)
    assert got.resumed_bytes >= 5 << 20 and got.refetched == ["assets.extra/padding.bin"]
    assert not os.path.exists(part) and os.path.getsize(os.path.join(target, "assets.extra", "padding.bin")) == 5 << 20
    from cloudml.download import verify_tree  # noqa: PLC0415 - the check the download made

    manifest = {"files": [{"path": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256} for f in next(iter(
        deployed._stub.DownloadVersion(pb.DownloadVersionRequest(model="linear", version=1, manifest_only=True),
                                       metadata=team.md, timeout=10))).manifest.files]}
    assert verify_tree(target, manifest) == []


# --- the CLI ----------------------------------------------------------------------------------

def cli(stack, tenant, *argv: str, cwd: str = ROOT, timeout: float = 180) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDML_")}
    env.update(CLOUDML_ENDPOINT=stack.gateway.address, CLOUDML_ACCESS_KEY=tenant.client.access_key_id,
               CLOUDML_SECRET_KEY=tenant.client.secret_key, CLOUDML_CONFIG=os.path.join(stack.workdir, "none.json"),
               PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "cloudml.cli.main", *argv], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_cli_export_describe_download(stack, team, deployed, tmp_path):
    """`cloudml models export|describe|download` as a user runs them."""
    # The first test made this export (made here when run alone): asking again answers it at once.
    deployed.wait_export("hp", 1, deployed.export("hp", 1, optimize="float16").id, timeout=EXPORT_TIMEOUT)
    exported = cli(stack, team, "models", "export", "hp", "-v", "1", "--format", "tflite", "--optimize", "float16",
                   "--wait", "-o", "json")
    assert exported.code == 0, exported.err
    data = exported.json()
    assert data["export"]["id"] == "tflite-float16" and data["export"]["state"] == "EXPORT_STATE_SUCCEEDED"
    assert data["created"] is False and "exists (SUCCEEDED)" in exported.err
    text = cli(stack, team, "models", "describe", "hp")
    assert text.code == 0 and "Artifacts:" in text.out, text.out
    row = next(line for line in text.out.splitlines() if " tflite-float16 " in f" {line} ")
    assert "SUCCEEDED" in row and "optimize=float16" in row and data["export"]["artifact"]["sha256"][:16] in row
    described = cli(stack, team, "models", "describe", "hp", "-o", "json").json()
    assert "tflite-float16" in [a["id"] for a in described["artifacts"]]

    got = cli(stack, team, "models", "download", "hp", "-v", "1", "--artifact", "tflite-float16", cwd=str(tmp_path))
    assert got.code == 0 and "SHA-256 verified" in got.out, got.err
    assert (tmp_path / "hp-v1-tflite-float16" / "model.tflite").stat().st_size == \
        int(data["export"]["artifact"]["size_bytes"])
    saved = cli(stack, team, "models", "download", "hp", "-v", "1", "-d", str(tmp_path / "sm"), "-o", "json")
    assert saved.code == 0 and saved.json()["files"] >= 2 and (tmp_path / "sm" / "saved_model.pb").is_file()

    # A download cut short (here by the SDK, as Ctrl-C would) is resumed by the CLI.
    with pytest.raises(_Cut):
        deployed.download("linear", str(tmp_path / "lin"), version=1,
                          progress=lambda done, total: (_ for _ in ()).throw(_Cut()) if done > 1 << 20 else None)
    resumed = cli(stack, team, "models", "download", "linear", "-v", "1", "-d", str(tmp_path / "lin"))
    assert resumed.code == 0 and "SHA-256 verified" in resumed.out, resumed.err
    assert "resumed: " in resumed.err and not os.path.exists(part_dir(str(tmp_path / "lin")))
    again = cli(stack, team, "models", "download", "linear", "-v", "1", "-d", str(tmp_path / "lin"))
    assert again.code == 0 and "already holds" in again.out, again.out

    bad = cli(stack, team, "models", "export", "hp", "-v", "1", "--optimize", "int4")
    assert bad.code != 0 and "unknown optimization 'int4'" in bad.err, bad.err
    bad = cli(stack, team, "models", "export", "hp", "-v", "1", "--format", "onnx")
    assert bad.code != 0 and "unknown export format 'onnx'" in bad.err, bad.err
    missing = cli(stack, team, "models", "download", "nope", "-v", "1", "-d", str(tmp_path / "x"))
    assert missing.code == 1 and missing.err.startswith("error: NOT_FOUND"), missing.err


def test_console_lists_artifacts_and_downloads_them_for_their_tenant_only(stack, team, deployed):
    """The console's models endpoint lists each version's artifacts; its
    download link streams the file with the cookie's token, so another
    tenant's member gets 404 and no cookie 401."""
    export = deployed.export("hp", 1, optimize="float16")  # the first test's export, or made here
    export = deployed.wait_export("hp", 1, export.id, timeout=EXPORT_TIMEOUT)

    def get(path: str, token: str | None):
        headers = {"Cookie": f"cloudml_page={token}"} if token else {}
        request = urllib.request.Request(f"{rest(stack)}{path}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    status, _, body = get("/ui/api/models", team.client.token)
    assert status == 200, body
    [hp] = [m for m in json.loads(body)["models"] if m["name"] == "hp"]
    [v1] = hp["versions"]
    assert "tflite-float16" in [a["id"] for a in v1["artifacts"]]
    path = "/ui/api/models/hp/versions/1/artifacts/tflite-float16"
    status, headers, data = get(path, team.client.token)
    assert status == 200 and len(data) == export.size_bytes
    assert hashlib.sha256(data).hexdigest() == export.sha256 == headers["X-Content-SHA256"]
    assert headers["Content-Disposition"] == 'attachment; filename="hp-v1-tflite-float16-model.tflite"'
    other = stack.new_tenant()
    assert get(path, other.client.token)[0] == 404
    assert get(path + f"?tenant={team.name}", other.client.token)[0] == 404
    assert get(path, None)[0] == 401
    assert get("/ui/api/models/hp/versions/1/artifacts/nope", team.client.token)[0] == 404


# --- restarts ------------------------------------------------------------------------------------

def test_export_survives_a_models_service_restart(stack, team, deployed):
    """The models service and the export process killed (SIGKILL) while an
    export runs: the next leader finds the record RUNNING and the process
    gone without an answer, and starts a second attempt; the export
    SUCCEEDS, its quota released."""
    models = deployed
    export = models.export("linear", 1, optimize="float16")
    wait_for(lambda: models.get_export("linear", 1, export.id).state == "RUNNING", EXPORT_TIMEOUT,
             "export RUNNING", interval=0.05)
    # It runs as the tenant's own user, as model servers do (services/common/tenancy.py).
    # (RUNNING is written just before the process starts.)
    [record] = wait_for(lambda: [r for r in stack.runtime_records() if r.get("replica_id", "").startswith("exports.")
                                 and r.get("pid")], 30, "the export's runtime record", interval=0.05)
    if os.geteuid() == 0:
        account = pwd.getpwnam(tenancy.account_name(team.name))

        def uids() -> set[int]:
            with open(f"/proc/{record['pid']}/status") as f:
                return set(map(int, next(line for line in f if line.startswith("Uid:")).split()[1:]))

        # The first moments are setpriv's, still root, until it switches and execs the converter.
        assert wait_for(lambda: uids() if uids() != {0} else None, 10, "setpriv's switch",
                        interval=0.01) == {account.pw_uid}
    # The service dies, and the converter with it before it answers (as an OOM kill would).
    stack.models.kill()
    os.kill(record["pid"], signal.SIGKILL)
    stack.start_models()
    done = models.wait_export("linear", 1, export.id, timeout=EXPORT_TIMEOUT)
    assert done.state == "SUCCEEDED" and done.proto.attempts == 2, done.proto
    def usage_cpu():
        return stack.auth.admin.call("GetQuota", auth_pb.GetQuotaRequest(tenant=team.name)).usage.cpu_millis

    # Replicas hold 100m each, an export 500m while it runs: none is held any more.
    wait_for(lambda: usage_cpu() < 500, 20, "the export's quota released")
