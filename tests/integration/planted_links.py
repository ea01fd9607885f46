"""What a tenant can do to its own socket directory (anything running as the
tenant can rename its entries): replace sockets there with symbolic links to
a socket of another user's (a decoy standing for another tenant's replica or
page server). For the tests that the platform never follows such a link
(services/common/sockets.py pin_socket)."""
from __future__ import annotations

import contextlib
import os
import socket

import pytest

from services.common import errors


def tenant_name(pinned: str, tenant: str) -> str:
    """The socket in the tenant's directory that the platform's link `pinned`
    (`<root>/.platform/<tenant>.<name>`) was made from: `<root>/<tenant>/<name>`."""
    root = os.path.dirname(os.path.dirname(pinned))
    return os.path.join(root, tenant, os.path.basename(pinned)[len(tenant) + 1:])


@contextlib.contextmanager
def planted(names: list[str], decoy_path: str):
    """Each of `names` renamed aside and replaced by a symbolic link to a
    listening decoy socket at `decoy_path`; yields the decoy (whose accept
    queue shows whether anyone connected). Restores everything after."""
    decoy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    decoy.bind(decoy_path)
    decoy.listen(16)
    moved = []
    try:
        for name in names:
            os.rename(name, f"{name}.moved")
            moved.append(name)
            os.symlink(decoy_path, name)
        yield decoy
    finally:
        for name in moved:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            os.rename(f"{name}.moved", name)
        decoy.close()


def reached(decoy: socket.socket) -> bool:
    """Whether anyone connected to the decoy."""
    decoy.setblocking(False)
    try:
        decoy.accept()[0].close()
        return True
    except BlockingIOError:
        return False


async def resolve_refuses_a_planted_link(resolve, tenant: str, decoy_path: str) -> str:
    """`resolve()` (-> "unix:<path>") hands out the platform's own link to a
    replica's socket in `<root>/.platform/`, and, once the tenant has replaced
    its socket by a link to a decoy, answers UNAVAILABLE without touching the
    decoy. Returns the pinned path."""
    pinned = (await resolve())[len("unix:"):]
    assert os.path.basename(os.path.dirname(pinned)) == ".platform"
    name = tenant_name(pinned, tenant)
    assert os.lstat(name).st_ino == os.lstat(pinned).st_ino
    with planted([name], decoy_path) as decoy:
        with pytest.raises(errors.Unavailable):
            await resolve()
        assert not reached(decoy)
    return pinned
