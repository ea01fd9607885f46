"""Uploads into a tenant's storage through the API (client-streaming RPCs),
shared by the jobs service (`UploadPackage`, one file) and the models
service (`UploadModel`, a directory tree).

A user who is not root on the platform's machine, or is on another machine,
cannot write into the platform's data directory; they stream the bytes
through the gateway instead, and the service writes them:

1. into a staging directory of the platform's own, `<storage>/.uploads/`
   (root's, mode 0700: no tenant can reach, swap or link anything in it),
   checking every relative path (no absolute paths, `..`, empty components,
   NUL; a path may not come back after another one), the number of files,
   the bytes per upload and the tenant's whole storage (RESOURCE_EXHAUSTED);
2. the finished tree is given to the tenant's user (`Tenancy.hand_over`)
   while still out of the tenant's reach;
3. the directories leading to its place in `<storage>/<tenant>/` are opened
   (or made) one component at a time without following symlinks
   (PERMISSION_DENIED if the tenant planted one), and the tree is renamed
   into place under its content hash, so the same content uploaded twice
   lands at the same URI and a version's files never change under it.

Chunks are written by worker threads; the event loop never blocks on disk.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import secrets
import shutil
import stat
from dataclasses import dataclass
from typing import AsyncIterator

from services.common import confine, errors, validation
from services.common.tenancy import Tenancy

STAGING = ".uploads"
MAX_PATH = 1024
MAX_COMPONENT = 255


@dataclass(frozen=True)
class UploadLimits:
    max_upload_bytes: int = 4 << 30       # one upload
    max_tenant_bytes: int = 100 << 30     # everything in a tenant's storage, the upload included
    max_files: int = 10_000               # files and directories of one upload
    max_chunk_bytes: int = 4 << 20        # bytes in one message


@dataclass(frozen=True)
class Stored:
    uri: str           # file:///<storage>/<tenant>/.../ (a trailing '/' for trees)
    size_bytes: int
    files: int
    sha256: str


def tree_sha256(digests: dict[str, str]) -> str:
    """The digest of a tree from its files' ({relative path: hex SHA-256},
    "" for an empty directory "x/"): what UploadModel answers and
    DownloadVersion's manifest carries for the same tree."""
    tree_hash = hashlib.sha256()
    for path in sorted(digests):
        tree_hash.update(f"{path}\0{digests[path]}\n".encode())
    return tree_hash.hexdigest()


def check_relative(path: str, field: str = "chunk.path") -> list[str]:
    """The components of a relative upload path; INVALID_ARGUMENT otherwise."""
    bad = errors.InvalidArgument
    if not path:
        raise bad(f"{field} is required")
    if len(path) > MAX_PATH or "\0" in path or any(ord(c) < 32 for c in path):
        raise bad(f"{field} {path[:80]!r} is not a valid relative path")
    if path.startswith("/"):
        raise bad(f"{field} {path!r} must be relative (no leading '/')")
    parts = path.split("/")
    if ".." in parts or "." in parts:
        raise bad(f"{field} {path!r}: '.' and '..' components are not allowed")
    if "" in parts[:-1] or any(len(p) > MAX_COMPONENT for p in parts):
        raise bad(f"{field} {path!r}: empty or over-long path components")
    return parts


