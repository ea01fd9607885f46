"""Train-job specs from the seed's JSON layout or keyword arguments, shared
by the SDK (`client.jobs.submit`, `client.studies.submit`) and the CLI
(`cloudml jobs submit -f`, `cloudml hp submit -f`).

The seed's field names: job_name, module_name, trainer_uri, job_args (a
string, split shell-style, or a list), cpu_limit, memory_limit, gpu_limit
(per replica), ps_count, worker_count, plus master_count, chief_count,
evaluator_count, env, output_path, docker_image, restart_policy (never |
on_failure | exit_code), max_retries, timeout (seconds, or "30s" / "10m" /
"2h"), priority.

Every builder raises `cloudml.errors.SpecError` (an InvalidArgument and a
ValueError) with a one-line message naming the field.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex

from cloudml import units
from cloudml.errors import SpecError

POLICIES = ("never", "on_failure", "exit_code")
SEED_FIELDS = {
    "job_name", "module_name", "trainer_uri", "job_args", "cpu_limit", "memory_limit", "gpu_limit",
    "ps_count", "worker_count", "master_count", "chief_count", "evaluator_count", "env", "output_path",
    "docker_image", "restart_policy", "max_retries", "timeout", "priority",
}
# Fields of the seed's format this platform has no use for (accepted, ignored).
SEED_IGNORED = {"framework", "framework_version", "docker_command", "volume_type", "volume_path", "mount_path",
                "mount_read_only", "prepare_command", "finish_command", "node_selector_key", "node_selector_value",
                "ps_cpu_limit", "ps_memory_limit", "save_mode"}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)?")
# What `build_spec` reads from its `args` (the CLI's flags; None = not given).
FLAG_FIELDS = ("name", "module", "trainer_uri", "cpu", "memory", "gpus", "timeout", "args", "output_path",
               "docker_image", "master", "chief_count", "ps", "workers", "evaluator", "env", "restart_policy",
               "max_retries", "priority")


def _pb():
    from cloudml.jobs.v1 import jobs_service_pb2

    return jobs_service_pb2


def parse_duration(value) -> float:
    """Seconds from 90, "90", "90s", "10m", "2h", "1d"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(str(value).strip())
        if not match:
            raise ValueError(f"invalid duration {value!r}; expected seconds or e.g. 30s, 10m, 2h")
        seconds = float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2] or "s"]
    if seconds < 0:
        raise ValueError(f"duration must not be negative (got {value!r})")
    return seconds


