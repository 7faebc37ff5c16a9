"""Reward models in full: real-data converters, the probe/gate math, the three train_rm.py methods end to end on the
tiny random Llama, and score.py on every RM format (ours, the released DPA RM layout, an ArmoRM-style model with its
own code). CPU, offline.

    python -m pytest tests/test_rm_methods.py -q        (≈ 20 s on 2 CPU cores)
"""
import contextlib
import io
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from tools import armo
from tools import reward_models, rm_data, stats
import score
import steer
import train_rm
from common import ATTRIBUTES, DPA_RM_TEMPLATE, HELPFULNESS, VERBOSITY, reward_forward, rm_text
from runtime.io import DataError, read_jsonl
from tools.armo import rm_prompt_text

CPU = ["--device", "cpu", "--dtype", "float32"]
VERB = ATTRIBUTES.index(VERBOSITY)


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


# ============================================================================= converters (hand-written raw schemas)
def test_helpsteer_rows_are_bin_centres(tmp_path):
    f = write_lines(tmp_path / "hs.jsonl", [
        {"prompt": "P1", "response": "R1", "helpfulness": 3, "correctness": 4, "coherence": 0, "complexity": 2,
         "verbosity": 1},
        {"prompt": "P2", "response": "R2", "helpfulness": 0, "correctness": None, "coherence": 4, "complexity": 1}])
    rows, pairs, info = rm_data.load(f)
    assert info["schema"] == "helpsteer" and pairs == [] and len(rows) == 2
    assert rows[0]["labels"] == {"helpsteer-helpfulness": 70.0, "helpsteer-correctness": 90.0,
                                 "helpsteer-coherence": 10.0, "helpsteer-complexity": 50.0,
                                 "helpsteer-verbosity": 30.0}
    assert rows[1]["labels"]["helpsteer-correctness"] is None and rows[1]["labels"]["helpsteer-verbosity"] is None
    t = rm_data.to_row(rows[1], ATTRIBUTES)  # missing → mask 0
    assert t["mask"].tolist() == [1, 0, 1, 1, 0, 0, 0, 0, 0, 0] and t["target"][0] == pytest.approx(0.1)
    bad = write_lines(tmp_path / "bad.jsonl", [{"prompt": "P", "response": "R", "helpfulness": 5}])
    with pytest.raises(DataError, match=f"{bad}:1: field 'helpfulness'"):
        rm_data.load(bad)


def test_ultrafeedback_fine_grained_rows(tmp_path):
    ann = {"instruction_following": {"Rating": "5"}, "truthfulness": {"Rating": "3", "Type": ["0"]},
           "honesty": {"Rating": "N/A"}, "helpfulness": {"Rating": "2"}}
    f = write_lines(tmp_path / "uf.jsonl", [{"source": "x", "instruction": "Why?", "completions": [
        {"response": "Because.", "overall_score": 7.5, "annotations": ann},
        {"response": "No idea.", "overall_score": 1, "annotations": {}}]}])
    rows, pairs, info = rm_data.load(f)
    assert info["schema"] == "ultrafeedback" and pairs == []
    assert [r["response"] for r in rows] == ["Because.", "No idea."] and rows[0]["prompt"] == "Why?"
    assert rows[0]["labels"] == {"ultrafeedback-overall_score": 70.0, "ultrafeedback-instruction_following": 90.0,
                                 "ultrafeedback-truthfulness": 50.0, "ultrafeedback-honesty": None,
                                 "ultrafeedback-helpfulness": 30.0}
    assert rows[1]["labels"]["ultrafeedback-overall_score"] == 5.0
    assert all(rows[1]["labels"][f"ultrafeedback-{a}"] is None for a in rm_data.UF_ASPECTS)


