"""The entrypoint of a train-job Pod on the `kubernetes` runtime (the
platform's trainer image runs it): fetches the job's trainer package,
installs it into an environment, and replaces itself with the trainer.

    python -m services.jobs.pod_entrypoint --package URI --module trainer.task [--cache DIR] -- ARG...

On `local` the jobs service installs the package on its own machine before
a replica starts (services.jobs.envs); a Pod cannot see that machine, so it
does the same inside the Pod, with the same code and the same cache rules:

- the package: a `file://` URI (or absolute path) of the tenant's storage,
  which the runtime mounts into the Pod at the same path as on the jobs
  service (the tenant's own directory of the storage volume and nothing
  else), an http(s) URI, or another fsspec scheme the image supports. The
  jobs service checked the URI for the tenant before it made the Pod
  (services.common.confine), as it does on `local`;
- the environment: `EnvCache` (a venv by content hash of the package, the
  image's own packages visible underneath, `uv pip install`, a ready marker
  and a per-key lock) in `--cache` (CLOUDML_PACKAGE_CACHE: a volume, the
  tenant's own directory of it, so a package is installed once per tenant
  across Pods and nodes), else in the Pod's work directory (once per Pod);
- then `exec` of `<env python> -m MODULE ARG...`: the trainer is the Pod's
  process (signals, exit code and OOM kills reach the kubelet unchanged).

Lines it prints are prefixed "[platform]"; a failure is one line on stderr
and exit code 3 (fetch) or 4 (install), so the job's events name it.
Imports neither TensorFlow nor grpc.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

EXIT_FETCH = 3
EXIT_INSTALL = 4


def _say(line: str) -> None:
    print(f"[platform] {line}", flush=True)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.jobs.pod_entrypoint")
    parser.add_argument("--package", default=os.environ.get("CLOUDML_PACKAGE_URI"),
                        help="the trainer package's URI (default $CLOUDML_PACKAGE_URI)")
    parser.add_argument("--module", required=True, help="the trainer module to run (python -m MODULE)")
    parser.add_argument("--cache", default=os.environ.get("CLOUDML_PACKAGE_CACHE") or None,
                        help="the environments' cache (default $CLOUDML_PACKAGE_CACHE, else the work directory)")
    parser.add_argument("--install-arg", action="append", default=[],
                        help="extra `uv pip install` argument (repeatable)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the trainer's arguments")
    args = parser.parse_args(argv)
    if not args.package:
        parser.error("no --package (nor CLOUDML_PACKAGE_URI)")
    if args.args[:1] == ["--"]:
        args.args = args.args[1:]
    return args


def prepare(package: str, cache: str | None, install_args=(), log=_say) -> str:
    """Fetches `package` and returns the interpreter of a ready environment
    with it installed. Raises FetchFailed / InstallFailed."""
    from services.common.tenancy import Tenancy  # noqa: PLC0415
    from services.jobs.envs import EnvCache, fetch  # noqa: PLC0415

    work = os.getcwd()
    root = cache or os.path.join(work, ".cloudml-envs")
    log(f"fetching {package}")
    path = asyncio.run(fetch(package, os.path.join(work, ".cloudml-package")))
    # The Pod is the boundary: one tenant's code, its own directory of the cache
    # volume; no users to switch to in here (even when the image runs as root).
    cache_of = EnvCache(root, install_args=install_args, tenancy=Tenancy(enabled=False))
    env = asyncio.run(cache_of.ensure(path, log))
    log(f"environment {env.key[:12]} {'(cached)' if env.cached else 'built'}: {env.python}")
    return env.python


def main(argv: list[str] | None = None) -> int:
    from services.jobs.envs import FetchFailed, InstallFailed  # noqa: PLC0415

    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        python = prepare(args.package, args.cache, tuple(args.install_arg))
    except FetchFailed as err:
        print(f"error: {err.message}", file=sys.stderr, flush=True)
        return EXIT_FETCH
    except InstallFailed as err:
        print(f"error: {err.message}", file=sys.stderr, flush=True)
        return EXIT_INSTALL
    sys.stdout.flush()
    os.execv(python, [python, "-m", args.module, *args.args])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
