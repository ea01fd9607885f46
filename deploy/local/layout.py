"""The files of one local platform under its data directory, and the
credentials written on its first start.

    DIR/                          0711: tenant code may pass through to its own directories, never list
    DIR/platform.json             the gateway ports and the etcd namespace (if any) of the services
    DIR/etcd/                     etcd's data: all platform state (0700)
    DIR/run/etcd/                 etcd's Unix sockets (client and peer; 0700: the platform's alone)
    DIR/bootstrap.json            keys the auth service registers on start (0600)
    DIR/service-credentials.json  the services' own key (0600)
    DIR/credentials.json          the admin's endpoint and key, for the CLI/SDK (0600)
    DIR/logs/<component>.log      etcd, every service and the supervisor
    DIR/run/<svc>.port            bound port of each service (written by the service)
    DIR/run/state.json            pids/addresses, written by the supervisor
    DIR/run/supervisor.pid        the supervisor's pid
    DIR/run/supervisor.lock       flock held by the supervisor for its whole life
"""
from __future__ import annotations

import json
import os
import secrets
import string
from dataclasses import dataclass

from services.common.tokens import new_secret_key

ADMIN_DESCRIPTION = "admin (cloudml-platform)"
SERVICES_DESCRIPTION = "platform services"
_BASE32 = string.ascii_uppercase + "234567"


@dataclass(frozen=True)
class Layout:
    root: str

    @classmethod
    def of(cls, data_dir: str) -> "Layout":
        return cls(os.path.abspath(os.path.expanduser(data_dir)))

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def etcd_dir(self) -> str:
        return self.path("etcd")

    @property
    def etcd_socket_dir(self) -> str:
        return self.path("run", "etcd")

    @property
    def logs_dir(self) -> str:
        return self.path("logs")

    @property
    def run_dir(self) -> str:
        return self.path("run")

    @property
    def config(self) -> str:
        return self.path("platform.json")

    @property
    def bootstrap(self) -> str:
        return self.path("bootstrap.json")

    @property
    def service_credentials(self) -> str:
        return self.path("service-credentials.json")

    @property
    def credentials(self) -> str:
        return self.path("credentials.json")

    @property
    def state(self) -> str:
        return self.path("run", "state.json")

    @property
    def pid_file(self) -> str:
        return self.path("run", "supervisor.pid")

    @property
    def lock_file(self) -> str:
        return self.path("run", "supervisor.lock")

    def log(self, component: str) -> str:
        return self.path("logs", f"{component}.log")

    def port_file(self, service: str) -> str:
        return self.path("run", f"{service}.port")

    def make_dirs(self) -> None:
        """The data dir is traversable (tenant code reaches its own gated
        directories below it) but not listable; what is the platform's
        alone (etcd, logs, run-time files, secrets) is 0700."""
        for d in (self.root, self.etcd_dir, self.logs_dir, self.run_dir):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.root, 0o711)
        for d in (self.etcd_dir, self.logs_dir, self.run_dir):
            os.chmod(d, 0o700)


def write_json(path: str, data, mode: int = 0o644) -> None:
    """Atomically replaces `path` (readers never see half a file)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    except BaseException:
        os.unlink(tmp)
        raise
    os.replace(tmp, path)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def new_access_key(description: str, tenant: str = "admin") -> dict:
    return {
        "access_key": "AK" + "".join(secrets.choice(_BASE32) for _ in range(20)),
        "secret_key": new_secret_key(),
        "tenant": tenant,
        "description": description,
    }


def ensure_credentials(layout: Layout, grpc_port: int, rest_port: int) -> bool:
    """Creates the keys on the first start (no bootstrap.json yet) and keeps
    the credential files in line with them; later starts keep the keys and
    only rewrite the endpoints when the gateway ports changed. Returns True
    on the first start."""
    first = not os.path.exists(layout.bootstrap)
    if first:
        keys = [new_access_key(ADMIN_DESCRIPTION), new_access_key(SERVICES_DESCRIPTION)]
        write_json(layout.bootstrap, {"keys": keys}, 0o600)
    bootstrap = read_json(layout.bootstrap)
    if not bootstrap or not isinstance(bootstrap.get("keys"), list):
        raise RuntimeError(f"{layout.bootstrap} is not valid JSON with a 'keys' list")
    by_description = {k.get("description"): k for k in bootstrap["keys"]}
    admin = by_description.get(ADMIN_DESCRIPTION)
    service = by_description.get(SERVICES_DESCRIPTION)
    if admin is None or service is None:
        raise RuntimeError(f"{layout.bootstrap} lacks the admin or the platform services key")

    service_creds = {"access_key": service["access_key"], "secret_key": service["secret_key"]}
    if read_json(layout.service_credentials) != service_creds:
        write_json(layout.service_credentials, service_creds, 0o600)

    creds = {
        "endpoint": f"127.0.0.1:{grpc_port}",
        "rest_endpoint": f"http://127.0.0.1:{rest_port}",
        "access_key": admin["access_key"],
        "secret_key": admin["secret_key"],
    }
    current = read_json(layout.credentials)
    if isinstance(current, dict) and current.get("access_key") == admin["access_key"]:
        # Keep whatever else a user put there; only the endpoints follow the ports.
        merged = {**current, "endpoint": creds["endpoint"], "rest_endpoint": creds["rest_endpoint"]}
        if merged != current:
            write_json(layout.credentials, merged, 0o600)
    else:
        write_json(layout.credentials, creds, 0o600)
    return first
