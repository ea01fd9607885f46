"""services.common.sockets.pin_socket: the platform calls a replica by its
own link to the replica's socket, never by a name in the tenant's directory,
which anything running as the tenant can rename."""
from __future__ import annotations

import os
import socket
import stat

from services.common.sockets import pin_socket, pinned_path, unpin_socket


def bound(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    return s


def layout(tmp_path):
    root = tmp_path / "root"
    tenant = root / "acme"
    tenant.mkdir(parents=True)
    return str(root), str(tenant)


def test_a_socket_of_the_tenants_user_is_linked_into_the_platforms_directory(tmp_path):
    root, tenant = layout(tmp_path)
    server = bound(os.path.join(tenant, "r1.frame.sock"))
    pinned = pin_socket(root, os.path.join(tenant, "r1.frame.sock"), os.geteuid())
    assert pinned == pinned_path(root, os.path.join(tenant, "r1.frame.sock")) == os.path.join(
        root, ".platform", "acme.r1.frame.sock")
    assert stat.S_IMODE(os.stat(os.path.dirname(pinned)).st_mode) == 0o700
    assert os.lstat(pinned).st_ino == os.lstat(os.path.join(tenant, "r1.frame.sock")).st_ino
    # A rename in the tenant's directory changes nothing the link reaches.
    os.rename(os.path.join(tenant, "r1.frame.sock"), os.path.join(tenant, "moved"))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(pinned)
    client.close()
    unpin_socket(root, os.path.join(tenant, "r1.frame.sock"))
    assert not os.path.exists(pinned)
    server.close()


def test_a_symbolic_link_a_file_another_users_socket_or_nothing_is_not_linked(tmp_path):
    root, tenant = layout(tmp_path)
    elsewhere = bound(str(tmp_path / "other.sock"))
    os.symlink(str(tmp_path / "other.sock"), os.path.join(tenant, "link.sock"))
    with open(os.path.join(tenant, "file.sock"), "w"):
        pass
    mine = bound(os.path.join(tenant, "mine.sock"))
    assert pin_socket(root, os.path.join(tenant, "link.sock"), os.geteuid()) is None
    assert pin_socket(root, os.path.join(tenant, "file.sock"), os.geteuid()) is None
    assert pin_socket(root, os.path.join(tenant, "gone.sock"), os.geteuid()) is None
    assert pin_socket(root, os.path.join(tenant, "mine.sock"), os.geteuid() + 1) is None  # not the tenant's user
    assert not [n for n in os.listdir(os.path.join(root, ".platform"))]  # nothing left behind
    elsewhere.close()
    mine.close()