def test_binarized_pairs_both_layouts_and_ties(tmp_path):
    msgs = [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "good"}]
    f = write_lines(tmp_path / "bin.jsonl", [
        {"prompt": "Q1", "chosen": "A", "rejected": "B", "metadata": {"score_chosen": 9.0, "score_rejected": 8.0}},
        {"prompt": "Q2", "prompt_id": "h2", "chosen": msgs, "score_chosen": 6.5, "score_rejected": 3,
         "rejected": [msgs[0], {"role": "assistant", "content": "bad"}]},
        {"prompt": "Q3", "chosen": "C", "rejected": "D", "metadata": {"score_chosen": 7.0, "score_rejected": 7.0}},
        {"prompt": "Q4", "chosen": "E", "rejected": "E", "metadata": {"score_chosen": 8.0, "score_rejected": 2.0}}])
    rows, pairs, info = rm_data.load(f)
    assert info["schema"] == "binarized" and info["pairs_dropped"] == 2  # the tie and the identical pair
    assert [(p["prompt"], p["chosen"], p["rejected"], p["prompt_id"]) for p in pairs] == [
        ("Q1", "A", "B", "Q1"), ("Q2", "good", "bad", "h2")]
    lab = {(r["prompt"], r["response"]): r["labels"][rm_data.UF_OVERALL] for r in rows}
    assert lab == {("Q1", "A"): 85.0, ("Q1", "B"): 75.0, ("Q2", "good"): 60.0, ("Q2", "bad"): 25.0,
                   ("Q3", "C"): 65.0, ("Q3", "D"): 65.0, ("Q4", "E"): 75.0}


def test_rm_schema_errors_and_pairs_from_ratings(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [
        {"prompt": "a", "response": "x", "labels": {HELPFULNESS: 80}},
        {"prompt": "a", "response": "y", "labels": {HELPFULNESS: 75}},
        {"prompt": "a", "response": "z", "labels": {HELPFULNESS: 40, VERBOSITY: None}},
        {"prompt": "b", "response": "w", "labels": {HELPFULNESS: None}}])
    rows, _, _ = rm_data.load(f)
    pairs = rm_data.pairs_from_ratings(rows, HELPFULNESS, 10)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("x", "z"), ("y", "z")]  # 80 vs 75: gap < 10
    bad = write_lines(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b", "labels": {"nope": 1}}])
    with pytest.raises(DataError, match=f"{bad}:1: field 'labels' has unknown"):
        rm_data.load(bad)
    with pytest.raises(DataError, match="cannot tell the schema"):
        rm_data.load(write_lines(tmp_path / "u.jsonl", [{"text": "?"}]))


def test_offline_hub_dataset_fails_fast(tiny_model_dir, tmp_path, monkeypatch):
    """A hub dataset id under HF_HUB_OFFLINE=1: one error, no connection attempted (a connect would raise here)."""
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by conftest before anything imported the hub

    def no_network(*a, **k):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(SystemExit, match="HF_HUB_OFFLINE=1 and it is not in the local datasets cache"):
        train_rm.main(["--data", "no-such-owner/no-such-ratings", "--backbone", tiny_model_dir,
                       "--out", str(tmp_path / "rm"), *CPU])
    assert not (tmp_path / "rm").exists()


# ============================================================================= probe and gate math
def test_ridge_path_matches_direct_solve():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(30, 8, generator=g, dtype=torch.float64), torch.randn(30, generator=g, dtype=torch.float64)
    W = armo.ridge_path(X, y, [1e-3, 1.0, 50.0])
    for w, a in zip(W, [1e-3, 1.0, 50.0]):
        direct = torch.linalg.solve(X.T @ X + a * torch.eye(8, dtype=torch.float64), X.T @ y)
        aug = torch.linalg.lstsq(torch.cat([X, math.sqrt(a) * torch.eye(8, dtype=torch.float64)]),
                                 torch.cat([y, torch.zeros(8, dtype=torch.float64)])).solution
        assert torch.allclose(w, direct, atol=1e-10) and torch.allclose(w, aug, atol=1e-8)


def test_fit_probe_ignores_missing_labels_and_picks_alpha():
    g = torch.Generator().manual_seed(1)
    F = torch.randn(40, 6, generator=g)
    w_true = torch.randn(6, generator=g)
    Y = torch.full((40, 3), float("nan"))
    Y[:30, 0] = F[:30] @ w_true       # noise-free: the smallest α wins
    Y[30:, 0] = float("nan")
    Y[::2, 1] = (F[::2] @ w_true) + 5  # objective 1: only every other row labelled
    W, alpha, sweep = armo.fit_probe(F, Y, list(range(0, 24)), list(range(24, 40)), [1e-4, 1.0, 1e4])
    assert alpha[0] == 1e-4 and torch.allclose(W[0], w_true, atol=1e-3)
    assert sweep[0][0] < sweep[0][1] < sweep[0][2]
    lab = [i for i in range(40) if i % 2 == 0]  # objective 1's refit uses exactly its labelled rows
    ref = armo.ridge_path(F[lab], Y[lab, 1], [alpha[1]])[0].float()
    assert torch.allclose(W[1], ref, atol=1e-5)
    assert alpha[2] is None and W[2].abs().sum() == 0  # never labelled: zero weights


def test_spearman_with_ties_is_pearson_of_average_ranks():
    x = torch.tensor([1.0, 2, 2, 3, 5, 5, 5, 0])
    y = torch.tensor([3.0, 1, 4, 1, 5, 9, 2, 6])
    rx, ry = [1, 2.5, 2.5, 4, 6, 6, 6, 0], [3, 0.5, 4, 0.5, 5, 7, 2, 6]  # average ranks, worked by hand
    assert armo.spearman(x, y) == pytest.approx(float(np.corrcoef(rx, ry)[0, 1]), abs=1e-12)
    assert stats.average_ranks(x).tolist() == rx and stats.average_ranks(y).tolist() == ry
    assert math.isnan(armo.spearman(torch.ones(5), torch.arange(5.0)))


def test_debias_matrix_properties():
    g = torch.Generator().manual_seed(2)
    K, N = 5, 400
    verb = 2
    v = torch.randn(N, generator=g)
    R = torch.randn(N, K, generator=g)
    R[:, verb] = v
    R[:, 0] = 0.3 * v + torch.randn(N, generator=g)   # correlated with verbosity: needs a penalty
    R[:, 1] = -0.5 * v + torch.randn(N, generator=g)  # anti-correlated: λ = 0
    R[:, 3] = 4.0 * v                                 # rank-identical to verbosity: no λ ≤ .95 helps → 1
    R[:, 4] = 7.0                                     # constant: uncorrelated → 0
    T, lam = armo.debias_matrix(R, verb, threshold=0.03)
    grid = armo.DEBIAS_GRID
    assert lam[verb] == 1 and lam[1] == 0 and lam[3] == 1 and lam[4] == 0
    assert 0 < lam[0] < 1
    k = min(range(len(grid)), key=lambda j: abs(grid[j] - lam[0].item()))  # λ_0 is the smallest passing value
    assert armo.spearman(R[:, 0] - grid[k] * v, v) <= 0.03 < armo.spearman(R[:, 0] - grid[k - 1] * v, v)
    assert torch.all(T[:, verb] == 0)                 # r'_verb ≡ 0
    assert torch.allclose(R @ T, R - lam[None, :] * v[:, None])
    assert torch.equal(T + torch.outer(torch.eye(K)[verb], lam), torch.eye(K))  # T = I − e_verb λᵀ


def test_bt_loss_exact():
    sc, sr = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(2))) / 3
    assert armo.bt_loss(sc, sr).item() == pytest.approx(expected, rel=1e-6)


