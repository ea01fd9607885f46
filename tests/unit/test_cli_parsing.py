"""The `cloudml` CLI without a platform: argument parsing, unit conversion at
the command line, usage and configuration errors (one line, exit 2), the
config file, output formatting, and how the SDK resolves credentials and maps
gRPC errors."""
from __future__ import annotations

import io
import json
import os
import socket
import stat

import grpc
import pytest

from cloudml import config, errors
from cloudml.cli import base
from cloudml.cli.main import build_parser, main
from cloudml.common.v1.resources_pb2 import Resources


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No credentials from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("CLOUDML_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CLOUDML_CONFIG", str(tmp_path / "config.json"))


def parse(*argv):
    return build_parser().parse_args(list(argv))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


# --- parsing ------------------------------------------------------------------------


def test_output_option_is_accepted_before_and_after_the_subcommand():
    assert parse("tenants", "list").output == "table"
    assert parse("-o", "json", "tenants", "list").output == "json"
    assert parse("tenants", "list", "-o", "json").output == "json"
    assert parse("quota", "get", "--output", "json", "--tenant", "a").output == "json"
    assert parse("-o", "json", "tenants", "list", "-o", "table").output == "table"


def test_every_leaf_command_takes_output_option():
    for argv in (["configure", "--endpoint", "x"], ["auth", "print-access-token"], ["auth", "whoami"],
                 ["tenants", "create", "a"], ["tenants", "list"], ["tenants", "describe", "a"],
                 ["tenants", "delete", "a"], ["keys", "create"], ["keys", "list"], ["keys", "revoke", "AK"],
                 ["quota", "get"], ["quota", "set", "--gpus", "1"]):
        args = parse(*argv, "-o", "json")
        assert args.output == "json" and callable(args.handler), argv


def test_quota_set_parses_human_units():
    args = parse("quota", "set", "--tenant", "team-a", "--cpu", "0.5", "--memory", "100M", "--gpus", "2",
                 "--train-jobs", "3", "--model-replicas", "4", "--studies", "5", "--dev-environments", "6",
                 "--tensorboards", "7")
    assert (args.tenant, args.cpu, args.memory, args.gpus) == ("team-a", 500, 100 * 10**6, 2)
    assert (args.train_jobs, args.model_replicas, args.studies) == (3, 4, 5)
    assert (args.dev_environments, args.tensorboards) == (6, 7)
    args = parse("quota", "set", "--cpu", "500m", "--memory", "1Gi")
    assert (args.tenant, args.cpu, args.memory, args.gpus) == (None, 500, 2**30, None)


def test_keys_and_tenants_arguments():
    args = parse("keys", "create", "--tenant", "t", "--description", "ci")
    assert (args.tenant, args.description) == ("t", "ci")
    assert parse("keys", "create").tenant is None
    args = parse("keys", "revoke", "AKX", "--tenant", "t")
    assert (args.access_key_id, args.tenant) == ("AKX", "t")
    args = parse("tenants", "create", "team-a", "--description", "Team A")
    assert (args.name, args.description) == ("team-a", "Team A")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["quota", "set", "--cpu", "abc"], "invalid CPU 'abc'"),
        (["quota", "set", "--memory", "100m"], "did you mean 100M"),
        (["quota", "set", "--memory=-1G"], "must not be negative"),
        (["quota", "set", "--gpus", "1.5"], "gpus"),
        (["tenants"], "required"),
        (["tenants", "create"], "required"),
        (["nosuch"], "invalid choice"),
        (["tenants", "list", "-o", "yaml"], "invalid choice"),
        (["keys", "revoke"], "required"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(capsys, argv, fragment):
    assert fragment in usage_error(capsys, *argv)


def test_no_command_is_a_usage_error(capsys):
    usage_error(capsys)


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("cloudml ")


def test_quota_set_without_fields_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setenv("CLOUDML_ACCESS_KEY", "AK")
    monkeypatch.setenv("CLOUDML_SECRET_KEY", "s")
    code, out, err = run(capsys, "quota", "set", "--tenant", "t")
    assert code == 2 and out == ""
    assert err.startswith("error: nothing to set") and err.count("\n") == 1


# --- credentials and failures before any server answers -------------------------------


def test_missing_credentials_exit_2_with_hint(capsys):
    code, out, err = run(capsys, "tenants", "list")
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert "no credentials" in err and "cloudml configure" in err and "CLOUDML_ACCESS_KEY" in err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_is_one_clean_line(capsys, monkeypatch):
    endpoint = f"127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("CLOUDML_ENDPOINT", endpoint)
    monkeypatch.setenv("CLOUDML_ACCESS_KEY", "AK")
    monkeypatch.setenv("CLOUDML_SECRET_KEY", "s")
    code, out, err = run(capsys, "auth", "whoami", "-o", "json")
    assert code == 1 and out == ""
    assert err.startswith(f"error: cannot reach the platform at {endpoint}: ") and err.count("\n") == 1
    assert "Traceback" not in err


# --- configure ----------------------------------------------------------------------


def test_configure_writes_0600_file_and_merges(capsys, tmp_path):
    path = tmp_path / "config.json"
    code, out, _ = run(capsys, "configure", "--endpoint", "10.0.0.1:8500", "--access-key", "AK1",
                       "--secret-key", "sk1", "-o", "json", "--no-verify")
    assert code == 0
    shown = json.loads(out)
    assert shown == {"config_path": str(path), "endpoint": "10.0.0.1:8500", "rest_endpoint": "", "access_key": "AK1"}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text()) == {"endpoint": "10.0.0.1:8500", "access_key": "AK1", "secret_key": "sk1"}
    # Only what is given changes.
    assert run(capsys, "configure", "--secret-key", "sk2", "--no-verify")[0] == 0
    assert json.loads(path.read_text()) == {"endpoint": "10.0.0.1:8500", "access_key": "AK1", "secret_key": "sk2"}
    assert "sk2" not in capsys.readouterr().out


