"""`client.tensorboards` and `client.dev` without a platform: their typed
results, waiting, reuse by for_job/for_study, and the requests they build
(the RPCs are answered by a stand-in; the real ones by
tests/integration/test_sdk_examples.py and the e2e browser tests)."""
from __future__ import annotations

import pytest

import cloudml
from cloudml import errors
from cloudml.common.v1 import resources_pb2
from cloudml.jobs.v1 import dev_environments_pb2 as dev_pb
from cloudml.jobs.v1 import tensorboards_pb2 as tb_pb
from cloudml.sdk import base
from cloudml.sdk.tensorboards import run_name
from cloudml.sdk.types import DevEnvironment, TensorBoard, Trial
from cloudml.tuner.v1 import tuner_service_pb2 as tuner_pb


@pytest.fixture
def client(monkeypatch, tmp_path):
    monkeypatch.setenv("CLOUDML_CONFIG", str(tmp_path / "none.json"))
    monkeypatch.setattr(base, "POLL", 0.0)
    with cloudml.Client("127.0.0.1:1", "AKUNIT", "secret") as c:  # nothing reaches the network
        c.rest_endpoint = "http://gw:8501"
        yield c


class Answers:
    """Stands in for `_rpc`: records (method, request), answers from a script of callables."""

    def __init__(self, **script):
        self.script = script
        self.calls = []

    def __call__(self, method, request):
        self.calls.append((method, request))
        return self.script[method](request)


def test_tensorboard_wrapper():
    proto = tb_pb.TensorBoard(name="linear", tenant="acme", state=tb_pb.TENSORBOARD_STATE_RUNNING,
                              job="linear", path="/tensorboard/acme/linear/",
                              runs=[tb_pb.TensorBoardRun(name="t0 lr=0.1", job="s-0"),
                                    tb_pb.TensorBoardRun(name="raw", logdir="file:///x")])
    proto.create_time.seconds = 1_700_000_000
    board = TensorBoard(proto)
    assert (board.name, board.tenant, board.state, board.running, board.job) == (
        "linear", "acme", "RUNNING", True, "linear")
    assert board.runs == {"t0 lr=0.1": "s-0", "raw": "file:///x"} and board.create_time.year == 2023
    assert board.idle_delete_time is None and board.to_dict()["state"] == "TENSORBOARD_STATE_RUNNING"
    assert repr(board) == "TensorBoard(name='linear', state='RUNNING', path='/tensorboard/acme/linear/')"
    assert TensorBoard(tb_pb.TensorBoard(state=tb_pb.TENSORBOARD_STATE_FAILED, message="exit 1")).state == "FAILED"


def test_dev_environment_wrapper():
    proto = dev_pb.DevEnvironment(name="nb", tenant="acme", state=dev_pb.DEV_ENVIRONMENT_STATE_STOPPED,
                                  message="idle", path="/dev/acme/nb/", idle_stop_seconds=3600,
                                  resources=resources_pb2.Resources(cpu_millis=2000, memory_bytes=4 << 30, gpus=1))
    env = DevEnvironment(proto)
    assert (env.state, env.running, env.message, env.cpu_millis, env.memory_bytes, env.gpus) == (
        "STOPPED", False, "idle", 2000, 4 << 30, 1)
    assert env.idle_stop_time is None and env.image == "" and env.to_dict()["name"] == "nb"
    proto.idle_stop_time.seconds = 1_700_000_000
    assert DevEnvironment(proto).idle_stop_time.year == 2023


def test_run_names_follow_the_platform_rule():
    trial = tuner_pb.Trial(number=3)
    trial.params["lr"].double_value = 0.01
    trial.params["layers"].double_value = 2.0
    trial.params["opt"].string_value = "adam/β"
    assert run_name(Trial(trial)) == "t3 layers=2 lr=0.01 opt=adam__"
    assert run_name(Trial(tuner_pb.Trial(number=0))) == "t0"


def test_create_waits_until_running_and_links(client, monkeypatch):
    states = iter([tb_pb.TENSORBOARD_STATE_STARTING, tb_pb.TENSORBOARD_STATE_RUNNING])
    board = dict(name="loss", tenant="acme", path="/tensorboard/acme/loss/")
    rpc = Answers(
        CreateTensorBoard=lambda r: tb_pb.CreateTensorBoardResponse(
            tensorboard=tb_pb.TensorBoard(state=tb_pb.TENSORBOARD_STATE_STARTING, logdir=r.logdir, **board)),
        GetTensorBoard=lambda r: tb_pb.GetTensorBoardResponse(tensorboard=tb_pb.TensorBoard(state=next(states),
                                                                                            **board)))
    monkeypatch.setattr(client.tensorboards, "_rpc", rpc)
    monkeypatch.setattr(client, "login_link", lambda path: "http://gw:8501" + path + "?once")
    got = client.tensorboards.create("loss", logdir="runs")
    assert got.running and [m for m, _ in rpc.calls] == ["CreateTensorBoard", "GetTensorBoard", "GetTensorBoard"]
    assert rpc.calls[0][1] == tb_pb.CreateTensorBoardRequest(name="loss", logdir="runs")
    assert rpc.calls[1][1] == tb_pb.GetTensorBoardRequest(tenant="acme", name="loss")
    assert client.tensorboards.login_link(got) == "http://gw:8501/tensorboard/acme/loss/?once"
    states = iter([tb_pb.TENSORBOARD_STATE_FAILED])
    with pytest.raises(errors.FailedPrecondition, match="tensorboard loss is failed: "):
        client.tensorboards.create("loss", logdir="runs")
    assert client.tensorboards.create("loss", logdir="runs", wait=False).state == "STARTING"