def test_gate_softmax_over_objectives_and_score_invariant():
    torch.manual_seed(0)
    K, H = 4, 6
    gate = armo.GatingNetwork(H, K, hidden=8, n_hidden=3, temperature=10.0,
                                  active=torch.tensor([True, True, False, True])).eval()
    assert sum(isinstance(m, torch.nn.Linear) for m in gate.mlp) == 4  # 3 hidden layers + output
    with torch.no_grad():
        gate.logit_scale.fill_(1.7)
    f_prompt, f_resp = torch.randn(5, H), torch.randn(5, H)
    g = gate(f_prompt)
    assert torch.allclose(g.sum(-1), torch.full((5,), 1.7)) and torch.all(g[:, 2] == 0)
    logits = gate.mlp(f_prompt)[:, [0, 1, 3]] / 10.0
    assert torch.allclose(g[:, [0, 1, 3]], 1.7 * torch.softmax(logits, -1))
    W, T = torch.randn(K, H), torch.eye(K) - torch.outer(torch.eye(K)[1], torch.tensor([0.2, 1.0, 0.0, 0.5]))
    rewards, gating, s = armo.ArmoHead(W, T, gate)(f_resp, f_prompt)
    assert torch.allclose(rewards, f_resp @ W.T)
    assert torch.allclose(s, (rewards * (gating @ T.T)).sum(-1), atol=1e-5)  # score = Σ r·(g Tᵀ)
    assert not torch.allclose(s, (rewards * gating).sum(-1))                 # and T is really applied


