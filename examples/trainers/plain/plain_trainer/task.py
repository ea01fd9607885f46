"""A framework-neutral trainer: plain Python, no TensorFlow.

    python -m plain_trainer.task --x1 3.14159 --x2 2.275 [--steps 10] [--sleep 0.1]

"Trains" for --steps steps and reports `objective` at each one with
`cloudml.report(step=i, objective=...)`: a curve that decreases towards the
Branin function's value at (x1, x2), reached at the last step. At every step
the curve preserves the final ranking between parameter choices (it is the
final value times 1 + (steps-1-i)/steps), so early-stopping rules in the tuner
can be tested with it. The tuner minimizes `objective`; Branin's global minimum
is 0.397887 at (-pi, 12.275), (pi, 2.275) and (9.42478, 2.475), over the usual
domain x1 in [-5, 10], x2 in [0, 15].

Prints each step and, at the end, a JSON line {"x1", "x2", "objective"}.
"""
from __future__ import annotations

import argparse
import os
import json
import math
import sys
import time

try:
    from cloudml import report
except ImportError:  # outside a Cloud-ML environment

    def report(step, **metrics):
        pass


def branin(x1: float, x2: float) -> float:
    a, b, c = 1.0, 5.1 / (4 * math.pi**2), 5.0 / math.pi
    r, s, t = 6.0, 10.0, 1.0 / (8 * math.pi)
    return a * (x2 - b * x1**2 + c * x1 - r) ** 2 + s * (1 - t) * math.cos(x1) + s


def curve(final: float, step: int, steps: int) -> float:
    """Decreasing in `step`, equal to `final` at the last step."""
    return final * (1.0 + (steps - 1 - step) / steps)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="plain_trainer.task", description=__doc__.split("\n\n")[0])
    parser.add_argument("--x1", type=float, required=True)
    parser.add_argument("--x2", type=float, required=True)
    parser.add_argument("--steps", type=int, default=1, help="reports before the final value (default 1)")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step")
    parser.add_argument("--output_path", default=os.environ.get("CLOUDML_OUTPUT_PATH", ""),
                        help="where a trial may write (the tuner passes one; this trainer writes nothing)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.sleep < 0:
        parser.error("--steps must be >= 1 and --sleep >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    final = branin(args.x1, args.x2)
    for step in range(args.steps):
        if args.sleep:
            time.sleep(args.sleep)
        value = curve(final, step, args.steps)
        report(step=step, objective=value)
        print(f"Step: {step}, objective: {value}", flush=True)
    print(json.dumps({"x1": args.x1, "x2": args.x2, "objective": final}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
