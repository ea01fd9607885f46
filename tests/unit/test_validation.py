import pytest

from cloudml.common.v1.resources_pb2 import Resources
from services.common import errors, validation


@pytest.mark.parametrize("name", ["a", "team-1", "x" * 63, "0abc"])
def test_valid_names(name):
    assert validation.check_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "-a", "a-", "a_b", "x" * 64, "a.b", "é"])
def test_invalid_names_are_invalid_argument(name):
    with pytest.raises(errors.InvalidArgument):
        validation.check_name(name)


def test_negative_resources_name_the_field():
    with pytest.raises(errors.InvalidArgument, match="limits.gpus"):
        validation.check_resources(Resources(gpus=-1), "limits")


def test_absurd_resources_name_the_field():
    with pytest.raises(errors.InvalidArgument, match="memory_bytes"):
        validation.check_resources(Resources(memory_bytes=2**62))


@pytest.mark.parametrize("owner", ["", "a b", "x" * 254])
def test_bad_owner_ids(owner):
    with pytest.raises(errors.InvalidArgument):
        validation.check_owner_id(owner)


@pytest.mark.parametrize("name", ["half_plus_two", "linear", "a-b_c"])
def test_model_names_may_hold_underscores(name):
    assert validation.check_model_name(name) == name


@pytest.mark.parametrize("name", ["_a", "a_", "team.model", "A", ""])
def test_bad_model_names(name):
    with pytest.raises(errors.InvalidArgument):
        validation.check_model_name(name)
