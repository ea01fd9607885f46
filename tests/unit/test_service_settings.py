"""Service flags become typed settings once, in __main__ (services/common/server.py, services/jobs/__main__.py)."""
import pytest

from services.common.server import parse_settings
from services.common.uploads import UploadLimits
from services.jobs import __main__ as jobs_main
from services.jobs.core import Defaults
from services.jobs.server import JobsSettings


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for name in ("CLOUDML_ALLOWED_URI_SCHEMES", "CLOUDML_UPLOAD_MAX_BYTES", "CLOUDML_TENANT_STORAGE_MAX_BYTES",
                 "CLOUDML_ETCD_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)


def test_common_flags_are_typed_fields():
    settings, _ = parse_settings("jobs", ["--data-dir", "/d", "--allowed-uri-schemes", "s3,https",
                                          "--upload-max-bytes", "1024", "--lease-ttl", "3"])
    assert settings.data_dir == "/d" and settings.lease_ttl == 3
    assert settings.allowed_uri_schemes == "s3,https"
    assert settings.uploads == UploadLimits(max_upload_bytes=1024)
    assert settings.etcd_namespace == ""


def test_etcd_namespace_flag_reaches_the_settings():
    settings, _ = parse_settings("auth", ["--etcd", "127.0.0.1:2379", "--etcd-namespace", "/cloudml-test/ab12"])
    assert (settings.etcd, settings.etcd_namespace) == ("127.0.0.1:2379", "/cloudml-test/ab12")


def test_jobs_flags_left_out_give_the_settings_defaults():
    _, args = parse_settings("jobs", [], jobs_main._arguments)
    assert jobs_main._jobs_settings(args) == JobsSettings()


def test_jobs_flags_build_jobs_settings():
    _, args = parse_settings("jobs", ["--stop-grace", "7", "--default-cpu", "2", "--default-memory", "1Gi",
                                      "--capacity-cpu", "4", "--install-arg=-q", "--install-arg=--no-cache"],
                             jobs_main._arguments)
    settings = jobs_main._jobs_settings(args)
    assert settings.stop_grace == 7.0
    assert settings.defaults == Defaults(cpu_millis=2000, memory_bytes=1 << 30, gpus=0)
    assert settings.capacity_cpu == 4000 and settings.capacity_memory is None
    assert settings.install_args == ("-q", "--no-cache")
