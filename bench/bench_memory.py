"""Peak resident memory of every stage of run_all.sh, each stage alone under /usr/bin/time -v, with run_all.sh's own
batch sizes and lengths but few steps and prompts, so the whole check takes minutes instead of the default run's 25.

The stages run in the default recipe's order on their own small outputs (under runs/bench/memory): train_rm, the
evaluation sampling (batch 112, 160 new tokens) and scoring with the judge, the round's sampling (batch 96 here: 16
prompts x 6) and scoring, hindsight SFT, mirrored DPO, evaluate, steer. The peak of a training stage is reached in
its first steps (the shapes repeat), so --steps 4 shows it; the RSS timeline of each stage is sampled every 0.2 s and
its high-water mark is printed next to /usr/bin/time's.

    flock /tmp/heavy.lock /work/venv-bench/bin/python bench/bench_memory.py [--only finetune-sft,finetune-dpo]
"""
import argparse
import os
import re
import subprocess
import sys
import time

import benchlib as B

DEGREES = "-45,-30,-15,0,15,30,45"


def stages(py, out, model, steps):
    """(name, argv) in run_all.sh's order and with its flags (sizes cut down: --limit, --max-steps; a training
    checkpoint half way, as run_all.sh's --save-every 25 writes them)."""
    save = max(1, steps // 2)
    return [
        ("train_rm", [py, "train_rm.py", "--data", "data/rm_train.jsonl", "--backbone", model, "--out", f"{out}/rm",
                      "--freeze-layers", "16", "--lr", "1e-4", "--epochs", "1", "--batch-size", "16",
                      "--max-steps", str(steps), "--save-every", str(save), "--overwrite"]),
        ("sample (eval, batch 112)", [py, "sample.py", "--model", model, "--prompts", "data/prompts_heldout.jsonl",
                                      "--limit", "16", f"--degrees={DEGREES}", "--n", "1", "--temperature", "0.7",
                                      "--max-new-tokens", "160", "--batch-size", "112", "--seed", "1234", "--out",
                                      f"{out}/eval-round0.samples.jsonl", "--overwrite"]),
        ("score --judge (eval)", [py, "score.py", "--samples", f"{out}/eval-round0.samples.jsonl", "--rm", f"{out}/rm",
                                  "--judge", "--out", f"{out}/eval-round0.jsonl", "--overwrite"]),
        ("sample (round, batch 96)", [py, "sample.py", "--model", model, "--prompts", "data/prompts_train.jsonl",
                                      "--limit", "16", "--n", "2", "--hints", "plain,brief,detail",
                                      "--max-new-tokens", "160", "--batch-size", "100", "--seed", "1", "--out",
                                      f"{out}/samples.jsonl", "--overwrite"]),
        ("score (round)", [py, "score.py", "--samples", f"{out}/samples.jsonl", "--rm", f"{out}/rm", "--out",
                           f"{out}/scored.jsonl", "--overwrite"]),
        ("finetune-sft", [py, "finetune.py", "--scored", f"{out}/scored.jsonl", "--init", model, "--loss", "sft",
                          "--select", "hindsight", "--target-degrees=-45,-15,15,45", "--epochs", "1.5", "--lr", "5e-5",
                          "--max-steps", str(steps), "--save-every", str(save), "--out", f"{out}/sft", "--overwrite"]),
        ("finetune-dpo", [py, "finetune.py", "--scored", f"{out}/scored.jsonl", "--init", f"{out}/sft", "--loss", "dpo",
                          "--pairs", "mirrored", "--pair-degrees", "45", "--batch-size", "4", "--beta", "0.1",
                          "--nll-coef", "1.0", "--epochs", "2", "--lr", "1.5e-5", "--max-steps", str(steps),
                          "--save-every", str(save), "--out", f"{out}/policy", "--overwrite"]),
        ("evaluate", [py, "evaluate.py", f"round0={out}/eval-round0.jsonl", f"--degrees={DEGREES}", "--out", f"{out}/eval"]),
        ("steer", [py, "steer.py", "--model", f"{out}/policy", "--degree", "45", "--max-new-tokens", "160",
                   "What should I pack for a weekend camping trip?"]),
    ]


def rss_kb(pid):
    """(VmRSS, VmHWM) in kB of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            s = f.read()
        return tuple(int(re.search(rf"{k}:\s+(\d+)", s).group(1)) for k in ("VmRSS", "VmHWM"))
    except (OSError, AttributeError):
        return None


def run(name, argv, env, cwd):
    """Run one stage under /usr/bin/time -v; → (peak RSS kB by time -v, wall s, second of the peak, last lines)."""
    t0 = time.time()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)
    child, peak, peak_at = None, 0, 0.0
    while proc.poll() is None:
        if child is None:
            try:
                with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                    child = int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                pass
        r = rss_kb(child) if child else None
        if r and r[0] > peak:
            peak, peak_at = r[0], time.time() - t0
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
    max_rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1))
    last = [ln for ln in out.splitlines() if ln.strip()][-1:]
    return max_rss, time.time() - t0, peak_at, last


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:SmolLM2-135M-Instruct")
    p.add_argument("--steps", type=int, default=4, help="--max-steps of every training stage")
    p.add_argument("--only", default="", help="comma list of stage names to run (their inputs must exist)")
    p.add_argument("--out", default=os.path.join(B.RESULTS, "memory"))
    p.add_argument("--code", default=B.REPO, help="checkout whose stage scripts run (e.g. another branch's, to "
                                                  "compare); its data/ is read")
    p.add_argument("--tag", default="", help="suffix of the results file")
    args = p.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TQDM_DISABLE="1")
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for name, argv in stages(sys.executable, args.out, args.model, args.steps):
        if only and name not in only:
            continue
        max_rss, wall, peak_at, last = run(name, argv, env, args.code)
        rows.append([name, f"{max_rss / 1e6:.2f}", f"{peak_at:.0f}", f"{wall:.0f}", (last[0][:90] if last else "")])
        print(f"{name:26s} | peak RSS {max_rss / 1e6:5.2f} GB (reached after {peak_at:.0f} s) | {wall:.0f} s", flush=True)
    B.print_table(f"Peak resident memory per stage (/usr/bin/time -v), run_all.sh's batch sizes, --max-steps "
                  f"{args.steps}", ["stage", "peak RSS (GB)", "peak after (s)", "wall (s)", "last line"], rows)
    worst = max(rows, key=lambda r: float(r[1]))
    B.save("memory" + ("-" + "-".join(sorted(only)) if only else "") + (f"-{args.tag}" if args.tag else ""),
           {"args": vars(args), "stages": {r[0]: {"peak_rss_gb": float(r[1]), "wall_s": float(r[3])} for r in rows}})
    print(f"ratio: largest stage {worst[0]} peaks at {worst[1]} GB (target for the whole run <= 8 GB: "
          f"{'met' if float(worst[1]) <= 8 else 'NOT met'})")


if __name__ == "__main__":
    main()
