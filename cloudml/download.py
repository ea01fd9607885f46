"""Downloading a version's SavedModel (or an artifact of it, e.g. its
TensorFlow Lite export) through the gateway (ModelsService/DownloadVersion),
for `client.models.download` and `cloudml models download`.

Never a half model that looks whole: the files go into a directory next to
the target, `.<target name>.part`, with the server's manifest beside them
(`.cloudml-manifest.json`); once every file's size and SHA-256 match the
manifest, the directory is renamed to the target in one step. A download cut
short (Ctrl-C, a killed process, a dropped connection) leaves only that
directory: run the same command again and it resumes each file from where
it stopped (each file is asked for from its local size), or starts over
when the model changed on the server (another manifest). A file whose
SHA-256 does not match is fetched again once; twice wrong is DATA_LOSS.
Within one run, a stream broken by UNAVAILABLE or its deadline is resumed
from the bytes that arrived (three times in a row without progress, then
the error).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import grpc

from cloudml import errors

MANIFEST_FILE = ".cloudml-manifest.json"
STREAM_RETRIES = 3


@dataclass
class Downloaded:
    """Where a download went and what it holds."""

    path: str
    version: int
    artifact: str
    files: int
    size_bytes: int
    sha256: str
    resumed_bytes: int = 0
    fetched_bytes: int = 0
    already_there: bool = False
    #: files whose SHA-256 did not match at first (changed on this disk meanwhile) and were fetched again
    refetched: list = None


def part_dir(target: str) -> str:
    parent, name = os.path.split(os.path.abspath(target).rstrip("/"))
    return os.path.join(parent, f".{name}.part")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_dict(manifest) -> dict:
    return {"version": manifest.version, "artifact": manifest.artifact, "sha256": manifest.sha256,
            "size_bytes": manifest.size_bytes,
            "files": [{"path": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256} for f in manifest.files]}


def _local_path(root: str, rel: str) -> str:
    parts = rel.rstrip("/").split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
        raise errors.DataLoss(f"the server named a file {rel[:100]!r} that is not a plain relative path")
    return os.path.join(root, *parts)


def verify_tree(root: str, manifest: dict) -> list[str]:
    """Paths of the manifest whose local file is missing or does not match
    its size and SHA-256 (empty: the tree is whole)."""
    bad = []
    for entry in manifest["files"]:
        local = _local_path(root, entry["path"])
        if entry["path"].endswith("/"):
            if not os.path.isdir(local):
                bad.append(entry["path"])
        elif not os.path.isfile(local) or os.path.getsize(local) != entry["size_bytes"] \
                or _sha256(local) != entry["sha256"]:
            bad.append(entry["path"])
    return bad


def download(client, model: str, target: str, *, version: int = 0, label: str = "", artifact: str = "",
             tenant: str = "", progress: Callable[[int, int], None] | None = None,
             timeout: float | None = None) -> Downloaded:
    from cloudml.models.v1 import models_service_pb2 as pb  # noqa: PLC0415
    from cloudml.models.v1 import models_service_pb2_grpc as pb_grpc  # noqa: PLC0415

    stub = client.stub(pb_grpc.ModelsServiceStub)
    base = dict(tenant=tenant, model=model, version=version, label="" if version else label, artifact=artifact)
    per_call = timeout or max(client.timeout, 600.0)

    def stream(**extra):
        try:
            yield from stub.DownloadVersion(pb.DownloadVersionRequest(**base, **extra), timeout=per_call)
        except grpc.RpcError as err:
            raise errors.from_rpc_error(err, client.endpoint) from None

    first = next(stream(manifest_only=True), None)
    if first is None or first.WhichOneof("part") != "manifest":
        raise errors.DataLoss("the download did not start with a manifest")
    manifest = _manifest_dict(first.manifest)
    base.update(version=manifest["version"], label="")  # a label resolves once: every file from one version
    target = os.path.abspath(target).rstrip("/")
    result = Downloaded(target, manifest["version"], artifact, sum(1 for f in manifest["files"]
                                                                   if not f["path"].endswith("/")),
                        manifest["size_bytes"], manifest["sha256"])
    if os.path.exists(target):
        if os.path.isdir(target) and not verify_tree(target, manifest):
            result.already_there = True
            return result
        raise errors.AlreadyExists(f"{target} exists and is not this download; remove it or pick another -d")

    part = part_dir(target)
    kept = None
    try:
        with open(os.path.join(part, MANIFEST_FILE)) as f:
            kept = json.load(f)
    except (OSError, ValueError):
        pass
    if kept != manifest:
        shutil.rmtree(part, ignore_errors=True)  # nothing, or another content: start over
    os.makedirs(part, mode=0o700, exist_ok=True)
    with open(os.path.join(part, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f)

    total = manifest["size_bytes"]
    done = 0
    sizes = {}
    for entry in manifest["files"]:
        local = _local_path(part, entry["path"])
        have = os.path.getsize(local) if os.path.isfile(local) else 0
        if have > entry["size_bytes"]:
            os.truncate(local, 0)
            have = 0
        sizes[entry["path"]] = have
        done += have
    result.resumed_bytes = done

    def fetch(entry: dict) -> None:
        nonlocal done
        local = _local_path(part, entry["path"])
        os.makedirs(os.path.dirname(local), exist_ok=True)
        retries = 0
        while sizes[entry["path"]] < entry["size_bytes"] or not os.path.exists(local):
            have = sizes[entry["path"]]
            broken = False
            try:
                with open(local, "ab") as out:
                    out.truncate(have)
                    for message in stream(path=entry["path"], offset=have):
                        if message.WhichOneof("part") == "manifest":
                            if message.manifest.sha256 != manifest["sha256"]:
                                raise errors.Aborted("the model changed on the server during the download; "
                                                     "run it again")
                            continue
                        chunk = message.chunk
                        if chunk.path != entry["path"] or chunk.offset != sizes[entry["path"]]:
                            raise errors.DataLoss(f"unexpected chunk {chunk.path}@{chunk.offset}")
                        out.write(chunk.data)
                        sizes[entry["path"]] += len(chunk.data)
                        done += len(chunk.data)
                        result.fetched_bytes += len(chunk.data)
                        if progress:
                            progress(done, total)
            except (errors.Unavailable, errors.DeadlineExceeded):
                # Resumable from what arrived; a stream that made progress starts the count again.
                retries = 1 if sizes[entry["path"]] > have else retries + 1
                broken = True
                if retries > STREAM_RETRIES:
                    raise
            if not broken and sizes[entry["path"]] < entry["size_bytes"]:
                raise errors.DataLoss(f"the stream of {entry['path']} ended at {sizes[entry['path']]} of "
                                      f"{entry['size_bytes']} bytes")

    for entry in manifest["files"]:
        if entry["path"].endswith("/"):
            os.makedirs(_local_path(part, entry["path"]), exist_ok=True)
        else:
            fetch(entry)
    bad = verify_tree(part, manifest)
    result.refetched = list(bad)
    for rel in bad:  # e.g. a file changed on this disk while the download was stopped: fetch it again, once
        entry = next(e for e in manifest["files"] if e["path"] == rel)
        done -= sizes[rel]
        sizes[rel] = 0
        os.truncate(_local_path(part, rel), 0)
        fetch(entry)
    bad = verify_tree(part, manifest)
    if bad:
        raise errors.DataLoss(f"SHA-256 mismatch after the download: {', '.join(bad)}; the partial download "
                              f"stays in {part}")
    os.unlink(os.path.join(part, MANIFEST_FILE))
    os.rename(part, target)
    return result
