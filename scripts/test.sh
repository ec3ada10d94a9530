#!/usr/bin/env bash
# Create or reuse .venv at the repo root, install qwenvl-dq into it, run the tests.
# Extra arguments go to pytest (e.g. ./scripts/test.sh -k writer).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
python -m pytest -q "$@"
