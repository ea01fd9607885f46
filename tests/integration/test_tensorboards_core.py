"""`services.jobs.tensorboards.TensorBoards` on a real etcd (a prefix per
test) with a stand-in runtime and quota: create's checks and its clean-up
when refused, the leader's passes (start, RUNNING once the socket answers,
FAILED when the replica ends, idle deletion returning the quota), and a new
leader adopting a running replica instead of starting another."""
from __future__ import annotations

import asyncio
import os

import pytest

from cloudml.jobs.v1 import jobs_service_pb2 as pb
from cloudml.jobs.v1 import tensorboards_pb2 as tb_pb
from services.common import errors
from services.common.confine import Confiner
from services.common.etcd import Etcd
from tests.integration.planted_links import resolve_refuses_a_planted_link
from tests.integration.standins import Clock, Quota
from services.common.runtime.base import ReplicaPhase, ReplicaStatus
from services.common.tokens import ROLE_MEMBER, Principal
from services.common.sockets import socket_root
from services.jobs.tensorboards import Board, TensorBoards, TensorBoardSettings, socket_name

S = tb_pb.TensorBoardState
ACME = Principal("acme", ROLE_MEMBER, "AK1", 2e9)
RIVAL = Principal("rival", ROLE_MEMBER, "AK2", 2e9)


class Runtime:
    """Replicas as records; `start` opens a listening Unix socket that answers HTTP like the replica."""

    tenancy = None

    def __init__(self):
        self.replicas: dict[str, ReplicaStatus] = {}
        self.started: list[str] = []
        self.groups: set[str] = set()
        self.listeners: dict[str, asyncio.base_events.Server] = {}

    def reserve(self, group, replicas):
        self.groups.add(group)

    def release(self, group):
        self.groups.discard(group)

    async def start(self, request):
        self.started.append(request.replica_id)
        sock = request.argv[request.argv.index("--socket") + 1]

        async def answer(reader, writer):
            await reader.readline()
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n")
            await writer.drain()
            writer.close()

        self.listeners[request.replica_id] = await asyncio.start_unix_server(answer, sock)
        status = ReplicaStatus(request.replica_id, request.group, ReplicaPhase.RUNNING, pid=1234)
        self.replicas[request.replica_id] = status
        return status

    async def status(self, replica_id):
        return self.replicas.get(replica_id) or ReplicaStatus(replica_id, "", ReplicaPhase.UNKNOWN)

    async def stop(self, replica_id, grace_seconds=10.0):
        self.end(replica_id, "Killed")
        return self.replicas[replica_id]

    def end(self, replica_id, reason="Error"):
        self.replicas[replica_id] = ReplicaStatus(replica_id, replica_id, ReplicaPhase.FAILED, exit_code=1,
                                                  reason=reason, message="exited with code 1")
        listener = self.listeners.pop(replica_id, None)
        if listener:
            listener.close()

    async def adopt(self):
        return list(self.replicas.values())

    async def forget(self, replica_id):
        self.replicas.pop(replica_id, None)


@pytest.fixture
async def env(etcd_endpoint, etcd_prefix, tmp_path):
    etcd = await Etcd.connect(etcd_endpoint)
    storage = tmp_path / "storage"
    (storage / "acme" / "runs").mkdir(parents=True)
    clock, runtime, quota = Clock(), Runtime(), Quota()

    async def no_job(tenant, name):
        return None

    def make(**settings):
        defaults = dict(data_dir=str(tmp_path / "data"), idle_seconds=600, max_per_tenant=2, start_timeout=30)
        return TensorBoards(etcd, quota, runtime, Confiner(str(storage)), no_job,
                            TensorBoardSettings(**{**defaults, **settings}), clock=clock, prefix=etcd_prefix)

    os.makedirs(tmp_path / "data")
    yield {"make": make, "boards": make(), "runtime": runtime, "quota": quota, "clock": clock,
           "logdir": str(storage / "acme" / "runs"), "etcd": etcd}
    for listener in runtime.listeners.values():
        listener.close()
    await etcd.close()


async def running(boards, name="board"):
    for _ in range(20):
        await boards.reconcile()
        board = await boards.get(ACME, "", name)
        if board.state != S.TENSORBOARD_STATE_STARTING:
            return board
    return board


