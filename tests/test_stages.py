"""End-to-end runs of every stage script from its command-line arguments, on a tiny random Llama (CPU, offline).

Run from the repository root:

    python -m pytest tests/ -q                    # the whole suite
    python -m pytest tests/test_stages.py -q      # this file only (≈ 1 min on 2 CPU cores)
"""
import contextlib
import csv
import importlib
import importlib.util
import io
import json
import math
import os
import random
import sys
import types

import pytest
import torch

from common import ATTRIBUTES, HELPFULNESS, SCHEMA_VERSION, VERBOSITY, reward_forward, rm_text
from runtime.io import DataError, read_jsonl

CPU = ("--device", "cpu", "--dtype", "float32")


def run(repo_root, script, *args, ok=True):
    """Run a stage as its command line would, in this process (no interpreter start-up and imports per run; the
    command-line layer itself, exit status and one-line errors, is tested through real processes in
    test_reliability.py): main(argv) from the repository root with stdout and stderr captured; a DataError or
    SystemExit becomes the exit status and stderr line that `cli` makes of it. Asserts the exit status (0 when ok,
    else non-zero) → (returncode, stdout, stderr)."""
    module = importlib.import_module(script.removesuffix(".py"))
    out, err, code, cwd = io.StringIO(), io.StringIO(), 0, os.getcwd()
    os.chdir(repo_root)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.main([str(a) for a in args])
            except DataError as e:
                print(f"error: {e}", file=sys.stderr)
                code = 1
            except SystemExit as e:  # argparse (status 2, message already on stderr) or an "error: ..." exit
                code = e.code if isinstance(e.code, int) else 1
                if not isinstance(e.code, int) and e.code is not None:
                    print(e.code, file=sys.stderr)
    finally:
        os.chdir(cwd)
    p = types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if ok:
        assert p.returncode == 0, f"{script} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    else:
        assert p.returncode != 0, f"{script} should have failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def scored_rec(pid, rid, degree, h, v, response=None):
    rewards = {a: 50.0 for a in ATTRIBUTES}
    rewards[HELPFULNESS], rewards[VERBOSITY] = float(h), float(v)
    return {"id": rid, "prompt_id": pid, "prompt": f"Question {pid}?", "degree": degree,
            "response": response or f"Answer {rid}.", "truncated": False, "rewards": rewards}


def scored_records():
    # per prompt: a short helpful answer (wins at -45°), a verbose one (wins at +45°), a mediocre one (never wins)
    return [scored_rec("A", "a0", 10.0, 80, 10, "Short."),
            scored_rec("A", "a1", 10.0, 70, 90, "A much longer and more detailed answer with many words."),
            scored_rec("A", "a2", 10.0, 40, 40, "Meh."),
            scored_rec("B", "b0", -20.0, 60, 95, "Here is a long, long explanation of everything involved."),
            scored_rec("B", "b1", -20.0, 75, 5, "Yes."),
            scored_rec("B", "b2", -20.0, 30, 50, "Hmm, maybe.")]


# ----------------------------------------------------------------------------- sample.py
@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_lines(tmp_path_factory.mktemp("prompts") / "prompts.jsonl",
                       [{"id": "p1", "prompt": "Why is the sky blue during the day?"},  # longer first: the
                        {"id": "p2", "prompt": "How do I boil an egg?"}])               # batches run p2 first


