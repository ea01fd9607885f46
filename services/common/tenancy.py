"""Unix identities of tenants on the `local` runtime, and the ownership of
their files.

Tenant code (trainers, the processes that build their environments, model
servers: a SavedModel's ops read and write files) never runs as the
platform's user. When the platform runs as root, every tenant gets a system
account of its own, created on first use:

    user and group  cml-<tenant, cut to 19 characters>-<8 hex of sha256(tenant)>

(at most 32 characters, the limit of `useradd`; the hash keeps two tenants
with the same 19-character prefix apart), no home, no login shell. A replica
is started through `setpriv` as that user and group, with no supplementary
groups, no capabilities (bounding set emptied) and `no_new_privs` (a set-uid
binary gives nothing back), umask 077.

Files follow one rule: a per-tenant directory owned by root with the
tenant's group and mode 0750 (or 0710) gates everything below it, so another
tenant cannot even look inside, whatever the modes further down; below such
a gate, the places tenant code writes (its job's work directory, its
storage, its model server's socket directory) belong to the tenant's user,
and everything the platform keeps (logs, records, environments, packages)
stays root's, readable through the gate where the tenant's processes need
it (an environment's interpreter) and not at all where they do not (logs,
read back through the API).

When the platform does not run as root it cannot switch users: isolation is
then off (`Tenancy.enabled` False), every tenant's code runs as the
platform's user, and the launcher says so loudly. That mode is for a
developer's own machine with one user, never for a shared platform.
"""
from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

PREFIX = "cml-"
NAME_MAX = 32
_LOCK_PATH = "/run/lock/cloudml-tenant-accounts.lock"
#: Uids and gids of tenant accounts: a million, above the regular users' range
#: (login.defs' UID_MAX 60000) and the first subordinate-id blocks (/etc/subuid).
ACCOUNT_ID_RANGE = (2_000_000, 2_999_999)


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def account_name(tenant: str) -> str:
    digest = hashlib.sha256(tenant.encode()).hexdigest()[:8]
    return f"{PREFIX}{tenant[:NAME_MAX - len(PREFIX) - 9]}-{digest}"


def setpriv_prefix(account: Account) -> list[str]:
    """argv prefix that runs the rest as `account`, with nothing of root's."""
    return [SETPRIV, f"--reuid={account.uid}", f"--regid={account.gid}", "--clear-groups",
            "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--"]


SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"


