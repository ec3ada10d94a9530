#!/usr/bin/env bash
# The same tests under transformers 4.46.0 (the seed's pin), in their own venv (.venv-tf446 at the repo root).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$PWD/.venv-tf446" TRANSFORMERS="transformers==4.46.0" source scripts/_venv.sh
python -m pytest -q "$@"
