#!/usr/bin/env bash
# The main job: set up .venv if needed, then simulate active learning on the bundled
# digits with every default strategy against random. Extra arguments go to
# tools/simulate.py (see `bash run.sh --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/bootstrap.sh
exec .venv/bin/python tools/simulate.py "$@"
