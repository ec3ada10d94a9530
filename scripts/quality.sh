#!/usr/bin/env bash
# The quality table of docs/QUALITY.md: none / m2 / m4 on the tiny outlier model, ours and msModelSlim's.
#     scripts/quality.sh [--out DIR] [--no_reference] [--calib30]
# msModelSlim runs in its own side venv (REFVENV, default /work/refvenv; created on first use by
# scripts/golden/refpython.sh); pass --no_reference to skip it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
python scripts/quality.py "$@"
