"""`python -m faulty_trainer.sleep --seconds 600`: sleeps, printing a heartbeat
every --every seconds (for timeouts and cancels), then exits 0."""
import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="faulty_trainer.sleep")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--every", type=float, default=10.0, help="heartbeat interval")
    args = parser.parse_args(argv)
    print(f"faulty_trainer.sleep: sleeping {args.seconds}s", flush=True)
    deadline = time.monotonic() + args.seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, args.every))
        print(f"faulty_trainer.sleep: {max(0.0, deadline - time.monotonic()):.0f}s left", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
