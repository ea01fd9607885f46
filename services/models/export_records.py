"""Export records: the etcd state of `ExportVersion` (one per version, format
and options), shared by the API (core.py) and the export driver
(exports.py, on the leader).

    exports/<tenant>/<model>/<version:019d>/<export id>   ExportRecord (JSON)

The record is the whole truth of an export: the API creates it PENDING; the
driver moves it RUNNING (with the runtime id of the process it started and
the quota owner it reserved for), then SUCCEEDED (with the artifact's path,
size and SHA-256) or FAILED, or back to PENDING when the process died
without an answer. `holds` says the record may still hold a quota
reservation, runtime capacity or a runtime record: the driver clears it only
after releasing them, so a leader killed at any point leaves nothing
leaked or stuck.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields

from cloudml.models.v1 import models_service_pb2 as pb
from services.common import errors
from services.models.rules import ts

E = pb.ExportState
OPTIMIZATION_NAMES = {
    pb.EXPORT_OPTIMIZATION_UNSPECIFIED: "none",
    pb.EXPORT_OPTIMIZATION_NONE: "none",
    pb.EXPORT_OPTIMIZATION_DYNAMIC_RANGE: "dynamic-range",
    pb.EXPORT_OPTIMIZATION_FLOAT16: "float16",
}
ARTIFACT_FILE = "model.tflite"
SIGNATURE_MAX = 128


def check_options(fmt: int, options: pb.ExportOptions) -> tuple[str, str]:
    """(optimization name, signature) of a request; INVALID_ARGUMENT otherwise."""
    if fmt != pb.EXPORT_FORMAT_TFLITE:
        known = ", ".join(n for n in pb.ExportFormat.keys() if not n.endswith("UNSPECIFIED"))
        raise errors.InvalidArgument(f"format {fmt} is not a known export format (known: {known})")
    if options.optimization not in OPTIMIZATION_NAMES:
        raise errors.InvalidArgument(
            f"options.optimization {options.optimization} is not known (none, dynamic-range, float16)")
    signature = options.signature
    if len(signature) > SIGNATURE_MAX or any(not (c.isalnum() or c in "_-./") for c in signature):
        raise errors.InvalidArgument(f"options.signature {signature[:80]!r} is not a signature name "
                                     f"(at most {SIGNATURE_MAX} of [A-Za-z0-9_-./])")
    return OPTIMIZATION_NAMES[options.optimization], signature


def export_id(optimization: str, signature: str) -> str:
    """The id of an export: its format and options, readable, stable."""
    name = "tflite" if optimization == "none" else f"tflite-{optimization}"
    if signature and signature != "serving_default":
        name += "-s" + hashlib.sha256(signature.encode()).hexdigest()[:8]
    return name


@dataclass
class ExportRecord:
    tenant: str
    model: str
    version: int
    id: str
    optimization: str
    signature: str
    state: int = E.EXPORT_STATE_PENDING
    message: str = ""
    attempts: int = 0
    created: float = 0.0
    updated: float = 0.0
    # The SavedModel to convert (a local directory, checked when the export was asked for).
    source: str = ""
    # The running process: its runtime id, quota owner and working directory.
    runtime_id: str = ""
    owner_id: str = ""
    workdir: str = ""
    holds: bool = False
    # When the current attempt's process was started (RUNNING).
    started: float = 0.0
    # Once SUCCEEDED: the platform's copy of the artifact.
    artifact_path: str = ""
    size_bytes: int = 0
    sha256: str = ""
    finished: float = 0.0

    def encode(self) -> bytes:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "ExportRecord":
        data = json.loads(raw)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def terminal(self) -> bool:
        return self.state in (E.EXPORT_STATE_SUCCEEDED, E.EXPORT_STATE_FAILED)

    def to_pb(self) -> pb.Export:
        optimization = {v: k for k, v in OPTIMIZATION_NAMES.items() if k != pb.EXPORT_OPTIMIZATION_UNSPECIFIED}
        export = pb.Export(
            tenant=self.tenant, model=self.model, version=self.version, id=self.id,
            format=pb.EXPORT_FORMAT_TFLITE,
            options=pb.ExportOptions(signature=self.signature, optimization=optimization[self.optimization]),
            state=self.state, message=self.message, attempts=self.attempts,
            create_time=ts(self.created), update_time=ts(self.updated or self.created),
        )
        if self.state == E.EXPORT_STATE_SUCCEEDED:
            export.artifact.CopyFrom(pb.Artifact(file=ARTIFACT_FILE, size_bytes=self.size_bytes, sha256=self.sha256,
                                                 create_time=ts(self.finished)))
        return export
