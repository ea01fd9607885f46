"""Metric series: ingesting the replicas' metrics files, reading series back,
and the TensorBoard fallback.

Reported metrics
----------------
Every replica appends JSON lines to its CLOUDML_METRICS_FILE
(`cloudml.report`, or ReportMetrics on the trainer's behalf):

    {"step": 3, "metrics": {"loss": 0.25}, "time": 1767225600.1, "replica": "worker-1", "attempt": 1}

While a job runs, the scheduler (`Ingester`) reads what is new in each file
about once a second and appends the points to chunks in etcd (see
`services.jobs.store`), writing the chunks and the new file offsets in one
transaction, so a scheduler that dies and comes back neither loses nor
repeats points. Readers merge the chunks of a series and keep the last value
reported for an (attempt, step).

TensorBoard fallback
--------------------
A job that reported nothing still has series if it wrote TensorFlow summaries:
`read_event_file` parses the TFRecord framing and the few fields of the
`tensorflow.Event` / `Summary` / `TensorProto` messages it needs straight
from the protobuf wire format, so TensorFlow (and TensorBoard) are never
imported. Scalars written by TF1 (`simple_value`) and TF2 (`tf.summary.scalar`,
a rank-0 float tensor tagged with the "scalars" plugin) are read.
"""
from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import stat as stat_mod
import struct
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.common import confine
from services.common.wire import varint as _varint
from services.jobs import store as store_mod
from services.jobs.logs import JobPaths, timestamp
from services.jobs.tfconfig import Replica

log = logging.getLogger(__name__)

MAX_READ = 8 << 20


# --- ingesting metrics files -------------------------------------------------------


@dataclass
class _Chunk:
    index: int
    series: pb.MetricSeries


