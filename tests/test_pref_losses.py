"""Preference objectives of finetune.py: DPO and RPO (Relative Preference Optimization, Yin et al. 2024,
arXiv 2402.10958) pinned to exact values, the preference-data readers on small hand-written files of each format, and
every --loss end to end on the tiny random Llama (in-process, one or two steps).

    python -m pytest tests/test_pref_losses.py -q
"""
import gzip
import json
import math
import random
import sys

import pytest
import torch

import finetune
from tools import policy_data, pref_data
from common import chat_messages
from runtime import batching
from runtime.io import DataError
from test_stages import scored_records, write_lines

LOG2 = math.log(2)


def softplus(x):
    return math.log1p(math.exp(x))  # −log σ(−x)


# ----------------------------------------------------------------------------- rpo_weights
def test_rpo_weights_hand_computed_rows_sum_to_one():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])  # cos: e0⊥e1, both at 45° to e2 (whose norm is ignored)
    w = finetune.rpo_weights(e, e, tau=0.5)
    assert w.shape == (3, 3) and w.dtype == torch.float32
    s = 1 / math.sqrt(2)
    row0 = [math.exp(2), math.exp(0), math.exp(2 * s)]   # softmax_j(cos_0j / τ)
    row2 = [math.exp(2 * s), math.exp(2 * s), math.exp(2)]
    assert w[0].tolist() == pytest.approx([x / sum(row0) for x in row0], abs=1e-6)
    assert w[2].tolist() == pytest.approx([x / sum(row2) for x in row2], abs=1e-6)
    assert torch.allclose(w.sum(1), torch.ones(3), atol=1e-6)
    assert w[0, 2].item() != pytest.approx(w[2, 0].item())  # rows are normalised, so ω is not symmetric
    # the reference code's form softmax_j(−(1 − cos)/τ) is the same weights
    cos = torch.nn.functional.normalize(e, dim=-1) @ torch.nn.functional.normalize(e, dim=-1).T
    assert torch.allclose(w, torch.softmax(-(1 - cos) / 0.5, dim=1), atol=1e-6)


def test_rpo_weights_unpaired_shape_and_limits():
    g = torch.Generator().manual_seed(0)
    e_w, e_l = torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)
    w = finetune.rpo_weights(e_w, e_l, tau=0.5)
    assert w.shape == (3, 5) and torch.allclose(w.sum(1), torch.ones(3), atol=1e-6)
    assert torch.allclose(finetune.rpo_weights(e_w, e_l, tau=1e6), torch.full((3, 5), 0.2), atol=1e-5)  # τ → ∞
    # τ → 0 with orthogonal prompts: ω → I exactly
    assert torch.equal(finetune.rpo_weights(torch.eye(4), 2 * torch.eye(4), tau=1e-3), torch.eye(4))


# ----------------------------------------------------------------------------- rpo_loss
def t(*x):
    return torch.tensor(x)


def test_rpo_one_pair_is_dpo_exactly():
    pc, pr, rc, rr = t(-10.0), t(-12.0), t(-11.0), t(-11.0)
    w = finetune.rpo_weights(torch.randn(1, 384), torch.randn(1, 384), tau=0.5)  # any prompts: a 1×1 softmax is 1
    assert w.tolist() == [[1.0]]
    loss, delta = finetune.rpo_loss(pc, pr, rc, rr, w, beta=0.1)
    dpo, margin = finetune.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.shape == () and delta.shape == (1, 1)
    assert torch.equal(delta[0], margin) and loss.item() == dpo.item()
    assert loss.item() == pytest.approx(0.598138869381788, abs=1e-6)  # −log σ(0.1·2), as in test_math


def test_rpo_identity_weights_is_dpo_over_m_plus_log2():
    pc, pr = t(-10.0, -20.0, -5.0, -7.0), t(-12.0, -18.0, -9.0, -7.5)
    rc, rr = t(-11.0, -19.0, -6.0, -8.0), t(-11.0, -19.0, -8.0, -8.0)
    m = 4
    loss, delta = finetune.rpo_loss(pc, pr, rc, rr, torch.eye(m), beta=0.5)
    dpo, margin = finetune.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert torch.equal(delta.diagonal(), margin)
    # diagonal cells are DPO's losses; the M² − M off-diagonal cells are −log σ(0) = log 2 each:
    # L = (1/M²)(Σ_i DPO_i + (M² − M) log 2) = mean DPO / M + (1 − 1/M) log 2
    assert loss.item() == pytest.approx(dpo.mean().item() / m + (1 - 1 / m) * LOG2, abs=1e-6)
    assert loss.item() == pytest.approx(dpo.mean().item() / 4 + 0.75 * LOG2, abs=1e-6)
    # ... and the constant carries no gradient: the gradient is DPO's divided by M
    ps = [x.clone().requires_grad_() for x in (pc, pr)]
    finetune.rpo_loss(ps[0], ps[1], rc, rr, torch.eye(m), beta=0.5)[0].backward()
    qs = [x.clone().requires_grad_() for x in (pc, pr)]
    (finetune.dpo_loss(qs[0], qs[1], rc, rr, beta=0.5)[0].mean() / m).backward()
    assert torch.allclose(ps[0].grad, qs[0].grad, atol=1e-7) and torch.allclose(ps[1].grad, qs[1].grad, atol=1e-7)


