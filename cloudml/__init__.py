"""Cloud-ML: the client library (`cloudml.Client`) and the `cloudml` CLI.

Importing this package is cheap: `Client` (and grpc with it) is loaded on
first use, so the generated `cloudml.<svc>.v1` modules and the CLI's help
stay fast.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Client", "CloudMLError", "__version__", "report"]

# `cloudml.report(step=..., loss=...)`: stdlib only, so it is imported eagerly
# (this also binds the name to the function rather than the submodule).
from cloudml.report import report  # noqa: E402


def __getattr__(name: str):
    if name == "Client":
        from cloudml.client import Client

        return Client
    if name == "CloudMLError":
        from cloudml.errors import CloudMLError

        return CloudMLError
    raise AttributeError(f"module 'cloudml' has no attribute {name!r}")
