"""Sampling throughput: sample.py's batched generation vs a plain batched model.generate at the same batch size, and
vs a one-prompt-at-a-time loop, side by side in one process.

Same policy (loaded in the dtype sample.py loads it in), same prompts (data/prompts_train.jsonl under random DPA
directions, sample.make_jobs), same sampling settings (temperature, top_p 1, no top-k, --max-new-tokens), same seed
per batch. Throughput counts the answer tokens kept (up to the end-of-turn token) per second of wall time, chat
template, tokenisation and decoding included. The headline rate is decoded positions per second (rows x decoding
steps the batch ran: the work done, whatever the samples say); answer tokens kept per second is shown beside it.
  ours         sample.generate_batch on sample.py's length-sorted batches
  plain        tok(texts, padding=True) + model.generate(**enc, ...) on batches in input order, same batch size
  one-by-one   model.generate on one prompt at a time (--single prompts, extrapolated as a rate)

    flock /tmp/heavy.lock /work/venv-bench/bin/python bench/bench_sample.py
"""
import argparse
from types import SimpleNamespace

import benchlib as B
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import chat_messages
from runtime.io import read_jsonl
from sample import HINTS, generate_batch, make_jobs


def texts_of(tok, jobs):
    return [tok.apply_chat_template(chat_messages(j["prompt"], j["degree"], HINTS[j["hint"]]), tokenize=False,
                                    add_generation_prompt=True) for j in jobs]


@torch.no_grad()
def plain(model, tok, jobs, gen, seed):
    """What a user writes without sample.py: template, pad, generate, decode; → (kept answer tokens, positions)."""
    torch.manual_seed(seed)
    enc = tok(texts_of(tok, jobs), return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=0,
                         max_new_tokens=gen.max_new_tokens, pad_token_id=tok.pad_token_id)
    new = out[:, enc["input_ids"].shape[1]:]
    n = 0
    for row in new.tolist():
        ids = row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        tok.decode(ids, skip_special_tokens=True)
        n += len(ids)
    return n, new.numel()


def positions(results, max_new):
    """Rows x decoding steps of one generate_batch call: it runs to max_new unless every row ended earlier."""
    steps = max_new if any(t for _, _, t in results) else max(k for _, k, _ in results) + 1
    return len(results) * steps


def add(a, b):
    return a[0] + b[0], a[1] + b[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.add_common_args(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=1, help="batches per repeat")
    p.add_argument("--single", type=int, default=3, help="prompts of the one-at-a-time loop per repeat")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.8)
    args = p.parse_args()
    _, dtype, _, path = B.init(args)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    gen = SimpleNamespace(temperature=args.temperature, top_p=1.0, max_new_tokens=args.max_new_tokens)
    prompts = read_jsonl(f"{B.REPO}/data/prompts_train.jsonl")
    n_jobs = args.batch_size * args.batches
    jobs = make_jobs(prompts[:n_jobs], 1, ["plain"], [], (-45.0, 45.0), args.seed)
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i]["prompt"]))  # as sample.py batches them
    ours_batches = [[jobs[i] for i in order[k:k + args.batch_size]] for k in range(0, n_jobs, args.batch_size)]
    plain_batches = [jobs[k:k + args.batch_size] for k in range(0, n_jobs, args.batch_size)]

    def run_ours():
        n = (0, 0)
        for b, batch in enumerate(ours_batches):
            torch.manual_seed(args.seed * 100_003 + b)
            with torch.no_grad():
                res = generate_batch(model, tok, batch, gen, "cpu")
            n = add(n, (sum(k for _, k, _ in res), positions(res, args.max_new_tokens)))
        return n

    def run_plain():
        n = (0, 0)
        for b, batch in enumerate(plain_batches):
            n = add(n, plain(model, tok, batch, gen, args.seed * 100_003 + b))
        return n

    def run_single():
        n = (0, 0)
        for k, j in enumerate(jobs[:args.single]):
            n = add(n, plain(model, tok, [j], gen, args.seed + k))
        return n

    variants = {"ours (sample.py)": run_ours, "plain batched generate": run_plain, "one prompt at a time": run_single}
    for _ in range(args.warmup):
        plain(model, tok, jobs[:2], SimpleNamespace(temperature=1.0, top_p=1.0, max_new_tokens=8), 0)
    raw, kept = {k: [] for k in variants}, {k: [] for k in variants}
    for rep in range(args.repeats):
        for name, fn in variants.items():
            t = B.now()
            n, pos = fn()
            dt = B.now() - t
            raw[name].append(pos / dt)
            kept[name].append(n / dt)
            print(f"repeat {rep + 1}/{args.repeats} | {name:24s} | {raw[name][-1]:6.1f} positions/s | "
                  f"{kept[name][-1]:6.1f} answer tokens/s ({n} kept of {pos}) | {dt:.1f}s", flush=True)

    med = {k: B.median(v) for k, v in raw.items()}
    ours = "ours (sample.py)"
    B.print_table(f"Sampling, batch {args.batch_size}, <= {args.max_new_tokens} new tokens, T {args.temperature}, "
                  f"{dtype}, {args.threads} threads, median of {args.repeats}",
                  ["variant", "positions/s (median)", "raw", "answer tokens/s (median)", "ours / variant"],
                  [[k, f"{med[k]:.1f}", B.fmt_raw(v), f"{B.median(kept[k]):.1f}", f"{med[ours] / med[k]:.2f}x"]
                   for k, v in raw.items()])
    r_plain, r_single = med[ours] / med["plain batched generate"], med[ours] / med["one prompt at a time"]
    B.save("sample", {"args": vars(args), "dtype": str(dtype), "positions_per_s": raw, "answer_tokens_per_s": kept,
                      "median": med, "ratio_vs_plain": r_plain, "ratio_vs_single": r_single, "target": 0.9})
    print(f"ratio: ours / plain batched generate = {r_plain:.2f}x (target >= 0.9x: "
          f"{'met' if r_plain >= 0.9 else 'NOT met'}) | ours / one prompt at a time = {r_single:.2f}x")


if __name__ == "__main__":
    main()