def test_for_job_reuses_a_board_on_that_job_only(client, monkeypatch):
    def taken(request):
        raise errors.AlreadyExists("taken")

    on = {"job": "linear"}
    rpc = Answers(CreateTensorBoard=taken, GetTensorBoard=lambda r: tb_pb.GetTensorBoardResponse(
        tensorboard=tb_pb.TensorBoard(name=r.name, state=tb_pb.TENSORBOARD_STATE_RUNNING, **on)))
    monkeypatch.setattr(client.tensorboards, "_rpc", rpc)
    assert client.tensorboards.for_job("linear").job == "linear"
    assert rpc.calls[0][1] == tb_pb.CreateTensorBoardRequest(name="linear", job="linear")
    on = {"logdir": "elsewhere"}
    with pytest.raises(errors.AlreadyExists):
        client.tensorboards.for_job("linear", name="board")


def test_for_study_makes_a_run_per_trial_with_a_job(client, monkeypatch):
    trials = [tuner_pb.Trial(number=n, job_name=f"s-{n}" if n else "") for n in (2, 0, 1)]
    monkeypatch.setattr(client.studies, "trials", lambda study, tenant=None: [Trial(t) for t in trials])
    rpc = Answers(CreateTensorBoard=lambda r: tb_pb.CreateTensorBoardResponse(
        tensorboard=tb_pb.TensorBoard(name=r.name, runs=r.runs, state=tb_pb.TENSORBOARD_STATE_RUNNING)))
    monkeypatch.setattr(client.tensorboards, "_rpc", rpc)
    board = client.tensorboards.for_study("s", tenant="acme")
    assert board.runs == {"t1": "s-1", "t2": "s-2"} and rpc.calls[0][1].tenant == "acme"
    trials = trials[1:2]
    with pytest.raises(errors.FailedPrecondition, match="study s has no trial with a job yet"):
        client.tensorboards.for_study("s")


def test_dev_create_parses_amounts_and_waits(client, monkeypatch):
    rpc = Answers(
        CreateDevEnvironment=lambda r: dev_pb.CreateDevEnvironmentResponse(dev_environment=dev_pb.DevEnvironment(
            name=r.name, state=dev_pb.DEV_ENVIRONMENT_STATE_STARTING, resources=r.resources)),
        GetDevEnvironment=lambda r: dev_pb.GetDevEnvironmentResponse(dev_environment=dev_pb.DevEnvironment(
            name=r.name, state=dev_pb.DEV_ENVIRONMENT_STATE_FAILED, message="no image")))
    monkeypatch.setattr(client.dev, "_rpc", rpc)
    env = client.dev.create("nb", cpu="500m", memory="1Gi", gpus=1, wait=False)
    assert (env.state, env.cpu_millis, env.memory_bytes, env.gpus) == ("STARTING", 500, 1 << 30, 1)
    assert client.dev.create("nb", wait=False).cpu_millis == 0  # the platform's default
    with pytest.raises(errors.FailedPrecondition, match="dev environment nb is failed: no image"):
        client.dev.create("nb")
    with pytest.raises(errors.SpecError, match="invalid memory"):
        client.dev.create("nb", memory="lots")


def test_dev_login_link_only_while_running(client, monkeypatch):
    monkeypatch.setattr(client, "login_link", lambda path: "http://gw:8501" + path)
    running = DevEnvironment(dev_pb.DevEnvironment(name="nb", path="/dev/acme/nb/",
                                                   state=dev_pb.DEV_ENVIRONMENT_STATE_RUNNING))
    assert client.dev.login_link(running) == "http://gw:8501/dev/acme/nb/"
    stopped = DevEnvironment(dev_pb.DevEnvironment(name="nb", state=dev_pb.DEV_ENVIRONMENT_STATE_STOPPED,
                                                   message="idle for 4 h"))
    with pytest.raises(errors.FailedPrecondition) as err:
        client.dev.login_link(stopped)
    assert err.value.message == "dev environment nb is stopped (idle for 4 h): start it with `cloudml dev start nb`"
    starting = DevEnvironment(dev_pb.DevEnvironment(name="nb", state=dev_pb.DEV_ENVIRONMENT_STATE_STARTING))
    with pytest.raises(errors.FailedPrecondition) as err:
        client.dev.login_link(starting)
    assert err.value.message == "dev environment nb is starting"
