#!/usr/bin/env bash
# Create a virtual environment from this repository's own files and run the whole test suite.
#
#   bash scripts/test.sh            # all tests
#   bash scripts/test.sh -k saliency  # extra arguments go to pytest
#
# VENV (default .venv) picks the environment folder; TORCH_SPEC (default torch==2.13.0, a CPU
# build) is installed first so that the package's torch range does not pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/setup_venv.sh
setup_venv dev

status=0
"$VENV/bin/python" -m pytest tests -q -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests; treating that as a failure" >&2
  exit 1
fi
exit "$status"
