"""Fixtures shared by every test layer.

`etcd_server` is a real etcd process on loopback for the whole session; tests
that need their own (to kill or restart it) start one with `EtcdProcess`.
`etcd_prefix` gives each test a fresh key prefix, `etcd_space` a fresh key
namespace on the session etcd for services (`deploy.local.stack.EtcdTarget`:
pass it where an etcd endpoint goes; services get `--etcd-namespace`).
"""
from __future__ import annotations

import os
import sys
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from deploy.local.etcd import EtcdProcess  # noqa: E402
from deploy.local.stack import EtcdTarget, fresh_namespace  # noqa: E402


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    server = EtcdProcess(str(tmp_path_factory.mktemp("etcd")), log_path=None).start()
    yield server
    server.stop()


@pytest.fixture
def etcd_endpoint(etcd_server) -> str:
    return etcd_server.endpoint


@pytest.fixture
def etcd_prefix() -> str:
    return f"/cloudml-test/{uuid.uuid4().hex[:12]}/"


@pytest.fixture
def etcd_space(etcd_server) -> EtcdTarget:
    """A keyspace of this test's own on the session etcd (its keys go after the test)."""
    target = EtcdTarget(etcd_server.endpoint, fresh_namespace())
    yield target
    EtcdTarget(etcd_server.endpoint).delete_prefix(target.namespace + "/")
