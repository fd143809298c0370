#!/usr/bin/env bash
# Creates .venv with lmfleet installed (editable, with dev tools). Safe to re-run: it reinstalls
# only when pyproject.toml changed. torch comes first so the right build is chosen:
#   - a GPU (nvidia-smi lists one): the default CUDA build;
#   - no GPU: the CPU build, from a wheel the machine's pip can find offline, else PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${LMFLEET_TORCH_VERSION:-2.13.0}"
VENV="${LMFLEET_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --quiet --disable-pip-version-check)
stamp="$VENV/.lmfleet-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) torch=$TORCH_VERSION"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing torch==$TORCH_VERSION (CUDA build)"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  elif "${PIP[@]}" install --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
    echo "setup: no GPU, installed the local CPU wheel of torch==$TORCH_VERSION"
  else
    echo "setup: no GPU, installing torch==$TORCH_VERSION (CPU build)"
    "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
echo "setup: installing lmfleet and its dependencies into $VENV"
"${PIP[@]}" install -e ".[dev]"
echo "$want" > "$stamp"
