#!/usr/bin/env python3
"""Tuner figures (issue 5):

1. Suggestion latency for TPE with 10, 100 and 500 completed trials, p50 (and
   p90), side by side in one run:
   - `optuna`: Optuna's own ask-and-tell on an in-memory study holding the
     same completed trials (`ask()` alone, and `ask()` + `tell()`), the
     floor any service built on it can reach;
   - `service`: `TunerCore.suggest` on a real etcd (start from the study as
     this process last wrote it, tell the sampler's study kept in memory
     what ended, ask, write the trial, its job spec, the sampler state and
     the study's counts in one transaction that compares the study's
     revision), i.e. a SuggestTrials minus gRPC, with its ratio to Optuna's
     `ask()`; and etcd alone: a read round trip and a durable write of the
     same size, the floor under the service's figure;
   - `rebuild`: `services.tuner.algorithms.suggest` alone (unpickle the
     sampler, rebuild the Optuna study from the recorded trials, ask once):
     what a suggestion costs after a restart or when the records changed
     under the service.
   Each measured suggestion's trial then completes (as Optuna's are told),
   so every side grows from n to n + repeat trials.
   These figures are back to back: each side suggests again as soon as the
   previous one is told, so Optuna's ask() runs in a hot loop while the
   service's is separated by etcd round trips. With `--pause-ms P` the run
   measures a paced variant too, as users' trials take time: both sides (and
   the durable write) idle P ms before each timed suggestion, untimed, on
   their own studies starting from the same n trials. On a machine with few
   shared cores an idle gap alone makes Optuna's ask() markedly slower.
2. Study overhead: the wall time of a 20-trial study of an instant trainer
   (the plain trainer, one step, no sleep), one trial at a time, against the
   sum of its trials' run times (replica process start to exit, as the jobs
   service records them), on real processes: etcd, auth, jobs, tuner. The
   trainer package is uploaded (JobsService/UploadPackage) into the admin's
   storage first, as a user's is.

    .venv/bin/python bench/bench_tuner.py [--repeat 20] [--trials 20] [--skip-study] [--pause-ms 20]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cloudml.tuner.v1 import tuner_service_pb2 as pb  # noqa: E402


def branin(x1: float, x2: float) -> float:
    b, c = 5.1 / (4 * math.pi**2), 5.0 / math.pi
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x1) + 10


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def branin_spec(seed: int = 1, max_trials: int = 10_000, parallel: int = 1) -> pb.StudySpec:
    spec = pb.StudySpec(goal=pb.GOAL_MINIMIZE, metric="objective", algorithm=pb.ALGORITHM_TPE, seed=seed,
                        max_trials=max_trials, max_parallel_trials=parallel)
    # In tenant "bench"'s storage of TunerCore(..., "/bench"): template paths are confined there.
    spec.trial_template.trainer_uri = "file:///bench/storage/bench/packages/0123456789abcdef/plain-trainer-1.0.tar.gz"
    spec.trial_template.module_name = "plain_trainer.task"
    spec.parameters.add(name="x1", double_range=pb.DoubleRange(min=-5, max=10))
    spec.parameters.add(name="x2", double_range=pb.DoubleRange(min=0, max=15))
    return spec


# --- 1. suggestion latency -------------------------------------------------------------------


def _completed(n: int, rng: random.Random) -> list[tuple[dict, float]]:
    out = []
    for _ in range(n):
        params = {"x1": rng.uniform(-5, 10), "x2": rng.uniform(0, 15)}
        out.append((params, branin(**params)))
    return out


def bench_rebuild(sizes, repeat: int) -> dict:
    from services.tuner import algorithms
    from services.tuner import spec as spec_mod
    from services.tuner.algorithms import Observation

    algorithms.quiet_optuna()
    out = {}
    rng = random.Random(0)
    for n in sizes:
        spec = spec_mod.normalize(branin_spec())
        obs = [Observation(number, params, pb.TRIAL_STATE_SUCCEEDED, value)
               for number, (params, value) in enumerate(_completed(n, rng), 1)]
        _, state = algorithms.suggest(spec, obs, None, 1)  # a sampler that has been used
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            algorithms.suggest(spec, obs, state, 1)
            times.append((time.perf_counter() - start) * 1000)
        out[n] = {"p50_ms": round(pct(times, 0.5), 2), "p90_ms": round(pct(times, 0.9), 2)}
    return out


def bench_optuna(sizes, repeat: int, pause_ms: float = 0) -> dict:
    """Optuna alone: an in-memory study with n completed trials, then
    `repeat` times ask() (timed), tell() (timed with it for ask_tell), each
    after an untimed pause of `pause_ms`."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {"x1": FloatDistribution(-5, 10), "x2": FloatDistribution(0, 15)}
    out = {}
    rng = random.Random(0)
    for n in sizes:
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=1))
        study.add_trials([create_trial(state=TrialState.COMPLETE, value=value, params=params, distributions=dists)
                          for params, value in _completed(n, rng)])
        asks, ask_tells = [], []
        for _ in range(repeat):
            if pause_ms:
                time.sleep(pause_ms / 1000)
            start = time.perf_counter()
            trial = study.ask(fixed_distributions=dists)
            asked = time.perf_counter()
            study.tell(trial, branin(**trial.params))
            told = time.perf_counter()
            asks.append((asked - start) * 1000)
            ask_tells.append((told - start) * 1000)
        out[n] = {"ask_p50_ms": round(pct(asks, 0.5), 2), "ask_p90_ms": round(pct(asks, 0.9), 2),
                  "ask_tell_p50_ms": round(pct(ask_tells, 0.5), 2)}
    return out


