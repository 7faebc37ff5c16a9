"""torchrun on CPU: 2 processes on the gloo backend compute what 1 process computes.

    python -m pytest tests/test_distributed.py -q      # ≈ 15 s on 2 CPU cores

Training: a step whose global batch is split over 2 ranks (DDP, or FSDP2 with --fsdp) must give the same losses and
parameters as one process that accumulates the same micro-batches (--grad-accum × 2). Sweeps: sample.py and score.py
sharded by rank (torchrun) or by job (--shard i/N, then --merge N) must write the same bytes as one process.
Every distributed run happens in ONE torchrun launch (tests/torchrun_jobs.py runs the stages one after another), so
the start-up of 2 interpreters and the process group is paid once. The one-process references run in this process
(main(argv)), on 1 thread like each rank, so that the same float reductions run on both sides.
"""
import importlib
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from common import ATTRIBUTES, HELPFULNESS, VERBOSITY
from runtime.dist import collect_parts, shard, shard_spec
from runtime.io import DataError, read_jsonl

CPU = ("--device", "cpu", "--dtype", "float32")


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def load_state(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def assert_same_model(a, b, init, atol=1e-5):
    """The same tensors (to atol), and training moved them far more than atol (so the check can fail). atol is
    loose because Adam's first steps (update ≈ lr·sign(g)) magnify float noise in near-zero gradient entries."""
    sa, sb, s0 = load_state(a), load_state(b), load_state(init)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)
    assert max((sa[k] - s0[k]).abs().max().item() for k in sa if k in s0) > 20 * atol


def log_of(folder):
    return json.loads((folder / "meta.json").read_text())["log"]


def scored_records():
    """4 prompts × 3 scored answers: a short helpful one (wins at −45°), a long one (wins at +45°), a weak one."""
    recs, rng = [], random.Random(0)
    for p in "ABCD":
        rewards = [(80, 10), (70, 90), (40, 40)]
        answers = ["Short.", "A much longer and more detailed answer with many words. " * rng.randint(1, 3), "Meh."]
        for k, ((h, v), text) in enumerate(zip(rewards, answers)):
            r = dict.fromkeys(ATTRIBUTES, 50.0)
            r[HELPFULNESS], r[VERBOSITY] = float(h), float(v)
            recs.append({"id": f"{p}{k}", "prompt_id": p, "prompt": f"Question {p}?", "degree": 10.0,
                         "response": text, "truncated": False, "rewards": r})
    return recs


def rm_rows():
    """5 prompts × 3 rated answers, some ratings missing; 1 prompt (3 rows) is held out: an odd count, so one rank
    of 2 predicts a padding row."""
    rng, rows = random.Random(1), []
    for i in range(15):
        labels = {HELPFULNESS: rng.randint(0, 100), VERBOSITY: rng.randint(0, 100),
                  "helpsteer-coherence": rng.randint(0, 100) if i % 2 else None}
        rows.append({"prompt_id": f"q{i // 3}", "prompt": f"Question {i // 3}?",
                     "response": " ".join(["word"] * rng.randint(1, 30)) + f" {i}", "labels": labels})
    return rows


