"""A whole platform for the serving tests (conformance and end to end),
driven through the `cloudml` CLI and the `cloudml.Client` SDK exactly as a
user would (`PlatformClient`):

- `ServingPlatform`: a local one, started with `cloudml-platform up --detach`
  on free ports in a temporary data dir and always stopped with
  `cloudml-platform down`;
- `RemotePlatform`: one that runs already (pytest `--endpoint HOST:PORT
  --credentials FILE`, tests/conftest.py), with the same client methods; its
  `start()`, `wait_up()` and `down()` start and stop nothing. Tests that kill
  or inspect the platform's processes or files are marked
  `needs_local_platform` and are deselected then. Files the platform writes
  for a tenant (a job's output) are read where the tenant's storage is, so
  the platform must run on this machine, as this user.

The serving tests get theirs from the `serving_platform` fixture
(tests/conftest.py), which picks one of the two.

Not a test module: tests/conformance/test_gateway_conformance.py and
tests/e2e/test_*.py import it as `tests.e2e.serving_platform`. It never
imports TensorFlow (see tests/conformance/test_model_server.py for why).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil

from deploy.local.etcd import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def _script(name: str, module: str) -> list[str]:
    path = os.path.join(BIN, name)
    return [path] if os.path.exists(path) else [sys.executable, "-m", module]


PLATFORM_CLI = _script("cloudml-platform", "deploy.local.launcher")
CLOUDML_CLI = _script("cloudml", "cloudml.cli.main")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any CLOUDML_* setting of the caller's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDML_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    """Polls `predicate` until it returns something truthy (returned)."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as err:  # noqa: BLE001 - kept for the failure message
            last_error = err
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                                 + (f" (last error: {last_error!r})" if last_error else ""))
        time.sleep(interval)


