"""`python -m faulty_trainer.hog_memory --mb 500 [--step-mb 10] [--hold 60]`:
allocates --mb MiB in --step-mb chunks, touching every page so the memory is
resident (RSS), then holds it for --hold seconds and exits 0. Under a memory
limit smaller than --mb it is killed on the way (the job says OOMKilled)."""
import argparse
import sys
import time

PAGE = 4096


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="faulty_trainer.hog_memory")
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--step-mb", "--step_mb", type=int, default=10)
    parser.add_argument("--step-sleep", "--step_sleep", type=float, default=0.02,
                        help="seconds between chunks, so a monitor sampling RSS sees the growth")
    parser.add_argument("--hold", type=float, default=60.0)
    args = parser.parse_args(argv)
    chunks = []
    allocated = 0
    while allocated < args.mb:
        size = min(args.step_mb, args.mb - allocated) << 20
        chunk = bytearray(size)
        for offset in range(0, size, PAGE):  # touch each page: resident, not just reserved
            chunk[offset] = 1
        chunks.append(chunk)
        allocated += size >> 20
        print(f"faulty_trainer.hog_memory: {allocated} MiB resident", flush=True)
        time.sleep(args.step_sleep)
    print(f"faulty_trainer.hog_memory: holding {allocated} MiB for {args.hold}s", flush=True)
    time.sleep(args.hold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
