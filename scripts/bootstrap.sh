#!/usr/bin/env bash
# Creates (or checks) the project's virtual environment in .venv.
#
# Idempotent: when .venv exists and was built from the same requirements, it returns in
# about a second. The mmcv 2.1.0 wheel (built from PyPI's source with its ops, C++ flag
# patched for torch 2.14) is cached in ${TASKAL_CACHE:-~/.cache/taskal}/wheels, so only the
# first set-up on a machine pays the ~12 minute compile.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${TASKAL_VENV:-$root/.venv}"
cache="${TASKAL_CACHE:-${HOME:-/tmp}/.cache/taskal}"
python_bin="${PYTHON:-python3}"

TORCH=2.14.1
TORCHVISION=0.29.1
MMCV=2.1.0
MMENGINE=0.10.7
MMDET=3.3.0
MMSEG=1.2.2

# The stamp changes whenever this script or the project's dependencies change.
stamp_src=$(cat "$root/scripts/bootstrap.sh" "$root/pyproject.toml" | sha256sum | cut -c1-16)
stamp_file="$venv/.taskal-stamp"
if [[ -x "$venv/bin/python" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_src" ]]; then
  exit 0
fi

log() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }

# Preflight: fail early, naming what to install, rather than deep inside a build.
command -v "$python_bin" >/dev/null || die "$python_bin not found; install Python 3.11 (or set PYTHON=...)"
"$python_bin" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
  die "Python 3.11 is needed (torch 2.14.1 wheels on this disk are cp311); set PYTHON=python3.11"
"$python_bin" -c 'import venv, ensurepip' 2>/dev/null ||
  die "the venv module is missing; apt-get install python3-venv"
command -v g++ >/dev/null || die "g++ not found (mmcv's ops are compiled); apt-get install g++"

if [[ ! -x "$venv/bin/python" ]]; then
  log "creating virtual environment in $venv"
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip "setuptools<81" wheel

log "torch $TORCH + torchvision $TORCHVISION"
"${pip[@]}" install "torch==$TORCH" "torchvision==$TORCHVISION"

log "mmengine and the scientific stack"
"${pip[@]}" install "mmengine==$MMENGINE" "numpy>=2" scikit-learn scikit-image nibabel matplotlib \
  pycocotools ftfy regex tqdm scipy shapely terminaltables prettytable \
  pytest hypothesis ruff mypy

pyver=$("$venv/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
arch=$(uname -m)
# CPU ops by default (CI has no GPU); TASKAL_MMCV_CUDA=1 builds the CUDA ops too (needs nvcc).
flavour=cpu
[[ "${TASKAL_MMCV_CUDA:-0}" == 1 ]] && flavour=cuda
wheel_dir="$cache/wheels/mmcv-$MMCV-torch$TORCH-$pyver-$arch-$flavour"
if ! ls "$wheel_dir"/mmcv-*.whl >/dev/null 2>&1; then
  log "building mmcv $MMCV with ops from source (first time on this machine: ~12 min on 2 cores)"
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  "${pip[@]}" download --no-deps --no-binary :all: --no-build-isolation -d "$build" "mmcv==$MMCV"
  tar -xzf "$build"/mmcv-$MMCV.tar.gz -C "$build"
  src="$build/mmcv-$MMCV"
  # torch >= 2.13 headers need C++20; mmcv 2.1.0's setup.py asks for C++17.
  sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
  mkdir -p "$wheel_dir.partial"
  if [[ $flavour == cpu ]]; then
    build_env=(CUDA_VISIBLE_DEVICES= FORCE_CUDA=0)
  else
    build_env=(FORCE_CUDA=1)
  fi
  env "${build_env[@]}" MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "${pip[@]}" wheel --no-build-isolation --no-deps -w "$wheel_dir.partial" "$src"
  rm -rf "$wheel_dir" && mv "$wheel_dir.partial" "$wheel_dir"
fi
log "installing mmcv from $wheel_dir"
"${pip[@]}" install --no-deps "$wheel_dir"/mmcv-*.whl
"${pip[@]}" install addict yapf opencv-python-headless

log "mmdet $MMDET + mmsegmentation $MMSEG"
"${pip[@]}" install "mmdet==$MMDET" "mmsegmentation==$MMSEG"

log "taskal (editable)"
"${pip[@]}" install --no-deps --no-build-isolation -e "$root"

"$venv/bin/python" -c 'import mmcv.ops, mmdet, mmseg, torch, taskal; print("[bootstrap] ok: torch", torch.__version__, "mmcv", mmcv.__version__)'
echo "$stamp_src" > "$stamp_file"