def test_user_turn_end_from_the_template(tokenizer):
    prompt, response = "How do I boil an egg?", "Boil water. Add the egg."
    for template in ("chat", "dpa"):
        full = rm_text(tokenizer, prompt, response, template)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        i = armo.user_turn_end(full, rm_prompt_text(tokenizer, prompt, template), enc["offset_mapping"])
        head = tokenizer.decode(enc["input_ids"][:i + 1])
        if template == "chat":  # the end-of-turn token that closes the user turn
            assert enc["input_ids"][i] == tokenizer.convert_tokens_to_ids("<|im_end|>")
            assert head.endswith(prompt + "<|im_end|>")
        else:
            assert head.endswith(prompt) or head.endswith(prompt[:-1])
            assert prompt not in tokenizer.decode(enc["input_ids"][i + 1:])
    # hand-made offsets: the token covering the prompt's last character, even when merged across the boundary
    assert armo.user_turn_end("ab|cd", "ab", [(0, 1), (1, 3), (3, 5)]) == 1
    with pytest.raises(ValueError, match="end of the user turn cannot be located"):
        armo.user_turn_end("<<q>>a", "q", [(0, 6)])


def test_user_turn_end_error_through_encode(tokenizer):
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    # a template that marks the last message: without the assistant turn the user turn renders differently
    tok.chat_template = "{% for m in messages %}{% if loop.last %}<<{{ m.content }}>>{% else %}{{ m.content }}|" \
                        "{% endif %}{% endfor %}"
    with pytest.raises(SystemExit, match="end of the user turn cannot be located"):
        armo.encode_items(tok, [("q", "a")], "chat", 64)


# ============================================================================= the three methods, end to end
def demo_rows():
    """6 prompts × 4 rated answers: helpfulness and verbosity follow simple text features, coherence is half missing."""
    rows = []
    for i in range(6):
        for j, ans in enumerate(["Yes.", "It depends on the details of the case " * 2, "Banana " * 3,
                                 "Here is a careful and complete answer, step by step, with an example " * 3]):
            rows.append({"prompt_id": f"q{i}", "prompt": f"Question number {i}: how does thing {i} work?",
                         "response": ans, "labels": {HELPFULNESS: [40, 70, 10, 85][j] + i,
                                                     VERBOSITY: [5, 30, 15, 90][j],
                                                     "helpsteer-coherence": None if j % 2 else 60.0 + j}})
    return rows


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """regression (plain-string DPA template), probe and gate on the same data. → {method: (folder, stdout)}"""
    tmp = tmp_path_factory.mktemp("rm-methods")
    data = write_lines(tmp / "demo.jsonl", demo_rows())
    common_args = ["--data", data, "--pairs", data, "--backbone", tiny_model_dir, "--val-frac", "0.34",
                   "--batch-size", "4", "--feature-cache", str(tmp / "features"), *CPU]
    extra = {"regression": ["--max-steps", "2", "--template", "dpa"], "probe": [],
             "gate": ["--gate-steps", "30", "--gate-batch", "16", "--gate-hidden", "16", "--log-every", "10"]}
    out = {}
    for method in ("regression", "probe", "gate"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            train_rm.main([*common_args, "--method", method, "--out", str(tmp / method), *extra[method]])
        out[method] = (tmp / method, buf.getvalue())
    return out


def test_regression_folder_is_plain_hf(trained):
    from transformers import AutoConfig, AutoModelForSequenceClassification
    folder, stdout = trained["regression"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["method"] == "regression" and meta["template"] == "dpa" and meta["scale"] == [0, 100]
    assert meta["attributes"] == ATTRIBUTES
    assert getattr(AutoConfig.from_pretrained(str(folder)), "auto_map", None) is None  # no remote code
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), trust_remote_code=False)
    assert model.config.num_labels == 10 and model.score.bias is None
    ev = json.loads((folder / "eval.json").read_text())
    assert ev["pairwise"]["attribute"] == HELPFULNESS and ev["pairwise"]["n"] > 0
    assert 0 <= ev["pairwise"]["accuracy_attribute"] <= 1 and "accuracy_score" not in ev["pairwise"]
    assert "pairwise accuracy (held out" in stdout


