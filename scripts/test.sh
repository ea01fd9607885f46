#!/usr/bin/env bash
# Sets up (idempotent) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PYTHONUNBUFFERED=1
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@" tests
status=$?
set -e
if [ "$status" = 5 ]; then
  echo "no tests were collected" >&2
  exit 1
fi
exit "$status"
