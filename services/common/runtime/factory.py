"""The runtime a service's `--runtime` flag names, and where its state lives.

The jobs and models services both place their replicas through the runtime
`make_runtime()` builds. (Not in the package's `__init__`: the local
runtime's shim imports `services.common.runtime.shim` with no site packages
and must stay quick to start.)
"""
from __future__ import annotations

import os

from services.common.runtime.base import Amount, Runtime

RUNTIMES = ("local", "kubernetes")
#: Where a Pod finds its service account's token, CA and namespace (in-cluster
#: credentials); CLOUDML_SERVICE_ACCOUNT_DIR names another directory (tests).
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def runtime_state_dir(data_dir: str, kind: str) -> str:
    """The runtime's state under the platform's data directory. Shared by every
    service that places replicas on this runtime (jobs and models): one
    capacity ledger for the machine, so train jobs and model replicas never
    over-commit it together. Each service adopts only its own replicas."""
    return os.path.join(data_dir, "runtime", kind)


def make_runtime(kind: str, data_dir: str, capacity_cpu: int | None = None,
                 capacity_memory: int | None = None, *, kubeconfig: str | None = None,
                 namespace: str | None = None, image: str | None = None, storage_claim: str | None = None,
                 package_cache_claim: str | None = None) -> Runtime:
    """The runtime named `kind`. `local`: its state in
    `runtime_state_dir(data_dir, kind)`; `capacity_cpu` (millis) and
    `capacity_memory` (bytes) override what the machine has (None: probe it).
    `kubernetes`: see `make_kubernetes_runtime`."""
    if kind not in RUNTIMES:
        raise SystemExit(f"error: --runtime {kind!r} is not available (one of {', '.join(RUNTIMES)})")
    if kind == "kubernetes":
        return make_kubernetes_runtime(kubeconfig, namespace, image, storage_claim=storage_claim,
                                       storage_root=os.path.join(os.path.abspath(data_dir), "storage"),
                                       package_cache_claim=package_cache_claim)
    from services.common.runtime.local import LocalRuntime  # noqa: PLC0415 - only the runtime in use is loaded

    state_dir = runtime_state_dir(data_dir, kind)
    total = None
    if capacity_cpu is not None or capacity_memory is not None:
        probe = LocalRuntime(state_dir).total()
        total = Amount(capacity_cpu if capacity_cpu is not None else probe.cpu_millis,
                       capacity_memory if capacity_memory is not None else probe.memory_bytes, probe.gpus)
    return LocalRuntime(state_dir, total=total)


def make_kubernetes_runtime(kubeconfig: str | None, namespace: str | None, image: str | None = None, *,
                            storage_claim: str | None = None, storage_root: str = "",
                            package_cache_claim: str | None = None) -> Runtime:
    """Pods in `namespace` through the API server of `kubeconfig`; without a
    kubeconfig, the in-cluster service account's credentials (and its
    namespace when none is given). Never connects here: an unreachable API
    server is retried by the runtime (reserve() says so meanwhile). The
    claims name the volumes Pods mount (kube_objects.PodVolumes)."""
    from kubernetes import client, config  # noqa: PLC0415

    from services.common.runtime.kube_objects import DEFAULT_IMAGE, PodVolumes  # noqa: PLC0415
    from services.common.runtime.kubernetes import KubernetesRuntime  # noqa: PLC0415

    configuration = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            account = os.environ.get("CLOUDML_SERVICE_ACCOUNT_DIR") or SERVICE_ACCOUNT_DIR
            config.incluster_config.InClusterConfigLoader(
                token_filename=os.path.join(account, "token"), cert_filename=os.path.join(account, "ca.crt"),
            ).load_and_set(configuration)
            if not namespace and os.path.exists(os.path.join(account, "namespace")):
                with open(os.path.join(account, "namespace")) as f:
                    namespace = f.read().strip()
    except (config.ConfigException, OSError, ValueError) as err:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig else "in-cluster credentials (no --kubeconfig given)"
        raise SystemExit(f"error: --runtime kubernetes: cannot use {where}: {err}") from None
    if not namespace:
        raise SystemExit("error: --runtime kubernetes needs --namespace")
    configuration.connection_pool_maxsize = 32  # two watches, log followers, concurrent writes
    volumes = PodVolumes(storage_claim or "", storage_root if storage_claim else "", package_cache_claim or "")
    return KubernetesRuntime(client.ApiClient(configuration), namespace, image=image or DEFAULT_IMAGE,
                             volumes=volumes)
