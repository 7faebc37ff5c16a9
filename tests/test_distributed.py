"""torchrun on CPU: 2 processes on the gloo backend compute what 1 process computes.

    python -m pytest tests/test_distributed.py -q      # ≈ 40 s on 2 CPU cores

Training: a step whose global batch is split over 2 ranks (DDP, or FSDP2 with --fsdp) must give the same losses and
parameters as one process that accumulates the same micro-batches (--grad-accum × 2). Sweeps: sample.py and score.py
sharded by rank (torchrun) or by job (--shard i/N, then --merge N) must write the same bytes as one process.
The one-process references run in this process (main() with patched argv: no interpreter start-up), on 1 thread like
each rank, so that the same float reductions run on both sides.
"""
import importlib
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from common import ATTRIBUTES, HELPFULNESS, VERBOSITY, DataError, collect_parts, read_jsonl, shard, shard_spec

CPU = ("--device", "cpu", "--dtype", "float32")


def torchrun(repo_root, script, *args):
    """`torchrun --standalone --nproc_per_node=2 -- script args` on 1 thread per rank; returns the finished process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--", script,
           *map(str, args)]
    p = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"torchrun {script} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture
def one_process(monkeypatch):
    """call(module, *args): run a stage's main() here, on 1 thread (each rank of torchrun runs on 1 thread too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def call(module, *args):
        monkeypatch.setattr(sys, "argv", [f"{module}.py", *map(str, args)])
        importlib.import_module(module).main()
    yield call
    torch.set_num_threads(threads)


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


def test_shard_spec():
    assert shard_spec() == (0, 1, "all")
    assert shard_spec("2/4") == (2, 4, "job") and shard_spec(merge=4) == (None, 4, "merge")
    for bad in ("4/4", "-1/2", "1", "a/b"):
        with pytest.raises(SystemExit, match="--shard"):
            shard_spec(bad)
    with pytest.raises(SystemExit, match="one of them"):
        shard_spec("0/2", 2)


# ----------------------------------------------------------------------------- training
def test_ddp_sft_matches_one_process(repo_root, tiny_model_dir, tmp_path, one_process):
    """SFT, global batch 4 rows: 2 ranks × 2 micro-batches of 1 (DDP, no_sync on the first) = 1 process × 4."""
    scored = write_lines(tmp_path / "scored.jsonl", scored_records())
    common = ("--scored", scored, "--loss", "sft", "--select", "hindsight", "--batch-size", 1, "--max-steps", 3,
              "--warmup", 0, "--lr", 1e-3, "--init", tiny_model_dir, *CPU)
    one_process("finetune", *common, "--grad-accum", 4, "--out", tmp_path / "one")
    p = torchrun(repo_root, "finetune.py", *common, "--grad-accum", 2, "--out", tmp_path / "ddp")
    assert p.stdout.count("finetune: sft on 16 rows | 3 steps") == 1  # rank 1 prints nothing
    one, ddp = (json.loads((tmp_path / d / "meta.json").read_text())["log"] for d in ("one", "ddp"))
    assert [s["loss"] for s in ddp] == pytest.approx([s["loss"] for s in one], rel=1e-6)
    assert len({round(s["loss"], 4) for s in one}) == 3  # the loss moves: the steps differ
    assert_same_model(tmp_path / "one", tmp_path / "ddp", tiny_model_dir)
    assert read_jsonl(str(tmp_path / "ddp" / "train_rows.jsonl")) == read_jsonl(str(tmp_path / "one" / "train_rows.jsonl"))


def test_fsdp_dpo_matches_one_process(repo_root, tiny_model_dir, tmp_path, one_process):
    """Mirrored DPO under FSDP2 (set_requires_gradient_sync, reference log-probs per rank's micro-batches, a frozen
    layer, a sharded checkpoint gathered into one folder): 2 ranks × 2 micro-batches of 2 pairs = 1 process × 4."""
    from transformers import AutoConfig
    scored = write_lines(tmp_path / "scored.jsonl", scored_records())
    common = ("--scored", scored, "--loss", "dpo", "--pairs", "mirrored", "--batch-size", 2, "--epochs", 2,
              "--warmup", 0, "--lr", 1e-3, "--nll-coef", 0.5, "--freeze-layers", 1, "--init", tiny_model_dir, *CPU)
    one_process("finetune", *common, "--grad-accum", 4, "--out", tmp_path / "one")
    torchrun(repo_root, "finetune.py", *common, "--fsdp", "--grad-accum", 2, "--out", tmp_path / "fsdp")
    one, fsdp = (json.loads((tmp_path / d / "meta.json").read_text())["log"] for d in ("one", "fsdp"))
    assert fsdp[0]["margin"] == pytest.approx(0.0, abs=1e-6)  # each rank's reference pass saw its own micro-batches
    for key in ("loss", "margin", "acc"):
        assert [s[key] for s in fsdp] == pytest.approx([s[key] for s in one], rel=1e-5, abs=1e-6)
    assert one[1]["margin"] > 0.01  # the policy moved after step 1
    assert_same_model(tmp_path / "one", tmp_path / "fsdp", tiny_model_dir)  # incl. no untied copy of the LM head
    frozen, s0 = load_state(tmp_path / "fsdp"), load_state(tiny_model_dir)
    assert all(torch.equal(frozen[k], s0[k]) for k in s0 if k.startswith(("model.layers.0.", "model.embed")))
    assert AutoConfig.from_pretrained(str(tmp_path / "fsdp")).architectures == ["LlamaForCausalLM"]