async def _bench_service(endpoint: str, sizes, repeat: int, pause_ms: float = 0, suffix: str = "") -> dict:
    from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
    from services.common.etcd import Etcd
    from services.common.tokens import ROLE_ADMIN, Principal
    from services.tuner import algorithms
    from services.tuner.core import TunerCore
    from services.tuner.store import TrialRecord, TunerStore

    class Jobs:
        async def submit(self, tenant, name, spec, validate_only=False):
            return jobs_pb.TrainJob(name=name), False

    class Quota:
        async def reserve_study(self, tenant, owner):
            return True

        async def release(self, tenant, owner):
            return True

    algorithms.quiet_optuna()
    etcd = await Etcd.connect(endpoint)
    core = TunerCore(TunerStore(etcd), Jobs(), Quota(), "/bench")
    admin = Principal("admin", ROLE_ADMIN, "AK", time.time() + 3600)
    rng = random.Random(0)
    out = {}
    try:
        for n in sizes:
            name = f"bench-{n}{suffix}"
            await core.create_study(admin, "bench", name, branin_spec())
            # n completed trials at random points, written straight to the store
            # (as if suggested and run), in transactions of 40
            for first in range(1, n + 1, 40):
                snap = await core.store.snapshot("bench", name)
                new = []
                for number, (params, value) in enumerate(_completed(min(40, n + 1 - first), rng), first):
                    trial = pb.Trial(study=name, tenant="bench", number=number, state=pb.TRIAL_STATE_SUCCEEDED,
                                     objective_value=value, client_id="fill")
                    trial.params["x1"].double_value, trial.params["x2"].double_value = params["x1"], params["x2"]
                    new.append((TrialRecord(trial), jobs_pb.TrainJobSpec()))
                assert await core.store.add_trials(snap, new, snap.algorithm)
            times = []
            for i in range(repeat):
                if pause_ms:
                    await asyncio.sleep(pause_ms / 1000)
                start = time.perf_counter()
                (trial,) = await core.suggest("bench", name, 1, f"measure-{i}")
                times.append((time.perf_counter() - start) * 1000)
                await core.end_trial("bench", name, trial.number, pb.TRIAL_STATE_SUCCEEDED, "Succeeded", "",
                                     objective=(branin(**spec_mod_params(trial)), 0))
            out[n] = {"p50_ms": round(pct(times, 0.5), 2), "p90_ms": round(pct(times, 0.9), 2)}
        out["etcd"] = await _etcd_floor(etcd, core.store, "bench", f"bench-100{suffix}" if 100 in sizes else name,
                                        pause_ms=pause_ms)
    finally:
        await etcd.close()
    return out


