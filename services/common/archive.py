"""The archive: finished objects moved out of etcd into the platform's storage.

A service moves an object here once it ended more than a retention period
ago (its archiver, leader only); reads fall back to it, so get, list, logs
and metrics of an archived object work as before. Storage goes through
`fsspec` (`file://` by default, any installed backend otherwise), like every
other storage URI of the platform.

Layout (JSON Lines, partitioned by tenant and creation day)::

    <root>/<kind>/<tenant>/<yyyy-mm-dd>/<part>.jsonl   the records created that UTC day,
                                                       one JSON line per object, each
                                                       part sorted by (create_ns, name)
    <root>/<kind>/<tenant>/names/<name>.json           the name's pointer: {uid, day, part,
                                                       offset, length, create_ns}
    <root>/<kind>/<tenant>/blobs/<name>.<uid>.bin      optional side data of one object
                                                       (the jobs service: its metric series)

`<tenant>` is the partition a kind lists from: the tenant, or a part of it
(model versions use `<tenant>/<model>`, so a model's versions list from one
`names/` directory).

A line is `{"name", "uid", "create_ns", "state", "record"}`: `record` is the
object's protobuf, base64. Why this and not Parquet: no new dependency
(pyarrow is not installed and would add ~100 MB to every service), appends
are whole new files (object stores have no append), a page reads one day's
few parts, and decoding a line is `json.loads` plus protobuf's C parser
(`json_format` would be ~50x slower). The plain fields make a day readable
with `jq` and filterable without decoding the record.

**The pointer is the truth.** A line is visible only while its name's
pointer names exactly that line (day, part, offset). Hence:

- a mover writes the part file (atomically: temp file + rename on local
  disks, one PUT on object stores), then the pointer, then deletes the
  etcd record under a revision check. Killed before the pointer, the line is
  invisible garbage; killed after it, the object is both live and archived
  until the next pass archives it again (a new line, the pointer moved to it)
  and readers prefer the live record and drop duplicates by name. Nothing is
  lost and nothing is listed twice;
- deleting an archived object removes its pointer (and blobs); its line
  stays in its part, invisible;
- a name with a pointer is taken: creating an object of that name fails as
  for a live one, until it is deleted.

A listing of one tenant reads the day directories it needs in order (one
`ls` of the tenant's directory, then one day at a time), never the tenant's
whole history; a page position is (create_ns, name), so a token stays valid
while objects move from etcd to the archive.
"""
from __future__ import annotations

import abc
import asyncio
import base64
import bisect
import datetime as dt
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable


log = logging.getLogger(__name__)

async def run_passes(what: str, pass_once: Callable[[], Awaitable[int]], pause: float) -> None:
    """An archiver's loop (on its service's leader) until cancelled:
    `pass_once()` moves what is due and returns how many; errors are logged
    and the next pass retries."""
    from services.common import errors  # noqa: PLC0415 - keeps this module's import light

    while True:
        try:
            moved = await pass_once()
            if moved:
                log.info("%s: %d archived", what, moved)
        except errors.Unavailable as err:
            log.info("%s: pass interrupted: %s", what, err.message)
        except Exception:  # noqa: BLE001 - keep archiving whatever happens
            log.exception("%s: pass failed", what)
        await asyncio.sleep(pause)


class Archiver(abc.ABC):
    """The frame of a service's archiver (on its leader): `run` calls
    `pass_once` (the subclass's: move what ended before `cutoff_ns()`,
    return how many) every `settings.pass_seconds` until cancelled."""

    #: names the archiver in the log
    what = "archiver"

    def __init__(self, store, archive, settings: "ArchiveSettings", clock: Callable[[], float] = time.time):
        self.store = store
        self.archive = archive
        self.settings = settings
        self.clock = clock

    async def run(self) -> None:
        """Until cancelled (the leader's loop)."""
        await run_passes(self.what, self.pass_once, self.settings.pass_seconds)

    @abc.abstractmethod
    async def pass_once(self) -> int:
        """Moves what is due; how many objects moved."""

    def cutoff_ns(self) -> int:
        """Objects that ended before this (ns) are due."""
        return int((self.clock() - self.settings.retention_seconds) * 1e9)


