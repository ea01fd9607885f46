"""Model artifacts, for the reconciler (a mixin of `Reconciler`): where a
version's SavedModel is on this machine, fetching a remote one into the
cache (`<data dir>/models/cache/<tenant>/<model>/<version>-<digest>`) in the
background, once per version, with its error kept for the pass."""
from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
from dataclasses import dataclass

from cloudml.models.v1 import models_service_pb2 as pb
from services.common import errors
from services.models.rules import split_uri


@dataclass
class _Download:
    task: asyncio.Task
    error: str = ""


class ArtifactFetcher:
    """Uses the `Reconciler`'s `settings`, `confiner`, `keys`, `_downloads`,
    `_fail()` and `wake()`."""

    def _model_path(self, version: pb.ModelVersion) -> str | None:
        """The SavedModel's local directory, or None while it is being fetched."""
        scheme, rest = split_uri(version.model_uri)
        if scheme == "file":
            if self.confiner is not None:
                try:
                    where = self.confiner.check(version.tenant, version.model_uri, "model_version.model_uri")
                    return os.path.join(where.root, where.relative) if where.relative else where.root
                except errors.CloudMLError as err:
                    self._fail(self.keys.version(version.tenant, version.model, version.version), 7, err.message)
                    return None
            return os.path.realpath(rest)
        vkey = self.keys.version(version.tenant, version.model, version.version)
        digest = hashlib.sha256(version.model_uri.encode()).hexdigest()[:12]
        target = os.path.join(self.settings.cache_dir, version.tenant, version.model,
                              f"{version.version}-{digest}")
        if os.path.isdir(target):
            return target
        download = self._downloads.get(vkey)
        if download is None or (download.task.done() and not download.error):
            task = asyncio.create_task(asyncio.to_thread(_fetch, version.model_uri, target))
            download = self._downloads[vkey] = _Download(task)

            def done(t: asyncio.Task, d=download) -> None:
                if not t.cancelled() and t.exception() is not None:
                    d.error = str(t.exception()) or type(t.exception()).__name__
                self.wake()

            task.add_done_callback(done)
        return None


def _fetch(uri: str, target: str) -> None:
    """Copies a SavedModel directory from an fsspec URI to `target` (atomically),
    after checking the URI again (services.common.confine)."""
    import fsspec  # noqa: PLC0415

    from services.common.confine import recheck_remote_model  # noqa: PLC0415

    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{target}.part-{secrets.token_hex(4)}"
    try:
        recheck_remote_model(uri)  # typed error: the version fails to load with its message
        fs, path = fsspec.core.url_to_fs(uri)
        if not any(fs.exists(f"{path.rstrip('/')}/{name}") for name in ("saved_model.pb", "saved_model.pbtxt")):
            raise FileNotFoundError(f"no saved_model.pb under {uri}")
        fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