async def test_create_starts_a_replica_that_runs_and_holds_quota(env):
    boards = env["boards"]
    created = await boards.create(ACME, "", "board", env["logdir"], "")
    assert created.state == S.TENSORBOARD_STATE_STARTING and created.path == "/tensorboard/acme/board/"
    assert created.logdir == "file://" + env["logdir"]
    board = await running(boards)
    assert board.state == S.TENSORBOARD_STATE_RUNNING, board.message
    assert env["quota"].held == {("acme", f"jobs/tensorboard/board/{board.uid}"): 500}
    address = await boards.resolve(ACME, "acme", "board")
    assert address.startswith("unix:") and len(address) < 108
    with pytest.raises(errors.NotFound):
        await boards.resolve(RIVAL, "acme", "board")
    assert [b.name for b in await boards.list(ACME, "")] == ["board"]


@pytest.mark.parametrize("logdir,error", [("/etc", errors.PermissionDenied), ("../x", errors.InvalidArgument),
                                          ("", errors.InvalidArgument)])
async def test_create_with_a_bad_logdir_creates_nothing(env, logdir, error):
    with pytest.raises(error):
        await env["boards"].create(ACME, "", "board", logdir, "")
    assert await env["boards"].list(ACME, "") == [] and env["quota"].held == {}


async def test_create_over_quota_or_count_or_taken_creates_nothing(env):
    boards = env["boards"]
    env["quota"].cpu_limit = 100
    with pytest.raises(errors.ResourceExhausted) as info:
        await boards.create(ACME, "", "board", env["logdir"], "")
    assert "quota" in info.value.message
    assert await boards.list(ACME, "") == []
    env["quota"].cpu_limit = 4000
    await boards.create(ACME, "", "one", env["logdir"], "")
    with pytest.raises(errors.AlreadyExists):
        await boards.create(ACME, "", "one", env["logdir"], "")
    await boards.create(ACME, "", "two", env["logdir"], "")
    with pytest.raises(errors.ResourceExhausted) as info:
        await boards.create(ACME, "", "three", env["logdir"], "")
    assert "--max-tensorboards" in info.value.message
    assert [b.name for b in await boards.list(ACME, "")] == ["one", "two"] and len(env["quota"].held) == 2


async def test_replica_that_ends_marks_the_board_failed(env):
    boards = env["boards"]
    await boards.create(ACME, "", "board", env["logdir"], "")
    board = await running(boards)
    env["runtime"].end(f"tensorboard.acme.board.{board.uid}")
    await boards.reconcile()
    board = await boards.get(ACME, "", "board")
    assert board.state == S.TENSORBOARD_STATE_FAILED and "exited with code 1" in board.message


async def test_idle_board_is_deleted_and_its_quota_returned(env):
    boards, clock = env["boards"], env["clock"]
    await boards.create(ACME, "", "board", env["logdir"], "")
    await running(boards)
    clock.now += 500
    await boards.resolve(ACME, "acme", "board")  # used: the idle clock restarts
    clock.now += 500
    await boards.reconcile()
    assert (await boards.get(ACME, "", "board")).state == S.TENSORBOARD_STATE_RUNNING
    clock.now += 601
    await boards.reconcile()
    described = await boards.get(ACME, "", "board")
    assert described.state == S.TENSORBOARD_STATE_DELETING and "idle" in described.message
    await boards.reconcile()
    assert await boards.list(ACME, "") == [] and env["quota"].held == {}
    assert not [s for s in env["runtime"].replicas.values() if s.phase == ReplicaPhase.RUNNING]
    assert not env["runtime"].groups


async def test_new_leader_adopts_the_running_replica(env):
    await env["boards"].create(ACME, "", "board", env["logdir"], "")
    await running(env["boards"])
    started = list(env["runtime"].started)
    successor = env["make"]()
    await successor.reconcile()
    assert env["runtime"].started == started
    assert (await successor.get(ACME, "", "board")).state == S.TENSORBOARD_STATE_RUNNING


async def test_replica_of_no_board_is_stopped(env):
    env["runtime"].replicas["tensorboard.acme.gone.abcd"] = ReplicaStatus(
        "tensorboard.acme.gone.abcd", "tensorboard.acme.gone.abcd", ReplicaPhase.RUNNING)
    env["runtime"].replicas["jobs.acme.j.1.a1.master-0"] = ReplicaStatus(
        "jobs.acme.j.1.a1.master-0", "jobs.acme.j.1", ReplicaPhase.RUNNING)
    await env["boards"].reconcile()
    assert list(env["runtime"].replicas) == ["jobs.acme.j.1.a1.master-0"]


