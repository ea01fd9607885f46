"""services.common.confine: every form of path and URI a tenant may give,
the safe opens and walks (openat2 and the per-component fallback), and the
TensorBoard reader built on them; services.common.uploads' path rules."""
import asyncio
import os
import socket

import pytest

from services.common import confine, errors, uploads
from services.common.confine import Confiner
from services.jobs.metrics import TensorBoardReader
from tests.unit.test_jobs_metrics import event, record, simple_value

OPENAT2_MODES = [True, False] if confine.HAVE_OPENAT2 else [False]


def fake_resolver(table):
    def resolve(host, port, type=0):  # noqa: A002 - getaddrinfo's name
        if host not in table:  # addresses (any spelling) resolve as the system resolves them
            if host.replace(".", "").replace(":", "").isalnum() and "example" not in host:
                return socket.getaddrinfo(host, port, type=type)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in table[host]]
    return resolve


@pytest.fixture
def storage(tmp_path):
    for tenant in ("team-a", "team-b"):
        (tmp_path / "storage" / tenant / "pkgs").mkdir(parents=True)
        (tmp_path / "storage" / tenant / "pkgs" / "t-1.tar.gz").write_bytes(tenant.encode())
    os.symlink(tmp_path / "storage" / "team-b" / "pkgs", tmp_path / "storage" / "team-a" / "theirs")
    os.symlink(tmp_path / "storage" / "team-b" / "pkgs" / "t-1.tar.gz", tmp_path / "storage" / "team-a" / "t.tar.gz")
    return tmp_path / "storage"


@pytest.fixture
def confiner(storage):
    table = {"public.example": ["93.184.216.34"], "rebound.example": ["93.184.216.34", "127.0.0.1"],
             "metadata.example": ["169.254.169.254"], "v6.example": ["2606:2800:220:1::1"]}
    return Confiner(str(storage), "http,https,memory", resolver=fake_resolver(table))


def test_own_paths_are_accepted_and_normalized(confiner, storage):
    own = f"{storage}/team-a/pkgs/t-1.tar.gz"
    where = confiner.check("team-a", own, "spec.trainer_uri")
    assert where.local and where.uri == own and where.relative == "pkgs/t-1.tar.gz"
    assert confiner.check("team-a", "file://" + own, "f").uri == "file://" + own
    assert confiner.check("team-a", "file://localhost" + own, "f").uri == "file://" + own
    assert confiner.check("team-a", own, "f", keep_plain=False).uri == "file://" + own
    assert confiner.check("team-a", f"{storage}//team-a/./jobs/new/", "f").uri == f"{storage}/team-a/jobs/new"
    assert confiner.check("team-a", f"{storage}/team-a", "f").relative == ""


