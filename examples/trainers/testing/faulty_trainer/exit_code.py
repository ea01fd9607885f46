"""`python -m faulty_trainer.exit_code --code N`: prints a line and exits with N."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="faulty_trainer.exit_code")
    parser.add_argument("--code", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"faulty_trainer.exit_code: exiting with code {args.code}", flush=True)
    return args.code


if __name__ == "__main__":
    sys.exit(main())
