#!/usr/bin/env python3
"""Models for devices (issue 16): TensorFlow Lite exports of the MLP
(bench_serving.py's 256 -> 3 x 1000 -> 10), side by side in one script, on
a real stack started for the run (its own etcd, auth, the models service
with the local runtime, a gateway).

Per optimization (none, dynamic-range, float16), `--rounds` times each:

- export time: ExportVersion sent -> the export SUCCEEDED, polled every
  50 ms through the gateway (the export process, run as the tenant through
  the runtime, imports TensorFlow and converts; a new version per round so
  each export really runs);
- the artifact's size, beside the SavedModel's (its files' total);
- the largest |TFLite - SavedModel| over 64 random examples.

Then single-example latency, in this process, interleaved over `--rounds`
rounds of `--calls` calls each: the SavedModel's serving_default (a
concrete function, eager call) against the TFLite interpreter of each
export (set_tensor, invoke, get_tensor on an interpreter made once; the
default XNNPACK delegate, `--threads` threads), p50 and p99. TensorFlow
runs the SavedModel with its own thread pools (`--tf-threads N` pins both
to N, for a one-thread comparison).

    .venv/bin/python bench/bench_devices.py [--rounds 3] [--calls 2000] [--threads 1] [--tf-threads N] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import warnings  # noqa: E402

import numpy as np  # noqa: E402

warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")

OPTIMIZATIONS = ("none", "dynamic-range", "float16")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def export_round(models, name: str, version: int, optimization: str) -> float:
    started = time.monotonic()
    export = models.export(name, version, optimize=optimization)
    while export.state not in ("SUCCEEDED", "FAILED"):
        time.sleep(0.05)
        export = models.get_export(name, version, export.id)
    if export.state == "FAILED":
        raise SystemExit(f"export {optimization} FAILED: {export.message}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000, help="single-example calls per target per round")
    parser.add_argument("--threads", type=int, default=1, help="TFLite interpreter threads")
    parser.add_argument("--tf-threads", type=int, default=0,
                        help="TensorFlow's intra- and inter-op threads for the SavedModel (0: its default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import tensorflow as tf

    if args.tf_threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.tf_threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.tf_threads)

    import cloudml
    from bench.bench_serving import build_mlp
    from deploy.local.stack import Stack

    results: dict = {"rounds": args.rounds, "calls": args.calls, "threads": args.threads,
                     "tf_threads": args.tf_threads or "default"}
    with tempfile.TemporaryDirectory(prefix="bench-devices-") as d:
        saved_model = build_mlp(d)
        results["saved_model_bytes"] = tree_bytes(saved_model)
        stack = Stack(os.path.join(d, "stack"), flags=["--log-level", "WARNING"])
        try:
            stack.start("models", "gateway")
            key, secret = stack.create_tenant("bench")
            with cloudml.Client(stack.gateway.address, key, secret) as client:
                models = client.models
                times: dict[str, list[float]] = {o: [] for o in OPTIMIZATIONS}
                for r in range(args.rounds):
                    version = r + 1
                    models.create("mlp", saved_model, version=version, cpu="500m", memory="2Gi", wait=True,
                                  timeout=300)
                    for optimization in OPTIMIZATIONS[r % 3:] + OPTIMIZATIONS[:r % 3]:
                        times[optimization].append(export_round(models, "mlp", version, optimization))
                    if r < args.rounds - 1:
                        models.delete_version("mlp", version)
                files = {}
                for optimization in OPTIMIZATIONS:
                    export = models.get_export("mlp", args.rounds, "tflite" if optimization == "none"
                                               else f"tflite-{optimization}")
                    target = os.path.join(d, f"tflite-{optimization}")
                    models.download("mlp", target, version=args.rounds, artifact=export.id)
                    files[optimization] = os.path.join(target, "model.tflite")
                    results.setdefault("exports", {})[optimization] = {
                        "export_s_median": round(statistics.median(times[optimization]), 2),
                        "export_s": [round(t, 2) for t in times[optimization]],
                        "artifact_bytes": export.size_bytes,
                        "vs_saved_model": round(export.size_bytes / results["saved_model_bytes"], 3),
                    }
        finally:
            stack.stop()

        fn = tf.saved_model.load(saved_model).signatures["serving_default"]
        rng = np.random.default_rng(1)
        batch = rng.normal(0, 1, (64, 256)).astype("float32")
        reference = fn(x=tf.constant(batch))["y"].numpy()
        interpreters = {}
        for optimization, path in files.items():
            interpreter = tf.lite.Interpreter(model_path=path, num_threads=args.threads)
            runner = interpreter.get_signature_runner("serving_default")
            got = np.concatenate([runner(x=row[None, :])["y"] for row in batch])
            results["exports"][optimization]["max_abs_diff"] = float(np.max(np.abs(got - reference)))
            results["exports"][optimization]["max_abs_output"] = float(np.max(np.abs(reference)))
            # A fresh interpreter for the timing (the signature runner holds views of this one's tensors).
            interpreters[optimization] = tf.lite.Interpreter(model_path=path, num_threads=args.threads)
            interpreters[optimization].allocate_tensors()

        example = batch[:1]
        tensor = tf.constant(example)
        latencies: dict[str, list[float]] = {"saved_model": [], **{o: [] for o in OPTIMIZATIONS}}

        def saved_model_call():
            fn(x=tensor)

        def tflite_call(interpreter):
            inp = interpreter.get_input_details()[0]["index"]
            out = interpreter.get_output_details()[0]["index"]

            def call():
                interpreter.set_tensor(inp, example)
                interpreter.invoke()
                interpreter.get_tensor(out)
            return call

        calls = {"saved_model": saved_model_call, **{o: tflite_call(i) for o, i in interpreters.items()}}
        for call in calls.values():  # warm up
            for _ in range(50):
                call()
        order = list(calls)
        for r in range(args.rounds):
            for target in order[r % len(order):] + order[:r % len(order)]:
                call = calls[target]
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    call()
                    latencies[target].append(time.perf_counter() - t0)
        results["latency_us"] = {t: {"p50": round(pct(v, 0.5) * 1e6, 1), "p99": round(pct(v, 0.99) * 1e6, 1)}
                                 for t, v in latencies.items()}
        base = results["latency_us"]["saved_model"]["p50"]
        for optimization in OPTIMIZATIONS:
            results["latency_us"][optimization]["vs_saved_model_p50"] = round(
                results["latency_us"][optimization]["p50"] / base, 3)
    results["load_average"] = os.getloadavg()

    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"MLP 256->3x1000->10: SavedModel {results['saved_model_bytes']:,} bytes; "
          f"{args.rounds} rounds; load average {results['load_average'][0]:.1f}")
    largest = max(e["max_abs_output"] for e in results["exports"].values())
    print(f"{'optimization':<14} {'export s (median; all)':<30} {'artifact bytes':>15} {'x SavedModel':>13} "
          f"{'max |diff|':>11}   (outputs up to |y| = {largest:.3g})")
    for optimization, e in results["exports"].items():
        print(f"{optimization:<14} {e['export_s_median']:<6} {str(e['export_s']):<23} {e['artifact_bytes']:>15,} "
              f"{e['vs_saved_model']:>13} {e['max_abs_diff']:>11.2e}")
    print(f"single example, in process ({args.calls} calls x {args.rounds} rounds each, TFLite threads "
          f"{args.threads}, TensorFlow threads {results['tf_threads']}):")
    for target, figures in results["latency_us"].items():
        ratio = f"  x{figures['vs_saved_model_p50']}" if "vs_saved_model_p50" in figures else ""
        print(f"  {target:<14} p50 {figures['p50']:>8.1f} us  p99 {figures['p99']:>8.1f} us{ratio}")


if __name__ == "__main__":
    main()
