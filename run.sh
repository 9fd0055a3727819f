#!/usr/bin/env bash
# The main job: set up .venv if needed, then the demo label campaign (tools/demo_campaign.py):
# two rounds of segmentation active learning with mmseg's UNet on the bundled synthetic
# medical images, a simulated annotator answering the queries in between; it ends with the
# report's path. `bash run.sh --simulate [options]` runs tools/simulate.py instead (the
# digits simulation by default; see `bash run.sh --simulate --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/bootstrap.sh
if [[ "${1:-}" == "--simulate" ]]; then
    shift
    exec .venv/bin/python tools/simulate.py "$@"
fi
exec .venv/bin/python tools/demo_campaign.py "$@"