def test_rpo_loss_hand_computed_weights_inside_the_sigmoid():
    # h_chosen = [1, −1], h_rejected = [−1, 0.5] → Δ = [[2, 0.5], [0, −1.5]]
    pc, rc = t(-10.0, -12.0), t(-11.0, -11.0)
    pr, rr = t(-12.0, -9.5), t(-11.0, -10.0)
    w = t([0.75, 0.25], [0.4, 0.6])
    loss, delta = finetune.rpo_loss(pc, pr, rc, rr, w, beta=0.5)
    assert delta.tolist() == [[2.0, 0.5], [0.0, -1.5]]
    cells = [softplus(-0.5 * 0.75 * 2), softplus(-0.5 * 0.25 * 0.5), LOG2, softplus(0.5 * 0.6 * 1.5)]
    assert loss.item() == pytest.approx(sum(cells) / 4, abs=1e-6)
    assert loss.item() == pytest.approx(0.6714131, abs=1e-6)


def test_rpo_gradients_flow_to_policy_only():
    g = torch.Generator().manual_seed(1)
    pc, pr = (-10 * torch.rand(3, generator=g)).requires_grad_(), (-10 * torch.rand(3, generator=g)).requires_grad_()
    rc, rr = (-10 * torch.rand(3, generator=g)).requires_grad_(), (-10 * torch.rand(3, generator=g)).requires_grad_()
    e = torch.randn(3, 16, generator=g).requires_grad_()
    w = finetune.rpo_weights(e, e, tau=0.5)
    assert not w.requires_grad
    beta = 0.3
    loss, delta = finetune.rpo_loss(pc, pr, rc, rr, w, beta)
    loss.backward()
    assert rc.grad is None and rr.grad is None and e.grad is None
    # ∂L/∂π_c,i = −β/(C·R) Σ_j ω_ij σ(−β ω_ij Δ_ij);  ∂L/∂π_r,j = +β/(C·R) Σ_i ω_ij σ(−β ω_ij Δ_ij)
    s = w * torch.sigmoid(-beta * w * delta.detach())
    assert torch.allclose(pc.grad, -beta / 9 * s.sum(1), atol=1e-7)
    assert torch.allclose(pr.grad, beta / 9 * s.sum(0), atol=1e-7)


def test_rpo_unpaired_shapes():
    pc, rc = t(-1.0, -2.0), t(-1.5, -1.5)             # C = 2 chosen answers
    pr, rr = t(-3.0, -1.0, -2.0), t(-2.0, -2.0, -2.0)  # R = 3 rejected answers, other prompts
    e_w, e_l = torch.randn(2, 8), torch.randn(3, 8)
    loss, delta = finetune.rpo_loss(pc, pr, rc, rr, finetune.rpo_weights(e_w, e_l, 0.5), beta=0.1)
    assert loss.shape == () and delta.shape == (2, 3)
    assert delta.tolist() == [[1.5, -0.5, 0.5], [0.5, -1.5, -0.5]]  # h_c = [0.5, −0.5], h_r = [−1, 1, 0]


# ----------------------------------------------------------------------------- batch plans
def test_plan_rejected_draws_other_prompts():
    groups = ["a", "a", "b", "c", "c", "d", "e"]
    plan = batching.plan_batches(groups, 3, 12, random.Random(0))
    rplan = batching.plan_rejected(groups, plan, random.Random(1))
    assert [len(b) for b in rplan] == [3] * 12
    for b, rb in zip(plan, rplan):
        assert not {groups[i] for i in b} & {groups[i] for i in rb}, (b, rb)
    seen = [i for rb in rplan for i in rb]
    assert set(seen) == set(range(7))  # every row's rejected answer gets used
    with pytest.raises(SystemExit, match="lower --batch-size"):  # one micro-batch holds every prompt
        batching.plan_rejected(["a", "a", "b"], [[0, 2]], random.Random(0))


# ----------------------------------------------------------------------------- preference readers
CONV_PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
HH_A = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a colour.\n\nAssistant:"


