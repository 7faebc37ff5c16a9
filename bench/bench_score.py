"""Scoring throughput: score.py's length-sorted batches vs a per-example loop (as on the ArmoRM model card) and vs
the same batches in input order (unsorted), side by side in one process.

Same reward model (the SmolLM2-135M backbone with a 10-output head, loaded in the dtype score.py loads it in), same
texts: the reward-model input (common.rm_text) of --n answers from data/rm_train.jsonl, i.e. answers the embedded
policy sampled, with their natural spread of lengths (tens to hundreds of tokens), cut at --max-len as score.py does.
Tokenisation is inside the timed region for every variant. A profile follows: the forward's throughput at batch
sizes 1 / 4 / 16 / 32 on unpadded rows of --profile-len tokens, i.e. the most any batching can gain on this machine.
  per-example  for each answer: tokenize it alone, model(**enc).logits (the model card's loop)
  unsorted     score.py's loop without the sort: batches of --batch-size in input order, padded to their longest
  ours         score.score_texts: longest-first, so each batch holds answers of similar length

    flock /tmp/heavy.lock /work/venv-bench/bin/python bench/bench_score.py
"""
import argparse

import benchlib as B
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from common import ATTRIBUTES, reward_forward, rm_text
from runtime.io import read_jsonl
from score import score_texts


@torch.no_grad()
def per_example(model, tok, texts, max_len):
    out = []
    for t in texts:
        enc = tok(t, return_tensors="pt", truncation=True, max_length=max_len, add_special_tokens=False)
        out.append(model(**enc).logits[0].float().tolist())
    return out


@torch.no_grad()
def unsorted(model, tok, texts, batch_size, max_len):
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_len,
                  add_special_tokens=False)
        out += reward_forward(model, enc["input_ids"], enc["attention_mask"]).tolist()
    return out


@torch.no_grad()
def profile(model, args):
    """Forward throughput (tokens/s, median of 3 x ~2 s) by batch size on rows of profile_len tokens, no padding."""
    out = {}
    for bs in (1, 4, 16, 32):
        ids = torch.randint(100, 40000, (bs, args.profile_len))
        attn = torch.ones_like(ids)
        reward_forward(model, ids, attn)
        rates = []
        for _ in range(3):
            t, n = B.now(), 0
            while B.now() - t < 2.0:
                reward_forward(model, ids, attn)
                n += 1
            rates.append(n * ids.numel() / (B.now() - t))
        out[bs] = B.median(rates)
    B.print_table(f"Profile: reward-model forward throughput by batch size, rows of {args.profile_len} tokens, no "
                  f"padding", ["batch size", "tokens/s (median of 3)", "vs batch 1"],
                  [[bs, f"{r:.0f}", f"{r / out[1]:.2f}x"] for bs, r in out.items()])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.add_common_args(p)
    p.add_argument("--n", type=int, default=192, help="answers to score per repeat")
    p.add_argument("--batch-size", type=int, default=32, help="score.py's default")
    p.add_argument("--max-len", type=int, default=320, help="score.py's default")
    p.add_argument("--profile-len", type=int, default=192, help="row length of the batch-size profile (0: skip it)")
    args = p.parse_args()
    _, dtype, _, path = B.init(args)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    tok.pad_token = tok.convert_ids_to_tokens(0)  # as a train_rm.py folder has it
    # score.py loads the RM in its compute dtype (bf16 weights where setup picks bf16); the loop uses the same model
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(ATTRIBUTES), dtype=dtype).eval()
    model.config.pad_token_id = tok.pad_token_id
    recs = read_jsonl(f"{B.REPO}/data/rm_train.jsonl")[:args.n]
    texts = [rm_text(tok, r["prompt"], r["response"]) for r in recs]
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"][:args.max_len]) for t in texts]

    def rm(input_ids, attention_mask):  # score.py's forward for a train_rm.py folder
        return {"rewards": reward_forward(model, input_ids, attention_mask)}

    variants = {"ours (score.py, length-sorted)": lambda: score_texts(rm, tok, texts, args.batch_size,
                                                                      args.max_len, "cpu")["rewards"],
                "unsorted batches": lambda: unsorted(model, tok, texts, args.batch_size, args.max_len),
                "per-example loop": lambda: per_example(model, tok, texts, args.max_len)}
    ref = None
    for _ in range(args.warmup):
        for name, fn in variants.items():
            got = torch.tensor(fn())
            ref = got if ref is None else ref
            # same numbers up to bf16 noise from padding and batch shapes
            assert got.shape == ref.shape and (got - ref).abs().max() < 0.1 * (ref.abs().max() + 1), name
    raw = {k: [] for k in variants}
    for rep in range(args.repeats):
        for name, fn in variants.items():
            t = B.now()
            fn()
            raw[name].append(len(texts) / (B.now() - t))
            print(f"repeat {rep + 1}/{args.repeats} | {name:32s} | {raw[name][-1]:6.2f} answers/s", flush=True)

    med = {k: B.median(v) for k, v in raw.items()}
    ours = "ours (score.py, length-sorted)"
    B.print_table(f"Scoring {len(texts)} answers ({min(lengths)}-{max(lengths)} tokens, mean "
                  f"{sum(lengths) / len(lengths):.0f}), batch {args.batch_size}, {dtype}, {args.threads} threads, "
                  f"median of {args.repeats}", ["variant", "answers/s (median)", "raw", "ours / variant"],
                  [[k, f"{med[k]:.2f}", B.fmt_raw(v, 2), f"{med[ours] / med[k]:.2f}x"] for k, v in raw.items()])
    prof = profile(model, args) if args.profile_len else {}
    r_loop, r_unsorted = med[ours] / med["per-example loop"], med[ours] / med["unsorted batches"]
    B.save("score" + (f"-batch{args.batch_size}" if args.batch_size != 32 else ""), {"args": vars(args), "dtype": str(dtype), "answers_per_s": raw, "median": med,
                     "profile_tokens_per_s": prof, "ratio_vs_loop": r_loop, "ratio_vs_unsorted": r_unsorted,
                     "targets": [8.0, 1.3]})
    print(f"ratio: ours / per-example loop = {r_loop:.2f}x (target >= 8x: {'met' if r_loop >= 8 else 'NOT met'}) | "
          f"ours / unsorted = {r_unsorted:.2f}x (target >= 1.3x: {'met' if r_unsorted >= 1.3 else 'NOT met'})")


if __name__ == "__main__":
    main()
