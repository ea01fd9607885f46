"""A field of /proc/PID/status, for the tests that bound a process's memory."""


def status_kb(pid: int, field: str) -> int:
    """`field` (VmRSS, VmHWM, ...) of process `pid`, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")
