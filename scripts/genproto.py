#!/usr/bin/env python3
"""Regenerates the checked-in Python code for every .proto under protos/.

    python scripts/genproto.py           # rewrite the generated files in place
    python scripts/genproto.py --check   # exit 1 (listing files) if they drift

Platform APIs (protos/cloudml/...) generate into the `cloudml` package, e.g.
protos/cloudml/auth/v1/auth_service.proto -> cloudml/auth/v1/auth_service_pb2.py.
Our wire-compatible copies of TF Serving's protos live under
protos/cloudml/tfs/ (same proto packages and field numbers as TF Serving's,
other file paths) and generate into `cloudml.tfs`, so their Python modules
never collide with the official `tensorflow_serving` ones.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def _protos() -> list[pathlib.Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: pathlib.Path) -> None:
    from grpc_tools import protoc
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in _protos()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Every generated folder is a package.
    for path in list(out_dir.rglob("*_pb2.py")):
        folder = path.parent
        while folder != out_dir:
            init = folder / "__init__.py"
            if not init.exists():
                init.write_text("")
            folder = folder.parent


def _generated_files(base: pathlib.Path) -> set[str]:
    found = set()
    for top in ("cloudml",):
        for path in (base / top).rglob("*"):
            if path.name.endswith(GENERATED_SUFFIXES):
                found.add(str(path.relative_to(base)))
    return found


def check() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)
        generate(tmp_path)
        fresh = _generated_files(tmp_path)
        current = _generated_files(ROOT)
        drift = sorted(fresh ^ current)
        for name in sorted(fresh & current):
            if not filecmp.cmp(tmp_path / name, ROOT / name, shallow=False):
                drift.append(name)
        return drift


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code drifted")
    args = parser.parse_args()
    if args.check:
        drift = check()
        if drift:
            print("generated code is out of date; run scripts/genproto.py:", *drift, sep="\n  ")
            return 1
        print("generated code is up to date")
        return 0
    generate(ROOT)
    print("regenerated", len(_generated_files(ROOT)), "files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
