"""Dev environments on the `kubernetes` runtime: the notebook server as a Pod.

On a runtime whose replicas are Pods (`Runtime.reports_readiness`), a dev
environment's replica is a Pod of the platform's image (the jobs service's
`--image`, the trainer image, or the environment's own `--image`) running
`python -m services.jobs.devenv_replica --listen 0.0.0.0:PORT`, placed as a
train-job replica is: the runtime's capacity, requests = limits, GPUs as
`nvidia.com/gpu`, the tenant's labels, the tenant's directory of the
storage volume only (sub-path = tenant), mounted where the jobs service sees
it, so the notebooks' folder is the same `DIR/storage/<tenant>/` as on
`local`. HOME is the Pod's emptyDir (Jupyter's settings last one run).
The readiness probe is the port accepting; the environment is RUNNING, at
`http://POD_IP:PORT` (what the gateway's page proxy calls), while the Pod is
Ready, and back to STARTING (no address) while it is not.

Secrets: the environment's access key (the tenant's, made by create, kept by
the jobs service in DIR/devenvs/.../config.json, never in etcd) and its
Jupyter token reach the Pod through a Kubernetes Secret of the replica's
own (`ReplicaRequest.secret_env`, services.common.runtime.kube_secrets):
made before the Pod, named after the replica id, owned by its Service, deleted
with the Pod on stop and delete (a new one each start). The Pod refers to it
by `secretKeyRef`: its spec holds no secret. Why not the tenant's storage
directory: the tenant's files are the tenant's to share, copy and list,
and the token is, unlike on `local`, what keeps other Pods from using a
server that listens on TCP (the platform's NetworkPolicies, deploy/
kubernetes/base/network.yaml, let only the gateway and the jobs service
reach the port; the token still holds where they are not enforced). A
Secret is readable only by the platform's runtime account (RBAC) and the
kubelet, and `devenv_replica` drops the token from its environment before
any kernel starts. The access key reaches the kernels as
CLOUDML_ACCESS_KEY/CLOUDML_SECRET_KEY, the gateway's addresses as
CLOUDML_ENDPOINT/CLOUDML_REST_ENDPOINT (as `cloudml configure` would).
"""
from __future__ import annotations

import asyncio
import json
import os
from urllib.parse import urlsplit

from services.common.runtime.base import Amount, ReplicaRequest

#: The interpreter of the platform's images (as train-job and model Pods run it).
POD_PYTHON = "python"
POD_HOME = "/work"


def read_config(path: str) -> dict:
    """The env's config.json (endpoint, rest_endpoint, access_key, secret_key). Blocking."""
    with open(path) as f:
        return json.load(f)


def pod_request(env, settings, token: str, config: dict, log_path: str) -> ReplicaRequest:
    """The ReplicaRequest of an env's Pod."""
    port = int(settings.port)
    argv = [POD_PYTHON, "-m", "services.jobs.devenv_replica", "--listen", f"0.0.0.0:{port}",
            "--base-url", env.path, "--root-dir", os.path.join(settings.data_dir, "storage", env.tenant)]
    plain = {"PYTHONUNBUFFERED": "1", "HOME": POD_HOME, "TMPDIR": POD_HOME, "CLOUDML_TENANT": env.tenant,
             "TF_CPP_MIN_LOG_LEVEL": "2", "CLOUDML_ENDPOINT": config.get("endpoint", ""),
             "CLOUDML_REST_ENDPOINT": config.get("rest_endpoint", "")}
    secret = {"CLOUDML_ACCESS_KEY": config.get("access_key", ""), "CLOUDML_SECRET_KEY": config.get("secret_key", ""),
              "CLOUDML_JUPYTER_TOKEN": token}
    return ReplicaRequest(
        replica_id=env.replica_id, group=env.replica_id, argv=argv, env={k: v for k, v in plain.items() if v},
        secret_env={k: v for k, v in secret.items() if v}, workdir=POD_HOME, log_path=log_path,
        resources=Amount(cpu_millis=env.cpu_millis, memory_bytes=env.memory_bytes, gpus=env.gpus),
        image=env.image, tenant=env.tenant, role="notebook", serving_port=port)


async def _connect(address: str):
    if address.startswith("unix:"):
        return await asyncio.wait_for(asyncio.open_unix_connection(address[5:]), 1.0)
    where = urlsplit(address)
    if where.scheme != "http" or not where.hostname or not where.port:
        raise OSError(f"not a page server address: {address!r}")
    return await asyncio.wait_for(asyncio.open_connection(where.hostname, where.port), 1.0)


async def server_json(address: str, url_path: str, authorization: str):
    """GET `url_path` of a page server (`unix:PATH` or `http://HOST:PORT`)
    with that Authorization, decoded; None on any failure."""
    try:
        reader, writer = await _connect(address)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(f"GET {url_path} HTTP/1.0\r\nHost: devenv\r\n"
                     f"Authorization: {authorization}\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 3.0)  # HTTP/1.0: to the end
        return json.loads(raw.split(b"\r\n\r\n", 1)[1])
    except (OSError, asyncio.TimeoutError, IndexError, ValueError):
        return None
    finally:
        writer.close()