def test_read_prefs_each_format(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Dunno."},                          # plain
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},                                      # skipped
        {"prompt": CONV_PROMPT, "chosen": [{"role": "assistant", "content": "Red."}],                   # TRL
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"chosen": [CONV_PROMPT[1], {"role": "assistant", "content": "Green."}],                        # implicit
         "rejected": [CONV_PROMPT[1], {"role": "assistant", "content": "Why?"}]},
        {"chosen": HH_A + " Blue, like the sky.", "rejected": HH_A + " I won't."},                      # HH-RLHF
        {"chosen": HH_A + " Um.\n\nAssistant: Teal.", "rejected": HH_A + " Pass."},                     # 2nd turn
    ])
    rows, skipped = pref_data.read_prefs(str(path))
    assert skipped == 1 and len(rows) == 5
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("Blue.", "Dunno."), ("Red.", "No."), ("Green.", "Why?"), ("Blue, like the sky.", "I won't."),
        ("Um.\n\nAssistant: Teal.", "Pass.")]
    assert rows[0]["prompt"] == "Name a colour." and rows[1]["prompt"] == CONV_PROMPT
    assert rows[2]["prompt"] == [CONV_PROMPT[1]]
    hh = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
          {"role": "user", "content": "Name a colour."}]
    assert rows[3]["prompt"] == hh and rows[4]["prompt"] == hh
    assert all(r["degree"] is None and r["chosen_truncated"] is False for r in rows)
    assert [r["line"] for r in rows] == [1, 3, 4, 5, 6]
    assert rows[3]["group"] == rows[4]["group"] == "line 5" and len({r["group"] for r in rows}) == 4  # per prompt
    # the same rows from a gzip file
    gz = tmp_path / "prefs.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert pref_data.read_prefs(str(gz)) == (rows, 1)


