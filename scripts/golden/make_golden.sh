#!/usr/bin/env bash
# Regenerate tests/data/golden/*.json from the reference tool, msModelSlim 26.1.0 (see make_golden.py and, for the
# side venv it runs in, refpython.sh).
#
#     scripts/golden/make_golden.sh [make_golden.py options, e.g. --keep DIR]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$HERE/refpython.sh" "$HERE/make_golden.py" "$@"