def test_configure_from_platform_credentials_file(capsys, tmp_path):
    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({"endpoint": "127.0.0.1:8500", "rest_endpoint": "http://127.0.0.1:8501",
                                 "access_key": "AKADMIN", "secret_key": "top"}))
    code, out, _ = run(capsys, "configure", "--from-file", str(creds), "--no-verify")
    assert code == 0 and "AKADMIN" in out and "top" not in out
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == json.loads(creds.read_text())


def test_configure_bad_from_file_is_a_config_error(capsys, tmp_path):
    code, _, err = run(capsys, "configure", "--from-file", str(tmp_path / "missing.json"))
    assert code == 2 and err.startswith("error: cannot read") and err.count("\n") == 1


def test_configure_without_options_and_no_terminal_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, _, err = run(capsys, "configure")
    assert code == 2 and "nothing to configure" in err


def test_resolve_precedence_argument_env_file(monkeypatch, tmp_path):
    path = tmp_path / "config.json"
    config.write_config({"endpoint": "file:1", "access_key": "AKF", "secret_key": "sf"}, str(path))
    creds = config.resolve()
    assert (creds.endpoint, creds.access_key, creds.secret_key) == ("file:1", "AKF", "sf")
    monkeypatch.setenv("CLOUDML_ACCESS_KEY", "AKE")
    monkeypatch.setenv("CLOUDML_SECRET_KEY", "se")
    creds = config.resolve()
    assert (creds.endpoint, creds.access_key, creds.secret_key) == ("file:1", "AKE", "se")
    creds = config.resolve("arg:2", "AKA", "sa")
    assert (creds.endpoint, creds.access_key, creds.secret_key) == ("arg:2", "AKA", "sa")
    path.unlink()
    assert config.resolve().endpoint == config.DEFAULT_ENDPOINT


def test_corrupt_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(errors.ConfigurationError, match="cannot read config file"):
        config.resolve()


def test_client_construction_needs_no_server(monkeypatch):
    from cloudml import Client

    client = Client("127.0.0.1:1", "AK", "s", timeout=2)
    assert client.endpoint == "127.0.0.1:1" and client.timeout == 2.0
    client.close()


# --- output -------------------------------------------------------------------------


def test_table_columns_are_aligned_with_headers():
    out = io.StringIO()
    base.print_table(["NAME", "DESCRIPTION"], [["a", "first"], ["long-name", ""]], out)
    lines = out.getvalue().splitlines()
    assert lines == ["NAME       DESCRIPTION", "a          first", "long-name  -"]


def test_message_json_has_every_field_in_proto_order():
    data = base.message_to_dict(Resources(cpu_millis=500, studies=2))
    assert list(data) == ["cpu_millis", "memory_bytes", "gpus", "train_jobs", "model_replicas", "studies",
                          "dev_environments", "tensorboards"]
    assert data["cpu_millis"] == "500" and data["gpus"] == "0"


# --- gRPC errors as typed SDK errors --------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details, trailers=()):
        self._code, self._details, self._trailers = code, details, trailers

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


@pytest.mark.parametrize(
    "code, cls",
    [
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists),
        (grpc.StatusCode.ABORTED, errors.Aborted),
        (grpc.StatusCode.INTERNAL, errors.Internal),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
    ],
)
def test_rpc_errors_map_to_typed_errors(code, cls):
    err = errors.from_rpc_error(FakeRpcError(code, "boom"))
    assert type(err) is cls and err.code == code.name and err.message == "boom"
    assert str(err) == f"{code.name}: boom"


def test_quota_busy_is_told_apart_by_its_trailer():
    busy = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "later",
                                              (("cloudml-retry", "quota"),)))
    assert isinstance(busy, errors.QuotaBusy) and isinstance(busy, errors.FailedPrecondition)
    plain = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "no"))
    assert type(plain) is errors.FailedPrecondition


def test_connect_failure_is_connection_failed():
    err = errors.from_rpc_error(
        FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: "
                     "ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused"),
        "127.0.0.1:1",
    )
    assert isinstance(err, errors.ConnectionFailed)
    assert str(err) == "cannot reach the platform at 127.0.0.1:1: Connection refused"


def test_dev_create_parses_sizes_and_open_may_skip_the_browser():
    args = parse("dev", "create", "nb", "--cpu", "2", "--memory", "4Gi", "--gpus", "1", "--no-wait")
    assert (args.name, args.cpu, args.memory, args.gpus, args.image, args.wait) == ("nb", 2000, 4 << 30, 1, "", False)
    assert parse("dev", "open", "nb", "--no-browser").browser is False
    for command in ("stop", "start", "delete", "describe"):
        assert parse("dev", command, "nb", "--tenant", "acme").tenant == "acme"