def parse_env(text: str) -> tuple[str, str]:
    """"KEY=VALUE" -> ("KEY", "VALUE")."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--env takes KEY=VALUE, got {text!r}")
    return key, value


def parse_replica(text: str):
    """"worker-1" -> ReplicaId(type=WORKER, index=1)."""
    pb = _pb()
    match = re.fullmatch(r"(master|chief|ps|worker|evaluator)-(\d+)", text or "")
    if not match:
        raise ValueError(f"invalid replica {text!r}; expected e.g. master-0, ps-0, worker-1")
    return pb.ReplicaId(type=pb.ReplicaType.Value(f"REPLICA_TYPE_{match[1].upper()}"), index=int(match[2]))


def split_args(value) -> list[str]:
    """job_args as a list: a string is split shell-style (the seed's form)."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as err:
            raise SpecError(f"job_args cannot be split shell-style: {err}") from None
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise SpecError("job_args must be a string or a list of strings")


def trainer_uri(value: str) -> str:
    """A URI as given; a local path becomes file://<absolute path>."""
    if "://" in value:
        return value
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.isfile(path):
        raise SpecError(f"trainer package {value!r} is not a file (give a path or a URI such as s3://...)")
    return "file://" + path


def read_json_object(path: str) -> dict:
    """A JSON file holding an object; SpecError naming the file otherwise."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as err:
        raise SpecError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise SpecError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path} must hold a JSON object")
    return data


def check_seed_fields(data: dict, where: str, note=lambda message: None, extra: frozenset = frozenset()) -> dict:
    """Refuses unknown fields of a seed-layout job object; notes ignored ones."""
    unknown = set(data) - SEED_FIELDS - SEED_IGNORED - set(extra)
    if unknown:
        known = ", ".join(sorted(SEED_FIELDS | set(extra)))
        raise SpecError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; known: {known}")
    ignored = set(data) & SEED_IGNORED
    if ignored:
        note(f"note: ignoring field(s) this platform does not use: {', '.join(sorted(ignored))}")
    return data


def load_seed_spec(path: str, note=lambda message: None) -> dict:
    """The seed-layout job object in the JSON file `path` (checked)."""
    return check_seed_fields(read_json_object(path), path, note)


def flags(**given) -> argparse.Namespace:
    """An `args` for `build_spec` with only `given` set (the rest None)."""
    unknown = set(given) - set(FLAG_FIELDS) - {"chief"}
    if unknown:
        raise TypeError(f"unknown job option(s) {', '.join(sorted(unknown))}")
    values = {f: None for f in FLAG_FIELDS}
    values.update(given)
    values.setdefault("chief", False)
    return argparse.Namespace(**values)


def build_spec(args, seed: dict | None = None):
    """(name, TrainJobSpec) from flags (`args`, None = not given) over an
    optional seed-layout dict; flags win."""
    pb = _pb()
    seed = dict(seed or {})

    def pick(flag, field):
        value = getattr(args, flag, None)
        return value if value is not None else seed.get(field)

    name = pick("name", "job_name")
    module = pick("module", "module_name")
    uri = pick("trainer_uri", "trainer_uri")
    if not name or not module or not uri:
        raise SpecError("a job needs a name (-n), a module (-m) and a trainer package (-u), or -f spec.json with them")
    try:
        cpu = args.cpu if args.cpu is not None else (units.parse_cpu(seed["cpu_limit"]) if "cpu_limit" in seed else 0)
        memory = args.memory if args.memory is not None else (
            units.parse_memory(seed["memory_limit"]) if "memory_limit" in seed else 0)
        gpus = args.gpus if args.gpus is not None else (
            units.parse_count(seed["gpu_limit"], "gpus") if "gpu_limit" in seed else 0)
        timeout = parse_duration(pick("timeout", "timeout")) if pick("timeout", "timeout") is not None else 0.0
    except ValueError as err:
        raise SpecError(str(err)) from None

    spec = pb.TrainJobSpec(trainer_uri=trainer_uri(str(uri)), module_name=str(module))
    raw_args = args.args if args.args is not None else seed.get("job_args")
    spec.job_args.extend(split_args(raw_args))
    output = pick("output_path", "output_path")
    if output:
        spec.output_path = str(output)
    image = pick("docker_image", "docker_image")
    if image:
        spec.docker_image = str(image)

    counts = {
        "MASTER": pick("master", "master_count"), "CHIEF": pick("chief_count", "chief_count"),
        "PS": pick("ps", "ps_count"), "WORKER": pick("workers", "worker_count"),
        "EVALUATOR": pick("evaluator", "evaluator_count"),
    }
    if getattr(args, "chief", False):
        counts["CHIEF"], counts["MASTER"] = 1, 0
    if counts["CHIEF"]:
        counts["MASTER"] = counts["MASTER"] or 0
    elif counts["MASTER"] is None:
        counts["MASTER"] = 1
    resources = {"cpu_millis": cpu, "memory_bytes": memory, "gpus": gpus}
    for kind in ("MASTER", "CHIEF", "PS", "WORKER", "EVALUATOR"):
        count = int(counts[kind] or 0)
        if count < 0:
            raise SpecError(f"replica counts must not be negative ({kind.lower()}: {count})")
        if count:
            item = spec.replica_specs.add(type=pb.ReplicaType.Value(f"REPLICA_TYPE_{kind}"), replica_count=count)
            for field, value in resources.items():
                setattr(item.resources, field, value)

    env = dict(seed.get("env") or {})
    given_env = args.env or []
    for key, value in (given_env.items() if isinstance(given_env, dict) else given_env):
        env[key] = value
    spec.env.update({str(k): str(v) for k, v in env.items()})
    policy = pick("restart_policy", "restart_policy")
    if policy:
        policy = str(policy).lower()
        if policy not in POLICIES:
            raise SpecError(f"restart policy {policy!r}: expected one of {', '.join(POLICIES)}")
        spec.restart_policy = pb.RestartPolicy.Value(f"RESTART_POLICY_{policy.upper()}")
    retries = pick("max_retries", "max_retries")
    if retries is not None:
        spec.max_retries = int(retries)
    if timeout:
        spec.timeout.FromNanoseconds(int(timeout * 1e9))
    priority = pick("priority", "priority")
    if priority is not None:
        spec.priority = int(priority)
    return str(name), spec
