"""The supervisor ("shim") of one replica of the local runtime.

`LocalRuntime.start()` runs one shim per replica, in a new session so that it
survives the service that started it (a kill -9 of the jobs service, or a
Ctrl-C to the launcher's process group, leaves replicas running)::

    python -m services.common.runtime.shim
    python -I -S -c "import sys; sys.path.insert(0, ROOT); \\
        from services.common.runtime.shim import main; sys.exit(main())"
                                     # the same, as the runtime runs it: no site

It reads its spec, one dict in `marshal` format, on stdin (argv, env, workdir,
log_path, memory_limit, state_path, stop_path, gpu_ids, run_as: the argv
prefix that switches to the tenant's user, see services.common.tenancy; on stdin so the
replica's environment never shows in `ps`), then:

1. makes itself a child subreaper (Linux), so every descendant of the replica,
   even one that double-forks or calls setsid(), stays in its subtree: counted
   for memory, killed at the end, reaped;
2. spawns the replica with posix_spawn in its own process group (pgid = the
   replica's pid), cwd = workdir (created if missing), stdin /dev/null,
   stdout+stderr appended to log_path, exactly `env` as its environment;
3. writes the replica's record (RUNNING, pid, pgid, start tokens) atomically
   to state_path, prints the same record as one line on stdout (the runtime's
   start() waits for it), and points its own stdio at /dev/null / the log;
4. waits for the replica (woken by SIGCHLD) while polling the RSS of the
   whole subtree every 100 ms (25 ms above 75 % of the limit); above
   memory_limit it SIGKILLs the replica's process group and every descendant
   and records reason OOMKilled, exit code 137;
5. when the replica's main process ends, SIGKILLs whatever remains of its
   process group and subtree, reaps everything, writes the final record
   (exit_code: code or 128+signal; reason Completed / Error / OOMKilled /
   Killed when a stop was requested through stop_path or a SIGTERM to the
   shim) atomically to state_path, and exits.

Memory enforcement is by polling, not cgroups: this host has cgroup v1 and
/sys/fs/cgroup is not writable, so a cgroup v2 memory.max is not an option.
It sums the RSS of the processes (a page shared between processes counts in
each), and a replica that allocates faster than ~limit per 100 ms can
overshoot briefly before it is killed. The kernel's own OOM killer is
unaffected. Cost: ~1 % of a core per limited replica on a 100-process host
(the process table is rescanned only when a new pid was allocated).

Identity of a process is (boot id, pid, start time in clock ticks) read from
/proc, so a reused pid is never mistaken for the shim or the replica.

The shim imports only builtin and C modules of the standard library (no site,
no services.* but its empty packages, no enum/re/json): with `python -I -S`
it is ready in ~9 ms and start() returns ~12 ms after it is called. On a
system without /proc it falls back to psutil for the process table (and has
no subreaper).
"""
from __future__ import annotations

import marshal
import os
import select
import sys
import time

# The C modules behind `signal` and `json`: the Python wrappers import enum
# and re, which would double the shim's start-up time (~7 -> ~17 ms).
try:
    import _signal as signal
except ImportError:  # not CPython
    import signal
try:
    from _json import encode_basestring_ascii as _json_str
except ImportError:  # not CPython
    from json.encoder import py_encode_basestring_ascii as _json_str

HAVE_PROC = os.path.exists("/proc/self/stat")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

POLL_SECONDS = 0.1        # memory sampling period
FAST_POLL_SECONDS = 0.025  # when the subtree is above 75 % of its limit
IDLE_POLL_SECONDS = 1.0   # no memory limit: only orphans to reap
DEFAULT_GRACE_SECONDS = 10.0
CLEANUP_SECONDS = 5.0     # bound on killing and reaping the rest of the tree


# --------------------------------------------------------------------------
# Process table helpers (also used by services.common.runtime.local)

def _psutil():
    try:
        import psutil  # noqa: PLC0415
    except ImportError:  # started with -S: site-packages not on sys.path yet
        import site  # noqa: PLC0415
        site.main()
        import psutil  # noqa: PLC0415
    return psutil


