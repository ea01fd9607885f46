"""The models service's key layout under a root of the caller's choosing."""
from __future__ import annotations

import json

from services.models import store
from services.models.store import ModelKeys, ModelStore, ReplicaRecord


def test_default_keys_are_the_default_layout():
    keys = ModelStore(None).keys
    assert keys.root == store.PREFIX == "/cloudml/models/"
    assert keys.version("t", "m", 3) == store.DEFAULT_KEYS.version("t", "m", 3) == "/cloudml/models/versions/t/m/" + "3".zfill(19)
    assert keys.endpoint("t", "m", 3, "r") == store.DEFAULT_KEYS.endpoint("t", "m", 3, "r") == "/cloudml/models/endpoints/t/m/3/r"


def test_keys_under_another_root_parse_back():
    keys = ModelKeys("/test/abc")
    assert keys.model("t", "m") == "/test/abc/models/t/m"
    assert keys.parse_model(keys.model("t", "m")) == ("t", "m")
    assert keys.parse_version(keys.version("t", "m", 12)) == ("t", "m", 12)
    assert keys.parse_endpoint(keys.endpoint("t", "m", 12, "r1")) == ("t", "m", 12, "r1")
    assert keys.parse_route(keys.route("t", "m")) == ("t", "m")
    assert keys.endpoint("t", "m", 12, "r1").startswith(keys.endpoints_of("t", "m", 12))


def test_replica_record_keys_follow_its_layout_which_is_not_stored():
    keys = ModelKeys("/test/abc/")
    record = ReplicaRecord("t", "m", 2, "r1", "rt", "owner", "/w", 1.0, keys=keys)
    assert record.key == keys.replica("t", "m", 2, "r1")
    assert record.version_key == keys.version("t", "m", 2)
    raw = record.encode()
    assert "keys" not in json.loads(raw)
    again = ReplicaRecord.decode(raw, keys)
    assert again == record and again.key == record.key
    assert ReplicaRecord.decode(raw).key == store.DEFAULT_KEYS.replica("t", "m", 2, "r1")
