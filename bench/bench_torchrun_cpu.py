"""One process vs `torchrun --nproc_per_node=2` on this CPU: the same work, the same cores, side by side.

finetune.py SFT on the embedded SmolLM2-135M-Instruct, global batch 8 rows × ≤ 256 tokens (1 process: --batch-size 4
--grad-accum 2 on 2 threads; 2 ranks: --batch-size 4 each on 1 thread, DDP over gloo), and sample.py on 32 prompts.
The rows are the demo RM set's real answers (data/rm_train.jsonl), labels used as rewards. On a 2-core machine two
ranks share the cores one process had, so this measures the cost of the torch.distributed path (gradient all-reduce,
one model copy per rank), not a speed-up; on N devices each rank brings its own.

    flock /tmp/heavy.lock python bench/bench_torchrun_cpu.py --steps 9   # ≈ 2 min on 2 cores; → runs/bench_torchrun_cpu.json
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
from common import ATTRIBUTES, read_jsonl, write_jsonl


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
    p.add_argument("--steps", type=int, default=5, help="SFT steps (the first is not timed)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default="runs/bench_torchrun_cpu.json")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_torchrun_")
    scored = os.path.join(tmp, "scored.jsonl")
    rows = read_jsonl(os.path.join(ROOT, "data/rm_train.jsonl"))[:64]
    write_jsonl(scored, [{"id": f"r{i}", "prompt_id": f"r{i}", "prompt": r["prompt"], "degree": 0.0,
                          "response": r["response"], "truncated": False,
                          "rewards": {a: (r["labels"].get(a) or 0.0) for a in ATTRIBUTES}} for i, r in enumerate(rows)])
    res = {}
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
        m = re.search(r"\| (\d+) new tok/s \| (\d+)s", out)
        with open(os.path.join(tmp, f"s{nproc}.jsonl"), "rb") as f:
            res[f"sample_{nproc}"] = {"new_tok_s": int(m.group(1)), "wall_s": wall, "bytes": f.read()}
    same = res["sample_1"].pop("bytes") == res["sample_2"].pop("bytes")
    print("| run | 1 process (2 threads) | torchrun 2 ranks (1 thread each) | ratio 2/1 |")
    print("|---|---|---|---|")
    f1, f2 = res["finetune_1"], res["finetune_2"]
    print(f"| finetune.py SFT step, 8 rows × ≤ 256 tokens, median of {args.steps - 1} | {f1['median_step_s']:.2f} s | "
          f"{f2['median_step_s']:.2f} s | {f1['median_step_s'] / f2['median_step_s']:.2f}× speed |")
    print(f"| finetune.py losses per step | {', '.join(f'{x:.4f}' for x in f1['losses'])} | "
          f"{', '.join(f'{x:.4f}' for x in f2['losses'])} | |")
    s1, s2 = res["sample_1"], res["sample_2"]
    print(f"| sample.py, {args.prompts} prompts × {args.new_tokens} new tokens: new tok/s (wall) | {s1['new_tok_s']} "
          f"({s1['wall_s']:.0f} s) | {s2['new_tok_s']} ({s2['wall_s']:.0f} s) | "
          f"{s2['new_tok_s'] / s1['new_tok_s']:.2f}× speed |")
    print(f"sample.py outputs byte-identical: {same}")
    res["sample_identical"] = same
    os.makedirs(os.path.dirname(os.path.join(ROOT, args.out)), exist_ok=True)
    with open(os.path.join(ROOT, args.out), "w") as f:
        json.dump(res, f, indent=1)
    print(f"bench_torchrun_cpu: → {args.out}")


if __name__ == "__main__":
    main()