def read_stat(pid: int | str):
    """(state, ppid, pgrp, start_ticks, rss_bytes) of a process from
    /proc/<pid>/stat, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb", buffering=0) as f:
            data = f.read()
        rest = data[data.rindex(b")") + 2:].split()
        return (rest[0].decode(), int(rest[1]), int(rest[2]), int(rest[19]),
                int(rest[21]) * PAGE_SIZE)
    except (OSError, ValueError, IndexError):
        return None


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb", buffering=0) as f:
            return f.read().decode().strip()
    except OSError:
        if HAVE_PROC:
            return ""
        return str(int(_psutil().boot_time()))


def start_token(pid: int, allow_zombie: bool = False) -> str | None:
    """The start time of a process as an opaque string (clock ticks since
    boot), or None if it is gone (or a zombie, unless allow_zombie)."""
    if pid <= 0:
        return None
    if HAVE_PROC:
        st = read_stat(pid)
        if st is None or (not allow_zombie and st[0] in ("Z", "X")):
            return None
        return str(st[3])
    psutil = _psutil()
    try:
        p = psutil.Process(pid)
        if not allow_zombie and p.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        return repr(p.create_time())
    except psutil.Error:
        return None


def process_table():
    """Yields (pid, ppid, pgrp, rss_bytes) for every process."""
    if HAVE_PROC:
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = read_stat(name)
                if st is not None:
                    yield int(name), st[1], st[2], st[4]
        return
    psutil = _psutil()
    for p in psutil.process_iter():
        try:
            with p.oneshot():
                yield p.pid, p.ppid(), os.getpgid(p.pid), p.memory_info().rss
        except (psutil.Error, OSError):
            pass


def subtree(root: int, pgid: int = 0) -> dict[int, int]:
    """{pid: rss_bytes} of every descendant of root (root excluded) and, if
    pgid, of every member of that process group and its descendants, from one
    scan of the process table."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    stack: list[int] = []
    for pid, ppid, pgrp, size in process_table():
        children.setdefault(ppid, []).append(pid)
        rss[pid] = size
        if pgid and pgrp == pgid and pid != root:
            stack.append(pid)
    stack.extend(children.get(root, ()))
    found: dict[int, int] = {}
    while stack:
        pid = stack.pop()
        if pid not in found:
            found[pid] = rss.get(pid, 0)
            stack.extend(children.get(pid, ()))
    return found