@dataclass(frozen=True)
class ArchiveSettings:
    """Where finished objects go and when (flags --archive-uri,
    --retention-seconds, --archive-seconds; every service's)."""

    #: fsspec URI of the archive's root; empty: DIR/archive (the platform's own, 0700)
    uri: str = ""
    #: an object is archived once it ended this long ago
    retention_seconds: float = 7 * 86400.0
    #: the archiver's pause between passes (it runs on the service's leader)
    pass_seconds: float = 60.0
    #: objects moved per batch (one part file per tenant and day, one etcd transaction each)
    batch: int = 200

    def root(self, data_dir: str) -> str:
        return self.uri or "file://" + os.path.join(os.path.abspath(data_dir), "archive")


DAY_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
#: a page position: (create time in ns, name); (0, "") is the start
Position = tuple[int, str]


def day_of(create_ns: int) -> str:
    return dt.datetime.fromtimestamp(create_ns / 1e9, dt.timezone.utc).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Row:
    """One archived object as stored (its record still encoded)."""

    name: str
    uid: str
    create_ns: int
    state: str
    record: bytes

    @property
    def position(self) -> Position:
        return (self.create_ns, self.name)

    def line(self) -> bytes:
        return (json.dumps({"name": self.name, "uid": self.uid, "create_ns": self.create_ns, "state": self.state,
                            "record": base64.b64encode(self.record).decode()}, separators=(",", ":"))
                + "\n").encode()

    @classmethod
    def parse(cls, line: bytes) -> "Row":
        data = json.loads(line)
        return cls(data["name"], data["uid"], int(data["create_ns"]), data["state"],
                   base64.b64decode(data["record"]))

    @classmethod
    def parse_head(cls, line: bytes) -> "Row":
        """The plain fields of a line, without decoding its record (`record`
        is the line's last field, so the head is what comes before it)."""
        cut = line.rfind(b',"record":')
        if cut < 0:
            return cls.parse(line)
        data = json.loads(line[:cut] + b"}")
        return cls(data["name"], data["uid"], int(data["create_ns"]), data["state"], b"")


@dataclass(frozen=True)
class Pointer:
    uid: str
    day: str
    part: str
    offset: int
    length: int
    create_ns: int

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Pointer":
        data = json.loads(raw)
        return cls(data["uid"], data["day"], data["part"], int(data["offset"]), int(data["length"]),
                   int(data["create_ns"]))


