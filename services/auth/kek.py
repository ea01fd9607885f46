"""The key-encryption key (KEK) that keeps the token-signing private keys
encrypted at rest: etcd never holds a private key in plaintext.

The KEK is 32 random bytes in a file outside etcd (mode 0600, in a 0700
directory, readable only by the platform's user); `--key-encryption-key-file`
names it. etcd holds each signing key's private half sealed with AES-256-GCM
under the KEK, with the key id it is stored under as associated data: a
sealed value copied or swapped to another key id does not decrypt. A sealed
value also names the KEK it needs by a fingerprint (an HMAC of a constant
under the KEK, which reveals nothing of it), so a wrong key file is reported
as such rather than as a corrupt record.

Creating the file (the first start): the key is written and fsynced to a
temporary file of a unique name (O_CREAT|O_EXCL, mode 0600), then published
under the real name with link(2), which never replaces an existing file; the
directory is fsynced after. When several auth processes start at once on one
machine, exactly one link succeeds and every process, the winner included,
then uses whatever the file holds: all of them end up with the same key, and
no process can read a half-written file. (Processes on different machines
must be given the same file, e.g. one Kubernetes Secret; a process whose KEK
does not open the keys in etcd refuses to start, see `KeyEncryptionError`.)
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
ALGORITHM = "AES-256-GCM"


class KeyEncryptionError(Exception):
    """The KEK file is unusable or does not open the signing keys in etcd.

    Fatal: starting anyway (e.g. with freshly generated signing keys) would
    invalidate every token issued so far, so the service must not start.
    """


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def associated_data(kid: str) -> bytes:
    """What a sealed private key is bound to: the signing key id it belongs to."""
    return f"cloudml.auth.v1/signing-key/{kid}".encode()


@dataclass(frozen=True)
class KeyEncryptionKey:
    key: bytes
    path: str

    def __repr__(self) -> str:  # never print the key
        return f"KeyEncryptionKey(path={self.path!r}, key_id={self.key_id!r})"

    @property
    def key_id(self) -> str:
        """A fingerprint naming this KEK in sealed records."""
        return hmac.new(self.key, b"cloudml key-encryption key id", hashlib.sha256).hexdigest()[:16]

    def seal(self, kid: str, plaintext: bytes) -> dict:
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = AESGCM(self.key).encrypt(nonce, plaintext, associated_data(kid))
        return {"alg": ALGORITHM, "kek_id": self.key_id, "nonce": _b64(nonce), "ciphertext": _b64(ciphertext)}

    def open(self, kid: str, sealed: dict) -> bytes:
        if not isinstance(sealed, dict) or sealed.get("alg") != ALGORITHM:
            raise KeyEncryptionError(f"signing key {kid}: unknown encryption {sealed!r:.60}")
        if sealed.get("kek_id") != self.key_id:
            raise KeyEncryptionError(
                f"signing key {kid} is encrypted with key-encryption key {sealed.get('kek_id')!r}, but "
                f"{self.path} holds key {self.key_id!r}: wrong or replaced key file (restore the original)"
            )
        try:
            nonce = base64.b64decode(sealed["nonce"], validate=True)
            ciphertext = base64.b64decode(sealed["ciphertext"], validate=True)
            return AESGCM(self.key).decrypt(nonce, ciphertext, associated_data(kid))
        except (InvalidTag, KeyError, ValueError, TypeError):
            raise KeyEncryptionError(
                f"signing key {kid} does not decrypt with {self.path} (tampered, or stored under another key id)"
            ) from None


def load(path: str) -> KeyEncryptionKey:
    """Reads an existing KEK file. FileNotFoundError if there is none;
    KeyEncryptionError if it is unusable (other users may read it, wrong size)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise KeyEncryptionError(f"cannot read the key-encryption key file {path}: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyEncryptionError(f"the key-encryption key file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise KeyEncryptionError(
                f"the key-encryption key file {path} is accessible by other users "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it"
            )
        data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise KeyEncryptionError(
            f"the key-encryption key file {path} holds {len(data)}{'+' if len(data) > KEY_BYTES else ''} bytes, "
            f"not a {KEY_BYTES}-byte key"
        )
    return KeyEncryptionKey(data, path)


def load_or_create(path: str) -> tuple[KeyEncryptionKey, bool]:
    """The KEK in `path`, creating the file with a new random key if there is
    none (safe with several processes racing: see the module's docstring).
    Returns the key and whether this call created the file."""
    try:
        return load(path), False
    except FileNotFoundError:
        pass
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)  # whatever the umask
                os.write(fd, os.urandom(KEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # atomic, and never replaces: the first process wins
                created = True
            except FileExistsError:
                created = False
        finally:
            os.unlink(tmp)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise KeyEncryptionError(f"cannot create the key-encryption key file {path}: {err}") from None
    try:
        return load(path), created
    except FileNotFoundError:
        raise KeyEncryptionError(f"the key-encryption key file {path} vanished right after its creation") from None
