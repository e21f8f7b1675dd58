#!/usr/bin/env bash
# Set up a virtual environment with uad-bench and its development tools.
#
#   bash install.sh            # creates .venv (or $UAD_BENCH_VENV) and installs the suite into it
#
# PyTorch comes first, so that pip never pulls a build the machine cannot use: on a machine
# without an NVIDIA driver the CPU build (PyTorch's CPU index, a few hundred MB instead of
# several GB of CUDA libraries); with one, the default (CUDA) build. A torch already in the
# environment is kept.
set -euo pipefail
cd "$(dirname "$0")"
venv="${UAD_BENCH_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
. "$venv/bin/activate"
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install --quiet torch
  else
    echo "no NVIDIA driver found: installing the CPU build of PyTorch" >&2
    python -m pip install --quiet --timeout 20 --retries 1 torch --index-url https://download.pytorch.org/whl/cpu \
      || { echo "PyTorch's CPU index is unreachable: installing torch from the default index" >&2; python -m pip install --quiet torch; }
  fi
fi
python -m pip install --quiet -e ".[dev]"
echo "uad-bench installed in $venv; activate it with: . $venv/bin/activate" >&2