@pytest.mark.parametrize("value, error, words", [
    ("{storage}/team-b/pkgs/t-1.tar.gz", errors.PermissionDenied, "own storage"),      # another tenant's file
    ("file://{storage}/team-b/pkgs/t-1.tar.gz", errors.PermissionDenied, "own storage"),
    ("{storage}/team-a/theirs/t-1.tar.gz", errors.PermissionDenied, "own storage"),     # a symlinked directory
    ("{storage}/team-a/t.tar.gz", errors.PermissionDenied, "own storage"),              # a symlinked file
    ("{storage}/team-a/../team-b/pkgs/t-1.tar.gz", errors.InvalidArgument, "'..'"),
    ("{storage}/team-a/pkgs/..", errors.InvalidArgument, "'..'"),
    ("file:///etc/passwd", errors.PermissionDenied, "own storage"),
    ("/etc/passwd", errors.PermissionDenied, "own storage"),
    ("file://etc/passwd", errors.InvalidArgument, "file:///absolute"),
    ("relative/t-1.tar.gz", errors.InvalidArgument, "absolute"),
    ("zip://m::file:///{storage}/team-b/m.zip", errors.InvalidArgument, "chained"),
    ("zip://m::/{storage}/team-b/m.zip", errors.InvalidArgument, "chained"),
    ("{storage}/team-a/x::y", errors.InvalidArgument, "chained"),
    ("memory://b/x::file:///etc/passwd", errors.InvalidArgument, "chained"),
    ("s3://bucket/t-1.tar.gz", errors.InvalidArgument, "not allowed"),                 # a scheme not allowed
    ("gopher://x/t", errors.InvalidArgument, "not allowed"),
    ("http://127.0.0.1:8500/t-1.tar.gz", errors.PermissionDenied, "loopback"),
    ("http://[::1]/t-1.tar.gz", errors.PermissionDenied, "loopback"),
    ("http://[::ffff:127.0.0.1]/t", errors.PermissionDenied, "loopback"),
    ("http://169.254.169.254/latest/meta-data", errors.PermissionDenied, "link-local"),
    ("http://metadata.example/x", errors.PermissionDenied, "link-local"),
    ("http://10.0.0.1/t-1.tar.gz", errors.PermissionDenied, "private"),
    ("https://192.168.1.1/t", errors.PermissionDenied, "private"),
    ("http://0.0.0.0/t", errors.PermissionDenied, "address"),
    ("http://224.0.0.1/t", errors.PermissionDenied, "multicast"),
    ("http://240.0.0.1/t", errors.PermissionDenied, "address"),
    ("http://100.64.0.1/t", errors.PermissionDenied, "address"),                        # shared (CGNAT)
    ("http://rebound.example/t", errors.PermissionDenied, "127.0.0.1"),                 # any bad address refuses
    ("http://user@public.example/t", errors.InvalidArgument, "credentials"),
    ("http://nosuch.example/t", errors.InvalidArgument, "resolve"),
    ("/x/\x00y", errors.InvalidArgument, "not a valid"),
    ("", errors.InvalidArgument, "required"),
])
def test_forms_outside_the_tenants_storage_are_refused(confiner, storage, value, error, words):
    with pytest.raises(error) as info:
        confiner.check("team-a", value.format(storage=storage), "spec.trainer_uri")
    assert words in info.value.message and info.value.message.startswith("spec.trainer_uri")
    assert "\n" not in info.value.message


def test_public_http_is_accepted_with_the_addresses_it_resolved_to(confiner):
    where = confiner.check("team-a", "https://public.example:8443/pkgs/t-1.tar.gz", "f")
    assert (where.host, where.port, where.addresses) == ("public.example", 8443, ("93.184.216.34",))
    assert confiner.check("team-a", "http://v6.example/t", "f").addresses == ("2606:2800:220:1::1",)
    assert confiner.check("team-a", "memory://bucket/t-1.tar.gz", "f").scheme == "memory"


def test_only_file_is_allowed_by_default(storage):
    plain = Confiner(str(storage))
    for uri in ("http://93.184.216.34/t", "s3://b/t", "memory://b/t"):
        with pytest.raises(errors.InvalidArgument, match="not allowed"):
            plain.check("team-a", uri, "f")
    assert confine.parse_schemes(" S3, https,file ") == ("https", "s3")
    with pytest.raises(ValueError):
        confine.parse_schemes("zip::file")


@pytest.mark.parametrize("use_openat2", OPENAT2_MODES)
def test_open_beneath_never_follows_a_symlink_nor_leaves_the_root(storage, use_openat2):
    root = str(storage / "team-a")
    fd = confine.open_beneath(root, "pkgs/t-1.tar.gz", use_openat2=use_openat2)
    assert os.read(fd, 100) == b"team-a"
    os.close(fd)
    for rel in ("t.tar.gz", "theirs/t-1.tar.gz", "../team-b/pkgs/t-1.tar.gz", "/etc/passwd"):
        with pytest.raises(OSError):
            confine.open_beneath(root, rel, use_openat2=use_openat2)
    with pytest.raises(FileNotFoundError):
        confine.open_beneath(root, "pkgs/missing", use_openat2=use_openat2)