def test_probe_and_gate_folders(trained):
    probe, p_out = trained["probe"]
    gate, g_out = trained["gate"]
    n = len(demo_rows())  # the gate reuses every feature the probe computed
    assert f"features: {n} items, 0 from the cache" in p_out and f"features: {n} items, {n} from the cache" in g_out
    pm, gm = (json.loads((d / "meta.json").read_text()) for d in (probe, gate))
    for m in (pm, gm):
        assert m["attributes"] == ATTRIBUTES and m["scale"] == [0, 100] and m["template"] == "chat"
        assert os.path.isdir(m["backbone"])
    assert pm["ridge_alpha"][HELPFULNESS] in armo.RIDGE_ALPHAS
    assert pm["ridge_alpha"]["ultrafeedback-honesty"] is None  # never labelled
    assert gm["debias"]["lambda"][VERBOSITY] == 1.0 and gm["gate"]["n_hidden"] == 3
    # same features and split: the gate's per-attribute held-out metrics are the probe's
    pe, ge = (json.loads((d / "eval.json").read_text()) for d in (probe, gate))
    assert pe[VERBOSITY] == ge[VERBOSITY] and pe[HELPFULNESS]["n"] == 8
    assert 0 <= ge["pairwise"]["accuracy_score"] <= 1
    head, meta = armo.load_armo(str(gate))
    assert head.gate is not None and torch.all(head.reward_transform_matrix[:, ATTRIBUTES.index(VERBOSITY)] == 0)
    assert head.gate.active.tolist() == [a is not None for a in gm["ridge_alpha"].values()]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    texts = ["Yes.", "A much longer answer " * 6, "Two words", "Medium length answer here.", "No"]
    return write_lines(tmp_path_factory.mktemp("samples") / "s.jsonl",
                       [{"id": f"r{i}", "prompt": f"Q{i}?", "response": t} for i, t in enumerate(texts)])


@pytest.mark.parametrize("method", ["regression", "probe", "gate"])
def test_score_our_formats(trained, samples, tmp_path, tokenizer, method):
    folder, _ = trained[method]
    out = tmp_path / "scored.jsonl"
    score.main(["--samples", samples, "--rm", str(folder), "--batch-size", "2", "--out", str(out), *CPU])
    recs = read_jsonl(str(out))
    assert [r["id"] for r in recs] == [f"r{i}" for i in range(5)]  # input order, despite length-sorted batches
    assert all(list(r["rewards"]) == ATTRIBUTES for r in recs)
    if method == "regression":  # the plain-string template recorded in meta.json is the one scored
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32).eval()
        r = recs[1]
        ids = tok(DPA_RM_TEMPLATE.format(prompt=r["prompt"], response=r["response"]), return_tensors="pt",
                  add_special_tokens=False)
        with torch.no_grad():
            ref = reward_forward(model, ids["input_ids"], ids["attention_mask"])[0].tolist()
        assert [r["rewards"][a] for a in ATTRIBUTES] == pytest.approx(ref, abs=2e-3)
        return
    # probe/gate: each record equals the head on that record's own features (batch of one, no padding)
    from transformers import AutoModel
    head, meta = armo.load_armo(str(folder))
    backbone = AutoModel.from_pretrained(meta["backbone"], dtype=torch.float32).eval()
    for r in recs:
        enc = armo.encode_items(tokenizer, [(r["prompt"], r["response"])], "chat", 320)
        f, fp, _ = armo.compute_features(backbone, enc, 1, "cpu", contextlib.nullcontext)
        with torch.no_grad():
            rw, g, s = head(f, fp)
        assert [r["rewards"][a] for a in ATTRIBUTES] == pytest.approx(rw[0].tolist(), abs=2e-3)
        if method == "probe":
            assert "score" not in r and "gating" not in r
        else:
            gv = torch.tensor([r["gating"][a] for a in ATTRIBUTES])
            rv = torch.tensor([r["rewards"][a] for a in ATTRIBUTES])
            assert r["score"] == pytest.approx(s.item(), abs=2e-3)
            assert r["score"] == pytest.approx((rv * (gv @ head.reward_transform_matrix.T)).sum().item(), abs=0.05)


def test_score_released_dpa_layout(samples, tmp_path, tokenizer, make_tiny_config):
    """A 10-output sequence classifier saved without meta.json reads as the released DPA RM: ATTRIBUTES, [INST] text."""
    from transformers import LlamaForSequenceClassification
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(make_tiny_config(len(tokenizer), num_labels=10)).eval()
    folder = tmp_path / "dpa-rm"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    out = tmp_path / "scored.jsonl"
    score.main(["--samples", samples, "--rm", str(folder), "--batch-size", "3", "--out", str(out), *CPU])
    recs = read_jsonl(str(out))
    with torch.no_grad():
        for r in recs:
            ids = tokenizer(DPA_RM_TEMPLATE.format(prompt=r["prompt"], response=r["response"]), return_tensors="pt",
                            add_special_tokens=False)
            ref = reward_forward(model, ids["input_ids"], ids["attention_mask"])[0].tolist()
            assert [r["rewards"][a] for a in ATTRIBUTES] == pytest.approx(ref, abs=2e-3)


