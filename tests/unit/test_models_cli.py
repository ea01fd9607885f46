"""`cloudml models` argument handling and the SDK's request shaping (no server)."""
import pytest

from cloudml import errors, serving
from cloudml.cli.main import build_parser


def test_seed_format_becomes_columnar_inputs_with_dtypes_applied():
    body = serving.to_rest_request({"keys_dtype": "int32", "keys": [[1], [2]], "X_dtype": "float32",
                                    "X": [[10], [30.0]]})
    assert body == {"inputs": {"keys": [[1], [2]], "X": [[10.0], [30.0]]}}
    assert isinstance(body["inputs"]["X"][0][0], float) and isinstance(body["inputs"]["keys"][0][0], int)


def test_tf_serving_json_passes_through():
    for data in ({"instances": [[1.0]]}, {"inputs": {"x": [[1.0]]}, "signature_name": "s"}):
        assert serving.to_rest_request(data) == data
    assert serving.to_rest_request([[1.0], [2.0]]) == {"instances": [[1.0], [2.0]]}
    assert serving.to_rest_request({"instances": [1]}, signature_name="sig")["signature_name"] == "sig"


def test_bad_seed_data_is_invalid_argument():
    for data in ({"X_dtype": "float32"}, {"X_dtype": "float32", "Y": [1]}, {"X_dtype": "int32", "X": [1.5]},
                 {"X_dtype": "complex", "X": [1]}, "text"):
        with pytest.raises(errors.InvalidArgument):
            serving.to_rest_request(data)


def test_versions_accept_the_seed_form():
    assert [serving.parse_version(v) for v in ("1", "v1", "V12", 3, "0")] == [1, 1, 12, 3, 0]
    for bad in ("x", "v", "-1", "1.5", ""):
        with pytest.raises(ValueError):
            serving.parse_version(bad)


def test_predict_urls():
    assert serving.predict_url("http://h:8501", "m") == "http://h:8501/v1/models/m:predict"
    assert serving.predict_url("http://h:8501", "m", version=3) == "http://h:8501/v1/models/m/versions/3:predict"
    assert serving.predict_url("http://h:8501", "m", label="stable") == "http://h:8501/v1/models/m/labels/stable:predict"


def test_models_commands_parse():
    parser = build_parser()
    args = parser.parse_args(["models", "create", "-n", "linear", "-v", "v1", "-u", "/tmp/x", "--replicas", "2",
                              "--cpu", "500m", "--memory", "1Gi", "-o", "json"])
    assert (args.name, args.version, args.replicas, args.cpu, args.memory, args.output) == (
        "linear", 1, 2, 500, 2**30, "json")
    args = parser.parse_args(["models", "versions", "create", "linear", "-u", "s3://b/m"])
    assert args.version == 0
    args = parser.parse_args(["models", "predict", "linear", "v2", "-d", "data.json"])
    assert (args.name, args.version, args.data) == ("linear", 2, "data.json")
    args = parser.parse_args(["models", "scale", "linear", "1", "--min", "1", "--max", "3"])
    assert (args.min_replicas, args.max_replicas) == (1, 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["models", "create", "-n", "linear", "-v", "vx", "-u", "/tmp/x"])


def test_endpoint_locality():
    assert serving._endpoint_is_local("127.0.0.1:8500") and serving._endpoint_is_local("localhost:8500")
    assert serving._endpoint_is_local("[::1]:8500")
    assert not serving._endpoint_is_local("10.1.2.3:8500") and not serving._endpoint_is_local("ml.example.com:8500")


def _tree(root, files: dict) -> str:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(root)


def test_upload_copies_then_reuses_identical_content(tmp_path):
    source = _tree(tmp_path / "src", {"saved_model.pb": b"g", "variables/v.index": b"i"})
    target = str(tmp_path / "storage" / "t" / "models" / "m" / "1")
    serving._copy_local(source, target, 1, lambda: True)
    assert serving.tree_digest(source) == serving.tree_digest(target)
    serving._copy_local(source, target, 1, lambda: True)  # same content: nothing to do
    assert sorted(p.name for p in (tmp_path / "storage" / "t" / "models" / "m").iterdir()) == ["1"]


def test_upload_refuses_other_content_for_a_live_version_and_replaces_a_deleted_ones(tmp_path):
    first = _tree(tmp_path / "a", {"saved_model.pb": b"one"})
    second = _tree(tmp_path / "b", {"saved_model.pb": b"two"})
    target = str(tmp_path / "storage" / "m" / "1")
    serving._copy_local(first, target, 1, lambda: True)
    with pytest.raises(errors.AlreadyExists):
        serving._copy_local(second, target, 1, lambda: True)
    serving._copy_local(second, target, 1, lambda: False)
    assert (tmp_path / "storage" / "m" / "1" / "saved_model.pb").read_bytes() == b"two"
    assert sorted(p.name for p in (tmp_path / "storage" / "m").iterdir()) == ["1"]
