"""`cloudml-platform up --etcd-namespace`: chosen on the first start, kept
after it, passed to every service (deploy/local/launcher.py, supervisor.py)."""
import pytest

from deploy.local.launcher import SERVICES, etcd_namespace, prepare
from deploy.local.layout import Layout, read_json
from deploy.local.supervisor import Ports, Supervisor


def test_first_start_takes_the_namespace_and_later_starts_keep_it(tmp_path):
    layout = Layout.of(str(tmp_path / "data"))
    assert prepare(layout, 8500, 8501, "/ns/one") == (Ports(8500, 8501), "/ns/one")
    assert read_json(layout.config)["etcd_namespace"] == "/ns/one"
    assert etcd_namespace(layout, None) == "/ns/one"  # `up` without the flag
    assert prepare(layout, 8502, 8503)[1] == "/ns/one"
    with pytest.raises(RuntimeError, match="keeps its state under etcd namespace '/ns/one'"):
        prepare(layout, 8500, 8501, "/ns/two")


def test_without_a_namespace_none_is_saved_and_none_may_be_added_later(tmp_path):
    layout = Layout.of(str(tmp_path / "data"))
    assert prepare(layout, 8500, 8501)[1] == ""
    assert "etcd_namespace" not in read_json(layout.config)
    with pytest.raises(RuntimeError):
        prepare(layout, 8500, 8501, "/late")


def test_every_service_command_carries_the_namespace(tmp_path):
    sup = Supervisor(Layout.of(str(tmp_path)), list(SERVICES), Ports(8500, 8501), etcd_namespace="/ns/x")
    for service in sup.services:
        command = service.command()
        assert command[command.index("--etcd-namespace") + 1] == "/ns/x", command
    plain = Supervisor(Layout.of(str(tmp_path)), list(SERVICES), Ports(8500, 8501))
    assert not [s for s in plain.services if "--etcd-namespace" in s.command()]