def test_steer_reads_every_rm_format_with_the_loader_of_score(trained, tmp_path, tokenizer, make_tiny_config,
                                                               tiny_model_dir, capsys):
    """steer.py --rm goes through score.py's loader: the released DPA layout (LABEL_i names, no meta.json) gets the
    [INST] template and the DPA attribute names; probe and gate folders load too."""
    from transformers import LlamaForSequenceClassification
    torch.manual_seed(3)
    released = tmp_path / "dpa-rm"
    LlamaForSequenceClassification(make_tiny_config(len(tokenizer), num_labels=10)).save_pretrained(str(released))
    tokenizer.save_pretrained(str(released))
    rm = reward_models.load_rm(str(released), "cpu", torch.float32)
    assert rm.kind == "released-dpa" and rm.template == "dpa" and rm.names == ATTRIBUTES
    for folder in (released, trained["probe"][0], trained["gate"][0]):
        steer.main(["--model", tiny_model_dir, "--rm", str(folder), "--best-of-n", "2", "--max-new-tokens", "3",
                    "--verbose", "--device", "cpu", "hi"])
        out = capsys.readouterr().out
        assert "[candidate 0] vᵀr = " in out and "[candidate 1] vᵀr = " in out and "[assistant θ=0°]" in out


STAND_IN = '''
from dataclasses import dataclass
import torch
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


@dataclass
class GatedRewardOutput(ModelOutput):
    rewards: torch.FloatTensor = None
    gating_output: torch.FloatTensor = None
    score: torch.FloatTensor = None


class TinyGatedRM(LlamaPreTrainedModel):
    """Test stand-in with an ArmoRM-like interface: rewards in [0, 1], gating weights, score = Σ g ⊙ (r T)."""
    config_class = LlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.heads = torch.nn.Linear(config.hidden_size, 2 * config.num_objectives)
        self.register_buffer("transform", torch.eye(config.num_objectives) * 0.5)
        self.post_init()

    def forward(self, input_ids, attention_mask, **kwargs):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = h[torch.arange(len(h)), attention_mask.sum(1) - 1]
        r, g = self.heads(last).chunk(2, dim=-1)
        rewards, gating = torch.sigmoid(r), torch.softmax(g, dim=-1)
        return GatedRewardOutput(rewards=rewards, gating_output=gating,
                                 score=(gating * (rewards @ self.transform)).sum(-1, keepdim=True))
'''


def test_score_own_code_gated_model(repo_root, samples, tmp_path, tokenizer, make_tiny_config):
    folder = tmp_path / "armo-like"
    folder.mkdir()
    (folder / "modeling_tiny_gated.py").write_text(STAND_IN)
    sys.path.insert(0, str(folder))
    try:
        import modeling_tiny_gated
    finally:
        sys.path.remove(str(folder))
    cfg = make_tiny_config(len(tokenizer), num_objectives=19,
                           auto_map={"AutoModelForSequenceClassification": "modeling_tiny_gated.TinyGatedRM"})
    torch.manual_seed(4)
    model = modeling_tiny_gated.TinyGatedRM(cfg).eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    out = tmp_path / "scored.jsonl"
    cmd = [sys.executable, "score.py", "--samples", samples, "--rm", str(folder), "--batch-size", "2", "--out",
           str(out), *CPU]
    p = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "--trust-remote-code" in p.stderr and not out.exists()
    p = subprocess.run([*cmd, "--trust-remote-code"], cwd=repo_root, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = read_jsonl(str(out))
    assert [r["id"] for r in recs] == [f"r{i}" for i in range(5)]
    assert list(recs[0]["rewards"]) == reward_models.ARMO_OBJECTIVES and list(recs[0]["gating"]) == reward_models.ARMO_OBJECTIVES
    with torch.no_grad():
        for r in recs:
            ids = tokenizer(rm_text(tokenizer, r["prompt"], r["response"]), return_tensors="pt",
                            add_special_tokens=False)
            o = model(ids["input_ids"], ids["attention_mask"])
            assert [r["rewards"][a] for a in reward_models.ARMO_OBJECTIVES] == pytest.approx((o.rewards[0] * 100).tolist(),
                                                                                   abs=2e-3)
            assert r["score"] == pytest.approx(o.score.item() * 100, abs=2e-3)
            assert sum(r["gating"].values()) == pytest.approx(1.0, abs=1e-3)
    assert np.isfinite([r["score"] for r in recs]).all()
