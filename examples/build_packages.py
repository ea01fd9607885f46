"""Builds every example trainer under examples/trainers/ into an sdist.

    python examples/build_packages.py OUT_DIR [--only linear plain] [--json]

Prints the built paths, one per line (with --json: {"linear": PATH, ...}).

Each package directory is copied to a scratch directory first, so the source
tree gets no build/ or *.egg-info litter and concurrent builds don't collide.
The build is `uv build --sdist`; when the running interpreter has setuptools
(the platform's does) it builds with `--no-build-isolation` against it, which
needs no network and takes well under a second per package.

The archive is then written again reproducibly (entries sorted, one fixed
time, no owners, no gzip timestamp), so the same sources always give the same
bytes: the platform names an upload by its content, and submitting the same
job again (e.g. `scripts/demo.sh` run twice) is then the same spec, not a
conflicting one.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

TRAINERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainers")
_IGNORE = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "*.pyc")
#: every entry's time in a built archive (2020-09-13; zip-based tools refuse times before 1980)
FIXED_MTIME = 1_600_000_000


def examples() -> dict[str, str]:
    """{example name: package directory} for every buildable example."""
    found = {}
    for name in sorted(os.listdir(TRAINERS_DIR)):
        path = os.path.join(TRAINERS_DIR, name)
        if os.path.isfile(os.path.join(path, "pyproject.toml")) or os.path.isfile(os.path.join(path, "setup.py")):
            found[name] = path
    return found


def find_uv() -> str:
    """uv on PATH, else the binary of the `uv` PyPI package, if installed."""
    found = shutil.which("uv")
    if found is None:
        try:
            from uv import find_uv_bin

            found = find_uv_bin()
        except Exception:
            raise SystemExit("build_packages: uv is not installed (pip install uv)") from None
    return found


def reproducible(path: str) -> None:
    """Rewrites the .tar.gz at `path` so that its bytes depend on its contents only."""
    with tarfile.open(path, "r:gz") as src:
        members = sorted(src.getmembers(), key=lambda m: m.name)
        contents = {m.name: src.extractfile(m).read() for m in members if m.isfile()}
    out = io.BytesIO()
    with gzip.GzipFile(filename="", fileobj=out, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for m in members:
                m.mtime, m.uid, m.gid, m.uname, m.gname, m.pax_headers = FIXED_MTIME, 0, 0, "", "", {}
                tar.addfile(m, io.BytesIO(contents[m.name]) if m.isfile() else None)
    with open(path + ".tmp", "wb") as f:
        f.write(out.getvalue())
    os.replace(path + ".tmp", path)


def build_one(package_dir: str, out_dir: str) -> str:
    uv = find_uv()
    with tempfile.TemporaryDirectory(prefix="cloudml-build-") as scratch:
        src = os.path.join(scratch, os.path.basename(package_dir))
        shutil.copytree(package_dir, src, ignore=_IGNORE)
        dist = os.path.join(scratch, "dist")
        argv = [uv, "build", "--sdist", "--out-dir", dist, "--no-config"]
        if importlib.util.find_spec("setuptools") is not None:
            argv += ["--no-build-isolation", "--python", sys.executable]
        argv.append(src)
        env = dict(os.environ, NO_COLOR="1", UV_NO_PROGRESS="1")
        env.pop("VIRTUAL_ENV", None)
        result = subprocess.run(argv, cwd=scratch, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"build_packages: building {package_dir} failed:\n{result.stdout}{result.stderr}")
        (built,) = [name for name in os.listdir(dist) if name.endswith(".tar.gz")]
        reproducible(os.path.join(dist, built))
        os.makedirs(out_dir, exist_ok=True)
        dest = os.path.join(out_dir, built)
        shutil.copyfile(os.path.join(dist, built), dest + ".tmp")
        os.replace(dest + ".tmp", dest)
        return dest


def build_all(out_dir: str, only: list[str] | None = None) -> dict[str, str]:
    available = examples()
    names = only or list(available)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise SystemExit(f"build_packages: unknown example(s) {unknown}; have {sorted(available)}")
    out_dir = os.path.abspath(out_dir)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(build_one, available[name], out_dir) for name in names}
        return {name: future.result() for name, future in futures.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--only", nargs="+", metavar="EXAMPLE", help=f"some of: {', '.join(examples())}")
    parser.add_argument("--json", action="store_true", help="print {example: path} as JSON")
    args = parser.parse_args(argv)
    built = build_all(args.out_dir, args.only)
    print(json.dumps(built, indent=2) if args.json else "\n".join(built.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
