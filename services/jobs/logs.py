"""A job's files on the platform's disk, and StreamLogs over its log files.

    DIR/jobs/<tenant>/<job>/
        logs/job.log                       the job's own lines (installation output,
                                           platform notes): "<unix time>\t<attempt>\t<text>"
        logs/attempt-<n>/<replica>.log     a replica's stdout+stderr (the runtime appends)
        metrics/attempt-<n>/<replica>.jsonl   CLOUDML_METRICS_FILE of that replica
        package/<file>                     the fetched trainer package
        work/                              the replicas' working directory

Logs live with the job (not with the runtime), so they replay after the job
ended and after a platform restart; DeleteJob removes the directory.

Replica log files hold raw output without timestamps: a line's `time` is when
the service read it while following, and the file's last modification for
lines replayed from before the stream started.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from google.protobuf.timestamp_pb2 import Timestamp

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from services.jobs.tfconfig import Replica

READ_CHUNK = 1 << 20
BATCH_LINES = 500
POLL_SECONDS = 0.2
TAIL_WINDOW = 4 << 20
_ATTEMPT_DIR = re.compile(r"attempt-(\d+)")


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


@dataclass(frozen=True)
class JobPaths:
    """Where one job's files are."""

    root: str

    @classmethod
    def of(cls, data_dir: str, tenant: str, name: str) -> "JobPaths":
        return cls(os.path.join(data_dir, "jobs", tenant, name))

    @property
    def logs(self) -> str:
        return os.path.join(self.root, "logs")

    @property
    def job_log(self) -> str:
        return os.path.join(self.logs, "job.log")

    def replica_log(self, attempt: int, replica: Replica) -> str:
        return os.path.join(self.logs, f"attempt-{attempt}", f"{replica.name}.log")

    def metrics_file(self, attempt: int, replica: Replica) -> str:
        return os.path.join(self.root, "metrics", f"attempt-{attempt}", f"{replica.name}.jsonl")

    @property
    def package_dir(self) -> str:
        return os.path.join(self.root, "package")

    @property
    def workdir(self) -> str:
        return os.path.join(self.root, "work")

    def attempts_on_disk(self, subdir: str = "logs") -> list[int]:
        try:
            names = os.listdir(os.path.join(self.root, subdir))
        except OSError:
            return []
        return sorted(int(m[1]) for m in map(_ATTEMPT_DIR.fullmatch, names) if m)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class JobLog:
    """Appends the job's own lines to logs/job.log (one write per line, O_APPEND)."""

    def __init__(self, paths: JobPaths, clock: Callable[[], float] = time.time):
        self.path = paths.job_log
        self.clock = clock

    def write(self, attempt: int, text: str) -> None:
        lines = str(text).splitlines() or [""]
        now = self.clock()
        data = "".join(f"{now:.6f}\t{attempt}\t{line}\n" for line in lines).encode(errors="replace")
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError:
            pass  # a full disk must not break the scheduler; the events still tell


@dataclass
class _Source:
    path: str
    replica: Replica | None  # None: the job's own log
    attempt: int
    offset: int = 0
    pending: bytes = b""
    started: bool = False

    @property
    def order(self) -> tuple:
        # the job's own lines first, then replicas by attempt, type, index
        return (self.replica is not None, self.attempt, self.replica or Replica(0, 0))


def _replica_id(replica: Replica) -> pb.ReplicaId:
    return pb.ReplicaId(type=replica.type, index=replica.index)


def _tail_offset(path: str, lines: int) -> int:
    """The offset where the last `lines` lines of the file start."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            start = max(0, end - TAIL_WINDOW)
            f.seek(start)
            data = f.read()
    except OSError:
        return 0
    body = data[:-1] if data.endswith(b"\n") else data
    cut = len(body)
    for _ in range(lines):
        cut = body.rfind(b"\n", 0, cut)
        if cut < 0:
            return start
    return start + cut + 1


LAST_LINE_WINDOW = 8192
LAST_LINE_MAX = 240


def last_line(path: str) -> str:
    """The last non-blank line a replica wrote (its log holds the tenant's
    output: read without following links or blocking, control characters
    dropped, cut to LAST_LINE_MAX characters); "" if there is none. For a
    Python trainer that died of an exception this is the exception's line,
    e.g. "ModuleNotFoundError: No module named 'trainer.tsk'"."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        end = os.lseek(fd, 0, os.SEEK_END)
        data = os.pread(fd, LAST_LINE_WINDOW, max(0, end - LAST_LINE_WINDOW))
    except OSError:
        return ""
    finally:
        os.close(fd)
    for raw in reversed(data.splitlines()):
        text = "".join(c for c in raw.decode("utf-8", "replace") if c.isprintable()).strip()
        if text:
            return text if len(text) <= LAST_LINE_MAX else text[:LAST_LINE_MAX - 1] + "…"
    return ""