def test_sample_records_and_determinism(repo_root, tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "samples.jsonl"
    args = ("--prompts", prompts_file, "--n", 1, "--hints", "plain,brief", "--max-new-tokens", 8,
            "--model", tiny_model_dir, "--seed", 3, "--out", out, *CPU)
    run(repo_root, "sample.py", *args)
    recs = read_jsonl(str(out))
    assert len(recs) == 2 * 2  # prompts × hints × n
    fields = {"id", "prompt_id", "prompt", "degree", "weights", "hint", "response", "n_tokens", "truncated", "model",
              "seed", "gen", "schema_version"}
    for r in recs:
        assert fields <= set(r), fields - set(r)
        assert -45 <= r["degree"] <= 45
        wh, wv = r["weights"]
        assert (wh, wv) == (round(100 * math.cos(math.radians(r["degree"]))),
                            round(100 * math.sin(math.radians(r["degree"]))))
        assert r["id"] == f"{r['prompt_id']}/{r['degree']:g}/{r['hint']}/0"
        assert isinstance(r["response"], str)
        assert 0 <= r["n_tokens"] <= 8
        assert r["truncated"] == (r["n_tokens"] == 8)  # ended rows drop the end-of-turn token: < 8 tokens
        assert r["model"] == tiny_model_dir and r["seed"] == 3 and r["schema_version"] == SCHEMA_VERSION
        assert r["gen"] == {"temperature": 0.8, "top_p": 1.0, "max_new_tokens": 8}
    # input order: prompt by prompt, hints in the order given; θ is shared by the hints of one prompt
    assert [(r["prompt_id"], r["hint"]) for r in recs] == [("p1", "plain"), ("p1", "brief"), ("p2", "plain"),
                                                          ("p2", "brief")]
    assert recs[0]["degree"] == recs[1]["degree"] and recs[2]["degree"] == recs[3]["degree"]
    assert recs[0]["prompt"] == "Why is the sky blue during the day?" and recs[2]["prompt"] == "How do I boil an egg?"
    assert not os.path.exists(str(out) + ".partial")
    first = out.read_bytes()

    # an existing output is refused without --overwrite ...
    p = run(repo_root, "sample.py", *args, ok=False)
    assert "exists" in p.stderr
    # ... and the same seed reproduces the file byte for byte
    run(repo_root, "sample.py", *args, "--overwrite")
    assert out.read_bytes() == first


def test_sample_malformed_prompts_names_file_and_line(repo_root, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "p1", "prompt": "ok"}\n{"id": "p2", "prompt": "broken"\n')
    p = run(repo_root, "sample.py", "--prompts", bad, "--model", tiny_model_dir, "--out", tmp_path / "o.jsonl",
            *CPU, ok=False)
    assert f"{bad}:2" in p.stderr
    assert not (tmp_path / "o.jsonl").exists()


# ----------------------------------------------------------------------------- train_rm.py
@pytest.fixture(scope="module")
def rm_dir(repo_root, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    rows, rng = [], random.Random(0)
    for i in range(12):
        words = " ".join(["word"] * rng.randint(1, 30))
        labels = {HELPFULNESS: rng.randint(0, 100), VERBOSITY: rng.randint(0, 100),
                  "helpsteer-coherence": rng.randint(0, 100) if i % 2 else None, "ultrafeedback-honesty": None}
        rows.append({"prompt_id": f"q{i // 2}", "prompt": f"Question {i // 2}?", "response": words, "labels": labels})
    data = write_lines(tmp / "rm_train.jsonl", rows)
    out = tmp / "rm"
    p = run(repo_root, "train_rm.py", "--data", data, "--backbone", tiny_model_dir, "--max-steps", 2,
            "--batch-size", 4, "--out", out, *CPU)
    return out, p.stdout


def test_train_rm_outputs(rm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    out, stdout = rm_dir
    assert "10 train / 2 val rows | 2 steps" in stdout  # 6 prompts, one held out (val-frac 0.1 → at least 1)
    meta = json.loads((out / "meta.json").read_text())
    ev = json.loads((out / "eval.json").read_text())
    assert meta["attributes"] == ATTRIBUTES and meta["scale"] == [0, 100] and meta["template"] == "chat"
    assert meta["steps"] == 2 and meta["helpfulness"] == HELPFULNESS and meta["verbosity"] == VERBOSITY
    assert json.dumps(meta["eval"], sort_keys=True) == json.dumps(ev, sort_keys=True)  # (NaN != NaN)
    # only labelled attributes are evaluated; both DPA axes are labelled on every held-out row
    assert set(ev) <= {HELPFULNESS, VERBOSITY, "helpsteer-coherence"}
    assert ev[HELPFULNESS]["n"] == 2 and ev[VERBOSITY]["n"] == 2
    assert all(math.isfinite(m["mse"]) and m["mse"] >= 0 for m in ev.values())
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert model.config.num_labels == 10
    assert [model.config.id2label[k] for k in range(10)] == ATTRIBUTES
    assert model.score.bias is None
    assert model.score.weight.abs().sum() > 0  # the head trained away from its zero init
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_train_rm_bad_label_names_line_and_field(repo_root, tiny_model_dir, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b", "labels": {HELPFULNESS: 1}},
                                              {"prompt": "a", "response": "b", "labels": {VERBOSITY: "high"}}])
    p = run(repo_root, "train_rm.py", "--data", data, "--backbone", tiny_model_dir, "--out", tmp_path / "rm", *CPU,
            ok=False)
    assert f"{data}:2" in p.stderr and f"labels.{VERBOSITY}" in p.stderr
    assert not (tmp_path / "rm").exists()


# ----------------------------------------------------------------------------- score.py
def test_score_order_and_values(repo_root, rm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    rm, _ = rm_dir
    texts = ["Yes.", "A much longer answer " * 6, "Two words", "Medium length answer here.", "No"]
    samples = write_lines(tmp_path / "s.jsonl", [{"id": f"r{i}", "prompt": f"Q{i}?", "response": t, "extra": i}
                                                 for i, t in enumerate(texts)])
    out = tmp_path / "scored.jsonl"
    run(repo_root, "score.py", "--samples", samples, "--rm", rm, "--batch-size", 2, "--out", out, *CPU)
    recs = read_jsonl(str(out))
    assert [r["id"] for r in recs] == [f"r{i}" for i in range(5)]  # input order, despite length-sorted batches
    assert [r["extra"] for r in recs] == list(range(5))           # other fields kept
    for r in recs:
        assert list(r["rewards"]) == ATTRIBUTES
        assert r["rm"] == str(rm)
    # each reward equals scoring that record alone (no padding), rounded to 3 decimals
    tok = AutoTokenizer.from_pretrained(str(rm))
    model = AutoModelForSequenceClassification.from_pretrained(str(rm), dtype=torch.float32).eval()
    with torch.no_grad():
        for r in recs:
            ids = tok(rm_text(tok, r["prompt"], r["response"]), return_tensors="pt", add_special_tokens=False)
            ref = reward_forward(model, ids["input_ids"], ids["attention_mask"])[0].tolist()
            assert [r["rewards"][a] for a in ATTRIBUTES] == pytest.approx(ref, abs=2e-3)
    assert len({r["rewards"][HELPFULNESS] for r in recs}) > 1  # not a constant output

    p = run(repo_root, "score.py", "--samples", samples, "--rm", rm, "--out", samples, *CPU, ok=False)
    assert "also an input" in p.stderr


def test_score_missing_field_names_line(repo_root, rm_dir, tmp_path):
    rm, _ = rm_dir
    samples = write_lines(tmp_path / "s.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    p = run(repo_root, "score.py", "--samples", samples, "--rm", rm, "--out", tmp_path / "o.jsonl", *CPU, ok=False)
    assert f"{samples}:2" in p.stderr and "'response'" in p.stderr


# ----------------------------------------------------------------------------- finetune.py
def _params_changed(init_dir, out_dir):
    from transformers import AutoModelForCausalLM
    a = AutoModelForCausalLM.from_pretrained(str(init_dir), dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return any(not torch.equal(sa[k], sb[k]) for k in sa)


def test_finetune_sft_hindsight(repo_root, tiny_model_dir, tmp_path):
    scored = write_lines(tmp_path / "scored.jsonl", scored_records())
    out = tmp_path / "sft"
    p = run(repo_root, "finetune.py", "--scored", scored, "--loss", "sft", "--select", "hindsight",
            "--max-steps", 2, "--batch-size", 2, "--init", tiny_model_dir, "--out", out, *CPU)
    assert "sft on 8 rows | 2 steps" in p.stdout and "packed rows checked against padded ones" in p.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["loss"] == "sft" and meta["rows"] == 8 and meta["steps"] == 2 and meta["init"] == tiny_model_dir
    assert len(meta["log"]) == 2 and all(math.isfinite(s["loss"]) and s["loss"] > 0 for s in meta["log"])
    rows = read_jsonl(str(out / "train_rows.jsonl"))
    got = {(r["prompt"], r["degree"]): r["source_id"] for r in rows}
    assert got == {("Question A?", -45.0): "a0", ("Question A?", -15.0): "a0", ("Question A?", 15.0): "a1",
                   ("Question A?", 45.0): "a1", ("Question B?", -45.0): "b1", ("Question B?", -15.0): "b1",
                   ("Question B?", 15.0): "b0", ("Question B?", 45.0): "b0"}
    assert _params_changed(tiny_model_dir, out)


def test_finetune_dpo_mirrored(repo_root, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer
    scored = write_lines(tmp_path / "scored.jsonl", scored_records())
    out = tmp_path / "dpo"
    p = run(repo_root, "finetune.py", "--scored", scored, "--loss", "dpo", "--pairs", "mirrored", "--max-steps", 1,
            "--batch-size", 2, "--init", tiny_model_dir, "--out", out, *CPU)
    assert "dpo on 4 pairs | 1 steps" in p.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["loss"] == "dpo" and meta["rows"] == 4 and meta["steps"] == 1
    # step 1: the policy is still the reference, so the margin is 0 and the loss is log 2
    assert meta["log"][0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert meta["log"][0]["margin"] == pytest.approx(0.0, abs=1e-2)
    pairs = read_jsonl(str(out / "train_rows.jsonl"))
    assert [(r["prompt"], r["degree"], r["chosen"][:6], r["rejected"][:6]) for r in pairs] == [
        ("Question A?", 45.0, "A much", "Short."), ("Question A?", -45.0, "Short.", "A much"),
        ("Question B?", 45.0, "Here i", "Yes."), ("Question B?", -45.0, "Yes.", "Here i")]
    assert _params_changed(tiny_model_dir, out)
    assert AutoTokenizer.from_pretrained(str(out)).eos_token == "<|im_end|>"


def test_finetune_unscored_input_names_line(repo_root, tiny_model_dir, tmp_path):
    recs = scored_records()
    del recs[2]["rewards"]
    scored = write_lines(tmp_path / "scored.jsonl", recs)
    p = run(repo_root, "finetune.py", "--scored", scored, "--init", tiny_model_dir, "--out", tmp_path / "o", *CPU,
            ok=False)
    assert f"{scored}:3" in p.stderr and "'rewards'" in p.stderr


# ----------------------------------------------------------------------------- steer.py
def test_steer_prints_system_prompt(repo_root, tiny_model_dir):
    p = run(repo_root, "steer.py", "--model", tiny_model_dir, "--degree", -15, "--max-new-tokens", 5, "--verbose",
            "--device", "cpu", "hi")
    assert "[system] You are a helpful, respectful, and honest assistant" in p.stdout
    assert "helpfulness*97 + verbosity*-26" in p.stdout
    assert "[user] hi" in p.stdout and "[assistant θ=-15°]" in p.stdout


def test_steer_degrees_equal_one_run_per_angle(repo_root, tiny_model_dir):
    flags = ("--model", tiny_model_dir, "--max-new-tokens", 6, "--temperature", 1.0, "--device", "cpu", "hi", "yo")
    both = run(repo_root, "steer.py", "--degrees=-45,30", *flags).stdout
    one_by_one = "".join(run(repo_root, "steer.py", "--degree", d, *flags).stdout for d in (-45, 30))
    assert both == one_by_one and both.count("[assistant θ=-45°]") == 2 and both.count("[assistant θ=30°]") == 2
    p = run(repo_root, "steer.py", "--degrees=-45,-45", *flags, ok=False)
    assert "listed twice" in p.stderr


def test_steer_best_of_n_with_rm_and_weights(repo_root, tiny_model_dir, rm_dir):
    rm, _ = rm_dir
    p = run(repo_root, "steer.py", "--model", tiny_model_dir, "--rm", rm, "--best-of-n", 3, "--weights", 80, -60,
            "--max-new-tokens", 4, "--verbose", "--device", "cpu", "hello there")
    assert "helpfulness*80 + verbosity*-60" in p.stdout
    assert all(f"[candidate {k}] vᵀr = " in p.stdout for k in range(3))
    assert "[candidate 3]" not in p.stdout
    assert "[user] hello there" in p.stdout and "[assistant θ=-36.8699°]" in p.stdout
    p = run(repo_root, "steer.py", "--model", tiny_model_dir, "--best-of-n", 2, "--device", "cpu", "hi", ok=False)
    assert "--best-of-n needs --rm" in p.stderr


# ----------------------------------------------------------------------------- evaluate.py
def eval_records(verb_by_degree, tokens_by_degree):
    recs = []
    for deg, verbs in verb_by_degree.items():
        for k, v in enumerate(verbs):
            recs.append({"degree": deg, "response": "word " * (k + 1), "n_tokens": tokens_by_degree[deg][k],
                         "truncated": k == 1, "rewards": {HELPFULNESS: 50.0 + k, VERBOSITY: v},
                         "judge": {HELPFULNESS: 40.0, VERBOSITY: v / 2}})
    return recs


def test_evaluate_outputs(repo_root, tmp_path):
    base = write_lines(tmp_path / "base.jsonl", eval_records({-45: [10, 20], 0: [30, 40], 45: [50, 60]},
                                                             {-45: [10, 20], 0: [20, 30], 45: [40, 60]}))
    r1 = write_lines(tmp_path / "r1.jsonl", eval_records({-45: [60, 60], 0: [40, 40], 45: [20, 20]},
                                                         {-45: [50, 50], 0: [30, 30], 45: [10, 10]}))
    prefix = tmp_path / "eval"
    p = run(repo_root, "evaluate.py", f"base={base}", f"round1={r1}", "--out", prefix)
    rows = read_jsonl(str(prefix) + ".jsonl")
    assert [(r["policy"], r["degree"]) for r in rows] == [("base", -45), ("base", 0), ("base", 45),
                                                          ("round1", -45), ("round1", 0), ("round1", 45)]
    assert [r["verb"] for r in rows] == [15.0, 35.0, 55.0, 60.0, 40.0, 20.0]
    assert rows[0]["verb_se"] == pytest.approx(5.0) and rows[3]["verb_se"] == 0.0
    assert rows[0]["judge_verb"] == pytest.approx(7.5) and rows[0]["help"] == pytest.approx(50.5)
    assert all(r["truncated"] == 0.5 and r["n"] == 2 for r in rows)
    with open(str(prefix) + ".csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and table[0]["policy"] == "base" and float(table[2]["verb"]) == 55.0
    summ = read_jsonl(str(prefix) + "_summary.jsonl")
    assert [s["policy"] for s in summ] == ["base", "round1"]
    assert summ[0]["spearman_verb"] == pytest.approx(1.0) and summ[1]["spearman_verb"] == pytest.approx(-1.0)
    assert summ[0]["len_ratio"] == pytest.approx(50 / 15) and summ[1]["len_ratio"] == pytest.approx(10 / 50)
    assert "spearman(θ, verbosity) +1.00" in p.stdout and "spearman(θ, verbosity) -1.00" in p.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        png = prefix.with_suffix(".png")
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_single_direction(repo_root, tmp_path):
    base = write_lines(tmp_path / "base.jsonl", eval_records({0: [30, 40]}, {0: [20, 30]}))
    run(repo_root, "evaluate.py", f"base={base}", "--out", tmp_path / "eval")
    assert (tmp_path / "eval_summary.jsonl").exists()