async def _etcd_floor(etcd, store, tenant: str, name: str, repeat: int = 100, pause_ms: float = 0) -> dict:
    """What a suggestion's etcd work costs alone: a read round trip, and a
    durable write (raft commit + WAL fsync) of the same size as its
    transaction (a trial, its job spec, the sampler state, the study record),
    each write after an untimed pause of `pause_ms` (then `repeat` // 2)."""
    from services.common.etcd import op_put

    snap = await store.snapshot(tenant, name)
    sizes = (len(snap.trials[-1].encode()), 200, len(snap.algorithm or b""), len(snap.record.encode()))
    reads, writes = [], []
    for i in range(repeat // 2 if pause_ms else repeat):
        start = time.perf_counter()
        await etcd.get("/bench-floor/read")
        reads.append((time.perf_counter() - start) * 1000)
        if pause_ms:
            await asyncio.sleep(pause_ms / 1000)
        start = time.perf_counter()
        await etcd.txn([], [op_put(f"/bench-floor/{k}/{i}", b"x" * size) for k, size in enumerate(sizes)])
        writes.append((time.perf_counter() - start) * 1000)
    return {"read_p50_ms": round(pct(reads, 0.5), 2), "write_p50_ms": round(pct(writes, 0.5), 2),
            "write_bytes": sum(sizes)}


def spec_mod_params(trial) -> dict:
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in trial.params.items()}


def _side_by_side(sizes, optuna_figures: dict, service: dict) -> dict:
    out = {"etcd": service.pop("etcd")}
    for n in sizes:
        out[n] = {"optuna": optuna_figures[n], "service": service[n],
                  "service_over_optuna_ask": round(service[n]["p50_ms"] / optuna_figures[n]["ask_p50_ms"], 2),
                  "service_over_optuna_ask_tell": round(service[n]["p50_ms"] / optuna_figures[n]["ask_tell_p50_ms"],
                                                        2)}
    return out


def bench_suggestions(sizes, repeat: int, pause_ms: float = 0) -> dict:
    from deploy.local.etcd import EtcdProcess

    with tempfile.TemporaryDirectory(prefix="bench-tuner-etcd-") as tmp:
        etcd = EtcdProcess(tmp, log_path=None).start()
        try:
            optuna_figures = bench_optuna(sizes, repeat)
            service = asyncio.run(_bench_service(etcd.endpoint, sizes, repeat))
            if pause_ms:
                paced_optuna = bench_optuna(sizes, repeat, pause_ms)
                paced_service = asyncio.run(_bench_service(etcd.endpoint, sizes, repeat, pause_ms, "-paced"))
        finally:
            etcd.stop()
    out = _side_by_side(sizes, optuna_figures, service)
    for n, row in bench_rebuild(sizes, repeat).items():
        out[n]["rebuild"] = row
    if pause_ms:
        out["paced"] = {"pause_ms": pause_ms, **_side_by_side(sizes, paced_optuna, paced_service)}
    return out


def print_suggestions(figures: dict) -> None:
    print(f"\nTPE suggestion p50, ms (load {os.getloadavg()[0]:.2f})")
    for label, rows in (("back to back", figures), ("paced", figures.get("paced"))):
        if rows is None:
            continue
        if label == "paced":
            print(f"  paced: {rows['pause_ms']:g} ms idle before each suggestion and each durable write")
        print(f"  {'completed':>9s} {'optuna ask':>10s} {'ask+tell':>9s} {'service':>8s} {'/ask':>6s} "
              f"{'/ask+tell':>9s} {'rebuild' if label != 'paced' else '':>8s}".rstrip())
        for n, row in rows.items():
            if not isinstance(n, int):
                continue
            rebuild = f"{row['rebuild']['p50_ms']:>8.2f}" if "rebuild" in row else ""
            print(f"  {n:>9d} {row['optuna']['ask_p50_ms']:>10.2f} {row['optuna']['ask_tell_p50_ms']:>9.2f} "
                  f"{row['service']['p50_ms']:>8.2f} x{row['service_over_optuna_ask']:<5.2f} "
                  f"x{row['service_over_optuna_ask_tell']:<8.2f} {rebuild}".rstrip())
        floor = rows["etcd"]
        print(f"  etcd alone: a read round trip {floor['read_p50_ms']:.2f} ms, the suggestion's durable write "
              f"({floor['write_bytes']:,} bytes in one transaction) {floor['write_p50_ms']:.2f} ms")


