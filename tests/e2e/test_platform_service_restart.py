"""`cloudml-platform up`, then the jobs service killed with SIGKILL: a client
calling ListJobs through the gateway in a loop sees at most a second of
UNAVAILABLE once the supervisor's replacement is SERVING (the replacement's
port file DIR/run/jobs.port tells where it listens). The window is printed
(run with -s to see it)."""
from __future__ import annotations

import os
import time

import grpc
import pytest

from cloudml.auth.v1 import auth_service_pb2 as auth_pb
from cloudml.auth.v1 import auth_service_pb2_grpc as auth_grpc
from cloudml.jobs.v1 import jobs_service_pb2 as jobs_pb
from cloudml.jobs.v1 import jobs_service_pb2_grpc as jobs_grpc
from deploy.local.service_process import read_port_file
from tests.e2e.test_launcher import new_platform  # noqa: F401 (fixture)
from tests.integration.restart_probe import Probe, wait_health

# Kills the platform's jobs service.
pytestmark = [pytest.mark.slow, pytest.mark.needs_local_platform]

MAX_WINDOW = 1.0
OBSERVE = float(os.environ.get("CLOUDML_TEST_RESTART_OBSERVE", "3"))


def test_killed_jobs_service_is_used_within_a_second_of_its_replacement_serving(new_platform):  # noqa: F811
    platform = new_platform()
    platform.up()
    creds = platform.credentials
    channel = grpc.insecure_channel(creds["endpoint"])
    token = auth_grpc.AuthServiceStub(channel).IssueToken(
        auth_pb.IssueTokenRequest(access_key_id=creds["access_key"], secret_key=creds["secret_key"]),
        timeout=10).token
    md = (("authorization", f"Bearer {token}"),)
    jobs = jobs_grpc.JobsServiceStub(channel)
    probe = Probe("gateway ListJobs",
                  lambda t: jobs.ListJobs(jobs_pb.ListJobsRequest(tenant="admin"), metadata=md, timeout=t))
    port_file = os.path.join(platform.data_dir, "run", "jobs.port")
    try:
        probe.start()
        probe.wait_ok(time.monotonic())
        old = platform.component("jobs")
        old_pid = old["pid"]
        os.kill(old_pid, 9)
        killed_at = time.monotonic()

        def new_address():
            ports = read_port_file(port_file)
            return ports["address"] if ports and ports.get("pid") not in (None, old_pid) else None

        serving_at = wait_health(new_address, timeout=60)
        probe.wait_ok(serving_at)
        time.sleep(OBSERVE)
    finally:
        probe.stop()
        channel.close()

    window = probe.window(serving_at)
    print(f"\njobs killed -> replacement SERVING after {serving_at - killed_at:.2f} s; "
          f"ListJobs through the gateway UNAVAILABLE for {window:.3f} s after that "
          f"(first success {probe.outage(serving_at):.3f} s after SERVING; "
          f"calls since the kill: {probe.summary(killed_at)})")
    assert window < MAX_WINDOW
    assert not probe.failures_since(serving_at + MAX_WINDOW)
