"""Resource sizes in the forms people type, and back.

CPU is counted in millicores (1000 = one core):

    parse_cpu("0.5") == 500     parse_cpu("500m") == 500     parse_cpu("2") == 2000

Memory is counted in bytes, with decimal (K, M, G, T, P, E = 10^3k) and binary
(Ki, Mi, Gi, Ti, Pi, Ei = 2^10k) suffixes as in Kubernetes quantities; a
trailing "B" is allowed ("100MB", "1GiB"), lower-case "k" means kilo:

    parse_memory("100M") == 100 * 10**6     parse_memory("1Gi") == 2**30
    parse_memory("1.5Gi") == 3 * 2**29      parse_memory("4096") == 4096

`format_cpu` and `format_memory` turn the numbers back into short strings for
tables ("500m", "2", "1Gi", "100M"). Every parser raises `ValueError` with a
message that says what was wrong and what is accepted; negative numbers,
fractions finer than the unit (a part of a byte, of a millicore) and values
beyond int64 are refused.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

INT64_MAX = 2**63 - 1

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_CPU_RE = re.compile(rf"(?P<num>{_NUMBER})(?P<milli>m?)")
_MEMORY_RE = re.compile(rf"(?P<num>{_NUMBER})\s*(?P<unit>[kKMGTPE]i?)?(?P<b>B)?")

DECIMAL_UNITS = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
BINARY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}

CPU_HELP = "cores, e.g. 0.5, 2 or 500m (millicores)"
MEMORY_HELP = "bytes, e.g. 100M, 2G, 1Gi, 512Mi, 100K, 64Ki or a plain number of bytes"


def _as_text(value) -> str:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {value!r}")
        return repr(value)
    if isinstance(value, (int, Decimal)):
        return str(value)
    if isinstance(value, str):
        return value.strip()
    raise ValueError(f"expected a number or a string, got {type(value).__name__}")


def _whole(amount: Decimal, what: str, text: str, unit_name: str) -> int:
    if amount != amount.to_integral_value():
        raise ValueError(f"{what} {text!r} is not a whole number of {unit_name}")
    result = int(amount)
    if result > INT64_MAX:
        raise ValueError(f"{what} {text!r} is too large")
    return result


def _negative_check(text: str, what: str, hint: str) -> None:
    if text.startswith("-"):
        raise ValueError(f"{what} must not be negative (got {text!r})")
    if not text:
        raise ValueError(f"{what} is empty; expected {hint}")


def parse_cpu(value) -> int:
    """Cores ("0.5", "2", 1.5) or millicores ("500m") -> millicores.

    A bare number is in cores, as in Kubernetes; an `int` is cores too.
    """
    text = _as_text(value)
    _negative_check(text, "CPU", CPU_HELP)
    match = _CPU_RE.fullmatch(text)
    if not match:
        raise ValueError(f"invalid CPU {text!r}; expected {CPU_HELP}")
    try:
        number = Decimal(match["num"])
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"invalid CPU {text!r}; expected {CPU_HELP}") from None
    amount = number if match["milli"] else number * 1000
    return _whole(amount, "CPU", text, "millicores (1m = 0.001 cores)")


def parse_memory(value) -> int:
    """"100M", "2G", "1Gi", "512Mi", "100K", "64Ki", "4096" -> bytes."""
    text = _as_text(value)
    _negative_check(text, "memory", MEMORY_HELP)
    match = _MEMORY_RE.fullmatch(text)
    if not match:
        hint = ""
        if re.fullmatch(rf"{_NUMBER}m", text):
            hint = f" (lower-case 'm' would mean milli-bytes; did you mean {text[:-1]}M or {text[:-1]}Mi?)"
        raise ValueError(f"invalid memory {text!r}{hint}; expected {MEMORY_HELP}")
    unit = match["unit"] or ""
    if unit == "k":
        unit = "K"
    elif unit == "ki":
        raise ValueError(f"invalid memory {text!r}; the binary kilo suffix is 'Ki'")
    factor = BINARY_UNITS.get(unit) or DECIMAL_UNITS.get(unit) or 1
    return _whole(Decimal(match["num"]) * factor, "memory", text, "bytes")


def parse_count(value, what: str = "count") -> int:
    """A non-negative whole number (GPUs, jobs, replicas, studies)."""
    text = _as_text(value)
    _negative_check(text, what, "a whole number")
    if not re.fullmatch(r"\d+", text):
        raise ValueError(f"invalid {what} {text!r}; expected a whole number such as 0, 1 or 8")
    result = int(text)
    if result > INT64_MAX:
        raise ValueError(f"{what} {text!r} is too large")
    return result


def format_cpu(millis: int) -> str:
    """500 -> "500m", 2000 -> "2", 0 -> "0"."""
    if millis % 1000 == 0:
        return str(millis // 1000)
    return f"{millis}m"


def format_memory(nbytes: int, *, exact: bool = False) -> str:
    """Bytes as the shortest exact quantity ("1Gi", "100M", "512Mi").

    When no suffix divides the number into something short (under 10000),
    the result is rounded to one decimal in binary units ("117.7Mi"), unless
    `exact` is set, which then gives the plain number of bytes.
    """
    if nbytes == 0:
        return "0"
    sign = "-" if nbytes < 0 else ""
    n = abs(nbytes)
    candidates = []
    for units in (BINARY_UNITS, DECIMAL_UNITS):
        for suffix, factor in reversed(units.items()):
            if n % factor == 0:
                candidates.append((len(str(n // factor)), suffix in BINARY_UNITS, f"{n // factor}{suffix}"))
                break
    if candidates:
        # Shortest number wins; on a tie prefer the binary unit (1024Ki -> 1Mi is
        # already shorter, so a tie means both are equally readable).
        length, _, text = min(candidates, key=lambda c: (c[0], not c[1]))
        if length <= 4 or exact:
            return sign + text
    if exact or n < 10**4:
        return f"{sign}{n}"
    for suffix, factor in reversed(BINARY_UNITS.items()):
        if n >= factor:
            return f"{sign}{n / factor:.1f}{suffix}"
    return f"{sign}{n}"  # pragma: no cover
