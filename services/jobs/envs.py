"""Per-package Python environments for trainers, cached by content hash.

Before a job's replicas start, the jobs service installs the job's trainer
package (an sdist `.tar.gz` or a `.whl`) into an environment of its own:

    env = await EnvCache(root).ensure("/jobs/j1/trainer-1.0.tar.gz", log)
    # run replicas as: env.python -m trainer.task ...

Layout: `root/<key>/` is a venv, `key` = sha256 of the package bytes and the
base interpreter's path. `root/<key>/.cloudml-ready` is written (atomically)
only after a successful install, so a directory without it is a half-built
environment (a crash or a cancel mid-install) and is rebuilt. A per-key
`flock` on `root/<key>.lock` makes concurrent `ensure` calls for the same
package, in this process or another, install once; the others wait and then
take the ready environment. A cache hit is one `stat` after hashing the file.

The platform's packages (TensorFlow, `cloudml` for `cloudml.report`, ...) are
visible in every environment without being reinstalled:

- The platform's interpreter is usually itself a venv, so `--system-site-packages`
  would expose the *base* interpreter, not the platform's packages. Instead the
  new env gets `zzz_cloudml_platform.pth` with one line per platform
  site-packages directory, `import site; site.addsitedir(DIR)`. `addsitedir`
  appends DIR after the env's own site-packages (the trainer's packages win)
  and also processes the `.pth` files there (the platform's editable install
  of `cloudml`).
- uv decides what is installed by scanning the target env's own site-packages,
  so it would not see those packages and would download TensorFlow again for a
  trainer that declares `tensorflow`. The install therefore passes
  `--excludes` with every distribution the platform provides: uv resolves and
  installs only what the platform lacks, and never contacts an index for
  TensorFlow (offline installs work too). Excluding drops version checks on
  those packages, so a check that runs in the new env afterwards compares every
  requirement of the newly installed distributions with the versions the
  platform provides, and fails the install with a clear message on a conflict
  (e.g. a trainer pinning `tensorflow<2`): a trainer cannot replace the
  platform's packages.

Tenants
-------
Installing a package runs its code (an sdist's build backend; a wheel's
`.pth` files run whenever its environment's interpreter starts), so with
tenant isolation on (services.common.tenancy) environments are per tenant,
`root/<tenant>/<key>/`, behind a gate only that tenant's processes may
enter, and everything that runs package code runs as the tenant's user:
`uv pip install` (with a uv cache of the tenant's own, `root/<tenant>/.uv`,
so no tenant reads another's code or plants a wheel in a shared cache) and
the conflict check. Meanwhile the environment belongs to that user; once
installed it is taken back (root's, read-only for everyone else), so no
tenant code can change it afterwards. `uv venv` and the ready marker are
the platform's own. Without isolation (not root) environments are shared
by content hash, as before.

This module imports neither TensorFlow nor grpc.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from services.common.tenancy import Tenancy, setpriv_prefix

__all__ = ["EnvCache", "EnvInfo", "InstallFailed", "FetchFailed", "fetch", "find_uv"]

READY_MARKER = ".cloudml-ready"
PLATFORM_PTH = "zzz_cloudml_platform.pth"
EXCLUDES_FILE = ".platform-packages.txt"
_LAYOUT_VERSION = b"cloudml-env-v1"
_PACKAGE_SUFFIXES = (".tar.gz", ".whl", ".zip")
_HASH_IN_THREAD_BYTES = 8 << 20
_TAIL_LINES = 40
_NETWORK_ENV = frozenset({"PATH", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
                          "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                          "no_proxy"})

Log = Callable[[str], None]


class InstallFailed(Exception):
    """The trainer package could not be installed; the message says why
    (including the useful tail of uv's output)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class FetchFailed(InstallFailed):
    """The trainer package could not be fetched from its URI."""


@dataclass(frozen=True)
class EnvInfo:
    key: str
    path: str  # the environment's directory
    python: str  # its interpreter: run replicas as `python -m module`
    cached: bool = False  # True when ensure() found it ready


@dataclass(frozen=True)
class _Platform:
    site_dirs: tuple[str, ...]  # the base interpreter's site-packages, in order
    dists: tuple[str, ...]  # distribution names installed there
    version: str  # "3.11"


def find_uv() -> Optional[str]:
    """The uv executable: the one the `uv` PyPI package ships in the running
    interpreter's environment, else on PATH; None if neither. (The package's
    binary first: a PATH entry may be a pyenv shim, a script that tenant
    users, who run uv too, cannot follow.)"""
    beside = os.path.join(os.path.dirname(sys.executable), "uv")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("uv")
    if found:
        return found
    try:
        from uv import find_uv_bin
    except ImportError:
        return None
    try:
        return find_uv_bin()
    except Exception:
        return None


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _package_name(filename: str) -> str:
    """The distribution name in a wheel or sdist file name (canonical form)."""
    if filename.endswith(".whl"):
        return _canonical(filename.split("-", 1)[0])
    stem = filename[: -len(".tar.gz")] if filename.endswith(".tar.gz") else os.path.splitext(filename)[0]
    return _canonical(stem.rsplit("-", 1)[0])


def _error_tail(lines: Sequence[str]) -> str:
    """The part of uv's output that explains a failure: from its last error
    header (`error:` / `×`) to the end, trimmed in the middle if long."""
    lines = [line for line in lines if line.strip()]
    start = None
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if stripped.startswith(("error:", "×")):
            start = i
    tail = lines[start:] if start is not None else lines[-20:]
    if len(tail) > _TAIL_LINES:
        tail = tail[:5] + ["  ..."] + tail[-(_TAIL_LINES - 6):]
    return "\n".join(tail)


_PLATFORM_PROBE = r"""
import importlib.metadata as md, json, os, site, sys
dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
names = set()
for dist in md.distributions(path=dirs):
    name = dist.metadata["Name"] if dist.metadata else None
    if name:
        names.add(name)
print(json.dumps({"site_dirs": dirs, "dists": sorted(names), "version": "%d.%d" % sys.version_info[:2]}))
"""

# Runs in the new environment after the install: the platform's directories
# are on sys.path, and every requirement of a distribution installed in the
# env is met by what is visible (the platform's versions included).
_ENV_CHECK = r"""
import importlib.metadata as md, json, sys
env_site, platform_dirs = sys.argv[1], json.loads(sys.argv[2])
problems = []
missing = [d for d in platform_dirs if d not in sys.path]
if missing:
    problems.append("the platform's packages are not visible: %s not on sys.path" % ", ".join(missing))
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:
    Requirement = None
if Requirement is not None:
    visible = {}
    for dist in md.distributions():
        if dist.metadata and dist.metadata["Name"]:
            visible.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    for dist in md.distributions(path=[env_site]):
        who = "%s %s" % (dist.metadata["Name"], dist.version)
        for spec in dist.requires or []:
            try:
                req = Requirement(spec)
                if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                    continue
            except Exception:
                continue
            have = visible.get(canonicalize_name(req.name))
            if have is None:
                problems.append("%s requires %s, which is not installed" % (who, req))
            elif req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append("%s requires %s, but the platform provides %s %s" % (who, req, req.name, have))
print(json.dumps(problems))
sys.exit(1 if problems else 0)
"""


class EnvCache:
    """Trainer-package environments under `root`, built with uv from `base_python`.

    `install_args` are extra `uv pip install` flags (an index URL,
    `--find-links DIR`, `--offline`, ...).
    """

    def __init__(
        self,
        root: str,
        base_python: str = sys.executable,
        *,
        uv: Optional[str] = None,
        install_args: Sequence[str] = (),
        lock_poll_seconds: float = 0.05,
        tenancy: Optional[Tenancy] = None,
    ):
        self.tenancy = tenancy if tenancy is not None else Tenancy()
        self.root = os.path.abspath(root)
        for program in (base_python, uv or find_uv() or "", os.path.join(self.root, "x")):
            if os.path.isabs(program):  # tenant users run these
                self.tenancy.ensure_reachable(os.path.dirname(os.path.realpath(program)))
        # abspath, not realpath: a venv's python is a symlink to the base
        # interpreter, and resolving it would lose the venv (and its packages).
        self.base_python = os.path.abspath(base_python)
        self.uv = uv or find_uv() or "uv"
        self.install_args = tuple(install_args)
        self.lock_poll_seconds = lock_poll_seconds
        self._platform: Optional[_Platform] = None

    # -- keys and paths ---------------------------------------------------

    def _hash(self, package_path: str) -> str:
        digest = hashlib.sha256()
        digest.update(_LAYOUT_VERSION + b"\0" + os.fsencode(self.base_python) + b"\0")
        with open(package_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    async def key_for(self, package_path: str) -> str:
        if os.path.getsize(package_path) > _HASH_IN_THREAD_BYTES:
            return await asyncio.to_thread(self._hash, package_path)
        return self._hash(package_path)

    def _dir(self, tenant: str) -> str:
        """Where the tenant's environments are: its own gated directory with
        isolation on, the shared root without."""
        return os.path.join(self.root, tenant) if self.tenancy.enabled else self.root

    def _info(self, key: str, cached: bool, tenant: str = "") -> EnvInfo:
        path = os.path.join(self._dir(tenant), key)
        return EnvInfo(key=key, path=path, python=os.path.join(path, "bin", "python"), cached=cached)

    def is_ready(self, key: str, tenant: str = "") -> bool:
        return os.path.exists(os.path.join(self._dir(tenant), key, READY_MARKER))

    # -- the entry point --------------------------------------------------

    async def ensure(self, package_path: str, log: Optional[Log] = None, *, tenant: str = "") -> EnvInfo:
        """Returns a ready environment of `tenant` with `package_path`
        installed, building it unless it is cached. Raises InstallFailed."""
        if log is None:
            log = lambda line: None  # noqa: E731
        if self.tenancy.enabled and not tenant:
            raise InstallFailed("no tenant: with tenant isolation on, environments are built per tenant")
        package_path = os.path.abspath(package_path)
        name = os.path.basename(package_path)
        if not name.endswith(_PACKAGE_SUFFIXES):
            raise InstallFailed(f"{name}: a trainer package must be an sdist (.tar.gz) or a wheel (.whl)")
        try:
            key = await self.key_for(package_path)
        except OSError as exc:
            raise InstallFailed(f"cannot read trainer package {package_path}: {exc}") from exc
        if self.is_ready(key, tenant):
            return self._info(key, cached=True, tenant=tenant)

        os.makedirs(self.root, exist_ok=True)
        if self.tenancy.enabled:
            os.chmod(self.root, 0o711)
            await asyncio.to_thread(self.tenancy.gate, self._dir(tenant), tenant, 0o750)
        async with self._key_lock(key, log, tenant):
            if self.is_ready(key, tenant):  # built by whoever held the lock
                log(f"using environment {key[:12]} built by a concurrent install")
                return self._info(key, cached=True, tenant=tenant)
            await self._build(package_path, self._info(key, cached=False, tenant=tenant), log, tenant)
        return self._info(key, cached=False, tenant=tenant)

    # -- locking ----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _key_lock(self, key: str, log: Log, tenant: str = ""):
        """An exclusive flock on root/<key>.lock, polled so that waiting never
        blocks the event loop and a cancelled waiter leaves nothing behind.
        flock locks belong to the open file, so two coroutines of one process
        exclude each other as two processes do."""
        fd = os.open(os.path.join(self._dir(tenant), f"{key}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        log(f"waiting for another install of the same package (environment {key[:12]})")
                        waited = True
                    await asyncio.sleep(self.lock_poll_seconds)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # -- building ---------------------------------------------------------

    async def _platform_info(self) -> _Platform:
        if self._platform is None:
            lines: list[str] = []
            rc = await self._run([self.base_python, "-I", "-c", _PLATFORM_PROBE], lines.append)
            if rc != 0:
                raise InstallFailed(f"cannot inspect the platform interpreter {self.base_python}:\n" + "\n".join(lines[-20:]))
            data = json.loads(lines[-1])
            self._platform = _Platform(tuple(data["site_dirs"]), tuple(data["dists"]), data["version"])
        return self._platform

    async def _build(self, package_path: str, env: EnvInfo, log: Log, tenant: str = "") -> None:
        started = time.monotonic()
        if os.path.lexists(env.path):
            log(f"discarding half-built environment {env.path}")
            await asyncio.to_thread(shutil.rmtree, env.path, True)
        platform = await self._platform_info()
        try:
            await self._create(env, platform, log)
            if self.tenancy.enabled:  # package code runs as the tenant, in an env it owns for now
                await asyncio.to_thread(self.tenancy.hand_over, env.path, tenant)
            await self._install(package_path, env, platform, log, tenant)
            if self.tenancy.enabled:
                await asyncio.to_thread(self.tenancy.take_back, env.path)
            await self._check(env, platform, tenant)
        except BaseException:
            # Leave no half-built env behind on failure; on a cancel or crash
            # the missing marker makes the next ensure() rebuild it anyway.
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.to_thread(shutil.rmtree, env.path, True))
            raise
        marker = {
            "key": env.key,
            "package": os.path.basename(package_path),
            "base_python": self.base_python,
            "platform_site_dirs": list(platform.site_dirs),
            "created": time.time(),
        }
        tmp = os.path.join(env.path, READY_MARKER + ".tmp")
        with _create_new(tmp) as f:
            json.dump(marker, f)
        os.replace(tmp, os.path.join(env.path, READY_MARKER))
        log(f"environment {env.key[:12]} ready in {time.monotonic() - started:.1f}s")

    def _site_packages(self, env: EnvInfo, platform: _Platform) -> str:
        return os.path.join(env.path, "lib", f"python{platform.version}", "site-packages")

    async def _create(self, env: EnvInfo, platform: _Platform, log: Log) -> None:
        lines: collections.deque[str] = collections.deque(maxlen=200)
        rc = await self._run(
            [self.uv, "venv", env.path, "--python", self.base_python, "--no-project"], self._tee(log, lines)
        )
        if rc != 0:
            raise InstallFailed(f"creating the environment failed (uv venv exit {rc}):\n{_error_tail(lines)}")
        site_packages = self._site_packages(env, platform)
        if not os.path.isdir(site_packages):
            raise InstallFailed(f"uv venv did not create {site_packages}")
        with open(os.path.join(site_packages, PLATFORM_PTH), "w") as f:
            f.write("# The Cloud-ML platform's packages (TensorFlow, cloudml, ...), after this env's own.\n")
            for directory in platform.site_dirs:
                f.write(f"import site; site.addsitedir({directory!r})\n")

    async def _install(self, package_path: str, env: EnvInfo, platform: _Platform, log: Log,
                       tenant: str = "") -> None:
        own = _package_name(os.path.basename(package_path))
        # Beside the env, not in it: the env may belong to the tenant right now.
        excludes = f"{env.path}{EXCLUDES_FILE}"
        with _create_new(excludes) as f:
            f.writelines(f"{name}\n" for name in platform.dists if _canonical(name) != own)
        lines: collections.deque[str] = collections.deque(maxlen=400)
        log(f"installing {os.path.basename(package_path)}")
        rc = await self._run(
            [self.uv, "pip", "install", "--python", env.python, "--excludes", excludes, *self.install_args, package_path],
            self._tee(log, lines), tenant,
        )
        if rc != 0:
            raise InstallFailed(
                f"installing {os.path.basename(package_path)} failed (uv exit {rc}):\n{_error_tail(lines)}"
            )

    async def _check(self, env: EnvInfo, platform: _Platform, tenant: str = "") -> None:
        lines: list[str] = []
        rc = await self._run(
            [env.python, "-I", "-c", _ENV_CHECK, self._site_packages(env, platform), json.dumps(platform.site_dirs)],
            lines.append, tenant,
        )
        if rc == 0:
            return
        try:
            problems = json.loads(lines[-1])
        except (IndexError, ValueError):
            problems = lines[-20:]
        raise InstallFailed("the trainer package conflicts with the platform:\n" + "\n".join(problems))

    @staticmethod
    def _tee(log: Log, lines: collections.deque) -> Log:
        def both(line: str) -> None:
            lines.append(line)
            log(line)

        return both

    async def _run(self, argv: Sequence[str], on_line: Log, tenant: str = "") -> int:
        """Runs argv, passing each output line (stdout and stderr merged) to
        `on_line` as it comes; as the tenant's user when `tenant` is given
        and isolation is on (with a minimal environment, a uv cache of its
        own and umask 022, so the platform can read what it installed). A
        cancel kills the process group."""
        cwd = self.root
        account = self.tenancy.account(tenant) if tenant else None
        if account is not None:
            home = await asyncio.to_thread(self.tenancy.own_dir, os.path.join(self._dir(tenant), ".uv"), tenant)
            # The host's network settings (CA bundle, proxies, indexes), nothing else of the service's.
            env = {k: v for k, v in os.environ.items() if k in _NETWORK_ENV or k.startswith(("UV_", "PIP_"))}
            env.update({"HOME": home, "UV_CACHE_DIR": os.path.join(home, "cache"), "TMPDIR": home})
            argv = [*setpriv_prefix(account), *argv]
            cwd = home
        else:
            env = dict(os.environ)
            env.pop("VIRTUAL_ENV", None)
        env.update({"NO_COLOR": "1", "UV_NO_PROGRESS": "1", "UV_PYTHON_DOWNLOADS": "never", "PYTHONUNBUFFERED": "1"})
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
                # Popen's own umask (set in C between fork and exec), never a
                # preexec_fn: Python code in the child of this multi-threaded
                # gRPC process can crash there (uv "exit -11" with no output).
                umask=0o022 if account is not None else -1,
            )
        except OSError as exc:
            raise InstallFailed(f"cannot run {argv[0]}: {exc}") from exc
        try:
            pending = b""
            while True:
                chunk = await proc.stdout.read(65536)
                if not chunk:
                    break
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    on_line(raw.decode(errors="replace").rstrip("\r"))
            if pending:
                on_line(pending.decode(errors="replace").rstrip("\r"))
            return await proc.wait()
        except BaseException:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                await asyncio.shield(proc.wait())
            raise


def _create_new(path: str):
    """A new file at `path` for writing, replacing whatever is there without
    following it (tenant code may have planted a symlink by that name)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644), "w")


MAX_PACKAGE_BYTES = 2 << 30


async def fetch(uri: str, dest_dir: str, location=None) -> str:
    """Copies the trainer package at `uri` into `dest_dir` under its own file
    name and returns the local path. Raises FetchFailed.

    `location` is `uri` as `services.common.confine.Confiner.check` answered
    it for the job's tenant (the scheduler checks again right before every
    fetch). With it, a local package is read beneath the tenant's storage
    root without following any symlink, an http(s) package is fetched from
    the address the check saw (no redirects), and other schemes through
    fsspec. Without it (tools and tests of the platform itself), `uri` is a
    path, `file://...` or fsspec URI taken as is, but never a chained one."""
    return await asyncio.to_thread(_fetch, uri, dest_dir, location)


def _fetch(uri: str, dest_dir: str, location=None) -> str:
    if "::" in uri:
        raise FetchFailed(f"cannot fetch trainer package {uri}: chained URIs are not allowed")
    if location is not None:
        name = posixpath.basename(location.uri.split("?", 1)[0].rstrip("/"))
    else:
        name = posixpath.basename(uri.split("://", 1)[-1].rstrip("/"))
    if not name or name in (".", ".."):
        raise FetchFailed(f"trainer package URI has no file name: {uri}")
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, name)
    tmp = f"{dest}.part-{os.getpid()}-{threading.get_ident()}"
    try:
        if location is not None:
            _fetch_checked(location, tmp)
        else:
            _fetch_fsspec(uri, tmp)
        os.replace(tmp, dest)
    except FetchFailed:
        raise
    except FileNotFoundError as exc:
        raise FetchFailed(f"trainer package not found: {uri}") from exc
    except IsADirectoryError as exc:
        raise FetchFailed(f"trainer package URI is a directory, not a .tar.gz or .whl: {uri}") from exc
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EXDEV):
            raise FetchFailed(f"cannot fetch trainer package {uri}: a symlink in the tenant's storage "
                              "(packages are never read through symlinks)") from exc
        raise FetchFailed(f"cannot fetch trainer package {uri}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise FetchFailed(f"cannot fetch trainer package {uri}: {type(exc).__name__}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return dest


def _fetch_checked(location, tmp: str) -> None:
    from services.common import confine  # noqa: PLC0415

    with open(tmp, "wb") as out:
        if location.local:
            fd = confine.open_beneath(location.root, location.relative, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as src:
                if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                    raise IsADirectoryError(location.uri)
                shutil.copyfileobj(src, out, 1 << 20)
        elif location.scheme in confine.HTTP_SCHEMES:
            confine.fetch_http(location, out, max_bytes=MAX_PACKAGE_BYTES)
        else:
            out.close()
            _fetch_fsspec(location.uri, tmp)


def _fetch_fsspec(uri: str, tmp: str) -> None:
    import fsspec  # only when fetching: keeps importing this module cheap

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:  # unknown protocol / backend not installed
        raise FetchFailed(f"cannot fetch trainer package {uri}: {exc}") from exc
    if fs.isdir(path):
        raise FetchFailed(f"trainer package URI is a directory, not a .tar.gz or .whl: {uri}")
    fs.get_file(path, tmp)
