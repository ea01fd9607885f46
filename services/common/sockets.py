"""Where replicas that only the platform may reach listen: Unix sockets in a
directory per tenant (model servers, TensorBoard replicas).

`socket_root(data_dir)` is `/run/cloudml-<hash of the data dir>` (else under
the temp dir): short, since socket paths are limited to 107 bytes and data
dirs can be long, and one per data dir (two platforms side by side never
share it). `tenant_socket_dir` is `<root>/<tenant>` (a long name is cut and
hashed), mode 0700, under a root of mode 0711 that only the platform's user
owns; with tenant isolation on, the tenant's user owns it (its replicas
create their sockets there; no other tenant can reach them).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import tempfile


def socket_root(data_dir: str) -> str:
    digest = hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest()[:10]
    base = "/run" if os.access("/run", os.W_OK | os.X_OK) else tempfile.gettempdir()
    return os.path.join(base, f"cloudml-{digest}")


def private_dir(path: str, mode: int) -> None:
    """Creates `path` (one level) as this process's own directory with `mode`;
    refuses one that someone else made (the temp dir is shared)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise PermissionError(f"{path} is not a directory of this platform's user")
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def tenant_socket_dir(root: str, tenant: str, tenancy=None) -> str:
    """`tenant`'s socket directory under `root`, created if missing. Blocking
    (it may create the tenant's account): run it on a thread."""
    private_dir(root, 0o711)
    name = tenant if len(tenant) <= 40 else f"{tenant[:31]}-{hashlib.sha256(tenant.encode()).hexdigest()[:8]}"
    path = os.path.join(root, name)
    if tenancy is not None and tenancy.enabled:
        if os.path.islink(path):
            raise PermissionError(f"{path} is a symbolic link")
        tenancy.own_dir(path, tenant, 0o700)
    else:
        private_dir(path, 0o700)
    return path


#: Under the socket root: the platform's own links to replicas' sockets (pin_socket).
PINNED_DIR = ".platform"


def pinned_path(root: str, path: str) -> str:
    """Where pin_socket links the socket at `path` (in a tenant's directory under `root`)."""
    return os.path.join(root, PINNED_DIR, f"{os.path.basename(os.path.dirname(path))}.{os.path.basename(path)}")


def pin_socket(root: str, path: str, uid: int) -> str | None:
    """A hard link, in the platform's own directory `<root>/.platform` (0700),
    to the socket at `path`, if that is a socket owned by `uid`; None if it
    is not (gone, a regular file, a symbolic link, another user's).

    Why: a tenant's socket directory is the tenant's own (its replicas bind
    their sockets there), so anything running as the tenant (a trainer, a
    notebook) can rename the entries in it, e.g. replace its replica's
    socket with a symbolic link to another tenant's replica's socket, which
    the platform (root) would follow. The link names the socket's inode: a
    later rename in the tenant's directory does not change what it reaches.
    link() does not follow a symbolic link, and the link is checked after it
    is made, so a swap between the check and the link is caught too; the
    tenant cannot link another user's socket into its directory (its
    directory is 0700, and protected_hardlinks)."""
    target = pinned_path(root, path)
    private_dir(os.path.dirname(target), 0o700)
    tmp = f"{target}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(path, tmp, follow_symlinks=False)
    except OSError:
        return None
    st = os.lstat(tmp)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != uid:
        os.unlink(tmp)
        return None
    os.replace(tmp, target)
    return target


def unpin_socket(root: str, path: str) -> None:
    """Removes pin_socket's link for `path`, if any."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pinned_path(root, path))


async def pinned_address(address: str, root: str, tenant: str, tenancy=None) -> str | None:
    """The address the platform calls a replica of `tenant` at `address` by:
    for `unix:PATH` (a socket in the tenant's directory under `root`), its
    pin_socket link, or None if PATH is not a socket of the tenant's user
    (with tenant isolation off, of this process's); any other address as
    is."""
    if not address.startswith("unix:"):
        return address
    uid = os.geteuid()
    if tenancy is not None and tenancy.enabled:
        account = tenancy.cached(tenant) or await asyncio.to_thread(tenancy.account, tenant)
        uid = account.uid
    pinned = pin_socket(root, address[len("unix:"):], uid)
    return f"unix:{pinned}" if pinned else None
