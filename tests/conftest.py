"""Shared fixtures for the DPA test suite.

Run the whole suite from the repository root with:

    python -m pytest tests/ -q

The tests never touch the network: the hub is switched to offline mode before anything imports transformers, and the
only model used is a randomly initialised tiny Llama (2 layers, hidden 64) that shares the SmolLM2 tokenizer.
"""
import os
import subprocess
import sys
from pathlib import Path

# Offline before transformers / huggingface_hub are imported anywhere (they read these at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

SMOLLM2_DIR = REPO_ROOT / ".cache" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def repo_root():
    """The repository root (where the stage scripts live)."""
    return REPO_ROOT


def _smollm2_dir(repo_root):
    """The converted embedded model folder; converted once with prepare.py when it is missing."""
    folder = repo_root / ".cache" / "SmolLM2-135M-Instruct"
    if not (folder / "config.json").exists():
        subprocess.run([sys.executable, "-m", "tools.prepare"], cwd=repo_root, check=True, timeout=600)
    return folder


@pytest.fixture(scope="session")
def smollm2_dir(repo_root):
    return _smollm2_dir(repo_root)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    """The SmolLM2-135M-Instruct tokenizer (chat template, <|im_end|> = eos = pad = id 2)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def tiny_config(vocab_size, **overrides):
    """The tiny Llama config every model-level test uses."""
    from transformers import LlamaConfig
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=vocab_size, tie_word_embeddings=True, pad_token_id=2,
              eos_token_id=2, bos_token_id=1)
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A randomly initialised tiny LlamaForCausalLM + the SmolLM2 tokenizer, saved with save_pretrained.
    Any stage's --model / --backbone / --init flag accepts this folder."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(len(tokenizer)))
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="session")
def make_tiny_config():
    """tiny_config as a fixture: make_tiny_config(vocab_size, **overrides) → LlamaConfig."""
    return tiny_config
