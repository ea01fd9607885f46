"""The auth service's key-encryption key file and sealing (services/auth/kek.py)."""
from __future__ import annotations

import multiprocessing
import os
import stat

import pytest

from services.auth import kek
from services.auth.kek import KeyEncryptionError


def test_load_or_create_makes_a_0600_file_of_32_random_bytes_in_a_0700_dir(tmp_path):
    path = tmp_path / "secrets" / "kek"
    key, created = kek.load_or_create(str(path))
    assert created
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert path.read_bytes() == key.key and len(key.key) == 32
    assert os.listdir(path.parent) == ["kek"]  # no temporary file left
    again, created = kek.load_or_create(str(path))
    assert not created and again.key == key.key
    assert kek.load_or_create(str(tmp_path / "other"))[0].key != key.key


def _create(path: str, queue) -> None:
    key, created = kek.load_or_create(path)
    queue.put((key.key, created))


def test_processes_creating_the_file_at_once_all_end_up_with_one_key(tmp_path):
    path = str(tmp_path / "kek")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_create, args=(path, queue)) for _ in range(8)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(30)
    assert len({k for k, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert open(path, "rb").read() == results[0][0]
    assert os.listdir(tmp_path) == ["kek"]


def test_seal_and_open_round_trip_bound_to_the_key_id(tmp_path):
    key, _ = kek.load_or_create(str(tmp_path / "kek"))
    a, b = key.seal("kid-a", b"private a"), key.seal("kid-b", b"private b")
    assert key.open("kid-a", a) == b"private a" and key.open("kid-b", b) == b"private b"
    assert b"private" not in repr(a).encode()
    # Swapped between key ids: neither decrypts.
    for kid, sealed in (("kid-a", b), ("kid-b", a)):
        with pytest.raises(KeyEncryptionError, match="does not decrypt"):
            key.open(kid, sealed)
    tampered = dict(a, ciphertext=a["ciphertext"][:-4] + ("AAAA" if a["ciphertext"][-4:] != "AAAA" else "BBBB"))
    with pytest.raises(KeyEncryptionError, match="does not decrypt"):
        key.open("kid-a", tampered)


def test_open_with_another_key_file_names_the_wrong_file(tmp_path):
    right, _ = kek.load_or_create(str(tmp_path / "right"))
    wrong, _ = kek.load_or_create(str(tmp_path / "wrong"))
    sealed = right.seal("kid", b"secret")
    with pytest.raises(KeyEncryptionError, match="wrong or replaced key file") as info:
        wrong.open("kid", sealed)
    assert str(tmp_path / "wrong") in str(info.value) and right.key_id in str(info.value)
    assert right.key.hex() not in repr(right)


@pytest.mark.parametrize("content", [b"", b"x" * 31, b"x" * 33, b"x" * 64])
def test_load_refuses_a_file_that_is_not_a_32_byte_key(tmp_path, content):
    path = tmp_path / "kek"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyEncryptionError, match="not a 32-byte key"):
        kek.load(str(path))
    with pytest.raises(KeyEncryptionError):
        kek.load_or_create(str(path))
    assert path.read_bytes() == content  # never replaced


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_load_refuses_a_file_other_users_may_read(tmp_path, mode):
    path = tmp_path / "kek"
    path.write_bytes(os.urandom(32))
    path.chmod(mode)
    with pytest.raises(KeyEncryptionError, match="chmod 600"):
        kek.load(str(path))


def test_load_of_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        kek.load(str(tmp_path / "absent"))
    assert not (tmp_path / "absent").exists()
