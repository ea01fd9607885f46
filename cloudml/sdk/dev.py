"""`client.dev`: dev environments, JupyterLab servers of the tenant
(DevEnvironmentService through the gateway).

    env = client.dev.create("nb", cpu="2", memory="4Gi")   # waits until it runs
    print(client.dev.login_link("nb"))                     # a one-time browser login link (about a minute)
    client.dev.stop("nb")                                   # frees its CPU, memory and GPUs; its files stay
    client.dev.start("nb")
    client.dev.delete("nb")                                 # its notebooks stay in the tenant's storage

Each runs as a replica of the tenant (it holds CPU, memory and GPUs of the
quota while it runs, and one of its `dev_environments` while it exists),
reached only through the gateway's HTTP port at /dev/<tenant>/<name>/ after
logging in with a link. Idle for the platform's idle time (default 4 h), it
is stopped.
"""
from __future__ import annotations

from cloudml import errors
from cloudml.sdk.base import Group, wait_running
from cloudml.sdk.types import DevEnvironment

#: how long `create` and `start` wait for a dev environment to run, by default
WAIT_TIMEOUT = 180.0


def _pb():
    from cloudml.jobs.v1 import dev_environments_pb2

    return dev_environments_pb2


class DevEnvironments(Group):
    """Dev environments of the caller's tenant (or, for an admin, of `tenant=`)."""

    _service = ("dev_environments_pb2_grpc", "DevEnvironmentServiceStub")

    def create(self, name: str, *, cpu=None, memory=None, gpus=None, image: str = "", tenant: str | None = None,
               wait: bool = True, wait_timeout: float = WAIT_TIMEOUT) -> DevEnvironment:
        """Creates and starts a dev environment. `cpu` ("2", "500m"),
        `memory` ("4Gi") and `gpus` default to the platform's (1 CPU, 2Gi);
        `image` is an image to run (the kubernetes runtime only).

        With `wait=True` it returns once its server runs (see `wait`).
        SpecError (an InvalidArgument) for a malformed amount, before anything
        is sent; AlreadyExists when `name` is taken; ResourceExhausted over
        the quota.
        """
        from cloudml.client import make_resources  # noqa: PLC0415

        try:
            resources = make_resources(cpu=cpu, memory=memory, gpus=gpus)
        except ValueError as err:
            raise errors.SpecError(str(err)) from None
        request = _pb().CreateDevEnvironmentRequest(tenant=tenant or "", name=name, image=image or "",
                                                    resources=resources)
        env = DevEnvironment(self._rpc("CreateDevEnvironment", request).dev_environment)
        return self.wait(env, timeout=wait_timeout) if wait else env

    def get(self, name: str, *, tenant: str | None = None) -> DevEnvironment:
        """The dev environment `name`. NotFound when there is none."""
        request = _pb().GetDevEnvironmentRequest(tenant=tenant or "", name=name)
        return DevEnvironment(self._rpc("GetDevEnvironment", request).dev_environment)

    def list(self, *, tenant: str | None = None) -> list[DevEnvironment]:
        """Every dev environment of the tenant."""
        resp = self._rpc("ListDevEnvironments", _pb().ListDevEnvironmentsRequest(tenant=tenant or ""))
        return [DevEnvironment(e) for e in resp.dev_environments]

    def stop(self, name: str, *, tenant: str | None = None) -> DevEnvironment:
        """Stops its server (its CPU, memory and GPUs are freed; its files
        stay) and returns it, STOPPING or STOPPED."""
        request = _pb().StopDevEnvironmentRequest(tenant=tenant or "", name=name)
        return DevEnvironment(self._rpc("StopDevEnvironment", request).dev_environment)

    def start(self, name: str, *, tenant: str | None = None, wait: bool = True,
              wait_timeout: float = WAIT_TIMEOUT) -> DevEnvironment:
        """Starts a stopped (or failed) dev environment again; `wait` as in `create`."""
        request = _pb().StartDevEnvironmentRequest(tenant=tenant or "", name=name)
        env = DevEnvironment(self._rpc("StartDevEnvironment", request).dev_environment)
        return self.wait(env, timeout=wait_timeout) if wait else env

    def delete(self, name: str, *, tenant: str | None = None) -> None:
        """Deletes the dev environment (its notebooks stay in the tenant's storage)."""
        self._rpc("DeleteDevEnvironment", _pb().DeleteDevEnvironmentRequest(tenant=tenant or "", name=name))

    def wait(self, env: DevEnvironment | str, *, tenant: str | None = None,
             timeout: float = WAIT_TIMEOUT) -> DevEnvironment:
        """Polls the dev environment (a name or a `DevEnvironment`) while it
        is STARTING and returns it once RUNNING. FailedPrecondition when it
        FAILED or stopped (its message says why) or still starts after
        `timeout` seconds."""
        if isinstance(env, str):
            env = self.get(env, tenant=tenant)
        return wait_running(env, lambda e: self.get(e.name, tenant=e.tenant), "dev environment", timeout)

    def login_link(self, env: DevEnvironment | str, *, tenant: str | None = None) -> str:
        """A one-time browser login link (valid about a minute; it works once)
        that opens the dev environment (a name or a `DevEnvironment`) in a
        browser. FailedPrecondition when it is not RUNNING."""
        if isinstance(env, str):
            env = self.get(env, tenant=tenant)
        if not env.running:
            hint = f": start it with `cloudml dev start {env.name}`" if env.state in ("STOPPED", "FAILED") else ""
            raise errors.FailedPrecondition(
                f"dev environment {env.name} is {env.state.lower()}" + (f" ({env.message})" if env.message else "")
                + hint, code="FAILED_PRECONDITION")
        return self._client.login_link(env.path)
