"""The whole DPA loop at toy size on the embedded SmolLM2-135M (SMOKE=1 bash run_all.sh), ≈ 2-3 min on 2 cores.

    python -m pytest tests/test_smoke.py -q
"""
import csv
import json
import os
import subprocess
import sys

from runtime.io import read_jsonl


def test_smoke_run_all(repo_root, smollm2_dir, tmp_path):
    env = dict(os.environ, SMOKE="1", OUT=str(tmp_path / "demo"), PY=sys.executable, HF_HUB_OFFLINE="1")
    proc = subprocess.run(["bash", "run_all.sh"], cwd=repo_root, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "smoke"
    # one table row per (policy, angle): the base policy and round 1 after RSF + neighbour-angle DPO (PREF=dpo, the
    # default); SMOKE leaves out the two ablation evaluations (best-of-3 reranking, RSF only)
    with open(out / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["policy"], float(r["degree"])) for r in rows} == {
        (p, d) for p in ("round0", "round1") for d in (-45.0, 0.0, 45.0)}
    assert all(0 <= float(r["truncated"]) <= 1 and float(r["tokens"]) > 0 for r in rows)
    assert "evaluate: round1 " in proc.stdout and "round1-rsf" not in proc.stdout
    assert "spearman(θ, verbosity)" in proc.stdout
    assert "Spearman(θ, words)" in proc.stdout and "within ±10°" in proc.stdout  # the target diagnostic
    assert "[assistant θ=-45°]" in proc.stdout and "[assistant θ=45°]" in proc.stdout
    # every stage left its artefact; the scored evaluation carries RM rewards and the judge's ratings
    assert (out / "rm" / "meta.json").exists() and (out / "round1" / "sft" / "meta.json").exists()
    assert json.loads((out / "round1" / "policy" / "meta.json").read_text())["loss"] == "dpo"
    scored = read_jsonl(str(out / "eval-round1.jsonl"))
    assert all(len(r["rewards"]) == 10 and "helpsteer-verbosity" in r["judge"] for r in scored)