class Uploads:
    def __init__(self, storage_root: str, tenancy: Tenancy | None = None, limits: UploadLimits = UploadLimits()):
        self.storage_root = os.path.abspath(storage_root)
        self.tenancy = tenancy if tenancy is not None else Tenancy(enabled=False)
        self.limits = limits

    # --- the two shapes -------------------------------------------------------------------

    async def receive_file(self, tenant: str, where: tuple[str, ...], file_name: str,
                           chunks: AsyncIterator[bytes]) -> Stored:
        """One file, stored as <tenant>/<where...>/<sha256[:16]>/<file_name>."""
        async def as_tree():
            async for data in chunks:
                yield file_name, data

        return await self._receive(tenant, where, as_tree(), single=file_name)

    async def receive_tree(self, tenant: str, where: tuple[str, ...],
                           chunks: AsyncIterator[tuple[str, bytes]], required: tuple[str, ...] = ()) -> Stored:
        """A directory tree, stored as <tenant>/<where...>/<sha256[:16]>/.
        `required`: file names of which at least one must be at the top."""
        return await self._receive(tenant, where, chunks, required=required)

    # --- the work -------------------------------------------------------------------------

    def _staging(self) -> str:
        path = os.path.join(self.storage_root, STAGING)
        os.makedirs(path, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
        stage = os.path.join(path, f"{secrets.token_hex(8)}")
        os.mkdir(stage, 0o700)
        return stage

    async def _receive(self, tenant: str, where: tuple[str, ...], chunks: AsyncIterator[tuple[str, bytes]], *,
                       single: str = "", required: tuple[str, ...] = ()) -> Stored:
        validation.check_name(tenant, "tenant")
        limits = self.limits
        tenant_root = os.path.join(self.storage_root, tenant)
        used = await asyncio.to_thread(confine.tree_bytes, tenant_root)
        stage = await asyncio.to_thread(self._staging)
        try:
            tree = os.path.join(stage, "tree")
            os.mkdir(tree, 0o700)
            seen: set[str] = set()
            digests: dict[str, str] = {}
            current, fd, hasher = "", -1, None
            total = 0
            try:
                async for path, data in chunks:
                    if len(data) > limits.max_chunk_bytes:
                        raise errors.InvalidArgument(f"chunk.data: at most {limits.max_chunk_bytes} bytes per message")
                    if path != current:
                        if fd >= 0:
                            os.close(fd)
                            fd = -1
                            digests[current] = hasher.hexdigest()
                        parts = check_relative(path)
                        if path in seen:
                            raise errors.InvalidArgument(f"chunk.path {path!r} was sent before; a file's chunks "
                                                         "are consecutive")
                        seen.add(path)
                        if len(seen) > limits.max_files:
                            raise errors.InvalidArgument(f"too many files: at most {limits.max_files} per upload")
                        current = path
                        if parts[-1] == "":  # an empty directory
                            if data:
                                raise errors.InvalidArgument(f"chunk.path {path!r} names a directory but carries data")
                            await asyncio.to_thread(os.makedirs, os.path.join(tree, *parts[:-1]), 0o700, True)
                            digests[path] = ""
                            current, hasher = "", None
                            continue
                        fd = await asyncio.to_thread(self._create, tree, parts)
                        hasher = hashlib.sha256()
                    elif not path:
                        raise errors.InvalidArgument("chunk.path is required")
                    total += len(data)
                    if total > limits.max_upload_bytes:
                        raise errors.ResourceExhausted(
                            f"upload too large: more than the {limits.max_upload_bytes} bytes allowed per upload")
                    if used + total > limits.max_tenant_bytes:
                        raise errors.ResourceExhausted(
                            f"tenant {tenant!r}'s storage would exceed its limit of {limits.max_tenant_bytes} bytes "
                            f"({used} in use); delete something first")
                    if data:
                        hasher.update(data)
                        await asyncio.to_thread(_write_all, fd, data)
                if fd >= 0:
                    os.close(fd)
                    fd = -1
                    digests[current] = hasher.hexdigest()
            finally:
                if fd >= 0:
                    os.close(fd)
            if not digests:
                raise errors.InvalidArgument("the upload holds no file")
            if required and not any(name in digests for name in required):
                raise errors.InvalidArgument(f"the upload has no {' or '.join(required)} at its top")
            sha = digests[single] if single else tree_sha256(digests)
            files = sum(1 for p in digests if not p.endswith("/"))
            uri = await asyncio.to_thread(self._place, tenant, where, sha[:16], tree, single)
            return Stored(uri=uri, size_bytes=total, files=files, sha256=sha)
        finally:
            await asyncio.to_thread(shutil.rmtree, stage, True)

    @staticmethod
    def _create(tree: str, parts: list[str]) -> int:
        parent = os.path.join(tree, *parts[:-1])
        os.makedirs(parent, 0o700, exist_ok=True)
        try:
            return os.open(os.path.join(parent, parts[-1]),
                           os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except (FileExistsError, IsADirectoryError, NotADirectoryError):
            raise errors.InvalidArgument(f"chunk.path {'/'.join(parts)!r} clashes with another path of the upload") from None

    def _place(self, tenant: str, where: tuple[str, ...], leaf: str, tree: str, single: str) -> str:
        """Hands the staged tree over and renames it to <tenant>/<where>/<leaf>."""
        for root, dirs, files in os.walk(tree):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o750)
            for name in files:
                os.chmod(os.path.join(root, name), 0o640)
        os.chmod(tree, 0o750)
        self.tenancy.hand_over(tree, tenant)
        tenant_root = os.path.join(self.storage_root, tenant)
        if not os.path.lexists(tenant_root):
            self.tenancy.own_dir(tenant_root, tenant)
        account = self.tenancy.account(tenant)
        fd = confine.open_root(tenant_root)
        try:
            for part in (*where, leaf) if single else where:
                parent, fd = fd, -1
                fd = self._step(parent, part, account)
            if single:
                os.rename(os.path.join(tree, single), single, dst_dir_fd=fd)
                return "file://" + os.path.join(tenant_root, *where, leaf, single)
            try:
                os.rename(tree, leaf, dst_dir_fd=fd)
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # The same content is there already (named by its hash).
                st = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise errors.PermissionDenied(
                        f"{os.path.join(tenant_root, *where, leaf)} exists and is not a directory") from None
            return "file://" + os.path.join(tenant_root, *where, leaf) + "/"
        finally:
            if fd >= 0:
                os.close(fd)

    @staticmethod
    def _step(fd: int, part: str, account) -> int:
        """Opens (making it if missing) directory `part` under `fd`, never
        through a symlink; closes `fd`."""
        try:
            made = False
            try:
                os.mkdir(part, 0o750, dir_fd=fd)
                made = True
            except FileExistsError:
                pass
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise errors.PermissionDenied(
                        f"the tenant's storage holds a symlink or a file at {part!r} where the upload goes") from None
                raise
            if made and account is not None:
                os.fchown(child, account.uid, account.gid)
            return child
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

