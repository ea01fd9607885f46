"""`cloudml models ...` as a user runs it (`python -m cloudml.cli.main`),
against the models service as a real process with the real auth service, a
real gateway and real model-server replicas, under a key namespace of their
own on the session's etcd (tests/integration/models_stack.py): create and
wait, list, describe, label, scale, predict, delete.
"""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from tests.integration.cli_result import Result
from tests.integration.models_stack import LOAD_TIMEOUT, ROOT, Tenant, open_stack, set_replica_quota


@pytest.fixture(scope="module")
def stack(tmp_path_factory, etcd_server, half_plus_two):
    with open_stack(str(tmp_path_factory.mktemp("models-cli")), etcd_server.endpoint, half_plus_two) as stack:
        yield stack


def cli(stack, tenant: Tenant, *argv: str, rest_endpoint: str = "", timeout: float = 120) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDML_")}
    env.update(CLOUDML_ENDPOINT=stack.gateway.address, CLOUDML_ACCESS_KEY=tenant.client.access_key_id,
               CLOUDML_SECRET_KEY=tenant.client.secret_key, CLOUDML_CONFIG=os.path.join(stack.workdir, "none.json"),
               CLOUDML_REST_ENDPOINT=rest_endpoint or f"http://127.0.0.1:{stack.rest_port}")
    proc = subprocess.run([sys.executable, "-m", "cloudml.cli.main", *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_cli_create_wait_exits_1_short_of_the_requested_replicas(stack):
    """`models create --replicas 2 --wait` with quota for one replica: it shows
    replicas becoming ready and fails when the timeout passes at 1 of 2, rather
    than reporting success with half the replicas."""
    tenant = stack.new_tenant()
    set_replica_quota(stack, tenant.name, 1)
    waited = cli(stack, tenant, "models", "create", "-n", "half", "-v", "v1", "-u", stack.saved_model,
                 "--cpu", "100m", "--memory", "1Gi", "--replicas", "2", "--wait", "--timeout", "20")
    assert waited.code == 1, (waited.out, waited.err)
    assert "0/2 replicas ready" in waited.err and "1/2 replicas ready" in waited.err, waited.err
    assert "DEADLINE_EXCEEDED" in waited.err and "1 of 2 replicas ready" in waited.err, waited.err
    set_replica_quota(stack, tenant.name, 2)
    again = cli(stack, tenant, "models", "create", "-n", "half", "-v", "v1", "-u", stack.saved_model,
                "--cpu", "100m", "--memory", "1Gi", "--replicas", "2", "--wait", "--timeout", str(LOAD_TIMEOUT))
    assert again.code == 0 and "2/2 replicas ready" in again.err, (again.out, again.err)


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                "body": json.loads(body)})
        answer = json.dumps({"outputs": [[7.0], [17.0]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_cli_create_list_describe_label_scale_predict_delete(stack, tmp_path):
    tenant = stack.new_tenant()
    # A local directory: the CLI uploads it into the tenant's storage.
    created = cli(stack, tenant, "models", "create", "-n", "linear", "-v", "v1", "-u", stack.saved_model,
                  "--cpu", "100m", "--memory", "1Gi", "--wait", "--timeout", str(LOAD_TIMEOUT), "-o", "json")
    data = created.json()
    assert data["created"] is True
    version = data["model_version"]
    assert version["state"] == "MODEL_VERSION_STATE_AVAILABLE" and version["version"] == "1"
    # Uploaded through the API (ModelsService.UploadModel), stored by content hash in the tenant's storage.
    models_dir = stack.storage(tenant.name, "models", "linear")
    stored = version["model_uri"][len("file://"):].rstrip("/")
    assert version["model_uri"].startswith(f"file://{models_dir}/") and os.path.dirname(stored) == models_dir
    assert os.path.isfile(os.path.join(stored, "saved_model.pb"))
    # Again: same upload, same spec -> the existing version.
    again = cli(stack, tenant, "models", "create", "-n", "linear", "-v", "1", "-u", stack.saved_model,
                "--cpu", "100m", "--memory", "1Gi", "-o", "json").json()
    assert again["created"] is False

    listed = cli(stack, tenant, "models", "list", "-o", "json").json()
    assert [m["name"] for m in listed] == ["linear"]
    table = cli(stack, tenant, "models", "list")
    assert table.code == 0 and table.out.splitlines()[0].split()[:2] == ["NAME", "PUBLIC"]
    assert "v1 AVAILABLE 1/1" in table.out.splitlines()[1], table.out  # each model's state, not "-"

    labelled = cli(stack, tenant, "models", "label", "linear", "stable", "v1", "-o", "json").json()
    assert labelled["labels"] == {"stable": "1"}
    bad = cli(stack, tenant, "models", "label", "linear", "canary", "5")
    assert bad.code == 1 and bad.err.startswith("error: FAILED_PRECONDITION")

    scaled = cli(stack, tenant, "models", "scale", "linear", "1", "--min", "1", "--max", "2", "-o", "json").json()
    assert (scaled["min_replicas"], scaled["max_replicas"]) == (1, 2)

    described = cli(stack, tenant, "models", "describe", "linear", "-o", "json").json()
    assert described["model"]["labels"] == {"stable": "1"}
    assert [(v["version"], v["state"]) for v in described["model_versions"]] == [("1", "MODEL_VERSION_STATE_AVAILABLE")]
    text = cli(stack, tenant, "models", "describe", "linear")
    assert text.code == 0 and "stable=1" in text.out and "AVAILABLE" in text.out
    versions = cli(stack, tenant, "models", "versions", "list", "linear", "-o", "json").json()
    assert [v["version"] for v in versions] == ["1"]

    # predict: the seed's format becomes TF Serving's columnar JSON, POSTed with the token.
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps({"keys_dtype": "int32", "keys": [[1], [2]], "X_dtype": "float32",
                                     "X": [[10], [30.0]]}))
    _RecordingHandler.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        answer = cli(stack, tenant, "models", "predict", "linear", "v1", "-d", str(data_file), "-o", "json",
                     rest_endpoint=f"http://127.0.0.1:{server.server_address[1]}").json()
    finally:
        server.shutdown()
    assert answer == {"outputs": [[7.0], [17.0]]}
    [seen] = _RecordingHandler.seen
    assert seen["path"] == "/v1/models/linear/versions/1:predict"
    assert seen["auth"].startswith("Bearer ") and seen["auth"].count(".") == 2
    assert seen["body"] == {"inputs": {"keys": [[1], [2]], "X": [[10.0], [30.0]]}}

    deleted = cli(stack, tenant, "models", "delete", "linear", "--wait", "--timeout", "60", "-o", "json").json()
    assert deleted["deleted"] is True
    assert cli(stack, tenant, "models", "list", "-o", "json").json() == []
    missing = cli(stack, tenant, "models", "describe", "linear")
    assert missing.code == 1 and missing.err.startswith("error: NOT_FOUND")


def test_cli_predict_through_the_gateway(stack, tmp_path):
    """Predict over the gateway's REST API, end to end (needs the gateway's
    TF Serving REST side)."""
    tenant = stack.new_tenant()
    cli(stack, tenant, "models", "create", "-n", "hp", "-u", stack.saved_model, "--cpu", "100m", "--memory", "1Gi",
        "--wait", "--timeout", str(LOAD_TIMEOUT), "-o", "json").json()
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps({"X_dtype": "float32", "x": [[1.0], [2.0]]}).replace('"X_dtype"', '"x_dtype"'))
    try:
        result = cli(stack, tenant, "models", "predict", "hp", "-d", str(data_file), "-o", "json")
        assert result.code == 0, result.err
        assert result.json() == {"outputs": [[2.5], [3.0]]}
    finally:
        cli(stack, tenant, "models", "delete", "hp", "--wait", "--timeout", "60")
