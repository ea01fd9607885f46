"""A dev environment's record and settings (services.jobs.devenvs)."""
from __future__ import annotations

from dataclasses import dataclass

from cloudml.jobs.v1 import dev_environments_pb2 as pb
from services.common import errors
from services.jobs.page_records import PageRecord

RUNTIME_PREFIX = "devenv."

S = pb.DevEnvironmentState


@dataclass
class DevEnvSettings:
    data_dir: str
    python: str = ""
    #: the gateway's gRPC address written into the kernels' config (`cloudml.Client()`)
    endpoint: str = ""
    rest_endpoint: str = ""
    cpu_millis: int = 1000
    memory_bytes: int = 2 << 30
    idle_seconds: float = 4 * 3600.0
    pass_seconds: float = 1.0
    start_timeout: float = 90.0
    stop_grace: float = 3.0
    #: kubernetes runtime: the notebook server's port in its Pod
    port: int = 8888


@dataclass
class Env(PageRecord):
    """A dev environment's record (JSON in etcd)."""

    RUNTIME_PREFIX = RUNTIME_PREFIX
    OWNER_KIND = "devenv"
    PAGE_KIND = "dev"

    tenant: str
    name: str
    uid: str
    state: int = S.DEV_ENVIRONMENT_STATE_STARTING
    cpu_millis: int = 0
    memory_bytes: int = 0
    gpus: int = 0
    image: str = ""
    access_key_id: str = ""
    created: float = 0.0
    last_activity: float = 0.0
    started: float = 0.0
    address: str = ""
    message: str = ""
    #: False until create() holds its quota and key (the leader leaves it alone meanwhile)
    reserved: bool = True

    @property
    def run_owner_id(self) -> str:
        return f"{self.owner_id}/run"


def socket_name(env: Env) -> str:
    """At most 37 characters (see tensorboards.socket_name)."""
    return f"nb-{env.name[:20]}-{env.uid}.sock"


def quota_error(tenant: str, what: str, err: errors.CloudMLError) -> errors.CloudMLError:
    if isinstance(err, errors.QuotaBusy):
        return errors.FailedPrecondition(f"tenant {tenant!r} has no room now for {what}: {err.message} "
                                         "(stop a dev environment or a job first)")
    if isinstance(err, errors.ResourceExhausted):
        return errors.ResourceExhausted(f"tenant {tenant!r} is over its quota for {what}: {err.message}")
    return err