@dataclass
class Ingester:
    """Ingests one job's metrics files into its stored series (leader only)."""

    store: store_mod.JobStore
    tenant: str
    name: str
    paths: JobPaths
    _offsets: dict[str, int] = field(default_factory=dict)
    _chunks: dict[tuple[str, str, int], _Chunk] = field(default_factory=dict)
    _loaded: bool = False

    async def _load(self) -> None:
        self._offsets = await self.store.ingest_offsets(self.tenant, self.name)
        for key, series in await self.store.metric_chunks(self.tenant, self.name):
            attempt, chunk = (int(part) for part in key.rsplit("/", 2)[1:])
            replica = Replica(series.replica.type, series.replica.index).name
            ident = (replica, series.name, attempt)
            current = self._chunks.get(ident)
            if current is None or current.index < chunk:
                self._chunks[ident] = _Chunk(chunk, series)
        self._loaded = True

    def _files(self) -> Iterator[tuple[str, Replica, int]]:
        for attempt in self.paths.attempts_on_disk("metrics"):
            folder = os.path.join(self.paths.root, "metrics", f"attempt-{attempt}")
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                continue
            for filename in names:
                if filename.endswith(".jsonl"):
                    try:
                        yield os.path.join(folder, filename), Replica.parse(filename[:-6]), attempt
                    except ValueError:
                        continue

    async def ingest(self) -> int:
        """Reads what is new in every metrics file; returns the points stored."""
        if not self._loaded:
            await self._load()
        changed: dict[str, pb.MetricSeries] = {}
        offsets = dict(self._offsets)
        count = 0
        for path, replica, attempt in self._files():
            rel = os.path.relpath(path, self.paths.root)
            offset = offsets.get(rel, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read(MAX_READ)
            except OSError:
                continue
            end = data.rfind(b"\n")
            if end < 0:
                continue
            offsets[rel] = offset + end + 1
            for raw in data[:end].split(b"\n"):
                for metric, point in parse_line(raw, attempt):
                    changed.update(self._append(replica, metric, attempt, point))
                    count += 1
        if offsets != self._offsets:
            await self.store.write_metrics(self.tenant, self.name, changed, offsets)
            self._offsets = offsets
        return count

    def _append(self, replica: Replica, metric: str, attempt: int, point: pb.MetricPoint) -> dict[str, pb.MetricSeries]:
        ident = (replica.name, metric, attempt)
        chunk = self._chunks.get(ident)
        if chunk is None or len(chunk.series.points) >= store_mod.CHUNK_POINTS:
            series = pb.MetricSeries(name=metric, replica=pb.ReplicaId(type=replica.type, index=replica.index),
                                     source=pb.METRIC_SOURCE_REPORTED)
            chunk = self._chunks[ident] = _Chunk(0 if chunk is None else chunk.index + 1, series)
        chunk.series.points.append(point)
        key = store_mod.chunk_key(self.tenant, self.name, replica.name, metric, attempt, chunk.index)
        return {key: chunk.series}


def parse_line(raw: bytes, attempt: int) -> list[tuple[str, pb.MetricPoint]]:
    """The (metric, point) pairs of one metrics-file line; [] for a bad line."""
    try:
        record = json.loads(raw)
        step = int(record["step"])
        metrics = record["metrics"]
        when = float(record.get("time") or 0)
    except (ValueError, KeyError, TypeError):
        return []
    if step < 0 or not isinstance(metrics, dict):
        return []
    found = []
    for name, value in metrics.items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        point = pb.MetricPoint(step=step, value=value, attempt=attempt)
        if when > 0:
            point.wall_time.CopyFrom(timestamp(when))
        found.append((str(name), point))
    return found


def metrics_line(replica: Replica, attempt: int, step: int, metrics: dict[str, float], when: float) -> bytes:
    """A metrics-file line, as `cloudml.report` writes it (NaN/inf allowed here)."""
    return (json.dumps({"step": step, "metrics": metrics, "time": when, "replica": replica.name,
                        "attempt": attempt}, separators=(",", ":")) + "\n").encode()


# --- reading series back -----------------------------------------------------------


def merge_series(chunks: Iterable[pb.MetricSeries], names: set[str], start_step: int) -> list[pb.MetricSeries]:
    """One series per (metric, replica, source) from stored chunks: points in
    attempt then step order, the last value reported for a step kept."""
    merged: dict[tuple, dict[tuple[int, int], pb.MetricPoint]] = {}
    heads: dict[tuple, pb.MetricSeries] = {}
    for chunk in chunks:
        if names and chunk.name not in names:
            continue
        ident = (chunk.name, chunk.replica.type, chunk.replica.index, chunk.source)
        if ident not in heads:
            heads[ident] = pb.MetricSeries(name=chunk.name, replica=chunk.replica, source=chunk.source)
            merged[ident] = {}
        points = merged[ident]
        for point in chunk.points:
            if point.step >= start_step:
                points[(point.attempt, point.step)] = point
    result = []
    for ident in sorted(heads):
        series = heads[ident]
        series.points.extend(merged[ident][k] for k in sorted(merged[ident]))
        result.append(series)
    return result


# --- TensorBoard event files -------------------------------------------------------


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a serialized message; value is an
    int (varint), bytes (length-delimited, fixed32, fixed64)."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("truncated message")
        yield number, wire, value


# TensorProto dtypes we read, with the struct format of one element.
_DT_FLOAT, _DT_DOUBLE, _DT_INT32, _DT_INT64 = 1, 2, 3, 9
_CONTENT_FORMAT = {_DT_FLOAT: "<f", _DT_DOUBLE: "<d", _DT_INT32: "<i", _DT_INT64: "<q"}


def _tensor_scalar(buf: bytes) -> float | None:
    """The single number a scalar TensorProto holds, or None."""
    dtype, content, values = 0, b"", []
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 0:
            dtype = value
        elif number == 4 and wire == 2:
            content = value
        elif number == 5:  # float_val (packed or not)
            values += [v for (v,) in struct.iter_unpack("<f", value)] if wire in (2, 5) else []
        elif number == 6:  # double_val
            values += [v for (v,) in struct.iter_unpack("<d", value)] if wire in (1, 2) else []
        elif number in (7, 10):  # int_val, int64_val
            if wire == 0:
                values.append(float(value))
            elif wire == 2:
                pos = 0
                while pos < len(value):
                    item, pos = _varint(value, pos)
                    values.append(float(item))
    if content and dtype in _CONTENT_FORMAT:
        fmt = _CONTENT_FORMAT[dtype]
        if len(content) == struct.calcsize(fmt):
            return float(struct.unpack(fmt, content)[0])
        return None
    return float(values[0]) if len(values) == 1 else None


def _is_scalar_metadata(buf: bytes) -> bool:
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 2:  # plugin_data
            for n, w, v in _fields(value):
                if n == 1 and w == 2 and v == b"scalars":
                    return True
        if number == 4 and wire == 0 and value == 1:  # DATA_CLASS_SCALAR
            return True
    return False


@dataclass(frozen=True)
class Scalar:
    tag: str
    step: int
    value: float
    wall_time: float


def parse_event(buf: bytes) -> list[Scalar]:
    """The scalars of one serialized tensorflow.Event."""
    wall_time, step, summary = 0.0, 0, None
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 1:
            (wall_time,) = struct.unpack("<d", value)
        elif number == 2 and wire == 0:
            step = value if value < 1 << 63 else value - (1 << 64)
        elif number == 5 and wire == 2:
            summary = value
    if summary is None:
        return []
    found = []
    for number, wire, raw in _fields(summary):
        if number != 1 or wire != 2:
            continue
        tag, simple, tensor, metadata = "", None, None, b""
        for n, w, v in _fields(raw):
            if n == 1 and w == 2:
                tag = v.decode(errors="replace")
            elif n == 2 and w == 5:
                (simple,) = struct.unpack("<f", v)
            elif n == 8 and w == 2:
                tensor = v
            elif n == 9 and w == 2:
                metadata = v
        value = simple
        if value is None and tensor is not None and (not metadata or _is_scalar_metadata(metadata)):
            value = _tensor_scalar(tensor)
        if tag and value is not None:
            found.append(Scalar(tag, step, float(value), wall_time))
    return found


def read_records(data: bytes) -> Iterator[bytes]:
    """The records of TFRecord-framed data (uint64 length, uint32 masked CRC,
    data, uint32 masked CRC); stops at a truncated tail (a file being written).
    CRCs are not verified: the stdlib has no CRC32C, and a torn record fails
    to parse anyway."""
    pos, end = 0, len(data)
    while pos + 12 <= end:
        (length,) = struct.unpack_from("<Q", data, pos)
        if pos + 12 + length + 4 > end:
            return
        yield data[pos + 12:pos + 12 + length]
        pos += 12 + length + 4


def read_event_file(data: bytes) -> list[Scalar]:
    scalars = []
    for record in read_records(data):
        try:
            scalars.extend(parse_event(record))
        except (ValueError, IndexError, struct.error):
            continue
    return scalars


class TensorBoardReader:
    """Scalar series from the event files under an output path, cached per
    file by (size, mtime).

    The output path comes checked (a `services.common.confine.Location` of
    the job's tenant). Local trees are listed and read beneath the tenant's
    storage root without following any symlink (`confine.walk_beneath`,
    `confine.open_beneath`): an events file, or a directory on the way, that
    is a symlink (to another tenant's events, say) is skipped, never read."""

    MAX_FILE_BYTES = 256 << 20

    def __init__(self, max_files: int = 2000):
        self._cache: dict[tuple[str, str], tuple[tuple, list[Scalar]]] = {}
        self.max_files = max_files

    def series(self, where, names: set[str], start_step: int) -> list[pb.MetricSeries]:
        by_tag: dict[str, dict[int, pb.MetricPoint]] = {}
        for run, scalars in self._scan(where):
            for s in scalars:
                name = s.tag if run in ("", ".") else f"{run}/{s.tag}"
                if (names and name not in names) or s.step < start_step or math.isnan(s.wall_time):
                    continue
                point = pb.MetricPoint(step=s.step, value=s.value, attempt=0)
                if s.wall_time > 0:
                    point.wall_time.CopyFrom(timestamp(s.wall_time))
                by_tag.setdefault(name, {})[s.step] = point
        return [
            pb.MetricSeries(name=name, source=pb.METRIC_SOURCE_TENSORBOARD,
                            points=[points[k] for k in sorted(points)])
            for name, points in sorted(by_tag.items())
        ]

    def _scan(self, where) -> Iterator[tuple[str, list[Scalar]]]:
        if not where:
            return
        if isinstance(where, str):  # a path the platform chose itself (tests, tools)
            if "://" in where and not where.startswith("file://"):
                yield from self._scan_fsspec(where)
                return
            where = confine.Location(uri=where, scheme="file", root=where.removeprefix("file://"))
        if not where.local:
            yield from self._scan_fsspec(where.uri)
            return
        try:
            rootfd = confine.open_root(where.root)
        except OSError:
            return
        try:
            files = []
            for _, found, _ in confine.walk_beneath(rootfd, where.relative):
                files += [e.relative for e in found if ".tfevents." in e.relative.rsplit("/", 1)[-1]]
                if len(files) > self.max_files:
                    break
            base = where.relative
            for rel in sorted(files)[: self.max_files]:
                scalars = self._read(rootfd, where.root, rel)
                if scalars is None:
                    continue
                run = posixpath.relpath(posixpath.dirname(rel), base) if base else posixpath.dirname(rel) or "."
                yield run, scalars
        finally:
            os.close(rootfd)

    def _read(self, rootfd: int, root: str, rel: str) -> list[Scalar] | None:
        try:
            fd = confine.open_beneath(rootfd, rel, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return None  # gone, or a symlink planted since the walk
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode) or st.st_size > self.MAX_FILE_BYTES:
                return None
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._cache.get((root, rel))
            if cached is None or cached[0] != key:
                with os.fdopen(os.dup(fd), "rb") as f:
                    cached = self._cache[(root, rel)] = (key, read_event_file(f.read(self.MAX_FILE_BYTES)))
            return cached[1]
        except OSError:
            return None
        finally:
            os.close(fd)

    def _scan_fsspec(self, output_path: str) -> Iterator[tuple[str, list[Scalar]]]:
        try:
            import fsspec

            fs, root = fsspec.core.url_to_fs(output_path)
            paths = [p for p in fs.find(root) if ".tfevents." in p.rsplit("/", 1)[-1]][: self.max_files]
            for path in sorted(paths):
                with fs.open(path, "rb") as f:
                    scalars = read_event_file(f.read())
                rel = os.path.relpath(os.path.dirname(path), root)
                yield rel, scalars
        except Exception:  # noqa: BLE001 - a fallback must not fail the call
            log.warning("cannot read event files under %s", output_path, exc_info=True)
