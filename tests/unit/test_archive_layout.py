"""The archive's layout and visibility rules (services/common/archive.py), on local files."""
import os

from services.common.archive import Archive, ArchiveSettings, Row, day_of

DAY_NS = 86400 * 10**9
T0 = 1_780_000_000 * 10**9


def row(name: str, created: int, state: str = "JOB_STATE_SUCCEEDED", uid: str = "u1") -> Row:
    return Row(name, uid, created, state, f"record of {name} {uid}".encode())


def archived(archive: Archive, tenant: str, rows: list[Row]) -> None:
    for name, pointer in archive.write("jobs", tenant, rows).items():
        archive.point("jobs", tenant, name, pointer)


def test_rows_read_back_by_name_and_page_in_creation_order_across_days(tmp_path):
    archive = Archive("file://" + str(tmp_path))
    rows = [row(f"j{i}", T0 + (i % 3) * DAY_NS + i) for i in range(9)]
    archived(archive, "acme", rows[:5])
    archived(archive, "acme", rows[5:])
    assert archive.get("jobs", "acme", "j4") == rows[4]
    assert archive.get("jobs", "other", "j4") is None
    expected = sorted(rows, key=lambda r: r.position)
    page, more = archive.page("jobs", "acme", (0, ""), 4)
    assert page == expected[:4] and more
    page, more = archive.page("jobs", "acme", page[-1].position, 100)
    assert page == expected[4:] and not more
    assert sorted(os.listdir(tmp_path / "jobs" / "acme")) == sorted(
        {day_of(r.create_ns) for r in rows} | {"names"})


def test_only_the_pointed_line_is_visible(tmp_path):
    archive = Archive("file://" + str(tmp_path))
    first = row("a", T0, uid="u1")
    archived(archive, "acme", [first, row("b", T0 + 1)])
    # Written again (an archiver killed before deleting from etcd, then rerun).
    archive.point("jobs", "acme", "a", archive.write("jobs", "acme", [first])["a"])
    # Written without a pointer (killed before pointing): invisible.
    archive.write("jobs", "acme", [row("c", T0 + 2)])
    page, _ = archive.page("jobs", "acme", (0, ""), 10)
    assert [r.name for r in page] == ["a", "b"]
    assert archive.get("jobs", "acme", "c") is None
    assert archive.unpoint("jobs", "acme", "a")
    assert [r.name for r in archive.page("jobs", "acme", (0, ""), 10)[0]] == ["b"]
    assert archive.get("jobs", "acme", "a") is None and not archive.unpoint("jobs", "acme", "a")


def test_page_filter_and_blobs(tmp_path):
    archive = Archive("file://" + str(tmp_path))
    archived(archive, "acme", [row("ok", T0), row("bad", T0 + 1, "JOB_STATE_FAILED")])
    page, more = archive.page("jobs", "acme", (0, ""), 10, lambda r: r.state == "JOB_STATE_FAILED")
    assert [r.name for r in page] == ["bad"] and not more
    archive.put_blob("jobs", "acme", "ok", "u1", b"series")
    assert archive.blob("jobs", "acme", "ok", "u1") == b"series"
    archive.unpoint("jobs", "acme", "ok")
    assert archive.blob("jobs", "acme", "ok", "u1") is None


def test_default_root_is_the_data_dir(tmp_path):
    assert ArchiveSettings().root(str(tmp_path)) == "file://" + str(tmp_path / "archive")
    assert ArchiveSettings(uri="memory://x").root(str(tmp_path)) == "memory://x"


def test_a_non_local_fsspec_store_works_alike():
    archive = Archive("memory://archive-layout-test")
    archived(archive, "acme", [row("a", T0), row("b", T0 + 1)])
    archive.write("jobs", "acme", [row("c", T0 + 2)])  # no pointer: invisible
    assert archive.get("jobs", "acme", "b") == row("b", T0 + 1)
    assert [r.name for r in archive.page("jobs", "acme", (0, ""), 10)[0]] == ["a", "b"]
