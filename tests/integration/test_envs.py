"""EnvCache with real uv: trainer packages installed into cached environments
that see the platform's TensorFlow and `cloudml` without reinstalling them."""
from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from services.common.tenancy import setpriv_prefix
from services.jobs.envs import READY_MARKER, EnvCache, FetchFailed, InstallFailed, fetch, find_uv

UV = find_uv()
# uv is a dependency of the project (scripts/setup.sh installs it): its absence
# is a broken set-up, so every test here fails rather than being skipped.
assert UV is not None, "uv is not installed: run scripts/setup.sh"

PLATFORM_SITE = next(p for p in sys.path if p.endswith("site-packages") and os.path.isdir(os.path.join(p, "tensorflow")))


def make_package(tmp_path, name: str, *, version: str = "0.1", requires=(), setup_prelude: str = "",
                 wheel: bool = False) -> str:
    """Builds a one-module package `name` and returns the sdist (or wheel) path."""
    src = tmp_path / f"src-{name}-{version}"
    (src / name).mkdir(parents=True)
    (src / name / "__init__.py").write_text(f"VERSION = {version!r}\n")
    (src / "setup.py").write_text(
        "from setuptools import setup\n"
        + textwrap.dedent(setup_prelude)
        + f"setup(name={name!r}, version={version!r}, packages=[{name!r}], install_requires={list(requires)!r})\n"
    )
    out = tmp_path / "dist"
    subprocess.run(
        [UV, "build", "--wheel" if wheel else "--sdist", "--no-build-isolation", "--python", sys.executable,
         "--out-dir", str(out), str(src)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    suffix = "-py3-none-any.whl" if wheel else ".tar.gz"
    path = out / f"{name}-{version}{suffix}"
    assert path.exists(), sorted(os.listdir(out))
    return str(path)


class Log(list):
    def __call__(self, line: str) -> None:
        self.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self)


async def test_cold_install_sees_platform_tensorflow_and_cache_hit_is_immediate(tmp_path):
    dep = make_package(tmp_path, "cmldep", version="1.0", wheel=True)
    package = make_package(tmp_path, "mypkg", requires=["tensorflow", f"cmldep @ file://{dep}"])
    cache = EnvCache(str(tmp_path / "envs"))
    log = Log()

    started = time.monotonic()
    env = await cache.ensure(package, log, tenant="t1")
    cold = time.monotonic() - started
    assert not env.cached and os.path.isfile(env.python)
    assert os.path.isfile(os.path.join(env.path, READY_MARKER))
    # The package's own dependency is installed, the platform's TensorFlow is not.
    assert "+ cmldep==1.0" in log.text and "+ mypkg==0.1" in log.text
    assert "tensorflow" not in log.text.lower()
    site = next(os.path.join(root, d) for root, dirs, _ in os.walk(env.path) for d in dirs if d == "site-packages")
    assert not os.path.exists(os.path.join(site, "tensorflow"))

    started = time.monotonic()
    again = await cache.ensure(package, log, tenant="t1")
    warm = time.monotonic() - started
    assert again.cached and again.key == env.key and again.python == env.python
    assert warm < 0.05, f"cache hit took {warm * 1000:.1f} ms"
    # A new cache object (a restarted jobs service) finds it too.
    assert (await EnvCache(str(tmp_path / "envs")).ensure(package, tenant="t1")).cached
    print(f"\nensure: cold {cold:.2f}s, warm {warm * 1000:.2f}ms")

    code = (
        "import json, tensorflow, cloudml, mypkg, cmldep; cloudml.report(step=0, loss=1.0); "
        "print(json.dumps({'tf': tensorflow.__file__, 'tf_version': tensorflow.__version__, "
        "'cloudml': cloudml.__file__, 'mypkg': mypkg.__file__, 'cmldep': cmldep.__file__}))"
    )
    out = subprocess.run([env.python, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stderr[-3000:]
    paths = json.loads(out.stdout.strip().splitlines()[-1])
    assert paths["tf"].startswith(PLATFORM_SITE), paths
    assert paths["mypkg"].startswith(env.path) and paths["cmldep"].startswith(env.path)
    assert paths["tf_version"].startswith("2.")


async def test_setup_py_error_fails_with_the_build_error_text(tmp_path):
    package = make_package(
        tmp_path, "brokenpkg",
        setup_prelude="""
            import sys
            if "bdist_wheel" in sys.argv:
                raise RuntimeError("brokenpkg cannot be built: on purpose")
        """,
    )
    cache = EnvCache(str(tmp_path / "envs"))
    log = Log()
    with pytest.raises(InstallFailed) as caught:
        await cache.ensure(package, log, tenant="t1")
    assert "brokenpkg cannot be built: on purpose" in caught.value.message
    assert "brokenpkg cannot be built" in log.text  # streamed to the job's log as well
    key = await cache.key_for(package)
    assert not cache.is_ready(key) and not os.path.exists(os.path.join(cache.root, key))


async def test_unsatisfiable_requirement_fails_naming_it(tmp_path):
    package = make_package(tmp_path, "needsmissing", requires=["nonexistent-pkg-xyz==9"], wheel=True)
    with pytest.raises(InstallFailed, match="nonexistent-pkg-xyz"):
        await EnvCache(str(tmp_path / "envs")).ensure(package, tenant="t1")


async def test_requirement_conflicting_with_the_platform_fails(tmp_path):
    package = make_package(tmp_path, "oldtf", requires=["tensorflow<2"], wheel=True)
    with pytest.raises(InstallFailed, match=r"requires tensorflow<2, but the platform provides tensorflow 2\."):
        await EnvCache(str(tmp_path / "envs")).ensure(package, tenant="t1")


async def test_half_built_environment_is_rebuilt(tmp_path):
    package = make_package(tmp_path, "halfpkg", wheel=True)
    cache = EnvCache(str(tmp_path / "envs"))
    key = await cache.key_for(package)
    half = os.path.join(cache.root, "t1", key)
    os.makedirs(os.path.join(half, "bin"))  # what a crash mid-install leaves: no marker
    open(os.path.join(half, "junk"), "w").close()
    log = Log()
    env = await cache.ensure(package, log, tenant="t1")
    assert not env.cached and "discarding half-built environment" in log.text
    assert not os.path.exists(os.path.join(half, "junk")) and cache.is_ready(key, "t1")
    out = subprocess.run([env.python, "-c", "import halfpkg; print(halfpkg.VERSION)"], capture_output=True, text=True)
    assert out.stdout.strip() == "0.1", out.stderr


async def test_concurrent_ensures_install_once(tmp_path):
    package = make_package(tmp_path, "concpkg", wheel=True)
    root = str(tmp_path / "envs")
    logs = [Log(), Log()]
    other_process = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import asyncio, sys; from services.jobs.envs import EnvCache\n"
        "log = []\n"
        "env = asyncio.run(EnvCache(sys.argv[1]).ensure(sys.argv[2], log.append, tenant='t1'))\n"
        "print(env.cached, sum(l.startswith('installing ') for l in log))",
        root, package, stdout=asyncio.subprocess.PIPE, cwd=os.getcwd(),
    )
    envs = await asyncio.gather(*(EnvCache(root).ensure(package, log, tenant="t1") for log in logs))
    out, _ = await other_process.communicate()
    other_cached, other_installs = out.decode().split()
    assert other_process.returncode == 0
    installs = sum(line.startswith("installing ") for log in logs for line in log) + int(other_installs)
    assert installs == 1, [log.text for log in logs]
    assert [env.cached for env in envs].count(False) + (other_cached == "False") == 1
    assert envs[0].python == envs[1].python


async def test_unsupported_package_file_is_rejected(tmp_path):
    path = tmp_path / "trainer.py"
    path.write_text("print('hi')\n")
    with pytest.raises(InstallFailed, match="sdist"):
        await EnvCache(str(tmp_path / "envs")).ensure(str(path), tenant="t1")
    with pytest.raises(InstallFailed, match="cannot read"):
        await EnvCache(str(tmp_path / "envs")).ensure(str(tmp_path / "missing-1.0.tar.gz"), tenant="t1")


async def test_key_covers_package_bytes_and_base_interpreter(tmp_path):
    a = tmp_path / "a" / "pkg-1.0.tar.gz"
    b = tmp_path / "b" / "pkg-1.0.tar.gz"
    for path, data in ((a, b"one"), (b, b"two")):
        path.parent.mkdir()
        path.write_bytes(data)
    cache = EnvCache(str(tmp_path / "envs"))
    assert await cache.key_for(str(a)) != await cache.key_for(str(b))
    other = EnvCache(str(tmp_path / "envs"), base_python="/opt/other/bin/python")
    assert await cache.key_for(str(a)) != await other.key_for(str(a))
    assert await cache.key_for(str(a)) == await EnvCache(str(tmp_path / "x")).key_for(str(a))


async def test_fetch_copies_paths_file_uris_and_fsspec_uris(tmp_path):
    import fsspec

    src = tmp_path / "src" / "trainer-1.0.tar.gz"
    src.parent.mkdir()
    src.write_bytes(b"sdist bytes")
    dest = tmp_path / "job"
    for uri in (str(src), f"file://{src}"):
        path = await fetch(uri, str(dest))
        assert path == str(dest / "trainer-1.0.tar.gz") and open(path, "rb").read() == b"sdist bytes"
    with fsspec.open("memory://cloudml-test/pkgs/other-2.0.whl", "wb") as f:
        f.write(b"wheel bytes")
    path = await fetch("memory://cloudml-test/pkgs/other-2.0.whl", str(dest))
    assert os.path.basename(path) == "other-2.0.whl" and open(path, "rb").read() == b"wheel bytes"
    assert sorted(os.listdir(dest)) == ["other-2.0.whl", "trainer-1.0.tar.gz"]  # no partial files left


async def test_fetch_failures_are_fetch_failed(tmp_path):
    with pytest.raises(FetchFailed, match="not found"):
        await fetch(str(tmp_path / "missing-1.0.tar.gz"), str(tmp_path / "job"))
    with pytest.raises(FetchFailed, match="directory"):
        await fetch(str(tmp_path), str(tmp_path / "job"))
    with pytest.raises(FetchFailed):
        await fetch("nosuchprotocol://bucket/trainer-1.0.tar.gz", str(tmp_path / "job"))
    assert issubclass(FetchFailed, InstallFailed)


async def test_package_code_runs_as_the_tenant_and_the_env_is_then_the_platforms(tmp_path):
    """An sdist's setup.py runs while it installs: as the tenant's user, who
    cannot read the platform's files nor change the environment afterwards;
    another tenant cannot even enter it."""
    secret = tmp_path / "platform-secret"
    secret.write_text("s3cr3t")
    os.chmod(secret, 0o600)
    probe = tmp_path / "probe.txt"
    package = make_package(tmp_path, "hostilepkg", setup_prelude=f"""
        import os
        building_from_sdist = os.path.exists("PKG-INFO")  # at install time, not while the test makes the sdist
        try:
            leaked = open({str(secret)!r}).read() if building_from_sdist else "not yet"
        except OSError as e:
            leaked = "denied:" + type(e).__name__
        with open(os.path.join("hostilepkg", "probe.py"), "w") as f:  # installed with the package (tenant's umask)
            f.write("FOUND = %r\\n" % ("HOSTILE uid=%d read=%s" % (os.getuid(), leaked)))
        try:
            if building_from_sdist:
                open({str(probe)!r}, "w").write("planted")
        except OSError:
            pass
    """)
    cache = EnvCache(str(tmp_path / "envs"))
    log = Log()
    env = await cache.ensure(package, log, tenant="tenant-a")
    found = subprocess.run([env.python, "-c", "from hostilepkg.probe import FOUND; print(FOUND)"],
                           capture_output=True, text=True, check=True).stdout
    assert "HOSTILE" in found and "uid=0 " not in found and "s3cr3t" not in found, found
    assert "denied:PermissionError" in found
    assert not probe.exists()
    account = cache.tenancy.account("tenant-a")
    assert f"uid={account.uid} " in found
    # The finished env is root's and read-only to everyone else.
    for root, dirs, files in os.walk(env.path):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            assert st.st_uid == 0, os.path.join(root, name)
            assert stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o022, os.path.join(root, name)
    gate = os.stat(os.path.dirname(env.path))
    assert gate.st_uid == 0 and gate.st_gid == account.gid and gate.st_mode & 0o007 == 0
    # Another tenant's environments are per tenant: B gets its own, and cannot enter A's.
    env_b = await cache.ensure(package, Log(), tenant="tenant-b")
    assert os.path.dirname(env_b.path) != os.path.dirname(env.path)
    other = cache.tenancy.account("tenant-b")
    result = subprocess.run([*setpriv_prefix(other), "ls", os.path.dirname(env.path)], capture_output=True)
    assert result.returncode != 0
