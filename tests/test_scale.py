"""The paper-scale options on CPU, each against the existing path: LoRA (trained, then merged into a plain folder),
gradient checkpointing, chat templates without a system role, and the BOS of the released DPA RM's template.

    python -m pytest tests/test_scale.py -q      # tiny random Llama, a few steps per run
"""
import argparse
import importlib
import json
import os

import pytest
import torch

from common import ATTRIBUTES, HELPFULNESS, VERBOSITY
from runtime import lora

CPU = ("--device", "cpu", "--dtype", "float32")


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def one_process(stage, *args):
    """A stage's main(argv) in this process, on 1 thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        importlib.import_module(stage).main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def log_of(folder):
    return json.loads((folder / "meta.json").read_text())["log"]


def weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """3 prompts × 3 scored answers (a short helpful one, a long one, a weak one)."""
    recs = []
    for p in "ABC":
        for k, (h, v, text) in enumerate([(80, 10, "Short."), (70, 90, "A longer answer with many more words. " * 2),
                                          (40, 40, "Meh.")]):
            r = dict.fromkeys(ATTRIBUTES, 50.0)
            r[HELPFULNESS], r[VERBOSITY] = float(h), float(v)
            recs.append({"id": f"{p}{k}", "prompt_id": p, "prompt": f"Question {p}?", "degree": 10.0,
                         "response": text, "truncated": False, "rewards": r})
    return write_lines(tmp_path_factory.mktemp("scale") / "scored.jsonl", recs)


@pytest.fixture(scope="module")
def rm_data(tmp_path_factory):
    rows = [{"prompt_id": f"q{i // 2}", "prompt": f"Question {i // 2}?", "response": "word " * (1 + i % 5) + str(i),
             "labels": {HELPFULNESS: 10 * (i % 9), VERBOSITY: 7 * (i % 11)}} for i in range(12)]
    return write_lines(tmp_path_factory.mktemp("scale") / "rm.jsonl", rows)


def sft(scored, init, out, *extra):
    one_process("finetune", "--scored", scored, "--loss", "sft", "--select", "hindsight", "--batch-size", 2,
                "--max-steps", 3, "--warmup", 0, "--lr", 1e-3, "--init", init, *CPU, "--out", out, *extra)
    return log_of(out)


def rm(data, init, out, *extra):
    one_process("train_rm", "--data", data, "--backbone", init, "--batch-size", 4, "--max-steps", 3, "--warmup", 0,
                "--lr", 1e-3, "--val-frac", 0.2, *CPU, "--out", out, *extra)
    return log_of(out)


# ----------------------------------------------------------------------------- LoRA and gradient checkpointing
def lora_args(*argv):
    p = argparse.ArgumentParser()
    lora.add_flags(p)
    return p.parse_args([str(a) for a in argv])


def test_merged_lora_folder_gives_the_peft_models_logits(tiny_model_dir, tmp_path):
    """Adapters with non-zero B (as after training), merged and saved: from_pretrained of the folder is a plain
    LlamaForCausalLM with the peft model's logits, and they differ from the base model's (the check can fail)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(3, 1000, (2, 12))
    base = model(input_ids=ids).logits
    merge = lora.prepare(model, lora_args("--lora", 4, "--lora-alpha", 8))
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)  # only the adapters train
    assert len(trainable) == 2 * 7 * 2  # A and B of 7 linear maps in each of the 2 layers
    with torch.no_grad():
        for n, q in model.named_parameters():
            if ".lora_B." in n:
                q.normal_(0, 0.05)
    model.eval()
    adapted = model(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-2
    merged = merge()
    assert merged is model and not [k for k in merged.state_dict() if "lora" in k or "base_layer" in k]
    merged.save_pretrained(tmp_path / "merged")
    assert sorted(os.listdir(tmp_path / "merged")) == ["config.json", "generation_config.json", "model.safetensors"]
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    torch.testing.assert_close(again(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)


def test_finetune_lora_starts_where_full_training_starts_and_saves_a_plain_folder(scored, tiny_model_dir,
                                                                                  tmp_path):
    """B = 0 at the start: step 1's loss is the full-weight run's; only the adapted linear maps change; the folder
    loads with from_pretrained as the next round's --init."""
    full = sft(scored, tiny_model_dir, tmp_path / "full")
    low = sft(scored, tiny_model_dir, tmp_path / "lora", "--lora", 4, "--lora-targets", "q_proj,v_proj,down_proj")
    assert low[0]["loss"] == pytest.approx(full[0]["loss"], rel=1e-6)
    assert low[-1]["loss"] < low[0]["loss"] - 0.01 and low[-1]["loss"] != pytest.approx(full[-1]["loss"])
    w, w0 = weights(tmp_path / "lora"), weights(tiny_model_dir)
    assert sorted(w) == sorted(w0)  # same tensors as the start: no adapter left, no untied copy of the head
    changed = {k for k in w if not torch.equal(w[k], w0[k])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(2)
                       for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    sft(scored, str(tmp_path / "lora"), tmp_path / "next", "--max-steps", 1)  # the next round starts from it


def test_train_rm_lora_with_grad_checkpointing(rm_data, tiny_model_dir, tmp_path):
    """The RM: adapters on the backbone, the head in full; step 1 matches full training (the same start),
    --grad-checkpointing changes no loss, and the merged folder is a plain sequence classifier."""
    from transformers import AutoModelForSequenceClassification
    full = rm(rm_data, tiny_model_dir, tmp_path / "full")
    low = rm(rm_data, tiny_model_dir, tmp_path / "lora", "--lora", 4)
    ckpt = rm(rm_data, tiny_model_dir, tmp_path / "lora_gc", "--lora", 4, "--grad-checkpointing")
    assert low[0]["mse"] == pytest.approx(full[0]["mse"], rel=1e-6)
    assert [s["mse"] for s in ckpt] == pytest.approx([s["mse"] for s in low], rel=1e-6)
    assert low[-1]["mse"] != pytest.approx(full[-1]["mse"])
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "lora"))
    assert model.score.weight.abs().sum() > 0 and model.config.num_labels == len(ATTRIBUTES)
    assert not [k for k in weights(tmp_path / "lora") if "lora" in k]
    torch.testing.assert_close(weights(tmp_path / "lora_gc")["score.weight"], weights(tmp_path / "lora")["score.weight"],
                               atol=1e-6, rtol=0)


def test_grad_checkpointing_gives_the_same_losses_and_weights(scored, tiny_model_dir, tmp_path):
    plain = sft(scored, tiny_model_dir, tmp_path / "plain")
    ckpt = sft(scored, tiny_model_dir, tmp_path / "ckpt", "--grad-checkpointing")
    assert [s["loss"] for s in ckpt] == pytest.approx([s["loss"] for s in plain], rel=1e-6)
    assert len({round(s["loss"], 4) for s in plain}) == 3  # the steps differ: the comparison means something
    a, b, w0 = weights(tmp_path / "plain"), weights(tmp_path / "ckpt"), weights(tiny_model_dir)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    assert max((a[k] - w0[k]).abs().max().item() for k in a) > 1e-4


def test_grad_checkpointing_recomputes_and_matches_gradients(tiny_model_dir):
    """One backward with and without checkpointing: the same gradients, and the layers really are recomputed."""
    from transformers import AutoModelForCausalLM
    from finetune import token_logps
    ids = torch.randint(3, 1000, (2, 10))
    attn, lmask = torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    lmask[:, 4:] = True
    grads, calls = [], []
    for gc in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
        lora.prepare(model, lora_args(*(["--grad-checkpointing"] if gc else [])))
        n = len(calls)
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # pre: recompute stops early
        logp, _ = token_logps(model, ids, attn, lmask)
        (-logp.mean()).backward()
        calls_made = len(calls) - n
        assert calls_made == (2 if gc else 1)  # forward once, and once more in backward when checkpointing
        grads.append({k: q.grad.clone() for k, q in model.named_parameters() if q.grad is not None})
    assert sorted(grads[0]) == sorted(grads[1])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5, msg=k)
