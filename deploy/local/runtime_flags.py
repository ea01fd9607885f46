"""The runtime a local platform places replicas on (`cloudml-platform up
--runtime ...`): checked once at `up`, kept in DIR/platform.json under
"runtime", and turned into the flags of the services that place replicas.

    up --runtime kubernetes --kubeconfig FILE --namespace NS [--image IMAGE] [--model-image IMAGE]

Without `--kubeconfig` the services use the in-cluster service account's
credentials (and its namespace when `--namespace` is not given): what a
platform running inside the cluster does. The settings of the last `up`
apply (a later `up` without `--runtime` keeps them).
"""
from __future__ import annotations

import os

from deploy.local.layout import Layout, read_json

RUNTIME_KEY = "runtime"
#: the flags of each runtime setting, in the order the services take them
_FLAGS = (("kubeconfig", "--kubeconfig"), ("namespace", "--namespace"), ("image", "--image"),
          ("model_image", "--model-image"), ("storage_claim", "--storage-claim"),
          ("package_cache_claim", "--package-cache-claim"))
#: which settings each service takes (the models service has no trainer image)
_SERVICE_FLAGS = {
    "jobs": ("kubeconfig", "namespace", "image", "storage_claim", "package_cache_claim"),
    "models": ("kubeconfig", "namespace", "model_image", "storage_claim"),
}


def add_arguments(parser) -> None:
    parser.add_argument("--runtime", choices=("local", "kubernetes"), default=None,
                        help="where train jobs and model replicas run (default local; kept across restarts)")
    parser.add_argument("--kubeconfig", default=None,
                        help="kubernetes runtime: the API server and credentials "
                             "(default: the in-cluster service account)")
    parser.add_argument("--namespace", default=None,
                        help="kubernetes runtime: the namespace of the platform's Pods "
                             "(default: the service account's)")
    parser.add_argument("--image", default=None,
                        help="kubernetes runtime: the trainer image of jobs that name none")
    parser.add_argument("--model-image", default=None,
                        help="kubernetes runtime: the model-server image of model replicas")
    parser.add_argument("--storage-claim", default=None,
                        help="kubernetes runtime: the PersistentVolumeClaim of the platform's storage "
                             "(each Pod mounts its own tenant's directory of it)")
    parser.add_argument("--package-cache-claim", default=None,
                        help="kubernetes runtime: a PersistentVolumeClaim for installed trainer packages "
                             "(a directory per tenant)")


def settings_of(args, layout: Layout) -> dict:
    """The runtime settings `up` asked for, checked (ValueError with a
    one-line message), or the saved ones when `up` names no runtime."""
    given = {name: getattr(args, name, None) for name, _ in _FLAGS}
    if args.runtime is None:
        if any(given.values()):
            flags = ", ".join(flag for name, flag in _FLAGS if given[name])
            raise ValueError(f"{flags} need --runtime kubernetes")
        return (read_json(layout.config) or {}).get(RUNTIME_KEY) or {"kind": "local"}
    if args.runtime == "local":
        if any(given.values()):
            flags = ", ".join(flag for name, flag in _FLAGS if given[name])
            raise ValueError(f"{flags} apply only to --runtime kubernetes")
        return {"kind": "local"}
    out = {"kind": "kubernetes"}
    if given["kubeconfig"]:
        path = os.path.abspath(os.path.expanduser(given["kubeconfig"]))
        if not os.path.isfile(path):
            raise ValueError(f"--kubeconfig {given['kubeconfig']}: no such file")
        given["kubeconfig"] = path
    elif not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise ValueError("--runtime kubernetes needs --kubeconfig outside a cluster "
                         "(no in-cluster service account here: KUBERNETES_SERVICE_HOST is not set)")
    out.update({k: v for k, v in given.items() if v})
    return out


def service_flags(layout: Layout, service: str) -> list[str]:
    """`--runtime ...` and its settings for `service` (jobs, models), from DIR/platform.json."""
    saved = (read_json(layout.config) or {}).get(RUNTIME_KEY) or {}
    if saved.get("kind", "local") == "local" or service not in _SERVICE_FLAGS:
        return []
    flags = ["--runtime", saved["kind"]]
    wanted = _SERVICE_FLAGS.get(service, ())
    for name, flag in _FLAGS:
        if name in wanted and saved.get(name):
            flags += [flag, saved[name]]
    return flags
