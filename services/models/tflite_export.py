"""The export process: converts a SavedModel to TensorFlow Lite.

    python -m services.models.tflite_export --saved-model DIR --output FILE --result FILE
        [--signature NAME] [--optimization none|dynamic-range|float16]

A SavedModel is tenant code (its ops read and write files), so this runs as
a replica of the tenant's, placed by the models service's export driver
(services/models/exports.py) through the runtime like a model server: the
tenant's own user, its working directory, a memory limit. It imports
TensorFlow; the service never does.

It writes the flatbuffer to --output and then, last, --result (JSON):
{"ok": true} or {"error": "<one line>"} for a model the converter refuses
(exit 0 either way: the conversion ran; a crash or a kill leaves no result,
and the driver retries). The service trusts neither file's content beyond
its size and shape: it copies the output out through O_NOFOLLOW and hashes
it itself.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

OPTIMIZATIONS = ("none", "dynamic-range", "float16")
REASON_MAX = 400


def one_line_reason(message: str) -> str:
    """The converter's (many-line, MLIR-laden) error as one line naming the
    ops it refused."""
    parts = []
    select = re.search(r"^TF Select ops: (.+)$", message, re.M)
    custom = re.search(r"^Custom ops: (.+)$", message, re.M)
    if select:
        parts.append(f"ops not supported by TensorFlow Lite's builtin ops (they need TF Select, which the "
                     f"export does not enable): {select.group(1).strip()}")
    if custom:
        parts.append(f"ops TensorFlow Lite does not have (custom ops): {custom.group(1).strip()}")
    if not parts:
        ops = sorted(set(re.findall(r"'tf\.([A-Za-z0-9_]+)' op", message)))
        if ops:
            parts.append(f"unsupported ops: {', '.join(ops)}")
    if not parts:
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        parts.append(lines[0] if lines else "the converter gave no reason")
    reason = "TensorFlow Lite conversion failed: " + "; ".join(parts)
    return reason if len(reason) <= REASON_MAX else reason[:REASON_MAX - 3] + "..."


def convert(saved_model: str, signature: str, optimization: str) -> bytes:
    import tensorflow as tf  # noqa: PLC0415

    # One signature: without keys the converter takes every signature (TF1 exports
    # carry classify/regress ones on tf.Example parsing, which TFLite lacks).
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model,
                                                         signature_keys=[signature or "serving_default"])
    if optimization in ("dynamic-range", "float16"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if optimization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.models.tflite_export")
    parser.add_argument("--saved-model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--signature", default="")
    parser.add_argument("--optimization", choices=OPTIMIZATIONS, default="none")
    args = parser.parse_args(argv)
    try:
        flatbuffer = convert(args.saved_model, args.signature, args.optimization)
    except Exception as err:  # noqa: BLE001 - the converter's refusal is the export's answer
        name = type(err).__name__
        if name in ("ConverterError", "ValueError", "KeyError", "OSError", "NotFoundError", "InvalidArgumentError"):
            reason = one_line_reason(str(err)) if name == "ConverterError" else \
                f"TensorFlow Lite conversion failed: {name}: {' '.join(str(err).split())[:300]}"
            _write(args.result, json.dumps({"error": reason}).encode())
            print(reason, file=sys.stderr)
            return 0
        raise
    _write(args.output, flatbuffer)
    _write(args.result, json.dumps({"ok": True, "size_bytes": len(flatbuffer)}).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
