"""The whole DPA loop at toy size on the embedded SmolLM2-135M (SMOKE=1 bash run_all.sh), ≈ 3 min on 2 cores.
In the whole suite the run starts before the first test and runs beside the others (conftest.py).

    python -m pytest tests/test_smoke.py -q
"""
import csv
import json
import os
import subprocess

from runtime.io import read_jsonl


def test_smoke_run_all(smoke_run):
    code, stdout, out = smoke_run
    assert code == 0, stdout[-6000:]
    # one table row per (policy, angle): the base policy and round 1 after RSF + neighbour-angle DPO (PREF=dpo, the
    # default); SMOKE leaves out the two ablation evaluations (best-of-3 reranking, RSF only)
    with open(out / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["policy"], float(r["degree"])) for r in rows} == {
        (p, d) for p in ("round0", "round1") for d in (-45.0, 0.0, 45.0)}
    assert all(0 <= float(r["truncated"]) <= 1 and float(r["tokens"]) > 0 for r in rows)
    assert "evaluate: round1 " in stdout and "round1-rsf" not in stdout
    assert "spearman(θ, verbosity)" in stdout
    assert "Spearman(θ, words)" in stdout and "within ±10°" in stdout  # the target diagnostic
    assert "[assistant θ=-45°]" in stdout and "[assistant θ=45°]" in stdout
    # every stage left its artefact; the scored evaluation carries RM rewards and the judge's ratings
    assert (out / "rm" / "meta.json").exists() and (out / "round1" / "sft" / "meta.json").exists()
    assert json.loads((out / "round1" / "policy" / "meta.json").read_text())["loss"] == "dpo"
    scored = read_jsonl(str(out / "eval-round1.jsonl"))
    assert all(len(r["rewards"]) == 10 and "helpsteer-verbosity" in r["judge"] for r in scored)


def test_run_all_rejects_bad_flags(tmp_path):
    # a flag run_all.sh cannot honour stops it at once with one line naming the flag, before it writes anything
    for env, words in (({"PREF": "ppo"}, "PREF=ppo"), ({"RM_METHOD": "svm"}, "RM_METHOD=svm"),
                       ({"SFT_EPOCHS": "0", "PREF": "none"}, "trains nothing")):
        out = tmp_path / "run"
        proc = subprocess.run(["bash", "run_all.sh"], cwd=os.path.dirname(os.path.dirname(__file__)),
                              env=dict(os.environ, OUT=str(out), **env), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and words in proc.stderr and proc.stderr.count("\n") == 1, (env, proc.stderr)
        assert not out.exists()
