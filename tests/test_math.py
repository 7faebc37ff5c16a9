"""Pure functions of the stages pinned to exact, hand-computed values (losses, schedules, selection, tokens,
statistics), plus two model-level equivalences on a tiny random Llama.

Run from the repository root:

    python -m pytest tests/ -q                  # the whole suite
    python -m pytest tests/test_math.py -q      # this file only
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
import finetune
from tools import judge, policy_data, targets
import train_rm
from common import ATTRIBUTES, HELPFULNESS, VERBOSITY, chat_messages, reward_forward
from runtime import batching, logprobs
from runtime.io import DataError


# ----------------------------------------------------------------------------- train_rm
def test_masked_mse_hand_computed():
    pred = torch.tensor([[1.0, 2.0, 5.0], [3.0, 4.0, 0.0]])
    target = torch.tensor([[0.0, 2.0, 1e9], [1.0, -1e9, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    # labelled cells: (1-0)² + (2-2)² + (3-1)² + (0-7)² = 1 + 0 + 4 + 49 = 54 over 4 cells
    assert train_rm.masked_mse(pred, target, mask).item() == pytest.approx(54 / 4)
    # masked cells change nothing, whatever their (finite) placeholder
    target2 = target.clone()
    target2[0, 2], target2[1, 1] = 0.0, 123.0
    assert train_rm.masked_mse(pred, target2, mask).item() == pytest.approx(54 / 4)


def test_masked_mse_all_masked_is_zero():
    pred = torch.tensor([[1.0, 2.0]])
    target = torch.tensor([[50.0, -3.0]])
    loss = train_rm.masked_mse(pred, target, torch.zeros(1, 2))
    assert loss.item() == 0.0
    assert torch.isfinite(loss)


def test_masked_mse_gradient_only_on_labelled_cells():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    train_rm.masked_mse(pred, target, mask).backward()
    # d/dp (p - t)² / 2 = (p - t) on labelled cells, 0 elsewhere
    assert torch.equal(pred.grad, torch.tensor([[1.0, 0.0], [0.0, 4.0]]))


def test_pearson():
    x = [1, 2, 3, 4, 5]
    assert train_rm.pearson(x, [2 * v + 1 for v in x]) == pytest.approx(1.0)
    assert train_rm.pearson(x, [-3 * v for v in x]) == pytest.approx(-1.0)
    assert math.isnan(train_rm.pearson(x, [7] * 5))
    assert math.isnan(train_rm.pearson([3] * 5, x))
    assert math.isnan(train_rm.pearson([1], [2]))
    assert train_rm.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- DPO
def test_dpo_loss_zero_margin_is_log2():
    z = torch.zeros(3)
    losses, margin = finetune.dpo_loss(z - 5, z - 7, z - 5, z - 7, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    assert torch.equal(margin, torch.zeros(3))


def test_dpo_loss_hand_computed():
    t = lambda x: torch.tensor([x])  # noqa: E731
    losses, margin = finetune.dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1)
    # margin = (-10 - -11) - (-12 - -11) = 1 - (-1) = 2; loss = -log σ(0.1·2)
    assert margin.item() == pytest.approx(2.0)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))), abs=1e-6)
    assert losses.item() == pytest.approx(0.598138869381788, abs=1e-6)
    # a negative margin costs more than log 2
    losses2, margin2 = finetune.dpo_loss(t(-12.0), t(-10.0), t(-11.0), t(-11.0), beta=0.5)
    assert margin2.item() == pytest.approx(-2.0)
    assert losses2.item() == pytest.approx(math.log(1 + math.exp(1.0)), abs=1e-6)


def test_dpo_loss_gradients_flow_to_policy_only():
    pc = torch.tensor([-10.0], requires_grad=True)
    pr = torch.tensor([-12.0], requires_grad=True)
    rc, rr = torch.tensor([-11.0]), torch.tensor([-11.0])
    losses, _ = finetune.dpo_loss(pc, pr, rc, rr, beta=0.1)
    losses.sum().backward()
    s = 1 / (1 + math.exp(0.2))  # σ(-βm)
    assert pc.grad.item() == pytest.approx(-0.1 * s, abs=1e-7)
    assert pr.grad.item() == pytest.approx(+0.1 * s, abs=1e-7)
    assert rc.grad is None and rr.grad is None


# ----------------------------------------------------------------------------- learning-rate schedules
@pytest.mark.parametrize("mod", [finetune, train_rm], ids=["finetune", "train_rm"])
def test_get_lr(mod):
    lr, warmup, total = 1e-3, 4, 14
    assert [mod.get_lr(s, total, warmup, lr) for s in range(warmup)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert mod.get_lr(warmup - 1, total, warmup, lr) == pytest.approx(lr)  # peak at the end of warmup
    assert mod.get_lr(warmup, total, warmup, lr) == pytest.approx(lr)      # cosine starts at the peak
    assert mod.get_lr(9, total, warmup, lr) == pytest.approx(0.55 * lr)    # half-way: 0.1 + 0.9·0.5
    assert mod.get_lr(total, total, warmup, lr) == pytest.approx(0.1 * lr)  # ends at 10% of lr
    lrs = [mod.get_lr(s, total, warmup, lr) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warmup
    assert mod.get_lr(0, 1, 0, lr) == pytest.approx(lr)  # no warmup


# ----------------------------------------------------------------------------- selection (RSF, DPO pairs)
def _rec(pid, rid, degree, h, v, prompt=None):
    rewards = {a: 0.0 for a in ATTRIBUTES}
    rewards[HELPFULNESS], rewards[VERBOSITY] = float(h), float(v)
    return {"id": rid, "prompt_id": pid, "prompt": prompt or f"prompt {pid}", "degree": degree,
            "response": f"response {rid}", "truncated": False, "rewards": rewards}


def test_reward_matrix_order_defaults_and_errors():
    recs = [_rec("A", "a0", 0, 80, 10)]
    recs[0]["rewards"] = {VERBOSITY: 10.0, HELPFULNESS: 80.0}  # others missing → 0
    m = policy_data.reward_matrix(recs, "s.jsonl")
    expected = np.zeros((1, len(ATTRIBUTES)))
    expected[0, 0], expected[0, 4] = 80, 10
    assert np.array_equal(m, expected)
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'rewards'"):
        policy_data.reward_matrix([_rec("A", "a0", 0, 1, 1), {"id": "x"}], "s.jsonl")
    bad = _rec("A", "a0", 0, 1, 1)
    bad["rewards"][VERBOSITY] = float("nan")
    with pytest.raises(DataError, match=r"s\.jsonl:1: field 'rewards\.helpsteer-verbosity'"):
        policy_data.reward_matrix([bad], "s.jsonl")


def _hindsight_records():
    # prompt A: a0 short and helpful, a1 verbose, a2 mediocre; prompt B: b0 verbose, b1 short
    return [_rec("A", "a0", 10.0, 80, 10), _rec("A", "a1", 10.0, 70, 90), _rec("A", "a2", -20.0, 50, 50),
            _rec("B", "b0", 5.0, 60, 95), _rec("B", "b1", 5.0, 75, 5)]


def test_select_sft_hindsight():
    recs = _hindsight_records()
    rows = targets.select_sft(recs, policy_data.reward_matrix(recs, "x"), "hindsight", [-45.0, -15.0, 15.0, 45.0])
    assert len(rows) == 2 * 4  # one row per prompt per target degree
    got = {(r["prompt"], r["degree"]): r["source_id"] for r in rows}
    # A at -45: (80-10, 70-90, 50-50)/√2 → a0; at +45: (90, 160, 100)/√2 → a1
    # A at -15: .966h - .259v → 74.7, 44.3, 35.4 → a0; at +15: 79.9, 90.9, 61.2 → a1
    assert got == {("prompt A", -45.0): "a0", ("prompt A", -15.0): "a0", ("prompt A", 15.0): "a1",
                   ("prompt A", 45.0): "a1",
                   ("prompt B", -45.0): "b1", ("prompt B", -15.0): "b1", ("prompt B", 15.0): "b0",
                   ("prompt B", 45.0): "b0"}
    for r in rows:
        assert r["response"] == f"response {r['source_id']}" and r["truncated"] is False


def test_select_sft_sampled_best_per_prompt_and_degree():
    recs = [_rec("A", "a0", -45.0, 80, 10), _rec("A", "a1", -45.0, 70, 90),   # at -45 the short one wins
            _rec("A", "a2", 45.0, 80, 10), _rec("A", "a3", 45.0, 70, 90),     # at +45 the verbose one wins
            _rec("B", "b0", 0.0, 60, 95), _rec("B", "b1", 0.0, 75, 5), _rec("B", "b2", 0.0, 75, 50)]  # tie → first
    rows = targets.select_sft(recs, policy_data.reward_matrix(recs, "x"), "sampled", [-45.0, 45.0])
    got = sorted((r["prompt"], r["degree"], r["source_id"]) for r in rows)
    assert got == [("prompt A", -45.0, "a0"), ("prompt A", 45.0, "a3"), ("prompt B", 0.0, "b1")]


def test_select_pairs_mirrored():
    recs = _hindsight_records()
    pairs = targets.select_pairs(recs, policy_data.reward_matrix(recs, "x"), "mirrored", [45.0])
    assert len(pairs) == 4  # two per prompt
    a = [p for p in pairs if p["prompt"] == "prompt A"]
    assert [(p["degree"], p["chosen"], p["rejected"]) for p in a] == [
        (45.0, "response a1", "response a0"), (-45.0, "response a0", "response a1")]
    b = [p for p in pairs if p["prompt"] == "prompt B"]
    assert [(p["degree"], p["chosen"], p["rejected"]) for p in b] == [
        (45.0, "response b0", "response b1"), (-45.0, "response b1", "response b0")]
    assert all(p["chosen_truncated"] is False and p["rejected_truncated"] is False for p in pairs)


def test_select_pairs_mirrored_no_pair_when_same_answer_wins_both():
    recs = [_rec("A", "a0", 0.0, 90, 50), _rec("A", "a1", 0.0, 10, 40),  # a0 wins at +45 (140 vs 50) and -45 (40 vs -30)
            _rec("B", "b0", 0.0, 50, 90), _rec("B", "b1", 0.0, 60, 10)]  # b0 at +45, b1 at -45
    pairs = targets.select_pairs(recs, policy_data.reward_matrix(recs, "x"), "mirrored", [45.0])
    assert [(p["prompt"], p["degree"], p["chosen"]) for p in pairs] == [
        ("prompt B", 45.0, "response b0"), ("prompt B", -45.0, "response b1")]


def test_select_pairs_mirrored_several_angles():
    recs = _hindsight_records()[:2]
    pairs = targets.select_pairs(recs, policy_data.reward_matrix(recs, "x"), "mirrored", [15.0, 45.0])
    assert [p["degree"] for p in pairs] == [15.0, -15.0, 45.0, -45.0]


def test_select_pairs_best_worst():
    recs = [_rec("A", "a0", 0.0, 50, 0), _rec("A", "a1", 0.0, 90, 0), _rec("A", "a2", 0.0, 20, 99),
            _rec("A", "a3", 90.0, 50, 10), _rec("A", "a4", 90.0, 10, 80),
            _rec("B", "b0", 30.0, 40, 40), _rec("B", "b1", 30.0, 40, 40)]  # all tie: no pair
    pairs = targets.select_pairs(recs, policy_data.reward_matrix(recs, "x"), "best-worst", [45.0])
    assert [(p["degree"], p["chosen"], p["rejected"]) for p in pairs] == [
        (0.0, "response a1", "response a2"), (90.0, "response a4", "response a3")]


# ----------------------------------------------------------------------------- tokens
def _prompt_ids(tok, prompt, degree):
    text = tok.apply_chat_template(chat_messages(prompt, degree), tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_encode_prompt_prefix_and_eos(tokenizer):
    tok = tokenizer
    p_ids = _prompt_ids(tok, "How do I boil an egg?", -15)
    r_ids = tok("Put it in boiling water.", add_special_tokens=False)["input_ids"]
    ids, n = policy_data.encode(tok, "How do I boil an egg?", -15, "Put it in boiling water.", False, 512)
    assert n == len(p_ids) and ids[:n] == p_ids
    assert ids[n:] == r_ids + [tok.eos_token_id]
    assert "helpfulness*97 + verbosity*-26" in tok.decode(ids[:n])
    # truncated responses never learn to stop: no end-of-turn token
    ids_t, n_t = policy_data.encode(tok, "How do I boil an egg?", -15, "Put it in boiling water.", True, 512)
    assert n_t == n and ids_t == p_ids + r_ids
    # --max-len cuts the response (and its eos) but never the prompt
    ids_c, n_c = policy_data.encode(tok, "How do I boil an egg?", -15, "Put it in boiling water.", False, n + 2)
    assert ids_c == p_ids + r_ids[:2]
    with pytest.raises(DataError, match="max-len"):
        policy_data.encode(tok, "How do I boil an egg?", -15, "x", False, n)


def test_collate_right_padding_and_loss_mask(tokenizer):
    tok = tokenizer
    a = policy_data.encode(tok, "Hi", 0, "Hello there, friend.", False, 512)
    b = policy_data.encode(tok, "A much longer question about something?", 45, "Ok", True, 512)
    ids, attn, lmask = batching.collate([a, b], pad_id=tok.pad_token_id)
    T = max(len(a[0]), len(b[0]))
    assert ids.shape == attn.shape == lmask.shape == (2, T)
    assert lmask.dtype == torch.bool
    for i, (s, n) in enumerate([a, b]):
        assert ids[i, :len(s)].tolist() == s
        assert (ids[i, len(s):] == tok.pad_token_id).all()          # right padding
        assert attn[i].tolist() == [1] * len(s) + [0] * (T - len(s))
        assert lmask[i].tolist() == [False] * n + [True] * (len(s) - n) + [False] * (T - len(s))
    # row 0 ended: its last masked token is the end-of-turn token; row 1 was truncated: no eos in its loss
    assert ids[0, lmask[0]].tolist()[-1] == tok.eos_token_id
    assert tok.eos_token_id not in ids[1, lmask[1]].tolist()


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_token_logps_matches_full_logits(tiny_lm, tokenizer):
    tok = tokenizer
    seqs = [policy_data.encode(tok, "Hi", 0, "Hello there, friend.", False, 512),
            policy_data.encode(tok, "Tell me a longer story please?", 45, "Once upon a time", True, 512),
            policy_data.encode(tok, "Q", -45, "A", False, 512)]
    ids, attn, lmask = batching.collate(seqs, tok.pad_token_id)
    with torch.no_grad():
        logp, rows = logprobs.token_logps(tiny_lm, ids, attn, lmask)
        full = tiny_lm(input_ids=ids, attention_mask=attn).logits.float()  # (B, T, V)
    n_resp = [len(s) - n for s, n in seqs]
    assert logp.shape == rows.shape == (sum(n_resp),)
    assert rows.tolist() == sum(([i] * k for i, k in enumerate(n_resp)), [])
    seq = torch.zeros(len(seqs)).index_add_(0, rows, logp)
    ref = []
    lp = F.log_softmax(full, dim=-1)
    for i, (s, n) in enumerate(seqs):
        ref.append(sum(lp[i, t - 1, s[t]].item() for t in range(n, len(s))))  # position t-1 predicts token t
    assert torch.allclose(seq, torch.tensor(ref), atol=1e-4)
    assert (logp <= 0).all()


# ----------------------------------------------------------------------------- evaluation statistics
def test_spearman_exact():
    assert evaluate.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert evaluate.spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert evaluate.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mean rank: x ranks (0, 1.5, 1.5, 3) vs (0, 1, 2, 3) → 4.5 / √(4.5·5) = √0.9
    assert evaluate.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    assert evaluate.spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)  # unsorted input
    assert math.isnan(evaluate.spearman([1, 2, 3], [5, 5, 5]))
    assert math.isnan(evaluate.spearman([0], [1]))


def _eval_rec(deg, h, v, n_tokens, response, truncated, judge_hv=None):
    r = {"degree": deg, "response": response, "n_tokens": n_tokens, "truncated": truncated,
         "rewards": {HELPFULNESS: h, VERBOSITY: v}}
    if judge_hv:
        r["judge"] = {HELPFULNESS: judge_hv[0], VERBOSITY: judge_hv[1]}
    return r


def _eval_records():
    return [_eval_rec(45, 70, 80, 40, "a b c d", False, (60, 70)),
            _eval_rec(-45, 60, 10, 10, "one two", False, (50, 5)),
            _eval_rec(0, 65, 40, 20, "x y z", True, (55, 30)),
            _eval_rec(-45, 80, 30, 20, "three", True, (70, 15)),
            _eval_rec(45, 50, 90, 60, "e f g h i j", False, (40, 90)),
            _eval_rec(0, 75, 50, 30, "p q r s", False, (65, 40))]


def test_eval_table():
    rows = evaluate.table("base", _eval_records())
    assert [r["degree"] for r in rows] == [-45, 0, 45]  # sorted by θ
    lo, mid, hi = rows
    assert lo["policy"] == "base" and lo["n"] == 2
    # mean ± standard error of two values a, b: se = |a - b| / 2
    assert (lo["help"], lo["help_se"]) == pytest.approx((70.0, 10.0))
    assert (lo["verb"], lo["verb_se"]) == pytest.approx((20.0, 10.0))
    assert (lo["judge_help"], lo["judge_help_se"]) == pytest.approx((60.0, 10.0))
    assert (lo["judge_verb"], lo["judge_verb_se"]) == pytest.approx((10.0, 5.0))
    assert (lo["tokens"], lo["tokens_se"]) == pytest.approx((15.0, 5.0))
    assert lo["words"] == pytest.approx(1.5) and lo["chars"] == pytest.approx((7 + 5) / 2)
    assert lo["truncated"] == pytest.approx(0.5)
    assert mid["truncated"] == pytest.approx(0.5) and hi["truncated"] == 0.0
    assert (hi["help"], hi["help_se"]) == pytest.approx((60.0, 10.0))
    assert (hi["verb"], hi["tokens"], hi["words"]) == pytest.approx((85.0, 50.0, 5.0))


def test_eval_table_single_record_and_missing_judge():
    recs = [_eval_rec(0, 10, 20, 7, "a b", False), _eval_rec(15, 30, 40, 9, "c", False, (1, 2)),
            _eval_rec(15, 50, 60, 11, "d", True)]
    rows = evaluate.table("p", recs)
    assert rows[0]["help_se"] == 0.0 and rows[0]["tokens_se"] == 0.0  # one sample: no spread
    assert "judge_help" not in rows[0] and "judge_help" not in rows[1]  # judge only when every record has it
    assert rows[1]["help"] == pytest.approx(40.0) and rows[1]["help_se"] == pytest.approx(10.0)


def test_paired_steps_cancel_the_prompts_own_length():
    # two prompts, one short-answer (10 tokens at -45°) and one long (100): unpaired, the means 55 and 60.5 lie well
    # within their SEs (45, 45.5); paired, a: 10 → mean(14, 16) = 15 (+5), b: 100 → 106 (+6): mean 5.5 ± 0.5
    recs = [{"prompt_id": q, "degree": d, "n_tokens": n} for q, d, n in
            [("a", -45, 10), ("b", -45, 100), ("a", 0, 14), ("b", 0, 106), ("a", 0, 16), ("c", 45, 50)]]
    steps = evaluate.paired_steps(recs)
    assert steps[0] == pytest.approx((-45, 0, 5.5, 0.5))
    assert len(steps) == 1  # 0° → 45° share no prompt: no step


def test_eval_summary():
    rows = evaluate.table("base", _eval_records())
    s = evaluate.summary(rows)
    assert s["policy"] == "base"
    assert s["spearman_verb"] == pytest.approx(1.0)   # mean verbosity 20, 45, 85
    assert s["spearman_len"] == pytest.approx(1.0)    # mean tokens 15, 25, 50
    assert s["len_ratio"] == pytest.approx(50 / 15)
    rows[2]["verb"] = 0.0  # now 20, 45, 0: ranks (1, 2, 0) vs (0, 1, 2) → -0.5
    assert evaluate.summary(rows)["spearman_verb"] == pytest.approx(-0.5)


def test_eval_summary_against_base_and_targets():
    base = evaluate.table("base", _eval_records())  # means: θ -45 (70, 20), 0 (70, 45), 45 (60, 85); tokens 15/25/50
    pol = [dict(r, policy="round1") for r in base]
    pol[0].update(help=70.0, verb=10.0, tokens=10.0)   # -45: vᵀr̄ = (70 - 10)/√2 > (70 - 20)/√2   beyond
    pol[1].update(help=69.0)                           # 0: helpfulness 1 point below the base   not beyond
    pol[2].update(help=60.0, verb=85.0, tokens=30.0)   # 45: the same point as the base          not beyond (ties)
    s = evaluate.summary(pol, base)
    assert (s["front_wins"], s["front_angles"]) == (1, 3)
    assert s["help_0_gain"] == pytest.approx(-1.0)
    assert s["len_ratio"] == pytest.approx(3.0)
    assert s["judge_help_wins"] == 3  # the judge's ratings are the base's own
    assert evaluate.targets_met(s) == {"spearman_len>=0.95": True, "spearman_verb>=0.95": True,
                                       "len_ratio>=2.3": True, "judge_help>=base_all": True,
                                       "front_wins_all": False, "truncated<=20%": False}  # 50 % at -45 and 0
    pol[1].update(help=71.0)
    s = evaluate.summary(pol, base)
    assert s["front_wins"] == 2 and s["help_0_gain"] == pytest.approx(1.0)
    assert not evaluate.targets_met(s)["front_wins_all"]  # 2 of 3
    pol[2].update(verb=86.0)
    assert evaluate.targets_met(evaluate.summary(pol, base))["front_wins_all"]
    pol[0]["judge_help"] -= 0.1
    assert evaluate.summary(pol, base)["judge_help_wins"] == 2
    assert not evaluate.targets_met(evaluate.summary(pol, base))["judge_help>=base_all"]
    pol[2].update(tokens=20.0)  # 10 → 25 → 20 tokens: ratio 2.0, and no longer rising
    t = evaluate.targets_met(evaluate.summary(pol, base))
    assert not t["len_ratio>=2.3"] and not t["spearman_len>=0.95"]
    assert "front_wins" not in evaluate.summary(base)  # no base given: no comparison


def test_eval_summary_truncation_and_separation():
    rows = [{"policy": "p", "degree": d, "help": 50.0, "verb": v, "tokens": t, "tokens_se": se, "truncated": tr}
            for d, v, t, se, tr in ((-45, 10, 20, 2, 0.0), (0, 20, 30, 3, 0.25), (45, 30, 32, 3, 0.1))]
    s = evaluate.summary(rows)
    # 30 − 20 = 10 > 2·√(4 + 9) = 7.2 apart; 32 − 30 = 2 < 2·√18 = 8.5 not apart
    assert (s["adjacent_separated"], s["adjacent_pairs"], s["max_truncated"]) == (1, 2, 0.25)
    assert not evaluate.targets_met(s)["truncated<=20%"]


# ----------------------------------------------------------------------------- judge
def test_repetition_exact():
    assert judge.repetition([]) == 0.0
    assert judge.repetition("a b c".split()) == 0.0             # fewer words than n: no 4-grams
    assert judge.repetition("a b c d".split()) == 0.0
    assert judge.repetition("a b c d a b c d".split()) == pytest.approx(1 - 4 / 5)
    assert judge.repetition("A b c d a B c D".split()) == pytest.approx(0.2)  # case-insensitive
    assert judge.repetition(["x"] * 5) == pytest.approx(0.5)   # grams (xxxx, xxxx): one repeat of two
    assert judge.repetition(["x"] * 10) == pytest.approx(1 - 1 / 7)
    assert judge.repetition("a a b".split(), n=1) == pytest.approx(1 / 3)
    assert judge.repetition("a b a b".split(), n=2) == pytest.approx(1 / 3)  # ab, ba, ab


# ----------------------------------------------------------------------------- reward model forward
def test_reward_forward_padding_invariant(make_tiny_config, tokenizer):
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(0)
    cfg = make_tiny_config(len(tokenizer), num_labels=10, pad_token_id=0)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    assert model.score.bias is None  # bias-free linear head
    torch.manual_seed(1)
    lengths = [7, 3, 5]
    seqs = [torch.randint(3, len(tokenizer), (n,)) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)  # right padding with pad id 0
    attn = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], attn[i, :len(s)] = s, 1
    with torch.no_grad():
        batch = reward_forward(model, ids, attn)
        assert batch.shape == (3, 10) and batch.dtype == torch.float32
        for i, s in enumerate(seqs):
            alone = reward_forward(model, s[None], torch.ones(1, len(s), dtype=torch.long))
            assert torch.allclose(batch[i], alone[0], atol=1e-5), i
        # the head reads the last real token: its final hidden state through the linear score layer
        h = model.model(input_ids=seqs[1][None]).last_hidden_state[0, -1]
        assert torch.allclose(batch[1], model.score(h), atol=1e-5)
    # rows differ (the test would be vacuous if every row gave the same output)
    assert not torch.allclose(batch[0], batch[1])


def test_sft_loss_and_sequence_logps():
    """sft_loss: mean NLL over the tokens of the first n_chosen rows only; sequence_logps: per-row sums."""
    logp, row = torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([0, 0, 1, 2])
    assert finetune.sft_loss(logp, row, 2).item() == pytest.approx(2.0)      # (1 + 2 + 3) / 3 tokens
    assert finetune.sft_loss(logp, row, 1).item() == pytest.approx(1.5)      # row 0 only
    assert finetune.sequence_logps(logp, row, 3).tolist() == [-3.0, -3.0, -4.0]