@pytest.mark.parametrize("record, message", [
    ({"prompt": 7, "chosen": "a", "rejected": "b"}, ":2: field 'prompt' must be a string"),
    ({"prompt": "q", "chosen": "a"}, ":2: missing field 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": ["b"]}, ":2: fields 'chosen' and 'rejected' must both be"),
    ({"prompt": "q", "chosen": 3, "rejected": 4}, ":2: field 'chosen' must be a string or a list of messages"),
    ({"prompt": CONV_PROMPT, "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "x"}]},
     ":2: field 'chosen' must be a non-empty list of {role, content} messages"),
    ({"prompt": CONV_PROMPT, "chosen": [{"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "y"}]}, ":2: field 'rejected' must hold exactly one assistant"),
    ({"chosen": "Blue.", "rejected": "Red."}, ":2: missing field 'prompt'"),
    ({"chosen": "Hi\n\nAssistant: a", "rejected": "Hi\n\nAssistant: b"}, ":2: fields 'chosen'/'rejected': a dialogue"),
])
def test_read_prefs_errors_name_file_line_and_field(tmp_path, record, message):
    path = write_lines(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(DataError) as err:
        pref_data.read_prefs(str(path))
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_prefs_use_the_plain_chat_template(tokenizer):
    assert policy_data.prompt_messages("Q?", None) == [{"role": "user", "content": "Q?"}]
    assert policy_data.prompt_messages(CONV_PROMPT, None) == CONV_PROMPT
    assert policy_data.prompt_messages("Q?", 45) == chat_messages("Q?", 45)
    ids, n = policy_data.encode(tokenizer, CONV_PROMPT, None, "Red.", False, 256)
    text = tokenizer.decode(ids[:n])
    assert text == tokenizer.apply_chat_template(CONV_PROMPT, tokenize=False, add_generation_prompt=True)
    assert "weighted rating" not in text and "Be brief." in text
    assert pref_data.prompt_text(CONV_PROMPT) == "system: Be brief.\nuser: Name a colour."


# ----------------------------------------------------------------------------- prompt embeddings
def test_embed_prompts_minilm_once_then_cached(tmp_path, monkeypatch):
    texts = ["How do I boil an egg?", "How long should eggs boil?", "Explain the causes of inflation.",
             "How do I boil an egg?"]
    emb = pref_data.embed_prompts(texts, pref_data.DEFAULT_EMBEDDER, str(tmp_path))
    assert emb.shape == (4, 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5) and torch.equal(emb[0], emb[3])
    cos = emb @ emb.T
    assert cos[0, 1] > 0.6 > 0.2 > cos[0, 2]  # a real sentence embedder: the two egg questions are close
    assert len(list(tmp_path.iterdir())) == 1  # one file for the dataset
    monkeypatch.setattr(pref_data, "minilm_dir", lambda: pytest.fail("embedded again instead of read from the cache"))
    assert torch.equal(pref_data.embed_prompts(texts, pref_data.DEFAULT_EMBEDDER, str(tmp_path)), emb)


# ----------------------------------------------------------------------------- finetune.py end to end
def run_finetune(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["finetune.py", *map(str, args), "--device", "cpu", "--dtype", "float32"])
    finetune.main()
    return capsys.readouterr().out


def hh_file(tmp_path):
    dialogues = [("How do I boil an egg?", "Put it in boiling water for 8 minutes.", "Eggs are eggs."),
                 ("Name a colour.", "Blue.", "I refuse."),
                 ("What is 2 + 2?", "4.", "5."),
                 ("Suggest a pet.", "A cat: calm and independent.", "A tiger."),
                 ("Same answers?", "Yes.", "Yes.")]
    return write_lines(tmp_path / "hh.jsonl", [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {c}",
                                                "rejected": f"\n\nHuman: {q}\n\nAssistant: {r}"}
                                               for q, c, r in dialogues])


def read_meta(out):
    return json.loads((out / "meta.json").read_text())


def test_finetune_rpo_paired_directional(monkeypatch, capsys, tiny_model_dir, tmp_path):
    scored = write_lines(tmp_path / "scored.jsonl", scored_records())
    out = tmp_path / "rpo"
    stdout = run_finetune(monkeypatch, capsys, "--scored", scored, "--loss", "rpo_paired", "--epochs", 2,
                          "--batch-size", 4, "--init", tiny_model_dir, "--embed-cache", tmp_path / "emb", "--out", out)
    assert "rpo_paired on 4 pairs | 2 steps" in stdout
    log = read_meta(out)["log"]
    # step 1: policy = reference, so every cell of Δ is 0 and the loss is log 2
    assert log[0]["loss"] == pytest.approx(LOG2, abs=1e-5) and log[0]["margin"] == pytest.approx(0.0, abs=1e-5)
    # 4 pairs = 2 prompts × 2 mirrored directions; the embedder reads the user prompt, so a row spreads its weight over
    # its own prompt's two pairs (cos 1) and, less, the other prompt's: ω_ii < 1/2
    assert 0.25 < log[0]["w_ii"] < 0.5 and "| w_ii " in stdout
    assert math.isfinite(log[1]["loss"]) and len(list((tmp_path / "emb").iterdir())) == 1


def test_finetune_rpo_unpaired_on_hh(monkeypatch, capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "rpo-u"
    stdout = run_finetune(monkeypatch, capsys, "--prefs", hh_file(tmp_path), "--loss", "rpo_unpaired", "--max-steps", 2,
                          "--batch-size", 2, "--init", tiny_model_dir, "--embed-cache", tmp_path / "emb", "--out", out)
    assert "rpo_unpaired on 4 pairs (1 skipped: chosen == rejected) | 2 steps" in stdout
    meta = read_meta(out)
    assert meta["log"][0]["loss"] == pytest.approx(LOG2, abs=1e-5) and math.isfinite(meta["log"][1]["loss"])
    rows = [json.loads(x) for x in (out / "train_rows.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == [{"role": "user", "content": "How do I boil an egg?"}]
    assert rows[0]["chosen"] == "Put it in boiling water for 8 minutes." and rows[0]["degree"] is None


def test_finetune_dpo_and_sft_on_prefs(monkeypatch, capsys, tiny_model_dir, tmp_path):
    prefs = hh_file(tmp_path)
    stdout = run_finetune(monkeypatch, capsys, "--prefs", prefs, "--loss", "dpo", "--max-steps", 1, "--batch-size", 4,
                          "--init", tiny_model_dir, "--out", tmp_path / "dpo")
    assert "dpo on 4 pairs (1 skipped: chosen == rejected) | 1 steps" in stdout
    assert read_meta(tmp_path / "dpo")["log"][0]["loss"] == pytest.approx(LOG2, abs=1e-5)
    # SFT on the chosen answers; the dialogue that does not fit --max-len is skipped and counted
    long = write_lines(tmp_path / "long.jsonl", [{"prompt": "word " * 200, "chosen": "a", "rejected": "b"},
                                                 {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Red."}])
    stdout = run_finetune(monkeypatch, capsys, "--prefs", long, "--loss", "sft", "--max-steps", 1, "--max-len", 64,
                          "--init", tiny_model_dir, "--out", tmp_path / "sft")
    assert "sft on 1 rows (1 skipped: prompt too long) | 1 steps" in stdout and f"{long}:1: prompt of" in stdout
    rows = [json.loads(x) for x in (tmp_path / "sft" / "train_rows.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": "Name a colour.", "degree": None, "response": "Blue.", "truncated": False,
                     "group": "line 2", "line": 2}]
