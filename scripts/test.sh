#!/usr/bin/env bash
# Sets up (idempotent) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PYTHONUNBUFFERED=1
set +e
# Two workers (CLOUDML_TEST_WORKERS): most tests wait on processes, etcd and
# sockets rather than the CPU, so two files at a time finish the suite in
# about two thirds of the time on two cores. A file's tests stay together on
# one worker (--dist loadfile): module fixtures (an etcd, a platform) start once.
workers="${CLOUDML_TEST_WORKERS:-2}"
parallel=()
if [ "$workers" != 0 ]; then
  parallel=(-n "$workers" --dist loadfile)
fi
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "${parallel[@]}" "$@" tests
status=$?
set -e
if [ "$status" = 5 ]; then
  echo "no tests were collected" >&2
  exit 1
fi
exit "$status"
