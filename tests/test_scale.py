"""The paper-scale options on CPU, each against the existing path: LoRA (trained, then merged into a plain folder),
gradient checkpointing, chat templates without a system role, and the BOS of the released DPA RM's template.

    python -m pytest tests/test_scale.py -q      # tiny random Llama, a few steps per run
"""
import argparse
import json
import os

import pytest
import torch

from common import ATTRIBUTES, HELPFULNESS, VERBOSITY
from runtime import lora
from test_distributed import one_process  # a stage's main(argv) in this process, on 1 thread

CPU = ("--device", "cpu", "--dtype", "float32")


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


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
    from runtime.logprobs import token_logps
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


# ----------------------------------------------------------------------------- chat templates and the RM's BOS
# Mistral-Instruct v0.1's convention: BOS, then [INST] user [/INST] answer</s> turns; any other role raises
SYSTEMLESS = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
              "' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% else %}"
              "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def mistral_like(tmp_path_factory):
    """A word-level tokenizer that adds BOS <s> like a Mistral tokenizer, with the system-less template above, and a
    tiny random causal LM and a 10-output sequence classifier (the released DPA RM's layout: no meta.json) on it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast
    from conftest import tiny_config
    words = ["<unk>", "<s>", "</s>", "[", "]", "/", "INST", "Question", "?", ".", ",", "User", ":", "Assistant", "You",
             "must", "read", "the", "answer", "A", "B", "yes", "no"] + [f"w{i}" for i in range(40)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>", chat_template=SYSTEMLESS)
    root = tmp_path_factory.mktemp("mistral-like")
    torch.manual_seed(0)
    cfg = dict(pad_token_id=2, eos_token_id=2, bos_token_id=1)
    for name, model in (("policy", LlamaForCausalLM(tiny_config(len(words), **cfg))),
                        ("rm", LlamaForSequenceClassification(tiny_config(len(words), num_labels=10, **cfg)))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root, tok


def test_systemless_template_gets_the_system_prompt_in_the_first_user_turn(mistral_like, tokenizer):
    from common import chat_messages, system_prompt
    from runtime.chat import render_chat, system_via
    _, tok = mistral_like
    msgs = chat_messages("Question A?", 30)
    with pytest.raises(Exception, match="Only user and assistant"):  # what sample.py died of before
        tok.apply_chat_template(msgs, tokenize=False)
    assert system_via(tok) == "user"
    assert render_chat(tok, msgs) == f"<s>[INST] {system_prompt(30)}\n\nQuestion A? [/INST]"
    # a template with a system role: the existing path, byte for byte
    assert system_via(tokenizer) == "system"
    assert render_chat(tokenizer, msgs) == tokenizer.apply_chat_template(msgs, tokenize=False,
                                                                         add_generation_prompt=True)
    broken = type(tok).from_pretrained(str(mistral_like[0] / "policy"))
    broken.chat_template = "{{ raise_exception('no chat here') }}"
    with pytest.raises(SystemExit, match="renders neither a system nor a user turn.*no chat here"):
        system_via(broken)


def test_sample_and_finetune_on_a_systemless_template(mistral_like, tmp_path):
    """sample.py states how the system prompt went in; finetune.py trains under the same rendering."""
    root, _ = mistral_like
    prompts = write_lines(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Question A?"}, {"id": "b", "prompt": "B ?"}])
    one_process("sample", "--prompts", prompts, "--n", 2, "--max-new-tokens", 4, "--model", root / "policy",
                "--out", tmp_path / "s.jsonl", *CPU)
    recs = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and {r["system_via"] for r in recs} == {"user"}
    for r in recs:
        r["rewards"] = dict.fromkeys(ATTRIBUTES, 50.0) | {HELPFULNESS: float(len(r["response"])), VERBOSITY: 1.0}
    write_lines(tmp_path / "scored.jsonl", recs)
    sft(tmp_path / "scored.jsonl", root / "policy", tmp_path / "policy", "--max-steps", 1)
    assert json.loads((tmp_path / "policy" / "meta.json").read_text())["system_via"] == "user"


def test_released_rm_layout_reads_the_dpa_template_with_bos(mistral_like):
    """A 10-output classifier without meta.json is the released DPA RM: template dpa, tokenized with the tokenizer's
    BOS, as its model card does (tokenizer(text), then the last token's head output); steer.py uses this loader."""
    import steer
    from common import reward_forward, rm_encode, rm_text
    from tools.reward_models import load_rm
    root, tok = mistral_like
    assert steer.load_rm is load_rm
    rm = load_rm(str(root / "rm"), "cpu", torch.float32)
    assert (rm.kind, rm.template) == ("released-dpa", "dpa")
    text = rm_text(tok, "Question A?", "yes .", "dpa")
    ids = rm_encode(tok, [text], "dpa")["input_ids"][0]
    assert ids[0] == tok.bos_token_id and ids[1:] == tok(text, add_special_tokens=False)["input_ids"]
    got = rm.score(["Question A?", "B ?"], ["yes .", "no"], ["a", "b"])["rewards"]
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(str(root / "rm")).eval()
    for (p, r), g in zip([("Question A?", "yes ."), ("B ?", "no")], got):
        enc = tok(rm_text(tok, p, r, "dpa"), return_tensors="pt")  # the model card's call: special tokens added
        with torch.no_grad():
            want = reward_forward(model, enc["input_ids"], enc["attention_mask"])[0]
        torch.testing.assert_close(torch.tensor(g), want, atol=1e-5, rtol=0)
