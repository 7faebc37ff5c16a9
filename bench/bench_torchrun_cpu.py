"""One process vs `torchrun --nproc_per_node=2` on this CPU: the same work, the same cores, side by side.

finetune.py SFT on the embedded SmolLM2-135M-Instruct, global batch 8 rows × ≤ 256 tokens (1 process: --batch-size 4
--grad-accum 2 on 2 threads; 2 ranks: --batch-size 4 each on 1 thread, DDP over gloo); sample.py on 32 prompts; and
score.py on 128 (prompt, answer) rows with a 10-output reward model made from SmolLM2 (random head: the speed is
that of any regression RM of this size). The rows are the demo RM set's real answers (data/rm_train.jsonl). On a
2-core machine two ranks share the cores one process had, so this measures the cost of the torch.distributed path
(gradient all-reduce, one model copy per rank) and how well each way uses 2 cores, not a speed-up; on N devices each
rank brings its own.

    flock /tmp/heavy.lock python bench/bench_torchrun_cpu.py   # ≈ 4 min on 2 cores; → runs/bench_torchrun_cpu.json
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import ATTRIBUTES
from runtime.io import read_jsonl, write_jsonl
from runtime.models import DEFAULT_MODEL, resolve_model


def make_rm(out):
    """SmolLM2 with a 10-output head (random): an RM folder score.py reads."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = resolve_model(DEFAULT_MODEL)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(ATTRIBUTES), id2label=dict(enumerate(ATTRIBUTES)),
        label2id={a: k for k, a in enumerate(ATTRIBUTES)})
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"attributes": ATTRIBUTES, "template": "chat"}, f)


def run(cmd, threads):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p.stdout, time.perf_counter() - t0


def launcher(nproc):
    return ([sys.executable] if nproc == 1 else
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=7, help="SFT steps (the first is not timed)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--score-rows", type=int, default=128)
    p.add_argument("--out", default="runs/bench_torchrun_cpu.json")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_torchrun_")
    scored, samples, rm = (os.path.join(tmp, x) for x in ("scored.jsonl", "rows.jsonl", "rm"))
    rows = read_jsonl(os.path.join(ROOT, "data/rm_train.jsonl"))
    write_jsonl(scored, [{"id": f"r{i}", "prompt_id": f"r{i}", "prompt": r["prompt"], "degree": 0.0,
                          "response": r["response"], "truncated": False,
                          "rewards": {a: (r["labels"].get(a) or 0.0) for a in ATTRIBUTES}}
                         for i, r in enumerate(rows[:64])])
    write_jsonl(samples, [{"id": f"r{i}", "prompt": r["prompt"], "response": r["response"]}
                          for i, r in enumerate(rows[:args.score_rows])])
    make_rm(rm)
    res, outputs = {}, {}
    for nproc in (1, 2):
        bs, accum, threads = 4, 2 // nproc, 2 // nproc
        out, wall = run([*launcher(nproc), "finetune.py", "--scored", scored, "--loss", "sft", "--select", "sampled",
                         "--batch-size", str(bs), "--grad-accum", str(accum), "--max-len", "256",
                         "--max-steps", str(args.steps), "--out", os.path.join(tmp, f"ft{nproc}")], threads)
        step_s = [float(x) for x in re.findall(r"^step \d+/\d+ \| .* \| ([\d.]+)s$", out, re.MULTILINE)]
        losses = [float(x) for x in re.findall(r"^step \d+/\d+ \| loss ([\d.]+)", out, re.MULTILINE)]
        res[f"finetune_{nproc}"] = {"step_s": step_s, "median_step_s": statistics.median(step_s[1:]),
                                    "losses": losses, "wall_s": wall}
        out, wall = run([*launcher(nproc), "sample.py", "--prompts", "data/prompts_heldout.jsonl", "--limit",
                         str(args.prompts), "--n", "1", "--batch-size", str(args.prompts // 2), "--max-new-tokens",
                         str(args.new_tokens), "--seed", "0", "--out", os.path.join(tmp, f"s{nproc}.jsonl")], threads)
        res[f"sample_{nproc}"] = {"new_tok_s": int(re.search(r"\| (\d+) new tok/s", out).group(1)), "wall_s": wall}
        out, wall = run([*launcher(nproc), "score.py", "--samples", samples, "--rm", rm, "--batch-size", "16",
                         "--out", os.path.join(tmp, f"c{nproc}.jsonl")], threads)
        res[f"score_{nproc}"] = {"rows_s": float(re.search(r"\| ([\d.]+) responses/s", out).group(1)), "wall_s": wall}
        for kind in ("s", "c"):
            with open(os.path.join(tmp, f"{kind}{nproc}.jsonl"), "rb") as f:
                outputs[kind, nproc] = f.read()
    f1, f2 = res["finetune_1"], res["finetune_2"]
    print("| run (SmolLM2-135M) | 1 process, 2 threads | torchrun, 2 ranks × 1 thread | 2 ranks / 1 process |")
    print("|---|---|---|---|")
    print(f"| finetune.py SFT step, 8 rows × ≤ 256 tokens, median of steps 2-{args.steps} | "
          f"{f1['median_step_s']:.2f} s ({8 / f1['median_step_s']:.2f} rows/s) | {f2['median_step_s']:.2f} s "
          f"({8 / f2['median_step_s']:.2f} rows/s) | {f1['median_step_s'] / f2['median_step_s']:.2f}× |")
    print(f"| finetune.py loss per step | {' '.join(f'{x:.4f}' for x in f1['losses'])} | "
          f"{' '.join(f'{x:.4f}' for x in f2['losses'])} | |")
    s1, s2 = res["sample_1"], res["sample_2"]
    print(f"| sample.py, {args.prompts} prompts × {args.new_tokens} new tokens, batch {args.prompts // 2} | "
          f"{s1['new_tok_s']} new tok/s | {s2['new_tok_s']} new tok/s | {s2['new_tok_s'] / s1['new_tok_s']:.2f}× |")
    c1, c2 = res["score_1"], res["score_2"]
    print(f"| score.py, {args.score_rows} rows, batch 16 | {c1['rows_s']:.1f} rows/s | {c2['rows_s']:.1f} rows/s | "
          f"{c2['rows_s'] / c1['rows_s']:.2f}× |")
    res["sample_identical"] = outputs["s", 1] == outputs["s", 2]
    res["score_identical"] = outputs["c", 1] == outputs["c", 2]
    print(f"byte-identical outputs, 1 process (2 threads) vs 2 ranks (1 thread): sample.py {res['sample_identical']}, "
          f"score.py {res['score_identical']}")
    os.makedirs(os.path.dirname(os.path.join(ROOT, args.out)), exist_ok=True)
    with open(os.path.join(ROOT, args.out), "w") as f:
        json.dump(res, f, indent=1)
    print(f"bench_torchrun_cpu: → {args.out}")

if __name__ == "__main__":
    main()
