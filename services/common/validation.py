"""Request-shape checks shared by every service (names, ids, amounts).

Each raises `errors.InvalidArgument` naming the field.
"""
from __future__ import annotations

import re

from services.common import errors

NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Model names also allow "_": TF Serving clients use names like half_plus_two.
# ("." stays out, so "<tenant>.<model>" is unambiguous.)
MODEL_NAME_RE = re.compile(r"[a-z0-9]([-_a-z0-9]*[a-z0-9])?")
NAME_MAX = 63
OWNER_ID_RE = re.compile(r"[!-~]{1,253}")  # printable ASCII, no spaces

# Upper bounds that catch typos ("absurd" values), per Resources field.
RESOURCE_BOUNDS = {
    "cpu_millis": 10**9,          # a million cores
    "memory_bytes": 2**60,        # an exbibyte
    "gpus": 10**5,
    "train_jobs": 10**6,
    "model_replicas": 10**6,
    "studies": 10**6,
    "dev_environments": 10**6,
    "tensorboards": 10**6,
}


def check_name(value: str, field: str = "name") -> str:
    if not value:
        raise errors.InvalidArgument(f"{field} is required")
    if len(value) > NAME_MAX or not NAME_RE.fullmatch(value):
        raise errors.InvalidArgument(
            f"{field} {value!r} is invalid: use lower-case letters, digits and '-', "
            f"starting and ending with a letter or digit, at most {NAME_MAX} characters"
        )
    return value


def check_model_name(value: str, field: str = "name") -> str:
    if not value:
        raise errors.InvalidArgument(f"{field} is required")
    if len(value) > NAME_MAX or not MODEL_NAME_RE.fullmatch(value):
        raise errors.InvalidArgument(
            f"{field} {value!r} is invalid: use lower-case letters, digits, '-' and '_', "
            f"starting and ending with a letter or digit, at most {NAME_MAX} characters"
        )
    return value


def check_owner_id(value: str) -> str:
    if not OWNER_ID_RE.fullmatch(value or ""):
        raise errors.InvalidArgument("owner_id must be 1-253 printable ASCII characters without spaces")
    return value


def check_resources(resources, field: str = "resources") -> None:
    """Every Resources field non-negative and within its bound."""
    for name, bound in RESOURCE_BOUNDS.items():
        value = getattr(resources, name)
        if value < 0:
            raise errors.InvalidArgument(f"{field}.{name} must not be negative (got {value})")
        if value > bound:
            raise errors.InvalidArgument(f"{field}.{name} = {value} is beyond the allowed maximum {bound}")


def check_page_size(page_size: int, default: int = 100, maximum: int = 1000) -> int:
    if page_size < 0:
        raise errors.InvalidArgument("page_size must not be negative")
    return min(page_size or default, maximum)