class Tenancy:
    """Tenant accounts and file ownership. One per process; thread-safe."""

    def __init__(self, enabled: bool | None = None):
        if enabled is None:
            enabled = os.geteuid() == 0
        if enabled and os.geteuid() != 0:
            raise RuntimeError("tenant isolation needs the platform to run as root")
        if enabled and not (os.path.exists(SETPRIV) and shutil.which("useradd")):
            raise RuntimeError("tenant isolation needs setpriv and useradd (util-linux, passwd)")
        self.enabled = enabled
        self._accounts: dict[str, Account] = {}
        self._lock = threading.Lock()

    def cached(self, tenant: str) -> Account | None:
        """The tenant's account if this process knows it already."""
        return self._accounts.get(tenant)

    def account(self, tenant: str) -> Account | None:
        """The tenant's account, created if missing; None when isolation is off."""
        if not self.enabled:
            return None
        found = self._accounts.get(tenant)
        if found is not None:
            return found
        with self._lock:
            found = self._accounts.get(tenant) or self._lookup_or_create(tenant)
            self._accounts[tenant] = found
            return found

    @staticmethod
    def _lookup(name: str) -> Account | None:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            return None
        return Account(name, pw.pw_uid, pw.pw_gid)

    def _lookup_or_create(self, tenant: str) -> Account:
        name = account_name(tenant)
        found = self._lookup(name)
        if found is not None:
            return found
        # One creator at a time across the platform's processes (useradd
        # itself refuses to run concurrently with another useradd).
        os.makedirs(os.path.dirname(_LOCK_PATH), exist_ok=True)
        with open(_LOCK_PATH, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            found = self._lookup(name)
            if found is None:
                # Ids from a range of the platform's own: Debian's system range
                # (100-999) holds fewer than 900 accounts, and the regular one
                # (1000-60000) is the machine's people's.
                low, high = ACCOUNT_ID_RANGE
                ids = [f"{key}={value}" for kind in ("UID", "GID") for key, value in
                       ((f"SYS_{kind}_MIN", low), (f"SYS_{kind}_MAX", high))]
                result = subprocess.run(
                    ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                     "--shell", "/usr/sbin/nologin", "--comment", f"cloudml tenant {tenant}",
                     *[arg for pair in ids for arg in ("-K", pair)], name],
                    capture_output=True, text=True, check=False)
                found = self._lookup(name)
                if found is None:
                    raise RuntimeError(f"cannot create the account of tenant {tenant!r}: "
                                       f"useradd exit {result.returncode}: {result.stderr.strip()}")
                log.info("created account %s (uid %d) for tenant %s", name, found.uid, tenant)
        return found

    # -- files ---------------------------------------------------------------

    def ensure_reachable(self, path: str) -> None:
        """Lets tenant users *traverse* (o+x, never read or list) every
        directory from / down to `path`: the interpreter, the platform's
        code and the data directory must be reachable for tenant code to
        run at all (/root is 0700 on Debian, pytest's temp root 0700). What
        lies below is protected by its own gates, not by its ancestors."""
        if not self.enabled:
            return
        current = os.path.abspath(path)
        chain = []
        while True:
            chain.append(current)
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
        for directory in reversed(chain):
            try:
                st = os.stat(directory)
            except FileNotFoundError:
                return
            if os.path.isdir(directory) and not st.st_mode & 0o001:
                os.chmod(directory, (st.st_mode & 0o7777) | 0o001)
                log.warning("tenant isolation: made %s traversable by tenant users (o+x)", directory)

    def gate(self, path: str, tenant: str, mode: int = 0o750) -> str:
        """Makes `path` a directory owned by root with the tenant's group:
        the tenant's processes may enter (and read, with 0750), no other
        tenant may."""
        os.makedirs(path, exist_ok=True)
        account = self.account(tenant)
        if account is not None:
            os.chown(path, 0, account.gid, follow_symlinks=False)
        os.chmod(path, mode)
        return path

    def own_dir(self, path: str, tenant: str, mode: int = 0o700) -> str:
        """Makes `path` a directory the tenant's user owns (where its code
        writes). Only the directory itself: what the tenant put inside stays
        as it is."""
        os.makedirs(path, exist_ok=True)
        account = self.account(tenant)
        if account is not None:
            st = os.lstat(path)
            if (st.st_uid, st.st_gid) != (account.uid, account.gid):
                os.chown(path, account.uid, account.gid, follow_symlinks=False)
        os.chmod(path, mode)
        return path

    def own_file(self, path: str, tenant: str, mode: int = 0o600) -> str:
        """Creates `path` (if missing) as a file of the tenant's user, for the
        tenant to write into a directory it may not change (a metrics file
        the platform reads). Never follows a symlink."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            account = self.account(tenant)
            if account is not None:
                os.fchown(fd, account.uid, account.gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        return path

    def make_dirs(self, base: str, path: str, tenant: str, mode: int = 0o700) -> str:
        """Creates `path` and its missing parents below `base` (an existing
        directory, e.g. the tenant's storage) as directories of the tenant's
        user. Walks with directory file descriptors and never follows a
        symlink, so a link the tenant planted on the way cannot send the
        platform outside `base` (OSError instead)."""
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
        parts = [] if rel == "." else rel.split(os.sep)
        if any(p in ("", "..") for p in parts):
            raise ValueError(f"{path} is not below {base}")
        account = self.account(tenant)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(base, flags)
        try:
            for part in parts:
                created = False
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                    created = True
                except FileExistsError:
                    pass
                child = os.open(part, flags, dir_fd=fd)
                if created and account is not None:
                    os.fchown(child, account.uid, account.gid)
                os.close(fd)
                fd = child
        finally:
            os.close(fd)
        return path

    def hand_over(self, path: str, tenant: str) -> None:
        """Gives a tree the platform wrote for the tenant (an upload, a
        fetched model, a fresh environment) to the tenant's user. Walks with
        directory descriptors (os.fwalk checks each directory it enters is
        the one it listed) and never follows a symlink, so even a tree the
        tenant can change meanwhile cannot send it elsewhere."""
        account = self.account(tenant)
        if account is None:
            return
        os.chown(path, account.uid, account.gid, follow_symlinks=False)
        if os.path.isdir(path) and not os.path.islink(path):
            for _, dirs, files, dir_fd in os.fwalk(path, follow_symlinks=False):
                for name in dirs + files:
                    with contextlib.suppress(FileNotFoundError):
                        os.chown(name, account.uid, account.gid, dir_fd=dir_fd, follow_symlinks=False)

    @staticmethod
    def take_back(path: str) -> None:
        """Makes a tree root's and not writable by anyone else (an
        environment that tenant code just built): nothing the tenant left
        there can be changed by it afterwards. Symlinks are not followed."""
        if os.geteuid() != 0:
            return
        os.chown(path, 0, 0, follow_symlinks=False)
        os.chmod(path, os.lstat(path).st_mode & 0o755)
        for _, dirs, files, dir_fd in os.fwalk(path, follow_symlinks=False):
            for name in dirs + files:
                # Through a descriptor opened without following links: a
                # process of the tenant's still running cannot swap the name
                # for a link to a file of the platform's in between.
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
                except FileNotFoundError:
                    continue
                except OSError:  # a symlink (ELOOP) or a socket: only the entry itself changes hands
                    with contextlib.suppress(FileNotFoundError):
                        os.chown(name, 0, 0, dir_fd=dir_fd, follow_symlinks=False)
                    continue
                try:
                    st = os.fstat(fd)
                    os.fchown(fd, 0, 0)
                    # chown cleared set-uid/set-gid; drop group/other write too.
                    os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o755)
                finally:
                    os.close(fd)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