@pytest.fixture(scope="module")
def rm_one_and_ddp(repo_root, tiny_model_dir, tmp_path_factory):
    """train_rm.py, global batch 4 rows: 1 process × 2 micro-batches of 2, and 2 DDP ranks × 1. 5 prompts × 3
    answers; one prompt (3 rows) is held out, so the 2 ranks score 2 + 1 held-out rows (+ 1 unlabelled pad)."""
    tmp = tmp_path_factory.mktemp("rm-dist")
    rng, rows = random.Random(1), []
    for i in range(15):
        labels = {HELPFULNESS: rng.randint(0, 100), VERBOSITY: rng.randint(0, 100),
                  "helpsteer-coherence": rng.randint(0, 100) if i % 2 else None}
        rows.append({"prompt_id": f"q{i // 3}", "prompt": f"Question {i // 3}?",
                     "response": " ".join(["word"] * rng.randint(1, 30)), "labels": labels})
    data = write_lines(tmp / "rm.jsonl", rows)
    common = ("--data", data, "--backbone", tiny_model_dir, "--batch-size", 2, "--max-steps", 3, "--warmup", 0,
              "--lr", 1e-3, "--val-frac", 0.2, *CPU)
    threads, argv = torch.get_num_threads(), sys.argv
    torch.set_num_threads(1)
    try:  # the one-process reference, in this process (see one_process)
        sys.argv = ["train_rm.py", *map(str, common), "--grad-accum", "2", "--out", str(tmp / "one")]
        importlib.import_module("train_rm").main()
    finally:
        torch.set_num_threads(threads)
        sys.argv = argv
    p = torchrun(repo_root, "train_rm.py", *common, "--grad-accum", 1, "--out", tmp / "ddp")
    return tmp / "one", tmp / "ddp", p.stdout


def test_ddp_train_rm_matches_one_process(rm_one_and_ddp, tiny_model_dir):
    one, ddp, stdout = rm_one_and_ddp
    assert "12 train / 3 val rows | 3 steps" in stdout
    assert_same_model(one, ddp, tiny_model_dir)
    ev_one, ev_ddp = (json.loads((d / "eval.json").read_text()) for d in (one, ddp))
    assert ev_one[HELPFULNESS]["n"] == ev_ddp[HELPFULNESS]["n"] == 3  # the pad row counted nowhere
    for a in ev_one:
        assert ev_ddp[a]["mse"] == pytest.approx(ev_one[a]["mse"], rel=1e-5)
        assert ev_ddp[a]["n"] == ev_one[a]["n"]


# ----------------------------------------------------------------------------- sweeps
def test_sharded_sample_and_score_equal_one_process(repo_root, tiny_model_dir, rm_one_and_ddp, tmp_path,
                                                    one_process):
    prompts = write_lines(tmp_path / "prompts.jsonl",
                          [{"id": f"p{i}", "prompt": "Why is the sky blue? " * (1 + i % 3) + str(i)} for i in range(5)])
    rm = rm_one_and_ddp[0]
    s_args = ("--prompts", prompts, "--n", 2, "--hints", "plain,brief", "--batch-size", 3, "--max-new-tokens", 6,
              "--model", tiny_model_dir, "--seed", 7, *CPU)  # 20 responses in 7 batches
    c_args = ("--rm", rm, "--batch-size", 3, *CPU)
    one_process("sample", *s_args, "--out", tmp_path / "s_one.jsonl")
    one_process("score", "--samples", tmp_path / "s_one.jsonl", *c_args, "--out", tmp_path / "c_one.jsonl")
    # torchrun: rank r draws (scores) batches r, r + 2, ...; rank 0 writes OUT
    torchrun(repo_root, "sample.py", *s_args, "--out", tmp_path / "s_ddp.jsonl")
    torchrun(repo_root, "score.py", "--samples", tmp_path / "s_one.jsonl", *c_args, "--out", tmp_path / "c_ddp.jsonl")
    # a job array: 3 sampling jobs and 2 scoring jobs, each writes its part; a merge joins them
    for i in (2, 0):
        one_process("sample", *s_args, "--shard", f"{i}/3", "--out", tmp_path / "s_job.jsonl")
    with pytest.raises(DataError, match="part-1-of-3"):  # a part is missing: no output, a clear error
        one_process("sample", *s_args, "--merge", 3, "--out", tmp_path / "s_job.jsonl")
    one_process("sample", *s_args, "--shard", "1/3", "--out", tmp_path / "s_job.jsonl")
    one_process("sample", *s_args, "--merge", 3, "--out", tmp_path / "s_job.jsonl")
    for i in range(2):
        one_process("score", "--samples", tmp_path / "s_one.jsonl", *c_args, "--shard", f"{i}/2",
                    "--out", tmp_path / "c_job.jsonl")
    one_process("score", "--samples", tmp_path / "s_one.jsonl", *c_args, "--merge", 2, "--out", tmp_path / "c_job.jsonl")

    s_one, c_one = (tmp_path / "s_one.jsonl").read_bytes(), (tmp_path / "c_one.jsonl").read_bytes()
    assert len(read_jsonl(str(tmp_path / "s_one.jsonl"))) == 20
    assert len({r["response"] for r in read_jsonl(str(tmp_path / "s_one.jsonl"))}) > 10  # real, varied samples
    assert (tmp_path / "s_ddp.jsonl").read_bytes() == s_one
    assert (tmp_path / "s_job.jsonl").read_bytes() == s_one
    assert (tmp_path / "c_ddp.jsonl").read_bytes() == c_one
    assert (tmp_path / "c_job.jsonl").read_bytes() == c_one
    assert sorted(os.listdir(tmp_path)) == sorted(["prompts.jsonl", "s_one.jsonl", "c_one.jsonl", "s_ddp.jsonl",
                                                   "c_ddp.jsonl", "s_job.jsonl", "c_job.jsonl"])  # no parts left
