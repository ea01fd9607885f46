"""cloudml.units: the seed's CPU and memory forms, parsed and formatted back."""
from __future__ import annotations

import pytest

from cloudml import units


@pytest.mark.parametrize(
    "text, millis",
    [
        ("0.5", 500), ("500m", 500), ("2", 2000), ("1.5", 1500), ("0.001", 1), ("1m", 1), ("0", 0),
        (".25", 250), ("2.", 2000), (" 4 ", 4000), ("64", 64000), (2, 2000), (0.25, 250), ("1000m", 1000),
    ],
)
def test_parse_cpu_accepts_cores_and_millicores(text, millis):
    assert units.parse_cpu(text) == millis


@pytest.mark.parametrize(
    "text, message",
    [
        ("-1", "must not be negative"), ("-500m", "must not be negative"), ("", "empty"),
        ("abc", "invalid CPU"), ("1e3", "invalid CPU"), ("1 core", "invalid CPU"), ("0.5m", "whole number"),
        ("0.0005", "whole number"), ("2M", "invalid CPU"), ("nan", "invalid CPU"), (float("inf"), "finite"),
        (True, "expected a number"), (None, "expected a number"), ("9" * 30, "too large"),
    ],
)
def test_parse_cpu_rejects_garbage_with_clear_message(text, message):
    with pytest.raises(ValueError, match=message):
        units.parse_cpu(text)


@pytest.mark.parametrize(
    "text, nbytes",
    [
        ("100M", 100 * 10**6), ("2G", 2 * 10**9), ("1Gi", 2**30), ("512Mi", 512 * 2**20),
        ("100K", 100_000), ("100k", 100_000), ("100Ki", 102_400), ("4096", 4096), ("0", 0),
        ("1.5Gi", 3 * 2**29), ("0.5G", 500 * 10**6), ("1T", 10**12), ("2Ti", 2 * 2**40), ("1E", 10**18),
        ("100MB", 100 * 10**6), ("1GiB", 2**30), ("16 Gi", 16 * 2**30), (1024, 1024),
    ],
)
def test_parse_memory_accepts_decimal_binary_and_plain_bytes(text, nbytes):
    assert units.parse_memory(text) == nbytes


@pytest.mark.parametrize(
    "text, message",
    [
        ("-1", "must not be negative"), ("-100M", "must not be negative"), ("", "empty"),
        ("100m", "did you mean 100M"), ("1x", "invalid memory"), ("Gi", "invalid memory"),
        ("10ki", "'Ki'"), ("100Mb", "invalid memory"), ("0.5", "whole number of bytes"),
        ("1.0000001K", "whole number of bytes"), ("100 MiB extra", "invalid memory"), ("8Ei", "too large"),
    ],
)
def test_parse_memory_rejects_garbage_with_clear_message(text, message):
    with pytest.raises(ValueError, match=message):
        units.parse_memory(text)


@pytest.mark.parametrize("text, value", [("0", 0), ("8", 8), (" 12 ", 12), (3, 3)])
def test_parse_count(text, value):
    assert units.parse_count(text, "gpus") == value


@pytest.mark.parametrize("text", ["-1", "1.5", "two", "", "1e2"])
def test_parse_count_rejects_non_whole_numbers(text):
    with pytest.raises(ValueError, match="gpus"):
        units.parse_count(text, "gpus")


@pytest.mark.parametrize("millis, text", [(0, "0"), (500, "500m"), (1000, "1"), (2000, "2"), (1500, "1500m"), (1, "1m")])
def test_format_cpu(millis, text):
    assert units.format_cpu(millis) == text


@pytest.mark.parametrize(
    "nbytes, text",
    [
        (0, "0"), (2**30, "1Gi"), (100 * 10**6, "100M"), (512 * 2**20, "512Mi"), (16 * 2**30, "16Gi"),
        (2 * 10**9, "2G"), (100_000, "100K"), (1024, "1Ki"), (4096, "4Ki"), (1500, "1500"), (512, "512"),
        (123_456_789, "117.7Mi"), (2**60, "1Ei"),
    ],
)
def test_format_memory_is_short_and_exact_when_possible(nbytes, text):
    assert units.format_memory(nbytes) == text


def test_format_memory_exact_falls_back_to_bytes():
    assert units.format_memory(123_456_789, exact=True) == "123456789"


@pytest.mark.parametrize("text", ["100M", "2G", "1Gi", "512Mi", "100K", "64Ki", "1536Mi", "3G", "7"])
def test_memory_round_trips(text):
    nbytes = units.parse_memory(text)
    assert units.parse_memory(units.format_memory(nbytes)) == nbytes


@pytest.mark.parametrize("text", ["0.5", "500m", "2", "1.25", "3m"])
def test_cpu_round_trips(text):
    millis = units.parse_cpu(text)
    assert units.parse_cpu(units.format_cpu(millis)) == millis
