"""A real tuning slice for tests and benchmarks: a jobs service and a tuner
service process on an etcd and auth service (the session's, or a JobsStack's:
then its `etcd.namespace` too), plus a small synchronous TunerService client.

    tuner = TunerStack(workdir, etcd_endpoint, admin_access_key, admin_secret, envs_dir=...)
    tuner.start()                        # python -m services.jobs ..., python -m services.tuner ...
    client = tuner.client(token, tenant)
    client.create("s1", study_spec(template(client.upload(sdist), ...), ...))
    client.wait("s1")
    tuner.stop()

A template's trainer package must lie in the tenant's storage: a client
uploads it (JobsService/UploadPackage, once per tenant and stack) and names
the answered URI.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field

import grpc

from cloudml.common.v1.resources_pb2 import Resources
from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from cloudml.jobs.v1 import jobs_service_pb2_grpc as jobs_grpc
from cloudml.tuner.v1 import tuner_service_pb2 as pb
from cloudml.tuner.v1 import tuner_service_pb2_grpc as pb_grpc
from deploy.local.service_process import ServiceProcess
from deploy.local.stack import Stack
from tests.integration.jobs_stack import TenantPackages, UploadCache, upload_requests

MiB = 1 << 20
FINAL = {pb.STUDY_STATE_SUCCEEDED, pb.STUDY_STATE_FAILED, pb.STUDY_STATE_CANCELLED}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_trainers(out_dir: str, scratch: str) -> dict[str, str]:
    """{"plain": sdist, "linear": sdist} of the example trainers.

    Every trial gets --output_path=<study output>/<n> (the seed's
    convention). Until examples/trainers/plain accepts that flag, a copy that
    does is built (a no-op once it does).
    """
    from examples.build_packages import build_one

    plain = os.path.join(ROOT, "examples", "trainers", "plain")
    task = open(os.path.join(plain, "plain_trainer", "task.py")).read()
    if "output_path" not in task:
        copy = os.path.join(scratch, "plain")
        shutil.copytree(plain, copy, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build", "dist"))
        anchor = 'parser.add_argument("--sleep"'
        task = task.replace(anchor, 'parser.add_argument("--output_path", default=None)\n    ' + anchor, 1)
        with open(os.path.join(copy, "plain_trainer", "task.py"), "w") as f:
            f.write(task)
        plain = copy
    return {"plain": build_one(plain, out_dir),
            "linear": build_one(os.path.join(ROOT, "examples", "trainers", "linear"), out_dir)}


def template(package: str, module: str, args=(), *, cpu: int = 100, memory: int = 256 * MiB,
             **fields) -> jobs_pb.TrainJobSpec:
    """A trial template; `package` a URI (an uploaded package's) or an absolute path."""
    uri = package if "://" in package else "file://" + package
    spec = jobs_pb.TrainJobSpec(trainer_uri=uri, module_name=module, job_args=list(args), **fields)
    spec.replica_specs.append(jobs_pb.ReplicaSpec(type=jobs_pb.REPLICA_TYPE_MASTER, replica_count=1,
                                                  resources=Resources(cpu_millis=cpu, memory_bytes=memory)))
    return spec


def double(name: str, lo: float, hi: float, log: bool = False) -> pb.ParameterSpec:
    return pb.ParameterSpec(name=name, double_range=pb.DoubleRange(
        min=lo, max=hi, scale=pb.SCALE_LOG if log else pb.SCALE_LINEAR))


def categorical(name: str, *values: str) -> pb.ParameterSpec:
    return pb.ParameterSpec(name=name, categorical=pb.CategoricalValues(values=list(values)))


def discrete(name: str, *values: float) -> pb.ParameterSpec:
    return pb.ParameterSpec(name=name, discrete=pb.DiscreteValues(values=list(values)))


def params_of(trial: pb.Trial) -> dict:
    out = {}
    for k, v in trial.params.items():
        out[k] = getattr(v, v.WhichOneof("kind"))
    return out


@dataclass
class TunerClient:
    """Sync TunerService and JobsService stubs acting as one principal."""

    channel: grpc.Channel
    jobs_channel: grpc.Channel
    token: str
    tenant: str = ""
    uploads: UploadCache = field(default_factory=UploadCache)

    def __post_init__(self):
        self.stub = pb_grpc.TunerServiceStub(self.channel)
        self.jobs = jobs_grpc.JobsServiceStub(self.jobs_channel)

    def upload(self, path: str) -> str:
        """The URI of the package at `path` in this client's tenant's storage,
        uploaded (JobsService/UploadPackage) once per tenant and stack."""
        return self.uploads.get(self.tenant, path, lambda: self.jobs.UploadPackage(
            upload_requests(path), metadata=self.md, timeout=60).uri)

    def packages(self, built) -> TenantPackages:
        """`built` ({name: local path}) as this client's tenant names them."""
        return TenantPackages(self, built)

    @property
    def md(self):
        return (("authorization", f"Bearer {self.token}"),)

    def call(self, method: str, request, timeout: float = 30.0):
        return getattr(self.stub, method)(request, metadata=self.md, timeout=timeout)

    def create(self, name: str, spec: pb.StudySpec) -> pb.CreateStudyResponse:
        return self.call("CreateStudy", pb.CreateStudyRequest(name=name, spec=spec))

    def get(self, name: str) -> pb.Study:
        return self.call("GetStudy", pb.GetStudyRequest(name=name)).study

    def trials(self, name: str) -> list[pb.Trial]:
        return list(self.call("ListTrials", pb.ListTrialsRequest(study=name, page_size=1000)).trials)

    def cancel(self, name: str) -> pb.Study:
        return self.call("CancelStudy", pb.CancelStudyRequest(name=name)).study

    def job(self, name: str) -> jobs_pb.TrainJob:
        return self.jobs.GetJob(jobs_pb.GetJobRequest(name=name), metadata=self.md, timeout=20).job

    def wait(self, name: str, timeout: float = 180.0, states=FINAL) -> pb.Study:
        deadline = time.monotonic() + timeout
        while True:
            study = self.get(name)
            if study.state in states:
                return study
            if time.monotonic() > deadline:
                trials = [(t.number, pb.TrialState.Name(t.state), t.reason, t.message) for t in self.trials(name)]
                raise TimeoutError(f"study {name} still {pb.StudyState.Name(study.state)} after {timeout}s: "
                                   f"{study.trial_counts} {trials}")
            time.sleep(0.1)


class TunerStack:
    """A jobs and a tuner service on an etcd whose auth service runs already
    (`access_key`/`secret`: its admin's key, the services' own too); a thin
    layer on the harness of deploy/local/stack.py (`harness`)."""

    def __init__(self, workdir: str, etcd_endpoint: str, access_key: str, secret: str, envs_dir: str | None = None,
                 lease_ttl: int = 3, poll_seconds: float = 0.5, namespace: str = ""):
        self.harness = Stack(workdir, etcd_endpoint=etcd_endpoint, namespace=namespace, admin=(access_key, secret),
                             service=None, lease_ttl=lease_ttl,
                             service_flags={"jobs": ["--envs-dir", envs_dir] if envs_dir else [],
                                            "tuner": ["--poll-seconds", str(poll_seconds)]})
        self.workdir = self.harness.workdir
        self._channels: list[grpc.Channel] = []
        self._uploads = UploadCache()

    @property
    def data_dir(self) -> str:
        return self.harness.data_dir

    @property
    def jobs(self) -> ServiceProcess:
        return self.harness.processes["jobs"][0]

    @property
    def tuners(self) -> list[ServiceProcess]:
        return self.harness.processes.setdefault("tuner", [])

    def storage(self, tenant: str) -> str:
        """The tenant's storage on this stack (DATA_DIR/storage/<tenant>)."""
        return os.path.join(self.data_dir, "storage", tenant)

    def start(self) -> "TunerStack":
        self.harness.start("jobs", auth=False)
        self.start_tuner()
        return self

    def start_tuner(self, wait: bool = True) -> ServiceProcess:
        return self.harness.start_service("tuner", f"tuner-{len(self.tuners)}", wait=60 if wait else None)

    @property
    def tuner(self) -> ServiceProcess:
        return self.harness.alive("tuner")

    def client(self, token: str, tenant: str = "") -> TunerClient:
        """A client of `tenant` (the token's; "admin" for the admin's)."""
        channel = grpc.insecure_channel(self.tuner.poll_address())
        jobs_channel = grpc.insecure_channel(self.jobs.poll_address())
        self._channels += [channel, jobs_channel]
        return TunerClient(channel, jobs_channel, token, tenant, self._uploads)

    def stop(self) -> None:
        for channel in self._channels:
            channel.close()
        self.harness.stop(replica_grace=1.0)