async def test_delete_of_another_tenants_board_is_not_found(env):
    await env["boards"].create(ACME, "", "board", env["logdir"], "")
    with pytest.raises(errors.NotFound):
        await env["boards"].delete(RIVAL, "acme", "board")
    with pytest.raises(errors.NotFound):
        await env["boards"].get(RIVAL, "acme", "board")


def test_socket_paths_fit_the_limit_for_the_longest_names():
    board = Board(tenant="t" * 63, name="a" * 63, uid="01234567", logdir="")
    path = os.path.join(socket_root("/" + "d" * 200), "t" * 40, socket_name(board))
    assert len(path.encode()) <= 107, len(path)


async def test_board_whose_creator_died_before_its_quota_is_never_started_then_removed(env):
    boards, clock = env["boards"], env["clock"]
    board = Board(tenant="acme", name="half", uid="deadbeef", logdir="file://" + env["logdir"],
                  created=clock.now, last_access=clock.now, reserved=False)
    await env["etcd"].put(boards._key("acme", "half"), board.encode())
    await boards.reconcile()
    assert env["runtime"].started == []
    clock.now += 61
    await boards.reconcile()
    await boards.reconcile()
    assert await boards.list(ACME, "") == [] and env["runtime"].started == []


async def test_runs_over_jobs_become_a_logdir_spec(env, tmp_path):
    jobs = {name: pb.TrainJob(name=name, spec=pb.TrainJobSpec(output_path="file://" + env["logdir"] + "/" + name))
            for name in ("s-1", "s-2")}
    boards = env["make"]()

    async def lookup(tenant, name):
        return jobs.get(name) if tenant == "acme" else None

    boards.jobs = lookup
    runs = [tb_pb.TensorBoardRun(name="t1 lr=0.1", job="s-1"), tb_pb.TensorBoardRun(name="t2 lr=0.2", job="s-2")]
    created = await boards.create(ACME, "", "study", "", "", runs)
    assert [(r.name, r.job) for r in created.runs] == [("t1 lr=0.1", "s-1"), ("t2 lr=0.2", "s-2")]
    assert created.runs[0].logdir == f"file://{env['logdir']}/s-1/tensorboard" and not created.logdir
    await running(boards, "study")
    board = (await boards._all("acme"))[0]
    assert boards._logdir_args(board) == [
        "--logdir-spec", f"t1 lr=0.1:{env['logdir']}/s-1/tensorboard,t2 lr=0.2:{env['logdir']}/s-2/tensorboard"]


@pytest.mark.parametrize("runs,error", [
    ([tb_pb.TensorBoardRun(name="a:b", logdir="{d}")], errors.InvalidArgument),
    ([tb_pb.TensorBoardRun(name="a,b", logdir="{d}")], errors.InvalidArgument),
    ([tb_pb.TensorBoardRun(name="a", logdir="{d}"), tb_pb.TensorBoardRun(name="a", logdir="{d}")], errors.InvalidArgument),
    ([tb_pb.TensorBoardRun(name="a", logdir="{d}", job="j")], errors.InvalidArgument),
    ([tb_pb.TensorBoardRun(name="a", logdir="/etc")], errors.PermissionDenied),
    ([tb_pb.TensorBoardRun(name="a", job="nope")], errors.NotFound),
])
async def test_bad_runs_create_nothing(env, runs, error):
    for run in runs:
        run.logdir = run.logdir.format(d=env["logdir"])
    with pytest.raises(error):
        await env["boards"].create(ACME, "", "study", "", "", runs)
    assert await env["boards"].list(ACME, "") == []


async def test_resolve_answers_the_platforms_link_never_a_name_the_tenant_renamed(env, tmp_path):
    """A board's socket is in its tenant's directory, where anything running as
    the tenant can rename entries: the gateway gets the platform's own link to
    the socket (services.common.sockets.pin_socket), and a socket the tenant
    replaced with a symbolic link (to another tenant's page server, say) is
    never handed out."""
    boards = env["boards"]
    await boards.create(ACME, "", "board", env["logdir"], "")
    assert (await running(boards)).state == S.TENSORBOARD_STATE_RUNNING
    pinned = await resolve_refuses_a_planted_link(lambda: boards.resolve(ACME, "acme", "board"), "acme",
                                                  str(tmp_path / "elsewhere.sock"))
    assert (await boards.resolve(ACME, "acme", "board"))[len("unix:"):] == pinned
