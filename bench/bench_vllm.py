"""Sampling with vLLM vs transformers' generate: sample.py's --engine vllm against --engine hf, on the same prompts,
the same CPU and the same process.

Both engines run sample.generate_batch (runtime/engines.py) on the same jobs (data/prompts_train.jsonl under random
DPA directions, sample.make_jobs), in sample.py's length-sorted batches, with the same sampling settings (temperature,
top_p 1, no top-k, --max-new-tokens), dtype (auto: bf16 on CPUs with native bf16) and per-batch seeds. Reported per
engine: answers/s and new tokens/s (answer tokens kept, up to the end-of-turn token, per second of wall time, template,
tokenisation and decoding included; start-up and a short warm-up untimed), start-up seconds, and the distribution of
answer lengths (n_tokens: mean, quantiles, share cut at --max-new-tokens) with the two-sample Kolmogorov-Smirnov
distance between the engines: the two draw different samples, but from the same distribution if they sample alike.

Needs the vLLM venv (bash setup.sh --vllm):
    flock /tmp/heavy.lock .venv-vllm/bin/python bench/bench_vllm.py
"""
import argparse
import json
import os
import statistics
import time
from types import SimpleNamespace

import benchlib as B

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache: plenty for a 135M model

from runtime.engines import load_policy  # noqa: E402
from runtime.io import read_jsonl  # noqa: E402
from sample import generate_batch, make_jobs  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402


def ks_distance(a, b):
    """The largest gap between the two empirical CDFs (0: same sample distribution, 1: disjoint)."""
    return max(abs(sum(x <= t for x in a) / len(a) - sum(x <= t for x in b) / len(b)) for t in set(a) | set(b))


def lengths_summary(n_tokens, max_new):
    q = statistics.quantiles(n_tokens, n=10, method="inclusive")
    return {"mean": statistics.mean(n_tokens), "p10": q[0], "median": statistics.median(n_tokens), "p90": q[-1],
            "truncated": sum(n == max_new for n in n_tokens) / len(n_tokens)}


def run_engine(engine, path, tok, batches, gen, dtype, seed):
    t0 = time.perf_counter()
    policy = load_policy(engine, path, dtype, "cpu", seed)
    start = time.perf_counter() - t0
    generate_batch(policy, tok, batches[0][:2], SimpleNamespace(**{**vars(gen), "max_new_tokens": 4}), "cpu", 1)
    t0 = time.perf_counter()
    n_tokens = []
    for b, batch in enumerate(batches):
        n_tokens += [n for _, n, _ in generate_batch(policy, tok, batch, gen, "cpu", seed * 100_003 + b)]
    dt = time.perf_counter() - t0
    del policy
    return {"engine": engine, "startup_s": start, "seconds": dt, "answers": len(n_tokens),
            "answers_per_s": len(n_tokens) / dt, "new_tokens_per_s": sum(n_tokens) / dt, "n_tokens": n_tokens}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.add_common_args(p, lengths=False)
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--n", type=int, default=2, help="answers per prompt")
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--engines", default="hf,vllm")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    _, dtype, _, path = B.init(args)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    gen = SimpleNamespace(temperature=args.temperature, top_p=1.0, max_new_tokens=args.max_new_tokens)
    jobs = make_jobs(read_jsonl(f"{B.REPO}/data/prompts_train.jsonl")[:args.prompts], args.n, ["plain"], [],
                     (-45.0, 45.0), args.seed)
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i]["prompt"]))  # as sample.py batches them
    batches = [[jobs[i] for i in order[k:k + args.batch_size]] for k in range(0, len(jobs), args.batch_size)]
    print(f"{len(jobs)} answers ({args.prompts} prompts × {args.n}), batches of {args.batch_size}, "
          f"≤ {args.max_new_tokens} new tokens, T={args.temperature}, {dtype}, torch threads {args.threads}")
    results = [run_engine(e, path, tok, batches, gen, dtype, args.seed) for e in args.engines.split(",")]
    print(f"{'engine':8} {'start s':>8} {'answers/s':>10} {'new tok/s':>10} {'mean':>6} {'p10':>5} {'median':>6} "
          f"{'p90':>5} {'cut':>5}")
    for r in results:
        r["lengths"] = lengths_summary(r["n_tokens"], args.max_new_tokens)
        s = r["lengths"]
        print(f"{r['engine']:8} {r['startup_s']:8.1f} {r['answers_per_s']:10.2f} {r['new_tokens_per_s']:10.1f} "
              f"{s['mean']:6.1f} {s['p10']:5.0f} {s['median']:6.0f} {s['p90']:5.0f} {s['truncated']:5.0%}")
    if len(results) == 2:
        ks = ks_distance(results[0]["n_tokens"], results[1]["n_tokens"])
        crit = 1.36 * ((len(results[0]["n_tokens"]) + len(results[1]["n_tokens"]))
                       / (len(results[0]["n_tokens"]) * len(results[1]["n_tokens"]))) ** 0.5
        print(f"KS distance of the n_tokens distributions: {ks:.3f} (5% critical value {crit:.3f}: "
              f"{'consistent with one distribution' if ks < crit else 'different distributions'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
