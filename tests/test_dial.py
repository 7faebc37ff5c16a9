"""The dial: a candidate pool of many lengths (sentence prefixes), the judge's length scales under which the best
length moves smoothly with θ, the target diagnostic, and pairs between neighbouring angles — exact values.

    python -m pytest tests/test_dial.py -q
"""
import contextlib
import math

import numpy as np
import pytest
import torch

import finetune
import sample
from common import ATTRIBUTES, HELPFULNESS, VERBOSITY
from runtime import batching
from tools import judge, policy_data, targets


def _rec(pid, rid, h, v, words=None):
    return {"id": rid, "prompt_id": pid, "prompt": f"prompt {pid}", "degree": 0.0,
            "response": " ".join([rid] * (words or 1)), "truncated": False,
            "rewards": {HELPFULNESS: float(h), VERBOSITY: float(v)}}


# ----------------------------------------------------------------------------- sentence prefixes
def test_sentence_prefixes_geometric_lengths_and_last_complete_sentence():
    s = "One two three four five six seven eight nine ten."  # 10 words
    text = " ".join([s] * 5) + " and a cut tail"              # 5 sentences, then an unfinished one
    got = [len(p.split()) for p in sample.sentence_prefixes(text)]
    # ≥ 10 words, each ≥ 1.6 × the previous: 10, 20 (≥ 16), 40 (≥ 32; 30 < 32); then 50 = the last complete sentence
    assert got == [10, 20, 40, 50]
    assert all(p.endswith("ten.") for p in sample.sentence_prefixes(text))


def test_sentence_prefixes_skip_list_markers_abbreviations_and_the_whole_answer():
    text = ("Pack these things for the trip, e.g. a tent and food and water.\n1. A warm sleeping bag for the cold "
            "nights outside.\n2. Boots.")
    got = sample.sentence_prefixes(text, min_words=1, growth=1.0)
    assert got == ["Pack these things for the trip, e.g. a tent and food and water.",
                   "Pack these things for the trip, e.g. a tent and food and water.\n1. A warm sleeping bag for the "
                   "cold nights outside."]  # not after "e.g." or "1.", and "… Boots." is the whole answer
    assert sample.sentence_prefixes("No sentence end here at all") == []


