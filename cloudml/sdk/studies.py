"""`client.studies`: hyperparameter studies (TunerService through the gateway).

    study = client.studies.submit("examples/studies/linear_runs.json", package="pkgs/trainer-1.0.tar.gz")
    study = client.studies.wait(study.name, progress=print)
    best = client.studies.best(study.name)          # a Trial: params, objective, job_name
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

from cloudml import errors, hpspec
from cloudml.sdk.types import Study, Trial


def _pb():
    from cloudml.tuner.v1 import tuner_service_pb2

    return tuner_service_pb2


def _states(enum_type, prefix: str, names: Iterable[str]) -> list[int]:
    out = []
    for name in names:
        try:
            out.append(enum_type.Value(prefix + name.upper().removeprefix(prefix)))
        except ValueError:
            raise errors.SpecError(f"unknown state {name!r}") from None
    return out


class Studies:
    """Studies of the caller's tenant (or, for an admin, of `tenant=`)."""

    def __init__(self, client):
        self._client = client

    @property
    def _stub(self):
        from cloudml.tuner.v1 import tuner_service_pb2_grpc

        return self._client.stub(tuner_service_pb2_grpc.TunerServiceStub)

    def _rpc(self, method: str, request):
        return self._client.call(getattr(self._stub, method), request)

    def submit(self, spec, *, name: str | None = None, package: str | None = None, max_trials: int | None = None,
               parallel: int | None = None, algorithm: str | None = None, seed: int | None = None,
               tenant: str | None = None, note: Callable[[str], None] = lambda message: None,
               progress: Callable[[int, int], None] | None = None) -> Study:
        """Creates a study and returns it (`study.created` False when the same
        spec existed: submitting is idempotent).

        `spec` is a study in the seed's layout: the path of a JSON file or
        the dict itself (the train job's fields plus `hyperparameters`,
        whose `params` are explicit runs or Cloud ML Engine's parameter
        specs; see `cloudml.hpspec`), or a ready tuner.v1.StudySpec (then
        `name` is required). `package` overrides the file's trainer_uri; a
        local trainer package is uploaded first. The keywords override
        the file's max_trials, max_parallel_trials, algorithm and seed.

        SpecError (an InvalidArgument) for a malformed spec, before anything
        is sent; the service's InvalidArgument names the StudySpec field.
        """
        pb = _pb()
        if isinstance(spec, (str, dict)):
            if isinstance(spec, str):
                job, hyper = hpspec.load_study_file(spec, note)
            else:
                job, hyper = hpspec.split_study(spec, "study spec", note)
            if package is not None:
                job["trainer_uri"] = package
            name, spec = hpspec.build_study(job, hyper, name=name, max_trials=max_trials, parallel=parallel,
                                            algorithm=algorithm, seed=seed)
            given = job.get("trainer_uri")
            if given and "://" not in str(given):
                template = spec.trial_template
                template.trainer_uri = self._client.upload_package(template.trainer_uri[len("file://"):],
                                                                   tenant=tenant, progress=progress)
                note(f"uploaded {given} to {template.trainer_uri}")
        elif not name:
            raise errors.SpecError("a study needs a name")
        resp = self._rpc("CreateStudy", pb.CreateStudyRequest(tenant=tenant or "", name=name, spec=spec))
        return Study(resp.study, created=resp.created)

    def get(self, name: str, *, tenant: str | None = None) -> Study:
        """The study with its trial counts and best trial so far."""
        return Study(self._rpc("GetStudy", _pb().GetStudyRequest(tenant=tenant or "", name=name)).study)

    def list(self, *, states: Iterable[str] = (), tenant: str | None = None,
             page_size: int = 1000) -> Iterator[Study]:
        """Every study (of `states`, e.g. ["RUNNING"]), page by page."""
        pb = _pb()
        wanted = _states(pb.StudyState, "STUDY_STATE_", states)
        token = ""
        while True:
            page = self._rpc("ListStudies", pb.ListStudiesRequest(tenant=tenant or "", states=wanted,
                                                                  page_size=page_size, page_token=token))
            for study in page.studies:
                yield Study(study)
            token = page.next_page_token
            if not token:
                return

    def trials(self, name: str, *, states: Iterable[str] = (), tenant: str | None = None,
               page_size: int = 1000) -> Iterator[Trial]:
        """The study's trials in number order (of `states`, e.g. ["SUCCEEDED"])."""
        pb = _pb()
        wanted = _states(pb.TrialState, "TRIAL_STATE_", states)
        token = ""
        while True:
            page = self._rpc("ListTrials", pb.ListTrialsRequest(tenant=tenant or "", study=name, states=wanted,
                                                                page_size=page_size, page_token=token))
            for trial in page.trials:
                yield Trial(trial)
            token = page.next_page_token
            if not token:
                return

    def best(self, name: str, *, tenant: str | None = None) -> Trial | None:
        """The best trial so far (None before any trial reported its metric)."""
        return self.get(name, tenant=tenant).best_trial

    def cancel(self, name: str, *, tenant: str | None = None) -> Study:
        """Cancels the study and every running trial."""
        return Study(self._rpc("CancelStudy", _pb().CancelStudyRequest(tenant=tenant or "", name=name)).study)

    def delete(self, name: str, *, tenant: str | None = None) -> None:
        """Deletes an ended study and its trials (their jobs are kept)."""
        self._rpc("DeleteStudy", _pb().DeleteStudyRequest(tenant=tenant or "", name=name))

    def wait(self, name: str, *, tenant: str | None = None, timeout: float | None = None, poll: float = 1.0,
             progress: Callable[[Study], None] | None = None) -> Study:
        """Blocks until the study ends (SUCCEEDED, FAILED or CANCELLED) and
        returns it; `progress(study)` is called whenever its trial counts,
        best trial or state change. DeadlineExceeded after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        shown = None
        while True:
            study = self.get(name, tenant=tenant)
            seen = (study.proto.state, study.proto.trial_counts.SerializeToString(),
                    study.proto.best_trial.SerializeToString())
            if progress is not None and seen != shown:
                shown = seen
                progress(study)
            if study.done:
                return study
            if deadline is not None and time.monotonic() >= deadline:
                counts = ", ".join(f"{n} {k}" for k, n in study.counts.items() if n) or "no trials"
                raise errors.DeadlineExceeded(f"study {name!r} is {study.state} ({counts}) after {timeout:.0f}s")
            time.sleep(poll)
