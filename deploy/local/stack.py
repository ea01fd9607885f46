"""A minimal platform (etcd, auth, gateway) started process by process, for
tests and benchmarks that must reach or kill each piece; `cloudml-platform`
is the way to run the whole platform.

    stack = AuthGatewayStack(workdir).start()
    ... stack.gateway.address, stack.auth.address, stack.rest_port, stack.admin ...
    stack.stop()
"""
from __future__ import annotations

import json
import os
import re
import urllib.request
from dataclasses import dataclass, field

from deploy.local.etcd import EtcdProcess, free_port
from deploy.local.service_process import ServiceProcess, service_command


@dataclass
class AuthGatewayStack:
    workdir: str
    #: (access key id, secret) of the bootstrap admin and of the services
    admin: tuple[str, str] = ("AKSTACKADMIN00000000", "stack-admin-secret")
    service: tuple[str, str] = ("AKSTACKSERVICE000000", "stack-service-secret")
    #: extra flags for both services, e.g. ["--log-level", "WARNING"]
    flags: list[str] = field(default_factory=list)
    etcd: EtcdProcess | None = None
    auth: ServiceProcess | None = None
    gateway: ServiceProcess | None = None
    rest_port: int = 0

    def path(self, name: str) -> str:
        return os.path.join(str(self.workdir), name)

    @property
    def kek_file(self) -> str:
        """The auth service's key-encryption key (any further auth process on this etcd needs it)."""
        return self.path("kek")

    def start(self) -> "AuthGatewayStack":
        self.etcd = EtcdProcess(self.path("etcd")).start()
        with open(self.path("boot.json"), "w") as f:
            json.dump({"keys": [{"access_key": self.admin[0], "secret_key": self.admin[1], "tenant": "admin"},
                                {"access_key": self.service[0], "secret_key": self.service[1],
                                 "tenant": "admin"}]}, f)
        with open(self.path("svc.json"), "w") as f:
            json.dump({"access_key": self.service[0], "secret_key": self.service[1]}, f)
        self.auth = ServiceProcess(
            "auth", service_command("auth", self.etcd.endpoint, self.path("auth.port"),
                                    extra=["--bootstrap-file", self.path("boot.json"),
                                           "--key-encryption-key-file", self.kek_file, *self.flags]),
            self.path("auth.port"), log_path=self.path("auth.log")).start().wait_serving()
        self.gateway, self.rest_port = self.start_gateway("gw")
        return self

    def start_gateway(self, name: str, env: dict | None = None) -> tuple[ServiceProcess, int]:
        """A gateway (files DIR/<name>.port, .log) on this etcd; returns it and its REST port."""
        rest_port = free_port()
        gateway = ServiceProcess(
            "gateway", service_command("gateway", self.etcd.endpoint, self.path(f"{name}.port"),
                                       listen=f"127.0.0.1:{free_port()}", credentials_file=self.path("svc.json"),
                                       extra=["--rest-listen", f"127.0.0.1:{rest_port}", *self.flags]),
            self.path(f"{name}.port"), log_path=self.path(f"{name}.log"), env=env).start().wait_serving()
        return gateway, rest_port

    def tenant_token(self, tenant: str) -> str:
        """Creates `tenant` and an access key of it (as the admin, through the
        gateway) and returns a token of that key."""
        import grpc

        from cloudml.auth.v1 import auth_service_pb2 as pb
        from cloudml.auth.v1 import auth_service_pb2_grpc as pb_grpc

        with grpc.insecure_channel(self.gateway.address) as channel:
            auth = pb_grpc.AuthServiceStub(channel)
            admin = (("authorization", "Bearer " + auth.IssueToken(
                pb.IssueTokenRequest(access_key_id=self.admin[0], secret_key=self.admin[1]), timeout=10).token),)
            auth.CreateTenant(pb.CreateTenantRequest(name=tenant), metadata=admin, timeout=10)
            key = auth.CreateAccessKey(pb.CreateAccessKeyRequest(tenant=tenant), metadata=admin, timeout=10)
            return auth.IssueToken(pb.IssueTokenRequest(access_key_id=key.access_key.access_key_id,
                                                        secret_key=key.secret_key), timeout=10).token

    def dataplane_calls(self) -> dict[str, int]:
        """The gateway data plane's call counts by path (cloudml_gateway_dataplane_calls_total)."""
        text = urllib.request.urlopen(f"{self.rest}/metrics", timeout=5).read().decode()
        return {m.group(1): int(float(m.group(2)))
                for m in re.finditer(r'cloudml_gateway_dataplane_calls_total\{path="(\w+)"\} (\S+)', text)}

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def stop(self) -> None:
        for proc in (self.gateway, self.auth):
            if proc is not None:
                proc.stop()
        if self.etcd is not None:
            self.etcd.stop()
