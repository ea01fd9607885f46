"""Pure rules of the models service: URIs, specs, labels, traffic splits, load errors."""
import os

import pytest

from cloudml.models.v1 import models_service_pb2 as pb
from services.common import errors
from services.common.confine import Confiner
from services.common.tokens import ROLE_ADMIN, ROLE_MEMBER, Principal
from services.models import store
from services.models.core import ModelsCore
from services.models.rules import check_label, check_split_shape, spec_of, split_uri
from services.models.reconciler import _fetch, error_code

MEMBER = Principal("team-a", ROLE_MEMBER, "AK1", 0)
ADMIN = Principal("admin", ROLE_ADMIN, "AK2", 0)


def saved_model(path) -> str:
    os.makedirs(path)
    with open(os.path.join(path, "saved_model.pb"), "wb") as f:
        f.write(b"x")
    return str(path)


@pytest.fixture
def core(tmp_path):
    storage = str(tmp_path / "storage")
    return ModelsCore(etcd=None, auth=None, runtime=None, storage_root=storage,
                      confiner=Confiner(storage, allowed_schemes="memory"))


def test_split_uri():
    assert split_uri("/a/b") == ("file", "/a/b")
    assert split_uri("file:///a/b") == ("file", "/a/b")
    assert split_uri("s3://bucket/m") == ("s3", "s3://bucket/m")


def test_member_local_paths_must_lie_in_own_storage(core, tmp_path):
    own = saved_model(tmp_path / "storage" / "team-a" / "models" / "m" / "1")
    other = saved_model(tmp_path / "storage" / "team-b" / "models" / "m" / "1")
    outside = saved_model(tmp_path / "elsewhere")
    core.check_model_uri("file://" + own, "team-a", MEMBER)
    core.check_model_uri(own, "team-a", MEMBER)
    for uri in (other, "file://" + outside):
        with pytest.raises(errors.PermissionDenied, match="own storage"):
            core.check_model_uri(uri, "team-a", MEMBER)
    with pytest.raises(errors.InvalidArgument, match="'..'"):
        core.check_model_uri(own + "/../../../../team-b/models/m/1", "team-a", MEMBER)
    # A symlink inside the tenant's storage pointing out of it does not help.
    os.symlink(other, tmp_path / "storage" / "team-a" / "link")
    with pytest.raises(errors.PermissionDenied, match="own storage"):
        core.check_model_uri(str(tmp_path / "storage" / "team-a" / "link"), "team-a", MEMBER)
    # Nor is the admin let out of the version's tenant's storage.
    with pytest.raises(errors.PermissionDenied, match="own storage"):
        core.check_model_uri(outside, "team-b", ADMIN)


def test_local_uri_must_hold_a_saved_model(core, tmp_path):
    empty = tmp_path / "storage" / "team-a" / "empty"
    empty.mkdir(parents=True)
    with pytest.raises(errors.InvalidArgument, match="not a SavedModel"):
        core.check_model_uri(str(empty), "team-a", MEMBER)
    with pytest.raises(errors.InvalidArgument, match="absolute"):
        core.check_model_uri("relative/path", "team-a", MEMBER)
    with pytest.raises(errors.InvalidArgument, match="scheme"):
        core.check_model_uri("nosuch://x/y", "team-a", MEMBER)
    core.check_model_uri("memory://bucket/model", "team-a", MEMBER)  # remote: checked when fetched


def test_spec_ignores_output_fields():
    a = pb.ModelVersion(version=1, model_uri="s3://b/m", min_replicas=1, max_replicas=2)
    b = pb.ModelVersion(version=1, model_uri="s3://b/m", min_replicas=1, max_replicas=2,
                        state=pb.MODEL_VERSION_STATE_AVAILABLE, desired_replicas=2)
    assert spec_of(a) == spec_of(b)
    assert spec_of(a) != spec_of(pb.ModelVersion(version=1, model_uri="s3://b/m2", min_replicas=1, max_replicas=2))


