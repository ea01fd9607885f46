#!/usr/bin/env python3
"""Tuner figures (issue 5):

1. Suggestion latency for TPE with 10, 100 and 500 completed trials, p50 (and
   p90), two ways:
   - `algorithm`: `services.tuner.algorithms.suggest` alone (unpickle the
     sampler, rebuild the Optuna study from the recorded trials, ask once);
   - `service`: `TunerCore.suggest` on a real etcd (read the study and its
     trials in one transaction, the above, write the trial, its job spec and
     the sampler state in one transaction), i.e. a SuggestTrials minus gRPC.
2. Study overhead: the wall time of a 20-trial study of an instant trainer
   (the plain trainer, one step, no sleep), one trial at a time, against the
   sum of its trials' run times (replica process start to exit, as the jobs
   service records them), on real processes: etcd, auth, jobs, tuner. The
   trainer package is uploaded (JobsService/UploadPackage) into the admin's
   storage first, as a user's is.

    .venv/bin/python bench/bench_tuner.py [--repeat 20] [--trials 20] [--skip-study]
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


def bench_algorithm(sizes, repeat: int) -> dict:
    from services.tuner import algorithms
    from services.tuner import spec as spec_mod
    from services.tuner.algorithms import Observation

    algorithms.quiet_optuna()
    out = {}
    rng = random.Random(0)
    for n in sizes:
        spec = spec_mod.normalize(branin_spec())
        obs = []
        for number in range(1, n + 1):
            params = {"x1": rng.uniform(-5, 10), "x2": rng.uniform(0, 15)}
            obs.append(Observation(number, params, pb.TRIAL_STATE_SUCCEEDED, branin(**params)))
        _, state = algorithms.suggest(spec, obs, None, 1)  # a sampler that has been used
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            algorithms.suggest(spec, obs, state, 1)
            times.append((time.perf_counter() - start) * 1000)
        out[n] = {"p50_ms": round(pct(times, 0.5), 2), "p90_ms": round(pct(times, 0.9), 2)}
    return out


async def _bench_service(endpoint: str, sizes, repeat: int) -> dict:
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
    rng = random.Random(1)
    out = {}
    try:
        for n in sizes:
            name = f"bench-{n}"
            await core.create_study(admin, "bench", name, branin_spec())
            # n completed trials at random points, written straight to the store
            # (as if suggested and run), in transactions of 40
            for first in range(1, n + 1, 40):
                snap = await core.store.snapshot("bench", name)
                new = []
                for number in range(first, min(first + 40, n + 1)):
                    x1, x2 = rng.uniform(-5, 10), rng.uniform(0, 15)
                    trial = pb.Trial(study=name, tenant="bench", number=number, state=pb.TRIAL_STATE_SUCCEEDED,
                                     objective_value=branin(x1, x2), client_id="fill")
                    trial.params["x1"].double_value, trial.params["x2"].double_value = x1, x2
                    new.append((TrialRecord(trial), jobs_pb.TrainJobSpec()))
                assert await core.store.add_trials(snap, new, snap.algorithm)
            times = []
            for i in range(repeat):
                start = time.perf_counter()
                (trial,) = await core.suggest("bench", name, 1, f"measure-{i}")
                times.append((time.perf_counter() - start) * 1000)
                await core.end_trial("bench", name, trial.number, pb.TRIAL_STATE_SUCCEEDED, "Succeeded", "",
                                     objective=(branin(**spec_mod_params(trial)), 0))
            out[n] = {"p50_ms": round(pct(times, 0.5), 2), "p90_ms": round(pct(times, 0.9), 2)}
    finally:
        await etcd.close()
    return out


def spec_mod_params(trial) -> dict:
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in trial.params.items()}


def bench_suggestions(sizes, repeat: int) -> dict:
    from deploy.local.etcd import EtcdProcess

    with tempfile.TemporaryDirectory(prefix="bench-tuner-etcd-") as tmp:
        etcd = EtcdProcess(tmp, log_path=None).start()
        try:
            service = asyncio.run(_bench_service(etcd.endpoint, sizes, repeat))
        finally:
            etcd.stop()
    return {"algorithm": bench_algorithm(sizes, repeat), "service": service}


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
    args = parser.parse_args(argv)
    figures = {"tpe_suggestion_latency": bench_suggestions(args.sizes, args.repeat)}
    print(json.dumps(figures, indent=2), flush=True)
    if not args.skip_study:
        figures["study_overhead"] = bench_study(args.trials)
        print(json.dumps({"study_overhead": figures["study_overhead"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