@dataclass
class LogStreamer:
    """Yields batches of LogLine for one StreamLogs call."""

    paths: JobPaths
    # Reads the job as it is now (None when deleted).
    load: Callable[[], Awaitable[pb.TrainJob | None]]
    replicas: frozenset[Replica]  # empty: every replica and the job's own lines
    follow: bool
    tail_lines: int
    is_final: Callable[[int], bool]
    changed: Callable[[], Awaitable[None]] | None = None
    _sources: dict[str, _Source] = field(default_factory=dict)

    def _discover(self, job: pb.TrainJob) -> None:
        if not self.replicas and self.paths.job_log not in self._sources:
            self._sources[self.paths.job_log] = _Source(self.paths.job_log, None, 0)
        attempts = set(self.paths.attempts_on_disk()) | set(range(1, job.attempts + 1))
        for attempt in sorted(attempts):
            folder = os.path.join(self.paths.logs, f"attempt-{attempt}")
            try:
                names = os.listdir(folder)
            except OSError:
                continue
            for filename in names:
                if not filename.endswith(".log"):
                    continue
                try:
                    replica = Replica.parse(filename[:-4])
                except ValueError:
                    continue
                if self.replicas and replica not in self.replicas:
                    continue
                path = os.path.join(folder, filename)
                if path not in self._sources:
                    self._sources[path] = _Source(path, replica, attempt)

    def _read(self, source: _Source, flush: bool) -> list[pb.LogLine]:
        if not source.started:
            source.started = True
            if self.tail_lines > 0:
                source.offset = _tail_offset(source.path, self.tail_lines)
        try:
            with open(source.path, "rb") as f:
                stat = os.fstat(f.fileno())
                if stat.st_size < source.offset:  # truncated or replaced: start over
                    source.offset, source.pending = 0, b""
                f.seek(source.offset)
                data = f.read(READ_CHUNK)
        except OSError:
            return []
        source.offset += len(data)
        data = source.pending + data
        *complete, source.pending = data.split(b"\n")
        if flush and source.pending and len(data) < READ_CHUNK:
            complete.append(source.pending)
            source.pending = b""
        if not complete:
            return []
        now = timestamp(time.time() if self._live else stat.st_mtime)
        lines = []
        for raw in complete:
            text = raw.decode(errors="replace").rstrip("\r")
            if source.replica is None:
                when, attempt, text = self._split_job_line(text)
                lines.append(pb.LogLine(time=timestamp(when) if when else now, attempt=attempt, text=text))
            else:
                lines.append(pb.LogLine(time=now, replica=_replica_id(source.replica), attempt=source.attempt,
                                        text=text))
        return lines

    @staticmethod
    def _split_job_line(text: str) -> tuple[float, int, str]:
        parts = text.split("\t", 2)
        if len(parts) == 3:
            try:
                return float(parts[0]), int(parts[1]), parts[2]
            except ValueError:
                pass
        return 0.0, 0, text

    _live = False

    async def stream(self) -> AsyncIterator[list[pb.LogLine]]:
        final_seen = False
        while True:
            job = await self.load()
            if job is None:
                return
            final_seen = final_seen or self.is_final(job.state)
            self._discover(job)
            flush = final_seen or not self.follow
            progressed = True
            while progressed:
                progressed = False
                for source in sorted(self._sources.values(), key=lambda s: s.order):
                    lines = self._read(source, flush)
                    for i in range(0, len(lines), BATCH_LINES):
                        yield lines[i:i + BATCH_LINES]
                    if lines:
                        progressed = True
            if not self.follow or final_seen:
                return
            # From here on lines are new: stamp them with the time they are read.
            self._live = True
            await self._pause()

    async def _pause(self) -> None:
        if self.changed is None:
            await asyncio.sleep(POLL_SECONDS)
            return
        try:
            await asyncio.wait_for(self.changed(), POLL_SECONDS)
        except asyncio.TimeoutError:
            pass
