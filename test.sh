#!/usr/bin/env bash
# The test command: set up .venv if needed, then lint, type-check and run the tests on CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/bootstrap.sh
py=.venv/bin/python
echo "== ruff check"; "$py" -m ruff check .
echo "== ruff format --check"; "$py" -m ruff format --check .
echo "== mypy"; "$py" -m mypy
echo "== pytest"; "$py" -m pytest "$@"