@pytest.mark.parametrize("label", ["stable", "canary-2", "A_b", "x" * 63])
def test_good_labels(label):
    check_label(label)


@pytest.mark.parametrize("label", ["", "123", "x" * 64, "with space", "dot.ted"])
def test_bad_labels(label):
    with pytest.raises(errors.InvalidArgument):
        check_label(label)


@pytest.mark.parametrize("split", [[(1, 90)], [(1, 50), (1, 50)], [(1, 0), (2, 100)], [(0, 100)], [(1, 101)]])
def test_bad_traffic_splits(split):
    with pytest.raises(errors.InvalidArgument):
        check_split_shape([pb.TrafficTarget(version=v, percent=p) for v, p in split])


def test_good_traffic_splits():
    check_split_shape([pb.TrafficTarget(version=1, percent=90), pb.TrafficTarget(version=2, percent=10)])
    check_split_shape([])


def test_load_error_codes():
    assert error_code({"error": "NOT_FOUND: no SavedModel"}) == 5
    assert error_code({"error": "Cannot parse file"}) == 2
    assert error_code({"error": "x", "code": 15}) == 15
    assert error_code({"error": "x", "code": "DATA_LOSS"}) == 15


def test_route_of_a_deleted_model_is_none():
    model = pb.Model(name="m", tenant="t")
    assert store.route_bytes(model, []) is not None
    model.delete_time.seconds = 1
    assert store.route_bytes(model, []) is None


def test_route_carries_states_and_errors():
    model = pb.Model(name="m", tenant="t", public=True, default_version=1, labels={"stable": 1})
    versions = [pb.ModelVersion(version=2, state=pb.MODEL_VERSION_STATE_END, status={"code": 3, "message": "bad"}),
                pb.ModelVersion(version=1, state=pb.MODEL_VERSION_STATE_AVAILABLE)]
    route = pb.ModelRoute.FromString(store.route_bytes(model, versions))
    assert [(v.version, v.state, v.status.message) for v in route.versions] == [
        (1, pb.MODEL_VERSION_STATE_AVAILABLE, ""), (2, pb.MODEL_VERSION_STATE_END, "bad")]
    assert route.public and dict(route.labels) == {"stable": 1}


def test_fetch_copies_a_remote_saved_model(tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("CLOUDML_ALLOWED_URI_SCHEMES", "memory")
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/model/saved_model.pb", b"graph")
    fs.pipe("/bucket/model/variables/variables.index", b"index")
    target = tmp_path / "cache" / "1-abc"
    _fetch("memory://bucket/model", str(target))
    assert (target / "saved_model.pb").read_bytes() == b"graph"
    assert (target / "variables" / "variables.index").read_bytes() == b"index"
    with pytest.raises(FileNotFoundError):
        _fetch("memory://bucket/nothing", str(tmp_path / "cache" / "2-abc"))
    assert sorted(os.listdir(tmp_path / "cache")) == ["1-abc"]


def test_fetch_checks_the_uri_again(tmp_path, monkeypatch):
    monkeypatch.delenv("CLOUDML_ALLOWED_URI_SCHEMES", raising=False)
    for uri, error in [("memory://bucket/model", errors.InvalidArgument),   # no longer allowed
                       ("zip://m::file:///elsewhere/m.zip", errors.InvalidArgument),
                       ("file:///etc", errors.InvalidArgument)]:
        with pytest.raises(error):
            _fetch(uri, str(tmp_path / "cache" / "x"))
    monkeypatch.setenv("CLOUDML_ALLOWED_URI_SCHEMES", "http,https")
    with pytest.raises(errors.InvalidArgument, match="http"):
        _fetch("http://127.0.0.1:1/model", str(tmp_path / "cache" / "y"))
    assert not (tmp_path / "cache" / "x").exists()
