"""--engine vllm against --engine hf (runtime/engines.py) on the embedded SmolLM2-135M-Instruct, in float32 on CPU:
the same records (ids, fields, prompts, seeds) from sample.py, greedy answers that agree on their first tokens,
--shard jobs that merge into the bytes of the unsharded run, and steer.py end to end as a command.

The vLLM tests need vLLM, which lives in its own environment (it pins its own transformers):
    bash setup.sh --vllm
    .venv-vllm/bin/python -m pytest tests/test_engines.py -q
Without it they are skipped, and only the one-line missing-vLLM error is tested.
"""
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import sample
from runtime import engines

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed here (bash setup.sh --vllm, then "
                                                     ".venv-vllm/bin/python -m pytest tests/test_engines.py)")
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache on CPU: plenty for a 135M model and short answers
GREEDY = ("--temperature", "1e-4")  # logits / 1e-4: the argmax token, in both engines (HF cannot sample at 0)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed: the missing-vLLM error cannot happen here")
def test_missing_vllm_is_one_line_naming_the_install(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hi"}\n')
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompts", str(prompts), "--out", str(tmp_path / "s.jsonl"), "--model", tiny_model_dir,
                     "--engine", "vllm", "--device", "cpu"])
    msg = str(e.value.code)
    assert "bash setup.sh --vllm" in msg and "\n" not in msg
    assert not (tmp_path / "s.jsonl").exists()


@pytest.fixture(scope="module")
def vllm_policy(smollm2_dir):
    """One vLLM engine for the in-process sample.py runs (engine core in this process: one start-up, not one per
    run)."""
    saved = {k: os.environ.get(k) for k in [*VLLM_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING"]}
    os.environ.update(VLLM_ENV, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    try:
        yield engines.VLLMPolicy(str(smollm2_dir), torch.float32, seed=0)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture
def run_sample(tmp_path, smollm2_dir, monkeypatch, vllm_policy):
    """sample.main in this process on 4 prompts × 2 hints × 2 answers (batches of 3); --engine vllm gets the
    module's engine. → run(out name, engine, *more flags) → the path written."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(
        ["How do I boil an egg?", "Why is the sky blue?", "Name three prime numbers.", "What is a haiku?"])))
    real = sample.load_policy
    monkeypatch.setattr(sample, "load_policy",
                        lambda engine, *a: vllm_policy if engine == "vllm" else real(engine, *a))

    def run(out, engine, *extra):
        sample.main([str(a) for a in ("--prompts", prompts, "--out", tmp_path / out, "--model", smollm2_dir,
                                      "--engine", engine, "--n", 2, "--hints", "plain,brief", "--batch-size", 3,
                                      "--max-new-tokens", 16, "--device", "cpu", "--dtype", "float32",
                                      "--seed", 3, *extra)])
        return tmp_path / out
    return run


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_vllm
def test_vllm_writes_the_records_hf_writes_and_greedy_answers_agree(run_sample, tokenizer):
    run = run_sample  # run(out, engine, *flags)
    hf, vl = records(run("hf.jsonl", "hf", *GREEDY)), records(run("vllm.jsonl", "vllm", *GREEDY))
    answer = {"response", "n_tokens", "truncated"}
    assert len(hf) == len(vl) == 16
    assert [{k: v for k, v in r.items() if k not in answer} for r in hf] == \
           [{k: v for k, v in r.items() if k not in answer} for r in vl]  # ids, prompts, θ, hints, seeds, gen
    assert [list(r) for r in hf] == [list(r) for r in vl]  # the same fields in the same order
    first = 8
    agree = 0
    for h, v in zip(hf, vl):
        a, b = (tokenizer(r["response"], add_special_tokens=False)["input_ids"][:first] for r in (h, v))
        agree += a == b
        assert a[:2] == b[:2], (h["id"], h["response"], v["response"])
    assert agree >= 0.75 * len(hf), f"only {agree}/{len(hf)} greedy answers agree on their first {first} tokens"
    assert all(r["n_tokens"] <= 16 and r["truncated"] == (r["n_tokens"] == 16) for r in vl)


@needs_vllm
def test_vllm_shards_merge_into_the_unsharded_run(run_sample):
    """Sampled at temperature 0.8: every request has its own seed from its batch's, so which job (and which other
    requests) ran a batch does not change its answers."""
    run = run_sample
    whole = run("whole.jsonl", "vllm").read_bytes()
    for i in range(2):
        run("parts.jsonl", "vllm", "--shard", f"{i}/2")
    merged = run("parts.jsonl", "vllm", "--merge", 2).read_bytes()
    assert merged == whole
    texts = [r["response"] for r in records(run("again.jsonl", "vllm", "--seed", 4))]
    assert texts != [json.loads(line)["response"] for line in whole.decode().splitlines()]  # the seed matters


@needs_vllm
def test_steer_with_vllm_as_a_command(repo_root, smollm2_dir):
    """The real entry point: the engine core runs in a process of its own (spawned: needs the __main__ guard)."""
    out = subprocess.run([sys.executable, "steer.py", "--engine", "vllm", "--model", str(smollm2_dir), "--degree",
                          "-15", "--max-new-tokens", "8", "How do I boil an egg?"], cwd=repo_root,
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, **VLLM_ENV, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[assistant θ=-15°]" in out.stdout


def test_shrinking_batch_decoding_equals_generate(tiny_model_dir, tokenizer, monkeypatch):
    """sample_shrinking drops rows from the batch and the KV cache as they end: with the draw replaced by argmax it
    must give transformers' greedy `generate` token for token, for left-padded prompts of different lengths and rows
    that end at different steps."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    texts = ["Why is the sky blue during the day and red at dusk?", "Hi", "How do I boil an egg?", "Name a prime."]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    n_prompt = enc["input_ids"].shape[1]

    def greedy(eos):
        out = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=eos)
        rows = []
        for row in out[:, n_prompt:].tolist():
            rows.append((row[:row.index(eos)], True) if eos in row else (row, False))
        return rows

    free = greedy(tokenizer.eos_token_id)
    eos = free[0][0][3]  # a token row 0 writes at step 4: with it as the end token, rows end at different steps
    expected = greedy(eos)
    assert any(ended for _, ended in expected) and not all(ended for _, ended in expected)
    monkeypatch.setattr(torch, "multinomial", lambda probs, n: probs.argmax(-1, keepdim=True))
    gen = types.SimpleNamespace(temperature=1.0, top_p=1.0, max_new_tokens=12)
    assert engines.sample_shrinking(model, enc["input_ids"], enc["attention_mask"], gen, eos) == expected


def test_top_p_filter_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept = engines.top_p_filter(logits, 0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert engines.top_p_filter(logits, 0.4).isfinite().sum(-1).tolist() == [1, 1]  # the top token always stays
    assert engines.top_p_filter(logits, 0.9).isfinite().sum(-1).tolist() == [3, 3]
    assert torch.equal(engines.top_p_filter(logits, 1.0), logits)