def one_process(stage, *args):
    """A stage's main(argv) in this process, on 1 thread (each rank of torchrun runs on 1 thread too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        importlib.import_module(stage).main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def torchrun_jobs(repo_root, jobs, path):
    """Every job in one `torchrun --standalone --nproc_per_node=2` launch (tests/torchrun_jobs.py), 1 thread per rank.
    → rank 0's output, split per job."""
    path.write_text(json.dumps([dict(j, argv=[str(a) for a in j["argv"]]) for j in jobs]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(repo_root / "tests" / "torchrun_jobs.py"), str(path)]
    p = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout.split("== job ")[1:]


@pytest.fixture(scope="module")
def runs(repo_root, tiny_model_dir, tmp_path_factory):
    """The same work done by 1 process (in this process) and by 2 torchrun ranks (one launch), plus job-array shards.
    → (tmp folder, rank 0's output per torchrun job)."""
    tmp = tmp_path_factory.mktemp("dist")
    scored = write_lines(tmp / "scored.jsonl", scored_records())
    rm_data = write_lines(tmp / "rm.jsonl", rm_rows())
    prompts = write_lines(tmp / "prompts.jsonl",
                          [{"id": f"p{i}", "prompt": "Why is the sky blue? " * (1 + i % 3) + str(i)} for i in range(5)])
    # train_rm: global batch 4 rows = 1 process × 2 micro-batches of 2 = 2 ranks × 1; 3 of 15 rows held out
    rm = ("--data", rm_data, "--backbone", tiny_model_dir, "--batch-size", 2, "--max-steps", 3, "--warmup", 0,
          "--lr", 1e-3, "--val-frac", 0.2, *CPU)
    # finetune sft: 16 hindsight rows, global batch 4 = 1 process × 4 micro-batches of 1 = 2 ranks × 2
    sft = ("--scored", scored, "--loss", "sft", "--select", "hindsight", "--batch-size", 1, "--max-steps", 3,
           "--warmup", 0, "--lr", 1e-3, "--init", tiny_model_dir, *CPU)
    # finetune dpo: 8 mirrored pairs, global batch 8 = 1 process × 4 micro-batches of 2 = 2 ranks × 2; 2 epochs
    dpo = ("--scored", scored, "--loss", "dpo", "--pairs", "mirrored", "--batch-size", 2, "--epochs", 2,
           "--warmup", 0, "--lr", 1e-3, "--nll-coef", 0.5, "--freeze-layers", 1, "--init", tiny_model_dir, *CPU)
    # sample: 5 prompts × 2 hints × 2 = 20 responses in 7 batches of 3; score: 7 batches of 3
    smp = ("--prompts", prompts, "--n", 2, "--hints", "plain,brief", "--batch-size", 3, "--max-new-tokens", 6,
           "--model", tiny_model_dir, "--seed", 7, *CPU)
    sco = ("--samples", tmp / "s_one.jsonl", "--rm", tmp / "rm_one", "--batch-size", 3, *CPU)

    one_process("train_rm", *rm, "--grad-accum", 2, "--out", tmp / "rm_one")
    one_process("finetune", *sft, "--grad-accum", 4, "--out", tmp / "sft_one")
    one_process("finetune", *dpo, "--grad-accum", 4, "--out", tmp / "dpo_one")
    one_process("sample", *smp, "--out", tmp / "s_one.jsonl")
    one_process("score", *sco, "--out", tmp / "c_one.jsonl")
    # an interrupted job 1/2 leaves OUT.part-1-of-2.partial after its first batch: rank 1 of torchrun resumes it
    sample = importlib.import_module("sample")
    real, calls = sample.generate_batch, []

    def interrupted(*a):
        if calls:
            raise InterruptedError("killed")
        calls.append(1)
        return real(*a)
    sample.generate_batch = interrupted
    try:
        with pytest.raises(InterruptedError):
            one_process("sample", *smp, "--shard", "1/2", "--out", tmp / "s_ddp.jsonl")
    finally:
        sample.generate_batch = real
    assert (tmp / "s_ddp.jsonl.part-1-of-2.partial").read_text().count("\n") == 1 + 3  # fingerprint + 1 batch

    out = torchrun_jobs(repo_root, [
        {"stage": "train_rm", "argv": [*rm, "--grad-accum", 1, "--out", tmp / "rm_ddp"]},
        {"stage": "finetune", "argv": [*sft, "--grad-accum", 2, "--out", tmp / "sft_ddp"]},
        {"stage": "finetune", "argv": [*dpo, "--grad-accum", 2, "--out", tmp / "dpo_ddp"]},
        {"stage": "finetune", "argv": [*dpo, "--grad-accum", 2, "--fsdp", "--out", tmp / "dpo_fsdp"]},
        # DDP with a checkpoint: interrupted when step 2 begins, then resumed from rank 0's checkpoint of step 1
        {"stage": "finetune", "argv": [*dpo, "--grad-accum", 2, "--save-every", 1, "--out", tmp / "dpo_resumed"],
         "stop_at_step": 1},
        {"stage": "finetune", "argv": [*dpo, "--grad-accum", 2, "--save-every", 1, "--resume",
                                       "--out", tmp / "dpo_resumed"]},
        {"stage": "sample", "argv": [*smp, "--out", tmp / "s_ddp.jsonl"]},
        {"stage": "score", "argv": [*sco, "--out", tmp / "c_ddp.jsonl"]},
        # FSDP2 with a checkpoint (torch.distributed.checkpoint, one shard per rank): interrupted, then resumed
        {"stage": "finetune", "argv": [*dpo, "--grad-accum", 2, "--fsdp", "--save-every", 1,
                                       "--out", tmp / "dpo_fsdp_resumed"], "stop_at_step": 1},
        {"stage": "finetune", "argv": [*dpo, "--grad-accum", 2, "--fsdp", "--save-every", 1, "--resume",
                                       "--out", tmp / "dpo_fsdp_resumed"]},
    ], tmp / "jobs.json")
    return tmp, out, (smp, sco)


# ----------------------------------------------------------------------------- helpers of common.py
def test_shard_and_collect_parts_restore_the_single_process_order(tmp_path):
    assert shard(range(7), 0, 3) == [0, 3, 6] and shard(range(7), 2, 3) == [2, 5] and shard(range(7), None, 3) == []
    records = [{"k": k} for k in range(7)]
    out = str(tmp_path / "x.jsonl")
    for i in range(3):  # each job writes its part ...
        assert collect_parts([(k, records[k]) for k in shard(range(7), i, 3)], 7, out, (i, 3, "job")) is None
    assert collect_parts([], 7, out, (None, 3, "merge")) == records  # ... and the merge restores the input order
    assert collect_parts([(k, records[k]) for k in range(7)], 7, out, (0, 1, "all")) == records
    os.remove(out + ".part-1-of-3")
    with pytest.raises(DataError, match=r"part-1-of-3: no such file"):
        collect_parts([], 7, out, (None, 3, "merge"))
    with pytest.raises(DataError, match="do not add up"):  # a part made from other flags: an index is missing
        collect_parts([(k, records[k]) for k in range(6)], 7, out, (0, 1, "all"))


def test_shard_spec_errors(monkeypatch):
    assert shard_spec() == (0, 1, "all")
    assert shard_spec("2/4") == (2, 4, "job") and shard_spec(merge=4) == (None, 4, "merge")
    for bad in ("4/4", "-1/2", "1", "a/b", "1/2/3"):
        with pytest.raises(SystemExit, match="--shard"):
            shard_spec(bad)
    with pytest.raises(SystemExit, match="give one of them"):
        shard_spec("0/2", 2)
    with pytest.raises(SystemExit, match="--merge needs"):
        shard_spec(merge=-1)


def test_refused_combinations(tmp_path, monkeypatch):
    """Checked before anything loads: probe/gate under torchrun."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--method probe runs in one process"):
        importlib.import_module("train_rm").main(["--data", "x.jsonl", "--method", "probe", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- training
def test_ddp_train_rm_matches_one_process(runs, tiny_model_dir):
    tmp, out, _ = runs
    assert "12 train / 3 val rows | 3 steps" in out[0]
    one, ddp = tmp / "rm_one", tmp / "rm_ddp"
    assert [s["mse"] for s in log_of(ddp)] == pytest.approx([s["mse"] for s in log_of(one)], rel=1e-5)
    assert_same_model(one, ddp, tiny_model_dir)
    ev_one, ev_ddp = (json.loads((d / "eval.json").read_text()) for d in (one, ddp))
    assert ev_one[HELPFULNESS]["n"] == ev_ddp[HELPFULNESS]["n"] == 3  # the pad row counted nowhere
    for a in ev_one:  # held-out predictions: each rank scored half, the ranks shared them
        assert ev_ddp[a]["mse"] == pytest.approx(ev_one[a]["mse"], rel=1e-5)


def test_ddp_sft_matches_one_process(runs, tiny_model_dir):
    tmp, out, _ = runs
    assert out[1].count("finetune: sft on 16 rows | 3 steps") == 1  # rank 1 prints nothing
    one, ddp = log_of(tmp / "sft_one"), log_of(tmp / "sft_ddp")
    assert [s["loss"] for s in ddp] == pytest.approx([s["loss"] for s in one], rel=1e-6)
    assert len({round(s["loss"], 4) for s in one}) == 3  # the loss moves: the steps differ
    assert_same_model(tmp / "sft_one", tmp / "sft_ddp", tiny_model_dir)
    rows = [read_jsonl(str(tmp / d / "train_rows.jsonl")) for d in ("sft_one", "sft_ddp")]
    assert rows[0] == rows[1]


@pytest.mark.parametrize("run", ["dpo_ddp", "dpo_fsdp", "dpo_resumed", "dpo_fsdp_resumed"])
def test_dpo_matches_one_process(runs, tiny_model_dir, run):
    """Mirrored DPO with a frozen layer: reference log-probs on each rank's own micro-batches (margin 0 at step 1);
    DDP, FSDP2 (shards gathered into one plain folder), DDP resumed from rank 0's checkpoint, and FSDP2 resumed from
    every rank's shards (torch.distributed.checkpoint)."""
    from transformers import AutoConfig
    tmp, out, _ = runs
    one, dist = log_of(tmp / "dpo_one"), log_of(tmp / run)
    assert len(one) == 2 and dist[0]["margin"] == pytest.approx(0.0, abs=1e-6)
    for key in ("loss", "margin", "acc"):  # margins are differences of summed fp32 log-probs: rounding ≈ 1e-5
        assert [s[key] for s in dist] == pytest.approx([s[key] for s in one], rel=1e-5, abs=1e-5)
    assert one[1]["margin"] > 0.01  # the policy moved after step 1
    assert_same_model(tmp / "dpo_one", tmp / run, tiny_model_dir)  # incl. no untied copy of the LM head
    frozen, s0 = load_state(tmp / run), load_state(tiny_model_dir)
    assert all(torch.equal(frozen[k], s0[k]) for k in s0 if k.startswith(("model.layers.0.", "model.embed")))
    assert AutoConfig.from_pretrained(str(tmp / run)).architectures == ["LlamaForCausalLM"]
    if run == "dpo_resumed":
        assert "stopped at step 1" in out[4] and "resumed from" in out[5] and "at step 1" in out[5]
        assert not (tmp / run / "checkpoint.pt").exists()
    if run == "dpo_fsdp_resumed":
        assert "stopped at step 1" in out[8] and "resumed from" in out[9] and "at step 1" in out[9]
        assert not [f for f in os.listdir(tmp / run) if f.startswith("checkpoint")]


# ----------------------------------------------------------------------------- sweeps
def test_torchrun_sample_and_score_equal_one_process(runs):
    """Rank r draws (scores) batches r, r + 2, ...; rank 0 writes OUT. Rank 1 resumed the log of an interrupted job
    1/2 (the same part, the same fingerprint)."""
    tmp, out, _ = runs
    s_one = (tmp / "s_one.jsonl").read_bytes()
    assert len(read_jsonl(str(tmp / "s_one.jsonl"))) == 20
    assert len({r["response"] for r in read_jsonl(str(tmp / "s_one.jsonl"))}) > 10  # real, varied samples
    assert (tmp / "s_ddp.jsonl").read_bytes() == s_one
    assert "sample: 20 responses" in out[6] and "resumed 3 from" in out[6] and "drew 17" in out[6]
    assert (tmp / "c_ddp.jsonl").read_bytes() == (tmp / "c_one.jsonl").read_bytes()
    assert not [f for f in os.listdir(tmp) if ".part-" in f]  # no part or log left behind


def test_job_array_shards_and_merge_equal_one_process(runs, tmp_path):
    tmp, _, (smp, sco) = runs
    for i in (2, 0):
        one_process("sample", *smp, "--shard", f"{i}/3", "--out", tmp_path / "s.jsonl")
    with pytest.raises(DataError, match="part-1-of-3: no such file"):  # a part is missing: no output, a clear error
        one_process("sample", *smp, "--merge", 3, "--out", tmp_path / "s.jsonl")
    assert not (tmp_path / "s.jsonl").exists()
    one_process("sample", *smp, "--shard", "1/3", "--out", tmp_path / "s.jsonl")
    with pytest.raises(SystemExit, match="exists"):  # a finished part is not redone by accident
        one_process("sample", *smp, "--shard", "1/3", "--out", tmp_path / "s.jsonl")
    with pytest.raises(DataError, match="other samples than these flags draw"):  # merged with other flags
        one_process("sample", *smp, "--seed", 8, "--merge", 3, "--out", tmp_path / "s.jsonl")
    one_process("sample", *smp, "--merge", 3, "--out", tmp_path / "s.jsonl")
    assert (tmp_path / "s.jsonl").read_bytes() == (tmp / "s_one.jsonl").read_bytes()
    for i in range(2):
        one_process("score", *sco, "--shard", f"{i}/2", "--out", tmp_path / "c.jsonl")
    one_process("score", *sco, "--merge", 2, "--out", tmp_path / "c.jsonl")
    assert (tmp_path / "c.jsonl").read_bytes() == (tmp / "c_one.jsonl").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "s.jsonl"]  # parts and logs removed after the merge
    with pytest.raises(SystemExit, match="give one of them"):
        one_process("score", *sco, "--shard", "0/2", "--merge", 2, "--out", tmp_path / "c2.jsonl")
