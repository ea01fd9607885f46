"""Fixtures shared by every test layer.

`etcd_server` is a real etcd process on loopback for the whole session; tests
that need their own (to kill or restart it) start one with `EtcdProcess`.
`etcd_prefix` gives each test a fresh key prefix, `etcd_space` a fresh key
namespace on the session etcd for services (`deploy.local.stack.EtcdTarget`:
pass it where an etcd endpoint goes; services get `--etcd-namespace`).

The serving tests (end to end, conformance) run on `serving_platform(data_dir)`:
a platform they start with `cloudml-platform up`, or, with `--endpoint
HOST:PORT --credentials FILE [--rest-endpoint URL]`, one that runs already
(tests/e2e/serving_platform.py), as etcd's and Temporal's suites target a
deployed server. Tests that kill or inspect the platform's own processes or
files are marked `needs_local_platform`; under `--endpoint` they are
deselected, and the report says so.
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

LOCAL_ONLY = "needs_local_platform"
_DESELECTED = pytest.StashKey[int]()


def pytest_addoption(parser):
    group = parser.getgroup("cloudml", "Cloud-ML: the platform the serving tests run on")
    group.addoption("--endpoint", metavar="HOST:PORT",
                    help="run the end-to-end and conformance tests against the platform whose gateway listens "
                         f"here instead of starting one; tests marked {LOCAL_ONLY} are deselected")
    group.addoption("--rest-endpoint", metavar="URL",
                    help="that platform's REST endpoint (default: the one in --credentials)")
    group.addoption("--credentials", metavar="FILE",
                    help="an admin credentials.json of that platform, as `cloudml-platform up` writes it")


def pytest_configure(config):
    config.addinivalue_line("markers", f"{LOCAL_ONLY}: kills or inspects the platform's own processes or files, "
                                       "so it cannot run against --endpoint")
    if config.getoption("endpoint") and not config.getoption("credentials"):
        raise pytest.UsageError("--endpoint needs --credentials FILE (the platform's admin credentials.json)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("endpoint"):
        return
    local = [item for item in items if item.get_closest_marker(LOCAL_ONLY)]
    if local:
        items[:] = [item for item in items if not item.get_closest_marker(LOCAL_ONLY)]
        config.hook.pytest_deselected(items=local)
    config.stash[_DESELECTED] = len(local)


def pytest_report_header(config):
    endpoint = config.getoption("endpoint")
    if endpoint:
        return [f"platform under test: {endpoint} (--endpoint; none is started); "
                f"tests marked {LOCAL_ONLY} are deselected"]
    return []


def pytest_terminal_summary(terminalreporter, config):
    endpoint = config.getoption("endpoint")
    if endpoint:
        count = config.stash.get(_DESELECTED, None)  # counted where the tests were collected
        what = f"{count} test(s)" if count is not None else "the tests"
        terminalreporter.write_line(f"--endpoint {endpoint}: deselected {what} marked {LOCAL_ONLY} "
                                    "(they kill or inspect the platform's own processes or files)")


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


@pytest.fixture(scope="session")
def serving_platform(request, tmp_path_factory):
    """`make(data_dir)`: the platform a serving test module runs on, to
    `start()`, `wait_up()` and `down()`: a `ServingPlatform` in `data_dir`, or
    under `--endpoint` a `RemotePlatform` (its config files in `data_dir`)."""
    from tests.e2e.serving_platform import RemotePlatform, ServingPlatform

    endpoint = request.config.getoption("endpoint")
    if not endpoint:
        return ServingPlatform
    credentials = os.path.abspath(request.config.getoption("credentials"))
    rest = request.config.getoption("rest_endpoint")
    return lambda data_dir: RemotePlatform(data_dir, endpoint, credentials, rest)
