"""Ed25519 signature verification by the OpenSSL library this Python is
already linked with (the libcrypto its `hashlib` and `ssl` modules load).

Why not `cryptography`: every service verifies tokens, but only the auth
service signs them. `cryptography`'s Rust extension costs each process about
8 MB of resident memory (and PyJWT imports it), a seventh of a service at
rest (issue 14's memory goal), for one call that libcrypto, mapped into every
process anyway, makes in a few lines. The auth service keeps `cryptography`
for what it does besides (key generation, signing, AES-GCM sealing).

Only verification lives here, through EVP_DigestVerify (OpenSSL 1.1.1 or
newer, which Python 3.11 requires), with a public key given as the PEM
SubjectPublicKeyInfo the auth service publishes.
"""
from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import threading

_EVP_PKEY_ED25519 = 1087  # NID_ED25519
# DER SubjectPublicKeyInfo of an Ed25519 key: SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING (32 bytes) }
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
KEY_BYTES = 32
SIGNATURE_BYTES = 64

_lib = None
_lib_lock = threading.Lock()


def _libcrypto_path() -> str:
    """The libcrypto already mapped into this process (Python's `_hashlib`
    is linked with it), else the system's."""
    import _hashlib  # noqa: F401, PLC0415 (maps libcrypto into the process)

    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rstrip("\n").split(maxsplit=5)[-1]
            if "/libcrypto.so" in path:
                return path
    found = ctypes.util.find_library("crypto")
    if not found:
        raise OSError("libcrypto (OpenSSL) not found")
    return found


def _libcrypto():
    global _lib
    with _lib_lock:
        if _lib is None:
            lib = ctypes.CDLL(_libcrypto_path())
            p, i, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
            lib.EVP_PKEY_new_raw_public_key.argtypes = (i, p, ctypes.c_char_p, size)
            lib.EVP_PKEY_new_raw_public_key.restype = p
            lib.EVP_PKEY_free.argtypes = (p,)
            lib.EVP_PKEY_free.restype = None
            lib.EVP_MD_CTX_new.argtypes = ()
            lib.EVP_MD_CTX_new.restype = p
            lib.EVP_MD_CTX_free.argtypes = (p,)
            lib.EVP_MD_CTX_free.restype = None
            lib.EVP_DigestVerifyInit.argtypes = (p, p, p, p, p)
            lib.EVP_DigestVerifyInit.restype = i
            lib.EVP_DigestVerify.argtypes = (p, ctypes.c_char_p, size, ctypes.c_char_p, size)
            lib.EVP_DigestVerify.restype = i
            lib.ERR_clear_error.argtypes = ()
            lib.ERR_clear_error.restype = None
            _lib = lib
        return _lib


def raw_public_key_from_pem(pem: str | bytes) -> bytes:
    """The 32 key bytes of an Ed25519 public key in PEM (SubjectPublicKeyInfo);
    ValueError for anything else."""
    text = pem.decode("ascii", "strict") if isinstance(pem, bytes) else pem
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 3 or lines[0] != "-----BEGIN PUBLIC KEY-----" or lines[-1] != "-----END PUBLIC KEY-----":
        raise ValueError("not a PEM public key")
    try:
        der = base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("malformed PEM public key") from None
    if len(der) != len(_SPKI_PREFIX) + KEY_BYTES or not der.startswith(_SPKI_PREFIX):
        raise ValueError("not an Ed25519 public key")
    return der[len(_SPKI_PREFIX):]


class PublicKey:
    """An Ed25519 public key that verifies signatures; safe to share among
    threads (each verification has its own context)."""

    __slots__ = ("_lib", "_pkey", "raw")

    def __init__(self, raw: bytes):
        if len(raw) != KEY_BYTES:
            raise ValueError(f"an Ed25519 public key is {KEY_BYTES} bytes")
        self._lib = _libcrypto()
        self.raw = bytes(raw)
        self._pkey = self._lib.EVP_PKEY_new_raw_public_key(_EVP_PKEY_ED25519, None, self.raw, KEY_BYTES)
        if not self._pkey:
            self._lib.ERR_clear_error()
            raise ValueError("libcrypto refused the Ed25519 public key")

    @classmethod
    def from_pem(cls, pem: str | bytes) -> PublicKey:
        return cls(raw_public_key_from_pem(pem))

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True only if `signature` is this key's Ed25519 signature of `message`."""
        if len(signature) != SIGNATURE_BYTES:
            return False
        lib = self._lib
        ctx = lib.EVP_MD_CTX_new()
        if not ctx:
            raise MemoryError("EVP_MD_CTX_new failed")
        try:
            if lib.EVP_DigestVerifyInit(ctx, None, None, None, self._pkey) != 1:
                lib.ERR_clear_error()
                return False
            ok = lib.EVP_DigestVerify(ctx, signature, SIGNATURE_BYTES, message, len(message)) == 1
            if not ok:
                lib.ERR_clear_error()  # a failed verification leaves an error on the thread's queue
            return ok
        finally:
            lib.EVP_MD_CTX_free(ctx)

    def __del__(self):
        pkey, self._pkey = getattr(self, "_pkey", None), None
        if pkey:
            self._lib.EVP_PKEY_free(pkey)