# --- 2. study overhead ------------------------------------------------------------------------


def bench_study(trials: int) -> dict:
    import grpc

    from cloudml.auth.v1 import auth_service_pb2 as auth_pb
    from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
    from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
    from tests.integration.jobs_stack import ADMIN_KEY, JobsStack
    from tests.integration.tuner_stack import TunerStack, build_trainers, double, template

    with tempfile.TemporaryDirectory(prefix="bench-tuner-") as tmp:
        packages = build_trainers(os.path.join(tmp, "packages"), os.path.join(tmp, "src"))
        base = JobsStack(os.path.join(tmp, "base")).start()  # etcd + auth
        stack = TunerStack(os.path.join(tmp, "tuner"), base.etcd.endpoint, ADMIN_KEY, base.secret,
                           envs_dir=os.path.join(tmp, "envs"), poll_seconds=1.0)
        try:
            stack.start()
            with grpc.insecure_channel(base.auth.address) as channel:
                token = auth_grpc.AuthServiceStub(channel).IssueToken(
                    auth_pb.IssueTokenRequest(access_key_id=ADMIN_KEY, secret_key=base.secret), timeout=10).token
            client = stack.client(token, "admin")
            tpl = template(client.upload(packages["plain"]), "plain_trainer.task", ["--steps", "1"])
            results = {}
            for label, parallel, n in (("warm-up", 1, 1), ("sequential", 1, trials), ("parallel-4", 4, trials)):
                spec = pb.StudySpec(trial_template=tpl, goal=pb.GOAL_MINIMIZE, metric="objective",
                                    algorithm=pb.ALGORITHM_RANDOM, seed=1, max_trials=n, max_parallel_trials=parallel,
                                    parameters=[double("x1", -5, 10), double("x2", 0, 15)])
                name = f"overhead-{label}"
                start = time.monotonic()
                client.create(name, spec)
                study = client.wait(name, timeout=600)
                wall = time.monotonic() - start
                assert study.state == pb.STUDY_STATE_SUCCEEDED, (
                    study.reason, study.message,
                    [(t.number, t.reason, t.message, client.job(t.job_name).message) for t in client.trials(name)])
                run, trial_times = 0.0, 0.0
                for trial in client.trials(name):
                    job = client.job(trial.job_name)
                    replica = job.replicas[0]
                    run += (replica.end_time.ToNanoseconds() - replica.start_time.ToNanoseconds()) / 1e9
                    trial_times += (trial.end_time.ToNanoseconds() - trial.start_time.ToNanoseconds()) / 1e9
                    assert job.state == jobs_pb.JOB_STATE_SUCCEEDED
                if label == "warm-up":
                    continue  # builds the trainer's environment once
                results[label] = {
                    "trials": n, "parallel": parallel, "wall_s": round(wall, 2),
                    "sum_of_trial_run_times_s": round(run, 2),
                    "sum_of_trial_spans_s": round(trial_times, 2),
                    "overhead_per_trial_s": round((wall * parallel - run) / n, 3) if parallel == 1 else None,
                    "wall_over_sum": round(wall / run, 2),
                }
            return results
        finally:
            stack.stop()
            base.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20, help="suggestions measured per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--trials", type=int, default=20, help="trials of the overhead study")
    parser.add_argument("--skip-study", action="store_true", help="only the suggestion latency")
    parser.add_argument("--pause-ms", type=float, default=0,
                        help="also measure suggestions paced by this idle time (0: back to back only)")
    args = parser.parse_args(argv)
    figures = {"tpe_suggestion_latency": bench_suggestions(args.sizes, args.repeat, args.pause_ms)}
    print(json.dumps(figures, indent=2))
    print_suggestions(figures["tpe_suggestion_latency"])
    sys.stdout.flush()
    if not args.skip_study:
        figures["study_overhead"] = bench_study(args.trials)
        print(json.dumps({"study_overhead": figures["study_overhead"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