def test_walk_beneath_skips_symlinks(storage):
    (storage / "team-a" / "deep" / "er").mkdir(parents=True)
    (storage / "team-a" / "deep" / "er" / "f").write_bytes(b"12345")
    walked = list(confine.walk_beneath(str(storage / "team-a")))
    assert [d for d, _, _ in walked] == ["", "deep", "deep/er", "pkgs"]
    files = [e.relative for _, found, _ in walked for e in found]
    assert files == ["deep/er/f", "pkgs/t-1.tar.gz"]  # neither t.tar.gz nor theirs/
    assert confine.tree_bytes(str(storage / "team-a")) == 5 + len(b"team-a")


def test_tensorboard_reader_does_not_read_another_tenants_events_through_symlinks(confiner, storage):
    theirs = storage / "team-b" / "jobs" / "secret"
    theirs.mkdir(parents=True)
    (theirs / "events.out.tfevents.1.host").write_bytes(record(event(1, 1.0, [simple_value("their_loss", 9.0)])))
    out = storage / "team-a" / "jobs" / "mine"
    (out / "train").mkdir(parents=True)
    (out / "train" / "events.out.tfevents.1.host").write_bytes(record(event(1, 1.0, [simple_value("loss", 0.5)])))
    os.symlink(theirs / "events.out.tfevents.1.host", out / "events.out.tfevents.2.host")
    os.symlink(theirs, out / "linked")
    where = confiner.check("team-a", str(out), "spec.output_path")
    series = TensorBoardReader().series(where, set(), 0)
    assert [s.name for s in series] == ["train/loss"]


@pytest.mark.parametrize("path", ["/abs", "../x", "a/../b", "a//b", "./a", "a/./b", "x\x00y", ""])
def test_upload_paths_must_be_plain_relative_paths(path):
    with pytest.raises(errors.InvalidArgument):
        uploads.check_relative(path)
    assert uploads.check_relative("variables/variables.index") == ["variables", "variables.index"]
    assert uploads.check_relative("assets/") == ["assets", ""]


def test_uploads_store_by_content_and_refuse_planted_symlinks_and_limits(storage, tmp_path):
    store = uploads.Uploads(str(storage), limits=uploads.UploadLimits(max_upload_bytes=100, max_files=3))

    async def chunks(items):
        for item in items:
            yield item

    async def run(items, **kw):
        return await store.receive_tree("team-c", ("models", "m"), chunks(items), required=("saved_model.pb",), **kw)

    tree = [("saved_model.pb", b"graph"), ("variables/variables.index", b"idx"), ("assets/", b"")]
    first = asyncio.run(run(tree))
    assert first.uri == f"file://{storage}/team-c/models/m/{first.sha256[:16]}/" and first.files == 2
    assert (storage / "team-c" / "models" / "m" / first.sha256[:16] / "variables" / "variables.index").read_bytes() == b"idx"
    assert asyncio.run(run(tree)).uri == first.uri  # same content, same place
    assert os.listdir(storage / ".uploads") == []    # nothing staged is left
    for bad, error in [([("saved_model.pb", b"x"), ("a", b"1"), ("saved_model.pb", b"y")], errors.InvalidArgument),
                       ([("../saved_model.pb", b"x")], errors.InvalidArgument),
                       ([("a", b""), ("b", b""), ("c", b""), ("d", b"")], errors.InvalidArgument),   # too many files
                       ([("variables/x", b"1")], errors.InvalidArgument),                             # no saved_model.pb
                       ([("saved_model.pb", b"x" * 101)], errors.ResourceExhausted)]:
        with pytest.raises(error):
            asyncio.run(run(bad))
    # A tenant that planted a symlink where uploads go gets PERMISSION_DENIED, and nothing lands elsewhere.
    (storage / "team-d").mkdir()
    os.symlink(storage / "team-b", storage / "team-d" / "models")
    with pytest.raises(errors.PermissionDenied):
        asyncio.run(store.receive_tree("team-d", ("models", "m"), chunks(tree)))
    assert not (storage / "team-b" / "m").exists()
    full = uploads.Uploads(str(storage), limits=uploads.UploadLimits(max_tenant_bytes=12))
    with pytest.raises(errors.ResourceExhausted, match="storage"):
        asyncio.run(full.receive_file("team-c", ("packages",), "t-1.tar.gz", chunks([b"x" * 10])))