class PlatformClient:
    """A platform as a user reaches it: its credentials file (the admin's, as
    `cloudml-platform up` writes it, at `credentials_path`), the CLI, the SDK
    and REST. Config files of tenants it creates go to `config_dir`."""

    config_dir: str
    _clients: list

    def close_clients(self) -> None:
        for client in self._clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass
        self._clients.clear()

    # --- credentials ---------------------------------------------------------------------

    @property
    def credentials_path(self) -> str:
        return os.path.join(self.config_dir, "credentials.json")

    @property
    def credentials(self) -> dict:
        with open(self.credentials_path) as f:
            return json.load(f)

    @property
    def endpoint(self) -> str:
        return self.credentials["endpoint"]

    @property
    def rest_endpoint(self) -> str:
        return self.credentials["rest_endpoint"]

    def client(self, config_path: str | None = None):
        """A `cloudml.Client` for the admin (or the key in `config_path`)."""
        import cloudml

        client = cloudml.Client(config_path=config_path or self.credentials_path)
        self._clients.append(client)
        return client

    def new_tenant(self, name: str) -> str:
        """Creates tenant `name` with an access key; returns a config file
        (the credentials.json format) that logs in as it."""
        admin = self.client()
        admin.create_tenant(name)
        key = admin.create_access_key(name, description="tests")
        path = os.path.join(self.config_dir, f"credentials-{name}.json")
        with open(path, "w") as f:
            json.dump({"endpoint": self.endpoint, "rest_endpoint": self.rest_endpoint,
                       "access_key": key.access_key.access_key_id,
                       "secret_key": key.secret_key}, f)
        os.chmod(path, 0o600)
        return path

    # --- the CLI ---------------------------------------------------------------------------

    def cli(self, *args: str, config: str | None = None, check: bool = True, timeout: float = 300,
            cwd: str | None = None) -> subprocess.CompletedProcess:
        """Runs `cloudml ARGS` as the admin (or with the key in `config`)."""
        result = subprocess.run([*CLOUDML_CLI, *args], capture_output=True, text=True, timeout=timeout,
                                env=clean_env(CLOUDML_CONFIG=config or self.credentials_path), cwd=cwd or ROOT)
        if check:
            assert result.returncode == 0, f"cloudml {' '.join(args)} exited {result.returncode}:\n" \
                                           f"{result.stdout}\n{result.stderr}"
        return result

    def cli_json(self, *args: str, config: str | None = None, timeout: float = 300):
        return json.loads(self.cli(*args, "-o", "json", config=config, timeout=timeout).stdout)

    def token(self, config: str | None = None) -> str:
        return self.cli("auth", "print-access-token", config=config).stdout.strip()

    # --- REST, like curl ------------------------------------------------------------------------

    def rest(self, method: str, path: str, body=None, token: str | None = None, timeout: float = 30,
             endpoint: str | None = None):
        """(HTTP status, decoded JSON body) of one call to the gateway's REST port (or `endpoint`'s)."""
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request((endpoint or self.rest_endpoint) + path, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except ValueError:
                return err.code, raw.decode(errors="replace")


class ServingPlatform(PlatformClient):
    """One platform in `data_dir`; `start()` returns at once, `wait_up()` blocks.
    `env`: settings of its processes (e.g. CLOUDML_UPLOAD_MAX_BYTES);
    `up_args`: more flags of `cloudml-platform up`."""

    def __init__(self, data_dir: str, *, env: dict[str, str] | None = None, up_args: tuple[str, ...] = ()):
        self.data_dir = self.config_dir = data_dir
        self.env = env or {}
        self.up_args = tuple(up_args)
        self.grpc_port = free_port()
        self.rest_port = free_port()
        self._up: subprocess.Popen | None = None
        self._clients: list = []

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> "ServingPlatform":
        self._up = subprocess.Popen(
            [*PLATFORM_CLI, "up", "--data-dir", self.data_dir, "--grpc-port", str(self.grpc_port),
             "--rest-port", str(self.rest_port), "--detach", *self.up_args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(**self.env), cwd=ROOT,
        )
        return self

    def wait_up(self, timeout: float = 180) -> "ServingPlatform":
        out, err = self._up.communicate(timeout=timeout)
        assert self._up.returncode == 0, f"cloudml-platform up failed:\n{out}\n{err}"
        return self

    def down(self) -> None:
        self.close_clients()
        if self._up is not None and self._up.poll() is None:
            self._up.kill()
            self._up.wait()
        result = subprocess.run([*PLATFORM_CLI, "down", "--data-dir", self.data_dir], capture_output=True,
                                text=True, timeout=180, env=clean_env(), cwd=ROOT)
        assert result.returncode == 0, result.stdout + result.stderr
        # `down` stops the model-server replicas and dev-environment servers too (they run
        # under shims of their own, and may still be exiting when it returns).
        wait_until(lambda: not self.replica_processes() and not self.devenv_processes(), 30,
                   "no model-server or notebook-server process left after down")

    def start_gateway_copy(self, name: str, *flags: str):
        """Another gateway on this platform (its etcd, its services): the running
        gateway's command line with ports and files of its own, plus `flags`
        (e.g. "--dataplane-rest", "off"). Returns its ServiceProcess and REST
        endpoint; the caller stops it (`down` does not know it)."""
        from deploy.local.service_process import ServiceProcess

        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if "services.gateway" in cmd and any(self.data_dir in a for a in cmd):
                break
        else:
            raise AssertionError("no gateway process of this platform")
        rest = free_port()
        port_file = os.path.join(self.data_dir, f"{name}.port")
        own = {"--listen": "127.0.0.1:0", "--rest-listen": f"127.0.0.1:{rest}", "--port-file": port_file}
        command = [own.get(prev, arg) for prev, arg in zip(["", *cmd], cmd)]
        gateway = ServiceProcess(name, [*command, *flags], port_file,
                                 log_path=os.path.join(self.data_dir, f"{name}.log")).start().wait_serving(30)
        return gateway, f"http://127.0.0.1:{rest}"

    # --- model-server replicas ------------------------------------------------------------------

    def _processes(self, module: str, also=lambda cmd: True) -> list[psutil.Process]:
        """Live processes of `python -m module` with this platform's data dir in their command line."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if module not in cmd or not any(self.data_dir in a for a in cmd) or not also(cmd):
                continue
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.NoSuchProcess:
                pass
        return found

    def replica_processes(self, replica_id: str | None = None) -> list[psutil.Process]:
        """This platform's model-server processes (optionally one replica's)."""
        return self._processes("services.models.model_server", lambda cmd: replica_id is None or any(
            a.endswith(f".{replica_id}/port.json") for a in cmd))

    def devenv_processes(self) -> list[psutil.Process]:
        """This platform's dev-environment (notebook) server processes."""
        return self._processes("services.jobs.devenv_replica")

    def log(self, name: str) -> str:
        try:
            with open(os.path.join(self.data_dir, "logs", f"{name}.log")) as f:
                return f.read()
        except OSError:
            return ""


class RemotePlatform(PlatformClient):
    """A platform that runs already, reached at `endpoint` (gRPC) and
    `rest_endpoint` with the admin key of `credentials_file`; `workdir` (on
    this machine) takes the config files written for it."""

    def __init__(self, workdir: str, endpoint: str, credentials_file: str, rest_endpoint: str | None = None):
        with open(credentials_file) as f:
            credentials = json.load(f)
        rest_endpoint = rest_endpoint or credentials.get("rest_endpoint")
        if not rest_endpoint:
            raise ValueError(f"{credentials_file} names no rest_endpoint: give --rest-endpoint")
        credentials.update(endpoint=endpoint, rest_endpoint=rest_endpoint)
        os.makedirs(workdir, exist_ok=True)
        self.config_dir = workdir
        self._clients: list = []
        fd = os.open(self.credentials_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(credentials, f)

    def start(self) -> "RemotePlatform":
        return self

    def wait_up(self, timeout: float = 180) -> "RemotePlatform":
        return self

    def down(self) -> None:
        """Closes this side's clients; the platform runs on."""
        self.close_clients()
