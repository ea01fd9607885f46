"""The addresses the reconciler publishes for a replica come from its port
file, which the replica (tenant code) writes: only the one path the
reconciler expects for each role is taken, anything else is ignored
(services/models/observe.py: _serving_address, _frame_address)."""
from __future__ import annotations

import pytest

from services.models import store
from services.models.observe import ReplicaObserver


def record(address: str) -> store.ReplicaRecord:
    return store.ReplicaRecord(tenant="t", model="m", version=1, replica_id="r1", runtime_id="models.t.m.1.r1",
                               owner_id="models/m/1/r1", workdir="/nonexistent", created=0.0, address=address)


OBSERVER = ReplicaObserver.__new__(ReplicaObserver)  # the two methods use no state
R = record("unix:/run/cloudml/t/r1.sock")


def test_the_expected_framed_socket_is_published():
    assert OBSERVER._frame_address(R, {"frame_address": "unix:/run/cloudml/t/r1.frame.sock"}) == \
        "unix:/run/cloudml/t/r1.frame.sock"


@pytest.mark.parametrize("forged", [
    "unix:/run/cloudml/other-tenant/r9.frame.sock",  # another tenant's replica
    "unix:/run/cloudml/t/r1.frame.sock/../../x.sock",
    "unix:/var/run/etcd.sock",
    "127.0.0.1:2379",  # etcd
    "unix:/run/cloudml/t/r1.server.sock",
    "",
    None,
    ["unix:/run/cloudml/t/r1.frame.sock"],
])
def test_a_forged_framed_socket_is_not(forged):
    assert OBSERVER._frame_address(R, {"frame_address": forged}) == ""


def test_no_framed_socket_for_a_replica_not_on_a_unix_socket():
    tcp = record("10.0.0.7:8500")
    assert OBSERVER._frame_address(tcp, {"frame_address": "unix:/run/cloudml/t/r1.frame.sock"}) == ""


def test_the_serving_address_is_the_expected_server_socket_or_the_public_one():
    assert OBSERVER._serving_address(R, {"replica_address": "unix:/run/cloudml/t/r1.server.sock"}) == \
        "unix:/run/cloudml/t/r1.server.sock"
    for forged in ("127.0.0.1:2379", "unix:/run/cloudml/u/r2.server.sock", None):
        assert OBSERVER._serving_address(R, {"replica_address": forged}) == R.address