def test_with_prefixes_records(tokenizer):
    s = "One two three four five six seven eight nine ten."
    rec = {"id": "p/0/plain/0", "prompt_id": "p", "response": f"{s} {s} cut", "n_tokens": 99, "truncated": True}
    out = sample.with_prefixes([rec], tokenizer)
    assert [r["id"] for r in out] == ["p/0/plain/0", "p/0/plain/0/p10", "p/0/plain/0/p20"]
    assert out[0] is rec and all(r["prefix_of"] == rec["id"] and r["truncated"] is False for r in out[1:])
    assert out[1]["n_tokens"] == len(tokenizer(s, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- the judge's length scales
def test_asked_words_rules():
    assert judge.asked_words("Why is the sky blue?") == 40
    assert judge.asked_words("Briefly, why is the sky blue?") == 20
    assert judge.asked_words("Explain step by step how to bake bread.") == 120
    assert judge.length_ratio(80, "Why is the sky blue?") == pytest.approx(math.log(2))


def test_judge_ratings_follow_the_documented_scales():
    j = judge.Judge()
    prompt = "Why is the sky blue?"
    words = "Sunlight scatters off air molecules and blue light scatters the most so the sky looks blue".split()
    answers = [" ".join((words * 20)[:n]) for n in (40, 80, 160)]
    r = j.rate([prompt] * 3, answers, [False] * 3)
    verb = r[:, ATTRIBUTES.index(VERBOSITY)]
    assert verb == pytest.approx([50.0, 75.0, 100.0])  # as asked, twice, four times: 50 + 50·u / ln 4
    # helpfulness = 100·rel − 20·u² − 50·rep − 100·oov: recompute from the judge's own parts
    rel = (j.embed([prompt] * 3) * j.embed(answers)).sum(-1)
    for k, n in enumerate((40, 80, 160)):
        u = math.log(n / 40)
        alpha = [w.lower() for w in judge.WORD.findall(answers[k])]
        oov = sum(w not in j.vocab for w in alpha) / len(alpha)
        expect = 100 * rel[k] - 20 * u * u - 50 * judge.repetition(answers[k].split()) - 100 * oov
        assert r[k, ATTRIBUTES.index(HELPFULNESS)] == pytest.approx(np.clip(expect, 0, 100), abs=1e-3)


def test_best_length_under_the_judge_scales_is_a_dial():
    """With relevance equal, the best of a dense pool of lengths rises with θ over the whole grid (no flat end)."""
    lengths = np.arange(5, 400)
    u = np.log(lengths / 40)
    help_, verb = -judge.COST * u * u, np.clip(50 + 50 * u / math.log(4), 0, 100)
    best = [lengths[np.argmax(math.cos(math.radians(d)) * help_ + math.sin(math.radians(d)) * verb)]
            for d in targets.GRID]
    assert all(a < b for a, b in zip(best, best[1:]))
    # the optimum ln(w*/asked) = (50 / ln 4) / (2·COST) · tan θ: 16 words at −45°, 40 at 0°, 99 at +45°
    assert (best[0], best[9], best[-1]) == (16, 40, 99)


# ----------------------------------------------------------------------------- the target diagnostic
def test_flip_degree_exact():
    ra = np.zeros(len(ATTRIBUTES))
    rb = np.zeros(len(ATTRIBUTES))
    ra[ATTRIBUTES.index(HELPFULNESS)], ra[ATTRIBUTES.index(VERBOSITY)] = 60, 20
    rb[ATTRIBUTES.index(HELPFULNESS)], rb[ATTRIBUTES.index(VERBOSITY)] = 50, 40
    # cos θ·10 + sin θ·(−20) = 0 → tan θ = 1/2
    assert targets.flip_degree(ra, rb) == pytest.approx(math.degrees(math.atan(0.5)))
    assert targets.flip_degree(rb, ra) == pytest.approx(math.degrees(math.atan(0.5)))


def test_target_curve_rising_words_and_flips():
    # one prompt, three answers: short (h 60, v 20), middle (h 64, v 40), long (h 50, v 80)
    recs = [_rec("A", "s", 60, 20, 10), _rec("A", "m", 64, 40, 30), _rec("A", "l", 50, 80, 90)]
    rows, flips = targets.target_curve(recs, policy_data.reward_matrix(recs, "x"))
    # s→m at tan θ = (60 − 64)/(40 − 20) = −0.2 (−11.3°); m→l at tan θ = 14/40 (19.3°)
    assert flips == pytest.approx([math.degrees(math.atan(-0.2)), math.degrees(math.atan(0.35))])
    words = {r["degree"]: r["words"] for r in rows}
    assert [words[d] for d in (-45.0, -15.0, -10.0, 15.0, 20.0, 45.0)] == [10, 10, 30, 30, 90, 90]
    assert rows[0]["help"] == 60 and rows[-1]["verb"] == 80 and len(rows) == 19


# ----------------------------------------------------------------------------- pairs between neighbouring angles
def test_select_pairs_neighbours():
    recs = [_rec("A", "s", 60, 20), _rec("A", "m", 64, 40), _rec("A", "l", 50, 80)]
    pairs = targets.select_pairs(recs, policy_data.reward_matrix(recs, "x"), "neighbours", [45.0, -45.0, 0.0])
    # winners: −45° s, 0° m, +45° l → (0°: m ≻ s, −45°: s ≻ m), (45°: l ≻ m, 0°: m ≻ l)
    assert [(p["degree"], p["chosen"], p["rejected"], p["group"]) for p in pairs] == [
        (0.0, "m", "s", "A/-45:0"), (-45.0, "s", "m", "A/-45:0"), (45.0, "l", "m", "A/0:45"), (0.0, "m", "l", "A/0:45")]


def test_finetune_diagnose_prints_the_curve_and_writes_nothing(tmp_path, capsys):
    import json
    recs = [_rec("A", "s", 60, 20, 10), _rec("A", "m", 64, 40, 30), _rec("A", "l", 50, 80, 90)]
    f = tmp_path / "scored.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    finetune.main(["--scored", str(f), "--diagnose", "--device", "cpu"])
    out = capsys.readouterr().out
    # words 10 × 7 angles, 30 × 6, 90 × 6 (ties share ranks); flips at −11.3° and +19.3°, none within ±10°
    assert "Spearman(θ, words) +0.943 over 19 angles | 2 flips, 0% within ±10°" in out
    assert out.count("\n") == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["scored.jsonl"]


# ----------------------------------------------------------------------------- decision tokens (--decision-coef)
def test_decision_positions_mark_where_two_angles_targets_part():
    # one prompt, 4 angles, prompt lengths 3 / 3 / 3 / 4; responses (ids after the prompt), 9 = end of turn
    data = [[([0, 0, 0, 5, 6, 9], 3)],         # −45°: "5 6" and stop
            [([0, 0, 0, 5, 6, 7, 8, 9], 3)],   # 0°: the same answer continued
            [([0, 0, 0, 5, 6, 9], 3)],         # 15°: the −45° answer again (identical: nothing to decide against it)
            [([0, 0, 0, 0, 4, 6, 9], 4)]]      # 45°: another answer from its first token
    rows = [{"group": "A"}] * 4
    got = policy_data.decision_positions(data, rows)
    # −45° vs 0°: part at response token 2 (9 vs 7) → position 5; vs 45°: at token 0 → position 3
    assert got == [[3, 5], [3, 5], [3, 5], [4]]
    # another group never counts; a truncated answer (no end of turn) that is a prefix of the other has nothing to mark
    assert policy_data.decision_positions([[([1, 5, 6], 1)], [([1, 5, 6, 7, 9], 1)], [([1, 4, 9], 1)]],
                                          [{"group": "A"}, {"group": "A"}, {"group": "B"}]) == [[], [3], []]


def test_sft_loss_decision_term_exact():
    logp = torch.tensor([-1.0, -2.0, -3.0, -6.0])   # tokens of rows 0, 0, 1, 2 (row 2 is not a target)
    row = torch.tensor([0, 0, 1, 2])
    decision = torch.tensor([False, True, True, True])
    # plain mean over rows 0-1: 2.0; decision tokens of rows 0-1: (2 + 3) / 2 = 2.5; λ = 2 → 2.0 + 5.0
    assert finetune.sft_loss(logp, row, 2, decision, 2.0).item() == pytest.approx(7.0)
    assert finetune.sft_loss(logp, row, 2, decision, 0.0).item() == pytest.approx(2.0)
    assert finetune.sft_loss(logp, row, 1, torch.tensor([False] * 4), 2.0).item() == pytest.approx(1.5)  # none marked


def test_micro_batch_decision_mask_follows_the_token_order(tiny_model_dir, tokenizer):
    """micro_batch_logps with decide: the decision term picks exactly the marked label positions, packed or not (pack
    lays the rows out longest first, another order than the micro-batch's; packed rows: tests/test_perf.py)."""
    from transformers import AutoModelForCausalLM
    from runtime import logprobs
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    data = [[([1, 2, 3, 4, 5, 6, 7], 2)], [([1, 2, 3, 4], 2)], [([1, 2, 8, 9, 10], 2)]]
    decide = [[4], [3], [2, 3]]
    fwd = lambda *a: logprobs.token_logps(model, *a)
    with torch.no_grad():
        logp, row = fwd(*batching.collate([d[0] for d in data], 0))
        # label t+1 of row r is marked where t+1 ∈ decide[r]; the tokens of each row in order from position 2
        pos = torch.cat([torch.arange(2, len(d[0][0])) for d in data])
        want = torch.tensor([int(p) in decide[int(r)] for p, r in zip(pos, row)])
        expect = -logp.mean() - 0.5 * logp[want].mean()
        for packed in (False, True):
            _, loss = finetune.micro_batch_logps(fwd, data, [0, 1, 2], [], 0, "cpu", contextlib.nullcontext, packed,
                                                 decide, 0.5)
            assert loss.item() == pytest.approx(expect.item(), abs=1e-5)
    assert want.sum() == 4


def test_decision_coef_needs_hindsight_sft(tmp_path):
    with pytest.raises(SystemExit, match="--decision-coef needs --loss sft --select hindsight"):
        finetune.main(["--scored", str(tmp_path / "x.jsonl"), "--decision-coef", "1", "--out", str(tmp_path / "o")])
