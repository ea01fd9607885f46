"""Reading a version's files for DownloadVersion: the manifest (every file
with its size and SHA-256) and bounded chunks, from a directory reached only
beneath its root without following any symlink (services.common.confine), so
a link planted in a tenant's storage never sends the platform's reads
elsewhere. Files are read by worker threads; digests are cached by (device,
inode, size, mtime), so a resumed download does not hash the tree again."""
from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass
from typing import AsyncIterator

from services.common import confine, errors
from services.common.uploads import tree_sha256

#: bytes per DownloadChunk (the proto's bound)
CHUNK_BYTES = 1 << 20
MAX_FILES = 10_000
_CACHE_SIZE = 4096


@dataclass(frozen=True)
class FileEntry:
    path: str      # relative, '/'-separated; "x/" for an empty directory
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    files: tuple[FileEntry, ...]
    size: int
    sha256: str

    def find(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path and not path.endswith("/"):
                return entry
        raise errors.InvalidArgument(f"path {path[:200]!r} is not a file of this download")


class TreeReader:
    """Manifests and chunks of directories beneath a root (one per service)."""

    def __init__(self) -> None:
        self._digests: OrderedDict[tuple, str] = OrderedDict()

    def _open(self, root: str, relative: str, path: str) -> tuple[int, os.stat_result]:
        target = f"{relative}/{path}" if relative else path
        try:
            fd = confine.open_beneath(root, target, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise errors.FailedPrecondition(f"{path} is gone from the stored model; download again") from None
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.EXDEV):
                raise errors.PermissionDenied(f"{path}: a symlink in the stored model") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise errors.FailedPrecondition(f"{path} is not a regular file")
        return fd, st

    def _digest(self, fd: int, st: os.stat_result) -> str:
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        found = self._digests.get(key)
        if found is not None:
            self._digests.move_to_end(key)
            return found
        digest = hashlib.sha256()
        offset = 0
        while True:
            data = os.pread(fd, CHUNK_BYTES, offset)
            if not data:
                break
            digest.update(data)
            offset += len(data)
        value = digest.hexdigest()
        self._digests[key] = value
        while len(self._digests) > _CACHE_SIZE:
            self._digests.popitem(last=False)
        return value

    def manifest_sync(self, root: str, relative: str = "") -> Manifest:
        """Every regular file (and empty directory) under `relative`."""
        entries: list[FileEntry] = []
        base = relative.strip("/")
        for folder, files, dirs in confine.walk_beneath(root, base, max_entries=MAX_FILES + 1):
            rel = folder[len(base):].lstrip("/")
            if not files and not dirs and rel:
                entries.append(FileEntry(rel + "/", 0, ""))
            for entry in files:
                path = entry.relative[len(base):].lstrip("/")
                fd, st = self._open(root, base, path)
                try:
                    entries.append(FileEntry(path, st.st_size, self._digest(fd, st)))
                finally:
                    os.close(fd)
            if len(entries) > MAX_FILES:
                raise errors.FailedPrecondition(f"the stored model has more than {MAX_FILES} files")
        entries.sort(key=lambda e: e.path)
        return Manifest(tuple(entries), sum(e.size for e in entries),
                        tree_sha256({e.path: e.sha256 for e in entries}))

    async def manifest(self, root: str, relative: str = "") -> Manifest:
        return await asyncio.to_thread(self.manifest_sync, root, relative)

    async def chunks(self, root: str, relative: str, manifest: Manifest, path: str = "",
                     offset: int = 0) -> AsyncIterator[tuple[str, int, bytes]]:
        """(path, offset, data) of every file of the manifest in order, or of
        `path` alone from `offset`; at most CHUNK_BYTES each. A file that
        changed since the manifest ends the stream FAILED_PRECONDITION."""
        if offset < 0:
            raise errors.InvalidArgument(f"offset must not be negative (got {offset})")
        if path:
            entry = manifest.find(path)
            if offset > entry.size:
                raise errors.InvalidArgument(f"offset {offset} is beyond the end of {path} ({entry.size} bytes)")
            todo = [(entry, offset)]
        elif offset:
            raise errors.InvalidArgument("offset needs a path")
        else:
            todo = [(e, 0) for e in manifest.files if not e.path.endswith("/")]
        for entry, start in todo:
            fd, st = await asyncio.to_thread(self._open, root, relative.strip("/"), entry.path)
            try:
                if st.st_size != entry.size:
                    raise errors.FailedPrecondition(f"{entry.path} changed during the download; download again")
                position = start
                while position < entry.size:
                    data = await asyncio.to_thread(os.pread, fd, min(CHUNK_BYTES, entry.size - position), position)
                    if not data:
                        raise errors.FailedPrecondition(f"{entry.path} shrank during the download; download again")
                    yield entry.path, position, data
                    position += len(data)
                if entry.size == 0 and start == 0:
                    yield entry.path, 0, b""
            finally:
                os.close(fd)