class Archive:
    """Archived objects of every kind under one storage root (blocking calls;
    the `a*` methods run them in a thread for the event loop)."""

    def __init__(self, uri: str, fsync: bool = True):
        self.uri = uri.rstrip("/")
        #: flush each file to disk before it becomes visible (off only for bulk loads: benchmarks)
        self.fsync = fsync
        import fsspec  # noqa: PLC0415 - only the processes that archive pay for it

        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.local:
            os.makedirs(self.root, mode=0o700, exist_ok=True)

    # --- paths ----------------------------------------------------------------------

    def _tenant_dir(self, kind: str, tenant: str) -> str:
        return f"{self.root}/{kind}/{tenant}"

    def _pointer_path(self, kind: str, tenant: str, name: str) -> str:
        return f"{self._tenant_dir(kind, tenant)}/names/{name}.json"

    def _part_path(self, kind: str, tenant: str, day: str, part: str) -> str:
        return f"{self._tenant_dir(kind, tenant)}/{day}/{part}.jsonl"

    def _blob_path(self, kind: str, tenant: str, name: str, uid: str) -> str:
        return f"{self._tenant_dir(kind, tenant)}/blobs/{name}.{uid}.bin"

    # --- file primitives ------------------------------------------------------------------

    def _put(self, path: str, data: bytes) -> None:
        """Writes a whole file so that readers see all of it or none."""
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb") as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)

    def _read(self, path: str) -> bytes | None:
        try:
            if self.local:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    chunks = []
                    while chunk := os.read(fd, 1 << 20):
                        chunks.append(chunk)
                    return b"".join(chunks)
                finally:
                    os.close(fd)
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _read_range(self, path: str, offset: int, length: int) -> bytes | None:
        try:
            if self.local:
                with open(path, "rb") as f:
                    f.seek(offset)
                    return f.read(length)
            return self.fs.cat_file(path, start=offset, end=offset + length)
        except FileNotFoundError:
            return None

    def _remove(self, path: str) -> None:
        try:
            if self.local:
                os.unlink(path)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def _ls(self, path: str) -> list[str]:
        """Base names in a directory (empty when it does not exist)."""
        try:
            if self.local:
                return os.listdir(path)
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    # --- writes ---------------------------------------------------------------------

    def put_blob(self, kind: str, tenant: str, name: str, uid: str, data: bytes) -> None:
        self._put(self._blob_path(kind, tenant, name, uid), data)

    def write(self, kind: str, tenant: str, rows: Iterable[Row]) -> dict[str, Pointer]:
        """Writes `rows` (one tenant's) as new parts, one per creation day, and
        returns where each went, by name. Pointers are not written: the
        caller does (`point`) once the parts are durable."""
        by_day: dict[str, list[Row]] = {}
        for row in rows:
            by_day.setdefault(day_of(row.create_ns), []).append(row)
        part = f"{time.time_ns():019d}-{secrets.token_hex(4)}"
        where: dict[str, Pointer] = {}
        for day, day_rows in by_day.items():
            day_rows.sort(key=lambda r: r.position)
            chunks, offset = [], 0
            for row in day_rows:
                line = row.line()
                where[row.name] = Pointer(row.uid, day, part, offset, len(line), row.create_ns)
                chunks.append(line)
                offset += len(line)
            self._put(self._part_path(kind, tenant, day, part), b"".join(chunks))
        return where

    def point(self, kind: str, tenant: str, name: str, pointer: Pointer) -> None:
        self._put(self._pointer_path(kind, tenant, name), pointer.encode())

    def unpoint(self, kind: str, tenant: str, name: str, pointer: Pointer | None = None) -> bool:
        """Removes a name's pointer (only if it is still `pointer`, when given)
        and its blobs: the object is gone from the archive and its name free."""
        current = self.pointer(kind, tenant, name)
        if current is None or (pointer is not None and current != pointer):
            return False
        self._remove(self._pointer_path(kind, tenant, name))
        self._remove(self._blob_path(kind, tenant, name, current.uid))
        return True

    # --- reads ----------------------------------------------------------------------

    def pointer(self, kind: str, tenant: str, name: str) -> Pointer | None:
        raw = self._read(self._pointer_path(kind, tenant, name))
        if raw is None:
            return None
        try:
            return Pointer.decode(raw)
        except (ValueError, KeyError, TypeError):
            log.error("bad archive pointer %s/%s/%s", kind, tenant, name)
            return None

    def get(self, kind: str, tenant: str, name: str) -> Row | None:
        pointer = self.pointer(kind, tenant, name)
        return self.get_at(kind, tenant, pointer) if pointer is not None else None

    def get_at(self, kind: str, tenant: str, pointer: Pointer, parts: dict[str, bytes] | None = None) -> Row | None:
        """The line a pointer names (from `parts`, part files already read, when there)."""
        path = self._part_path(kind, tenant, pointer.day, pointer.part)
        cached = (parts or {}).get(path)
        raw = (cached[pointer.offset:pointer.offset + pointer.length] if cached is not None
               else self._read_range(path, pointer.offset, pointer.length))
        if not raw:
            log.error("archive pointer %s names a missing line", pointer)
            return None
        return Row.parse(raw)

    def blob(self, kind: str, tenant: str, name: str, uid: str) -> bytes | None:
        return self._read(self._blob_path(kind, tenant, name, uid))

    def page(self, kind: str, tenant: str, after: Position, limit: int,
             keep: Callable[[Row], bool] = lambda row: True) -> tuple[list[Row], bool]:
        """Up to `limit` visible rows of `tenant` after position `after`, in
        (create_ns, name) order, that `keep` accepts; and whether more follow."""
        days = sorted(d for d in self._ls(self._tenant_dir(kind, tenant)) if DAY_RE.fullmatch(d))
        first_day = day_of(after[0]) if after[0] else ""
        found: list[Row] = []
        for day in days:
            if day < first_day:
                continue
            parts: dict[str, bytes] = {}
            for head, offset, length, part in sorted(self._day(kind, tenant, day, parts), key=lambda x: x[0].position):
                if head.position <= after or not keep(head):
                    continue
                pointer = self.pointer(kind, tenant, head.name)
                if pointer is None or (pointer.day, pointer.part, pointer.offset) != (day, part, offset):
                    continue  # deleted, or archived again elsewhere
                if len(found) == limit:
                    return found, True
                row = self.get_at(kind, tenant, pointer, parts)
                if row is not None:
                    found.append(row)
        return found, False

    def page_by_name(self, kind: str, tenant: str, after: str, limit: int,
                     keep: Callable[[Row], bool] = lambda row: True) -> tuple[list[Row], bool]:
        """Up to `limit` rows of `tenant` named after `after`, in name order
        (for kinds listed by name: one `ls` of the names, then a read per row)."""
        names = self.names(kind, tenant)
        found: list[Row] = []
        for name in names[bisect.bisect_right(names, after):]:
            row = self.get(kind, tenant, name)
            if row is None or not keep(row):
                continue
            if len(found) == limit:
                return found, True
            found.append(row)
        return found, False

    def names(self, kind: str, tenant: str) -> list[str]:
        """Every name of `tenant` that has a pointer, sorted (one `ls`)."""
        return sorted(n[:-len(".json")] for n in self._ls(f"{self._tenant_dir(kind, tenant)}/names")
                      if n.endswith(".json"))

    def _day(self, kind: str, tenant: str, day: str, parts: dict[str, bytes]) -> list[tuple[Row, int, int, str]]:
        """(head, offset, length, part) of every line of a day's parts; the
        parts' bytes go into `parts` (path: bytes) for `get_at`."""
        out = []
        base = f"{self._tenant_dir(kind, tenant)}/{day}"
        for file_name in self._ls(base):
            if not file_name.endswith(".jsonl"):
                continue
            part = file_name[:-len(".jsonl")]
            data = self._read(f"{base}/{file_name}") or b""
            parts[f"{base}/{file_name}"] = data
            offset = 0
            for line in data.splitlines(keepends=True):
                try:
                    out.append((Row.parse_head(line), offset, len(line), part))
                except (ValueError, KeyError, TypeError):
                    pass  # a torn line of a non-atomic store: never pointed at
                offset += len(line)
        return out

    # --- for the event loop ------------------------------------------------------------------

    async def aget(self, kind: str, tenant: str, name: str) -> Row | None:
        return await asyncio.to_thread(self.get, kind, tenant, name)

    async def apage_by_name(self, kind: str, tenant: str, after: str, limit: int,
                            keep: Callable[[Row], bool] = lambda row: True) -> tuple[list[Row], bool]:
        return await asyncio.to_thread(self.page_by_name, kind, tenant, after, limit, keep)

    async def apage(self, kind: str, tenant: str, after: Position, limit: int,
                    keep: Callable[[Row], bool] = lambda row: True) -> tuple[list[Row], bool]:
        return await asyncio.to_thread(self.page, kind, tenant, after, limit, keep)
