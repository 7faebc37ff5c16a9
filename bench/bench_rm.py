"""Reward-model methods side by side (train_rm.py --method regression | probe | gate): accuracy and time, CPU.

--part pairs (default): real GPT-4-rated preference pairs, ../shared/data/ultrafeedback_pairs/train_1000.jsonl (1,000
    binarized UltraFeedback pairs; those whose prompt has ≤ 256 tokens are copied to the bench's output folder, never
    into the repository). Each response is a row whose target is its
    UltraFeedback overall score (1-10 → 0-100 bin centres); held-out prompts (--val-frac) give the pairwise accuracy:
    does the RM rank chosen above rejected? (ties in the data are dropped by the converter.)
      regression  fine-tuned top layers + bias-free head, masked MSE (the DPA RM recipe)
      probe       frozen SmolLM2 features + one ridge per objective (ArmoRM stage 1)
      gate        the probe fitted on the UF overall score *and* the demo ratings (helpfulness, coherence, complexity,
                  verbosity of data/rm_train.jsonl), then the gate trained on the UF training pairs with the
                  verbosity de-bias (ArmoRM stage 2); accuracy by the gated score. With the overall score as the only
                  objective, the gate could not change any ranking (both answers of a pair share the prompt's weights).
--part demo: the three methods on the demo ratings data/rm_train.jsonl (judge labels): held-out Pearson per attribute
    (same split as run_all.sh's RM), pairs made from the ratings by helpfulness (gap ≥ 10).

Times are wall-clock seconds of each train_rm.py run (loading, features, training, evaluation); the feature cache is
emptied first, so the first frozen-feature method pays for the features and the next one reuses them.

    flock /tmp/heavy.lock python bench/bench_rm.py --part pairs      # ≈ 10 min on 2 cores
    flock /tmp/heavy.lock python bench/bench_rm.py --part demo       # ≈ 6 min
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UF = os.path.join(ROOT, "..", "shared", "data", "ultrafeedback_pairs", "train_1000.jsonl")
DEMO = os.path.join(ROOT, "data", "rm_train.jsonl")
OVERALL, HELP = "ultrafeedback-overall_score", "helpsteer-helpfulness"
SHOWN = [OVERALL, HELP, "helpsteer-coherence", "helpsteer-complexity", "helpsteer-verbosity"]


def run(name, args, out):
    """One train_rm.py run → (wall seconds, eval.json, meta.json); its log goes to <out>/<name>.log."""
    folder = os.path.join(out, name)
    t = time.time()
    with open(f"{folder}.log", "w") as log:
        p = subprocess.run([sys.executable, "train_rm.py", *map(str, args), "--out", folder], cwd=ROOT, stdout=log,
                           stderr=subprocess.STDOUT)
    dt = time.time() - t
    if p.returncode:
        raise SystemExit(f"bench_rm: {name} failed ({p.returncode}); see {folder}.log")
    with open(os.path.join(folder, "eval.json")) as f, open(os.path.join(folder, "meta.json")) as g:
        return dt, json.load(f), json.load(g)


def short_prompts(src, dst, backbone, max_tokens):
    """The pairs whose prompt has at most max_tokens tokens, so an answer fits in --max-len 512 (train_rm.py stops on
    a prompt that fills --max-len). The copy lives in the bench's output folder only."""
    sys.path.insert(0, ROOT)
    from transformers import AutoTokenizer

    from runtime.models import resolve_model
    tok = AutoTokenizer.from_pretrained(resolve_model(backbone))
    with open(src, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in rows if len(tok(r["prompt"])["input_ids"]) <= max_tokens]
    with open(dst, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    print(f"bench_rm: {len(kept)} of {len(rows)} pairs have a prompt of ≤ {max_tokens} tokens → {dst}", flush=True)
    return dst


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="pairs", choices=["pairs", "demo"])
    p.add_argument("--uf", default=UF, help="binarized UltraFeedback pairs (JSONL)")
    p.add_argument("--backbone", default="embedded:SmolLM2-135M-Instruct")
    p.add_argument("--max-prompt-tokens", type=int, default=256, help="pairs part: drop pairs with longer prompts")
    p.add_argument("--limit", type=int, default=800, help="pairs part: the first N pairs (the 12-minute budget)")
    p.add_argument("--reg-steps", type=int, default=40, help="pairs part: regression steps of --reg-batch rows")
    p.add_argument("--reg-batch", type=int, default=8)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_rm"))
    args = p.parse_args()

    out = os.path.join(args.out, args.part)
    shutil.rmtree(out, ignore_errors=True)  # fresh feature cache: the timings include computing features
    os.makedirs(out)
    base = ["--backbone", args.backbone, "--feature-cache", os.path.join(out, "features"), "--seed", 0]
    # frozen features run fastest in batches of 8 on 2 cores (measured: 2200 tok/s vs 1500 at 32)
    gate = ["--batch-size", 8, "--gate-hidden", 256, "--gate-steps", 1000, "--gate-batch", 256, "--log-every", 250]
    if args.part == "pairs":
        args.uf = short_prompts(args.uf, os.path.join(out, "uf_short.jsonl"), args.backbone,
                                args.max_prompt_tokens)
        base += ["--max-len", 512, "--val-frac", 0.2, "--prefer", OVERALL, "--limit", args.limit]
        runs = {
            "regression": ["--data", args.uf, "--freeze-layers", 16, "--lr", 1e-4, "--batch-size", args.reg_batch,
                           "--max-steps", args.reg_steps],
            "probe": ["--method", "probe", "--data", args.uf, "--batch-size", 8],
            "gate": ["--method", "gate", "--data", args.uf, DEMO, "--pairs", args.uf, *gate],
        }
    else:  # run_all.sh's RM settings for the regression
        base += ["--data", DEMO, "--pairs", DEMO, "--prefer", HELP]
        runs = {"regression": ["--freeze-layers", 16, "--lr", 1e-4, "--batch-size", 16, "--epochs", 1],
                "probe": ["--method", "probe", "--batch-size", 8],
                "gate": ["--method", "gate", *gate]}

    results = {}
    for name, extra in runs.items():
        dt, ev, meta = run(name, [*base, *extra], out)
        pw = ev.get("pairwise", {})
        results[name] = {"seconds": round(dt, 1), "feature_seconds": meta.get("feature_seconds"),
                         "fit_seconds": meta.get("fit_seconds"), "acc_length": pw.get("accuracy_length"),
                         "pairs": pw.get("n"), "acc_attribute": pw.get("accuracy_attribute"),
                         "acc_score": pw.get("accuracy_score"),
                         "pearson": {a: ev[a]["pearson"] for a in SHOWN if a in ev}, "n_rows": meta["data"]["rows"]}
        print(f"bench_rm: {name} done in {dt:.0f}s", flush=True)

    pref = OVERALL if args.part == "pairs" else HELP
    cols = [a for a in SHOWN if any(a in r["pearson"] for r in results.values())]
    print(f"\n| method | time (s) | features (s) | probe/gate fit (s) | held-out pairs | pair acc by "
          f"{pref.split('-', 1)[1]} | pair acc by gated score | " + " | ".join(f"Pearson {a.split('-', 1)[1]}"
                                                                          for a in cols) + " |")
    print("|---" * (7 + len(cols)) + "|")
    fmt = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
    for name, r in results.items():
        fit = "–" if r["fit_seconds"] is None else f"{r['fit_seconds']:.1f}"
        print(f"| {name} | {r['seconds']:.0f} | {r['feature_seconds'] or 0:.0f} | {fit} | {r['pairs']} | "
              f"{fmt(r['acc_attribute'])} | {fmt(r['acc_score'])} | "
              + " | ".join(fmt(r["pearson"].get(a)) for a in cols) + " |")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    reg, probe = results["regression"]["seconds"], results["probe"]["seconds"]
    print(f"bench_rm: {args.part} | regression {reg:.0f}s vs probe {probe:.0f}s ({reg / probe:.1f}×) | baseline "
          f"'longer answer wins' {fmt(results['probe']['acc_length'])} | results → {os.path.join(out, 'results.json')}")


if __name__ == "__main__":
    main()
