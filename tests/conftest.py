"""Shared fixtures for the DPA test suite.

Run the whole suite from the repository root with:

    python -m pytest tests/ -q

The tests never touch the network: the hub is switched to offline mode before anything imports transformers, and the
only model used is a randomly initialised tiny Llama (2 layers, hidden 64) that shares the SmolLM2 tokenizer.
"""
import os
import shutil
import subprocess
import sys
import tempfile
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


# ----------------------------------------------------------------------------- the SMOKE run beside the other tests
# test_smoke.py runs `SMOKE=1 bash run_all.sh`: a dozen stage processes, about half the suite's time, most of it
# single-threaded interpreter start-up. When more tests than it are selected, it starts in the background before the
# first test and test_smoke_run_all checks its result; the stages and this process then take one thread each, so the
# two share the 2 cores instead of fighting over them.
SMOKE_TEST = "test_smoke.py::test_smoke_run_all"
_smoke = {}


def start_smoke():
    """Start the SMOKE run once (OUT in a temp folder, stdout and stderr in OUT/log.txt) → its record."""
    if "proc" not in _smoke:
        _smollm2_dir(REPO_ROOT)  # the converted embedded model, before two processes could both convert it
        out = Path(tempfile.mkdtemp(prefix="dpa-smoke-"))
        env = dict(os.environ, SMOKE="1", OUT=str(out / "demo"), PY=sys.executable, HF_HUB_OFFLINE="1",
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        log = open(out / "log.txt", "w+", encoding="utf-8")
        _smoke.update(out=out, log=log, proc=subprocess.Popen(["bash", "run_all.sh"], cwd=REPO_ROOT, env=env,
                                                              stdout=log, stderr=subprocess.STDOUT))
    return _smoke


def pytest_collection_modifyitems(config, items):
    if len(items) > 1 and any(item.nodeid.endswith(SMOKE_TEST) for item in items):
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the stage processes that tests start
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        start_smoke()


def pytest_sessionfinish(session):
    if "proc" in _smoke:
        if _smoke["proc"].poll() is None:  # the session stopped early (-x, Ctrl-C): stop the run too
            _smoke["proc"].kill()
            _smoke["proc"].wait()
        _smoke["log"].close()
        shutil.rmtree(_smoke["out"], ignore_errors=True)


@pytest.fixture
def smoke_run():
    """The finished SMOKE run (started before the first test, or now when it is the only test) → (returncode, its
    output, the OUT folder of SMOKE: OUT/smoke)."""
    run = start_smoke()
    code = run["proc"].wait(timeout=1500)
    run["log"].seek(0)
    return code, run["log"].read(), run["out"] / "smoke"
