"""`python -m faulty_trainer.flaky --fail-times 2 [--code 1]`: fails (exit
--code) on attempts 1..N, as numbered by $CLOUDML_ATTEMPT (1-based; 1 when
unset), and succeeds from attempt N+1 on."""
import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="faulty_trainer.flaky")
    parser.add_argument("--fail-times", "--fail_times", type=int, default=2)
    parser.add_argument("--code", type=int, default=1)
    args = parser.parse_args(argv)
    attempt = int(os.environ.get("CLOUDML_ATTEMPT") or 1)
    if attempt <= args.fail_times:
        print(f"faulty_trainer.flaky: attempt {attempt} of {args.fail_times} failing ones: exit {args.code}", flush=True)
        return args.code
    print(f"faulty_trainer.flaky: attempt {attempt} succeeds", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
