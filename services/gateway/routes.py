"""Which service owns each platform RPC, read from the generated descriptors.

A method `/cloudml.<svc>.v1.<Service>/<Rpc>` belongs to service `<svc>`; its
streaming shape comes from the proto, so a new RPC is proxied as soon as its
generated code is in place.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

import cloudml

# Services whose APIs the gateway proxies (packages cloudml.<svc>.v1).
PLATFORM_SERVICES = ("auth", "jobs", "models", "tuner")


@dataclass(frozen=True, slots=True)
class Route:
    method: str          # "/cloudml.auth.v1.AuthService/IssueToken"
    owner: str           # "auth"
    client_streaming: bool
    server_streaming: bool


def _descriptor_modules(owner: str):
    package = f"cloudml.{owner}.v1"
    try:
        pkg = importlib.import_module(package)
    except ImportError:
        return
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.endswith("_pb2"):
            yield importlib.import_module(f"{package}.{info.name}")


def platform_routes() -> dict[str, Route]:
    routes: dict[str, Route] = {}
    for owner in PLATFORM_SERVICES:
        for module in _descriptor_modules(owner):
            for service in module.DESCRIPTOR.services_by_name.values():
                for method in service.methods:
                    path = f"/{service.full_name}/{method.name}"
                    routes[path] = Route(path, owner, method.client_streaming, method.server_streaming)
    return routes


def service_names(routes: dict[str, Route]) -> tuple[str, ...]:
    return tuple(sorted({r.method.split("/")[1] for r in routes.values()}))


assert cloudml  # the generated packages live inside it
