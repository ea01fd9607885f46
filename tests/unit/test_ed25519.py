"""Ed25519 verification by the process's libcrypto (services/common/ed25519.py),
checked against `cryptography`'s signatures and keys."""
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.common.ed25519 import PublicKey, raw_public_key_from_pem


def _pem(public) -> str:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture
def private():
    return Ed25519PrivateKey.generate()


def test_raw_key_from_pem_is_the_key(private):
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw_public_key_from_pem(_pem(private.public_key())) == raw
    assert raw_public_key_from_pem(_pem(private.public_key()).encode()) == raw


@pytest.mark.parametrize("size", [0, 1, 63, 1000, 70_000])
def test_verifies_what_cryptography_signs(private, size):
    key = PublicKey.from_pem(_pem(private.public_key()))
    message = os.urandom(size)
    signature = private.sign(message)
    assert key.verify(signature, message)
    assert not key.verify(signature, message + b"x")
    if size:
        flipped = bytes([message[0] ^ 1]) + message[1:]
        assert not key.verify(signature, flipped)


def test_refuses_tampered_and_malformed_signatures(private):
    key = PublicKey.from_pem(_pem(private.public_key()))
    signature = private.sign(b"hello")
    for bad in (bytes([signature[0] ^ 1]) + signature[1:], signature[:-1] + bytes([signature[-1] ^ 0x80]),
                signature[:63], signature + b"\0", b"", b"\0" * 64, b"\xff" * 64):
        assert not key.verify(bad, b"hello")
    assert key.verify(signature, b"hello")  # failures left nothing behind that breaks the next call


def test_another_keys_signature_is_refused(private):
    other = Ed25519PrivateKey.generate()
    assert not PublicKey.from_pem(_pem(private.public_key())).verify(other.sign(b"m"), b"m")


@pytest.mark.parametrize("pem", [
    "",
    "not a key",
    "-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----",
    "-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----",
    "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----",  # the prefix, no key
])
def test_malformed_pem_is_refused(pem):
    with pytest.raises(ValueError):
        PublicKey.from_pem(pem)


def test_other_key_types_are_refused():
    for public in (rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(),
                   ec.generate_private_key(ec.SECP256R1()).public_key()):
        with pytest.raises(ValueError, match="not an Ed25519"):
            PublicKey.from_pem(_pem(public))
    private_pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    with pytest.raises(ValueError):
        PublicKey.from_pem(private_pem)


def test_raw_key_of_wrong_size_is_refused():
    with pytest.raises(ValueError):
        PublicKey(b"\0" * 31)
