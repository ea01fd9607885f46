"""The models service's rules on its own values: the limits and defaults of a
version's spec, traffic splits, labels and replica bounds, and the page
tokens of its list calls. Pure functions on messages (no etcd, no files
except `is_file_at`), shared by the API (`core.py`) and the reconciler.
"""
from __future__ import annotations

import base64
import os
import re
import stat
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from cloudml.common.v1 import resources_pb2
from cloudml.models.v1 import models_service_pb2 as pb
from services.common import errors
from services.common.runtime.base import Amount

S = pb.ModelVersionState
MAX_VERSION = 2**63 - 1
MAX_REPLICAS = 1000
LABEL_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")
UPDATABLE = ("description", "public", "default_version", "traffic_split")
DESCRIPTION_MAX = 1000
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
LOCAL_SCHEMES = ("file", "local")


@dataclass(frozen=True)
class Defaults:
    """What a zero in a version's spec takes."""

    cpu_millis: int = 500
    memory_bytes: int = 2 * 2**30
    gpus: int = 0


def ts(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def replica_resources(version: pb.ModelVersion) -> resources_pb2.Resources:
    """What one replica of `version` reserves against the tenant's quota."""
    r = version.resources
    return resources_pb2.Resources(cpu_millis=r.cpu_millis, memory_bytes=r.memory_bytes, gpus=r.gpus,
                                   model_replicas=1)


def replica_amount(version: pb.ModelVersion) -> Amount:
    r = version.resources
    return Amount(cpu_millis=r.cpu_millis, memory_bytes=r.memory_bytes, gpus=r.gpus)


def spec_of(version: pb.ModelVersion) -> bytes:
    """The fields that make a version's spec, for idempotency checks."""
    spec = pb.ModelVersion(
        version=version.version, model_uri=version.model_uri, description=version.description,
        resources=version.resources, min_replicas=version.min_replicas, max_replicas=version.max_replicas,
        batching=version.batching,
    )
    return spec.SerializeToString(deterministic=True)


def split_uri(uri: str) -> tuple[str, str]:
    """("file", "/abs/path") for local paths and file:// URIs, (scheme, uri) otherwise."""
    if "://" not in uri:
        return "file", uri
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme in LOCAL_SCHEMES:
        return "file", rest
    return scheme, uri


def is_file_at(dirfd: int, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def encode_page_token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode()


def decode_page_token(token: str) -> str:
    try:
        return base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise errors.InvalidArgument("page_token is not one this service issued") from None



def check_split_shape(split) -> None:
    if not split:
        return  # clears the split
    seen: set[int] = set()
    total = 0
    for target in split:
        if target.version <= 0:
            raise errors.InvalidArgument(f"traffic_split names version {target.version}; versions are >= 1")
        if target.version in seen:
            raise errors.InvalidArgument(f"traffic_split names version {target.version} more than once")
        if not 1 <= target.percent <= 100:
            raise errors.InvalidArgument(
                f"traffic_split gives version {target.version} {target.percent}%; each share is 1..100"
            )
        seen.add(target.version)
        total += target.percent
    if total != 100:
        raise errors.InvalidArgument(f"traffic_split percents sum to {total}, not 100")


def check_replica_bounds(min_replicas: int, max_replicas: int, prefix: str = "") -> None:
    if not 1 <= min_replicas <= max_replicas <= MAX_REPLICAS:
        raise errors.InvalidArgument(
            f"{prefix}min_replicas = {min_replicas} and {prefix}max_replicas = {max_replicas}: "
            f"need 1 <= min_replicas <= max_replicas <= {MAX_REPLICAS}"
        )

def check_batching(batching: pb.BatchingConfig) -> pb.BatchingConfig:
    if not 0 <= batching.max_batch_size <= 100_000:
        raise errors.InvalidArgument(
            f"model_version.batching.max_batch_size must be within 1..100000 (got {batching.max_batch_size})")
    if not 0 <= batching.batch_timeout_micros <= 60_000_000:
        raise errors.InvalidArgument(
            "model_version.batching.batch_timeout_micros must be within 0..60000000 "
            f"(got {batching.batch_timeout_micros})")
    if not 0 <= batching.max_enqueued_batches <= 1_000_000:
        raise errors.InvalidArgument(
            "model_version.batching.max_enqueued_batches must be within 0..1000000 "
            f"(got {batching.max_enqueued_batches})")
    if not 0 <= batching.num_batch_threads <= 1024:
        raise errors.InvalidArgument(
            f"model_version.batching.num_batch_threads must be within 0..1024 (got {batching.num_batch_threads})")
    return pb.BatchingConfig(enabled=batching.enabled, max_batch_size=batching.max_batch_size,
                             batch_timeout_micros=batching.batch_timeout_micros,
                             max_enqueued_batches=batching.max_enqueued_batches,
                             num_batch_threads=batching.num_batch_threads)


def check_label(label: str) -> None:
    if not LABEL_RE.fullmatch(label or "") or label.isdigit():
        raise errors.InvalidArgument(
            f"label {label!r} is invalid: use 1..63 characters of [A-Za-z0-9_-], not all digits"
        )