def to_json(obj) -> str:
    """JSON of dicts (str keys), lists, str, int, float, bool and None."""
    if isinstance(obj, str):
        return _json_str(obj)
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, int):
        return int.__repr__(obj)
    if isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            raise ValueError(f"{obj!r} is not JSON")
        return float.__repr__(obj)
    if isinstance(obj, dict):
        return "{" + ",".join(f"{_json_str(str(k))}:{to_json(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(to_json(v) for v in obj) + "]"
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def atomic_write_json(path: str, obj) -> None:
    """Writes obj as JSON to path through a temporary file and rename, so a
    reader sees the old or the new content, never a torn one."""
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.tmp")
    data = to_json(obj).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def exit_code_of(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code


def _signal_name(num: int) -> str:
    for name in dir(signal):
        if name.startswith("SIG") and not name.startswith("SIG_") and getattr(signal, name) == num:
            return name
    return f"signal {num}"


def _mib(n: int) -> str:
    return f"{n / 1048576:.0f} MiB"


# --------------------------------------------------------------------------
# Tree memory sampler

class _Sampler:
    """RSS of the shim's subtree. A full scan of /proc costs ~10 us per
    process on the machine, so it is repeated only when a pid was allocated
    since the last one (last field of /proc/loadavg); otherwise only the
    known members are re-read."""

    def __init__(self, root: int, pgid: int):
        self.root = root
        self.pgid = pgid
        self.known: dict[int, int] = {}
        self.last_pid: bytes | None = None

    @staticmethod
    def _last_pid() -> bytes | None:
        if not HAVE_PROC:
            return None
        try:
            with open("/proc/loadavg", "rb", buffering=0) as f:
                return f.read().rsplit(None, 1)[-1]
        except (OSError, IndexError):
            return None

    def rss(self) -> int:
        last = self._last_pid()
        if last is None or last != self.last_pid:
            self.known = subtree(self.root, self.pgid)
            self.last_pid = last
        else:
            for pid in list(self.known):
                st = read_stat(pid)
                if st is None:
                    del self.known[pid]
                else:
                    self.known[pid] = st[4]
        return sum(self.known.values())


# --------------------------------------------------------------------------
# The shim

def _set_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes  # noqa: PLC0415
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _resolve(argv0: str, env: dict[str, str]) -> str:
    """The executable for argv0, searched in the replica's PATH (as
    subprocess does when given an env)."""
    if os.sep in argv0:
        return argv0
    denied = None
    for directory in os.get_exec_path(env):
        path = os.path.join(directory, argv0)
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                return path
            denied = denied or path
    if denied:
        return denied  # posix_spawn reports EACCES
    raise FileNotFoundError(2, "No such file or directory (not in PATH)", argv0)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


class Shim:
    def __init__(self, spec: dict):
        self.spec = spec
        self.record: dict = {}
        self.child = 0
        self.term_requested = False
        self.subreaper = False
        self.shim_pid = os.getpid()

    # -- helpers -------------------------------------------------------------
    def _write(self) -> None:
        atomic_write_json(self.spec["state_path"], self.record)

    def _log(self, log_fd: int | None, text: str) -> None:
        if log_fd is not None:
            try:
                os.write(log_fd, f"[cloudml local runtime] {text}\n".encode())
            except OSError:
                pass

    def _report(self) -> None:
        """The record, on one line, to the runtime's start()."""
        try:
            sys.stdout.write(to_json(self.record) + "\n")
            sys.stdout.flush()
        except OSError:  # the runtime is gone; the state file has it all
            pass

    def _detach_stdio(self, log_fd: int | None) -> None:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(log_fd if log_fd is not None else devnull, 2)
        os.close(devnull)

    def _fail_to_start(self, log_fd: int | None, code: int, message: str) -> int:
        self._log(log_fd, message)
        now = time.time()
        self.record.update(phase="FAILED", exit_code=code, reason="Error", message=message,
                           started_at=now, finished_at=now)
        self._write()
        self._report()
        return 0

    def _kill_tree(self, sig: int) -> None:
        _killpg(self.child, sig)
        for pid in subtree(self.shim_pid, self.child):
            _kill(pid, sig)

    # -- main ----------------------------------------------------------------
    def run(self) -> int:
        spec = self.spec
        env = {str(k): str(v) for k, v in spec["env"].items()}
        limit = int(spec.get("memory_limit") or 0)
        self.record = {
            "replica_id": spec["replica_id"], "group": spec.get("group", ""),
            "argv": [str(a) for a in spec["argv"]],
            "phase": "RUNNING", "exit_code": None, "reason": "", "message": "",
            "pid": 0, "pgid": 0, "pid_start": None,
            "shim_pid": self.shim_pid, "shim_start": start_token(self.shim_pid),
            "boot_id": boot_id(), "gpu_ids": list(spec.get("gpu_ids", ())),
            "memory_limit": limit, "peak_rss": 0, "log_path": spec["log_path"],
            "started_at": 0.0, "finished_at": 0.0,
        }

        # Whatever the shim and the replica create is private to their owner
        # (logs: the platform's; files of a replica run as its tenant's user:
        # that user's), never world-readable.
        os.umask(0o077)
        log_fd = None
        try:
            os.makedirs(os.path.dirname(spec["log_path"]) or ".", exist_ok=True)
            log_fd = os.open(spec["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                             | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            return self._fail_to_start(None, 127, f"cannot open the log file {spec['log_path']}: {e}")
        try:
            os.makedirs(spec["workdir"], exist_ok=True)
            os.chdir(spec["workdir"])
        except OSError as e:
            return self._fail_to_start(log_fd, 127, f"cannot enter the working directory "
                                                    f"{spec['workdir']}: {e}")

        # Wake-ups: SIGCHLD (a child ended) and SIGTERM/SIGINT/SIGHUP (stop).
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)

        def on_term(*_):
            self.term_requested = True
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_term)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        self.subreaper = _set_subreaper()

        argv = [str(a) for a in spec["argv"]]
        try:
            if not argv:
                raise FileNotFoundError(2, "empty command", "")
            executable = _resolve(argv[0], env)
            run_as = [str(a) for a in spec.get("run_as") or ()]
            if run_as:  # as the tenant's user: setpriv ... -- /resolved/command args
                if not os.access(executable, os.X_OK):
                    raise PermissionError(13, "Permission denied", executable)
                argv = [*run_as, executable, *argv[1:]]
                executable = run_as[0]
            restore = [signal.SIGPIPE]
            if hasattr(signal, "SIGXFSZ"):
                restore.append(signal.SIGXFSZ)
            self.child = os.posix_spawn(
                executable, argv, env,
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_DUP2, log_fd, 1),
                              (os.POSIX_SPAWN_DUP2, log_fd, 2)],
                setpgroup=0, setsigmask=(), setsigdef=restore)
        except OSError as e:
            code = 127 if isinstance(e, FileNotFoundError) else 126
            what = argv[0] if argv else "(empty)"
            return self._fail_to_start(log_fd, code, f"cannot run {what}: {e.strerror or e}")

        self.record.update(pid=self.child, pgid=self.child, started_at=time.time(),
                           pid_start=start_token(self.child, allow_zombie=True))
        self._write()
        self._report()
        self._detach_stdio(log_fd)
        try:
            return self._supervise(limit, rfd, log_fd)
        except BaseException as e:  # a bug here must not leave an unsupervised replica
            self._kill_tree(signal.SIGKILL)
            self._cleanup()
            self.record.update(phase="FAILED", exit_code=137, reason="Error",
                               finished_at=time.time(), message=f"the supervisor failed: {e!r}")
            self._write()
            raise

    def _supervise(self, limit: int, rfd: int, log_fd: int) -> int:
        poller = select.poll()
        poller.register(rfd, select.POLLIN)
        sampler = _Sampler(self.shim_pid, self.child) if limit > 0 else None
        wait_status = None
        oom_rss = 0
        peak = 0
        kill_at = None
        stopping = False
        while True:
            while True:  # reap: the replica and any orphan handed to us
                try:
                    pid, st = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    pid = 0
                if pid == 0:
                    break
                if pid == self.child:
                    wait_status = st
            if wait_status is not None:
                break
            now = time.monotonic()
            if self.term_requested and not stopping:
                stopping = True
                grace = DEFAULT_GRACE_SECONDS
                try:  # the stop marker's first line: the grace period in seconds
                    with open(self.spec["stop_path"], "rb") as f:
                        grace = float(f.readline().strip() or grace)
                except (OSError, ValueError):
                    pass
                self._log(log_fd, f"stop requested: SIGTERM, SIGKILL after {grace:g} s")
                self._kill_tree(signal.SIGTERM)
                kill_at = now + grace
            if kill_at is not None and now >= kill_at:
                self._kill_tree(signal.SIGKILL)
                kill_at = now + 1.0
            timeout = IDLE_POLL_SECONDS
            if sampler is not None and not oom_rss:
                rss = sampler.rss()
                peak = max(peak, rss)
                if rss > limit:
                    oom_rss = rss
                    self._kill_tree(signal.SIGKILL)
                    self._log(log_fd, f"memory limit exceeded ({_mib(rss)} > {_mib(limit)}): "
                                      "killed (OOMKilled)")
                    timeout = FAST_POLL_SECONDS
                else:
                    timeout = FAST_POLL_SECONDS if rss * 4 > limit * 3 else POLL_SECONDS
            if kill_at is not None:
                timeout = max(0.0, min(timeout, kill_at - now))
            try:
                if poller.poll(int(timeout * 1000) + 1):
                    try:
                        while os.read(rfd, 512):
                            pass
                    except BlockingIOError:
                        pass
            except InterruptedError:
                pass

        finished = time.time()
        code = exit_code_of(wait_status)
        stop_requested = self.term_requested or os.path.exists(self.spec["stop_path"])
        self._cleanup()
        self.record.update(finished_at=finished, peak_rss=peak)
        if oom_rss:
            self.record.update(phase="FAILED", exit_code=137, reason="OOMKilled",
                               message=f"memory limit exceeded: {_mib(oom_rss)} used, "
                                       f"limit {_mib(limit)}")
        elif stop_requested:
            self.record.update(phase="FAILED", exit_code=code, reason="Killed",
                               message=f"stopped on request (exit code {code})")
        elif code == 0:
            self.record.update(phase="SUCCEEDED", exit_code=0, reason="Completed")
        else:
            if code > 128 and os.WIFSIGNALED(wait_status):
                what = f"killed by {_signal_name(code - 128)}"
            else:
                what = f"exited with code {code}"
            self.record.update(phase="FAILED", exit_code=code, reason="Error", message=what)
        self._write()
        return 0

    def _cleanup(self) -> None:
        """Kills and reaps whatever is left of the replica's tree. The
        replica's main process is reaped by now, so its pid (= the pgid) may
        be reused once the group is empty: as a subreaper the shim's subtree
        already holds every descendant and the group is not signalled."""
        deadline = time.monotonic() + CLEANUP_SECONDS
        pgid = 0 if self.subreaper else self.child
        while True:
            left = subtree(self.shim_pid, pgid)
            if pgid and left:
                _killpg(pgid, signal.SIGKILL)
            for pid in left:
                _kill(pid, signal.SIGKILL)
            has_children = True
            while True:
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    has_children = False
                    break
                if pid == 0:
                    break
            if (not left and not has_children) or time.monotonic() > deadline:
                return
            time.sleep(0.01)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0
    spec = marshal.loads(sys.stdin.buffer.read())
    return Shim(spec).run()


if __name__ == "__main__":
    sys.exit(main())
