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
