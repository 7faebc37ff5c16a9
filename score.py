"""Stage 3 of DPA: score every sampled response with the multi-objective reward model.

r(x, y) ∈ R^K on a 0-100 scale from the RM trained by train_rm.py (or any folder with the same layout: an
AutoModelForSequenceClassification whose labels are the attribute names). Batches are sorted by length so little
compute goes to padding; the output keeps the input order. With --judge the demo's ground-truth judge (judge.py) rates
the same responses, so evaluation can show the learned RM next to the truth.

reads  samples JSONL (sample.py)      writes the same records + rewards {attribute: value}, rm [, judge {...}]

    python score.py --samples runs/demo/samples.jsonl --rm runs/demo/rm --out runs/demo/scored.jsonl

Several devices: `torchrun --nproc_per_node=8 score.py ...`; several machines: `score.py ... --shard i/N` per job,
then `score.py ... --merge N`. Batches are planned over the whole input and dealt out, so OUT is the same file a
single process writes.
"""
import argparse
import json
import os
import time

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from common import (ATTRIBUTES, HELPFULNESS, VERBOSITY, DataError, check_output, collect_parts, dist_setup,
                    is_main, part_path, read_jsonl, resolve_model, reward_forward, rm_text, setup, shard, shard_spec,
                    write_jsonl)


@torch.no_grad()
def score_texts(model, tok, texts, batch_size, max_len, device, part=(0, 1)):
    """Reward vectors for a list of RM input texts, in input order. → list of (K,) lists.
    part (i, n): only every n-th batch from the i-th (the other texts get None)."""
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # longest first: peak memory shows up at once
    out = [None] * len(texts)
    for i in tqdm(shard(range(0, len(order), batch_size), *part), desc="score", unit="batch",
                  disable=not is_main()):
        idx = order[i:i + batch_size]
        enc = tok([texts[j] for j in idx], return_tensors="pt", padding=True, truncation=True, max_length=max_len,
                  add_special_tokens=False).to(device)
        r = reward_forward(model, enc["input_ids"], enc["attention_mask"])  # (B, K)
        for j, row in zip(idx, r.tolist()):
            out[j] = row
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    p.add_argument("--samples", required=True, help="JSONL with prompt and response (sample.py output)")
    p.add_argument("--max-len", type=int, default=320)
    # Model
    p.add_argument("--rm", required=True, help="reward-model folder (train_rm.py output) or hub id")
    p.add_argument("--judge", action="store_true", help="also add the demo judge's ground-truth ratings")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    # Output
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--shard", default="", help="i/N: score only part i of N (a job of a job array) → OUT.part-i-of-N")
    p.add_argument("--merge", type=int, default=0, help="N: join the N parts (made with the same flags) into OUT")
    args = p.parse_args()

    _, _, device = dist_setup(args.device)  # torchrun: one process per device; else (0, 1, device)
    device, dtype, _ = setup(0, device, args.dtype)
    part = shard_spec(args.shard, args.merge)  # (i, n, how): which batches this process scores
    check_output(args.out, args.overwrite, [args.samples])
    lines, records = read_jsonl(args.samples, required=("prompt", "response"), with_lines=True)
    for i, r in zip(lines, records):
        for field in ("prompt", "response"):
            if not isinstance(r[field], str):
                raise DataError(f"{args.samples}:{i}: field '{field}' must be a string")

    path = resolve_model(args.rm)
    meta_path = os.path.join(path, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"  # reward_forward reads the last real token of right-padded rows
    model = (AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device).eval()
             if part[2] != "merge" else None)  # a merge only joins the parts
    config = model.config if model is not None else AutoConfig.from_pretrained(path)
    names = meta.get("attributes") or [config.id2label[k] for k in range(config.num_labels)]
    missing = {HELPFULNESS, VERBOSITY} - set(names)
    if missing:
        raise SystemExit(f"error: reward model {args.rm} has no {sorted(missing)} output: DPA needs both "
                         f"(its attributes: {names})")

    t0 = time.time()
    texts = [rm_text(tok, r["prompt"], r["response"], meta.get("template", "chat")) for r in records]
    rewards = score_texts(model, tok, texts, args.batch_size, args.max_len, device, part[:2])
    mine = [(k, dict(r, rewards={a: round(v, 3) for a, v in zip(names, rewards[k])}, rm=args.rm))
            for k, r in enumerate(records) if rewards[k] is not None]
    scored = collect_parts(mine, len(records), args.out, part)  # input order, from every rank or job
    if scored is None:  # a --shard job (its part is written) or a rank > 0 (its records went to rank 0)
        print(f"score: part {part[0]}/{part[1]} → {part_path(args.out, part[0], part[1])}")
        return
    if [(r["prompt"], r["response"], r["rm"]) for r in scored] != [(r["prompt"], r["response"], args.rm)
                                                                   for r in records]:
        raise DataError(f"{args.out}: the parts hold other records than {args.samples}: merge with the same flags")
    records = scored
    judged = None
    if args.judge:  # after the merge: the judge sees every record at once, as in a single process
        from judge import Judge
        judged = Judge(device).rate([r["prompt"] for r in records], [r["response"] for r in records],
                                    [r.get("truncated", False) for r in records])
    for k, r in enumerate(records):
        if judged is not None:
            r["judge"] = {a: round(float(v), 3) for a, v in zip(ATTRIBUTES, judged[k]) if v == v}
    write_jsonl(args.out, records)
    if part[2] == "merge":
        for i in range(part[1]):
            os.remove(part_path(args.out, i, part[1]))
    dt = time.time() - t0
    h = sum(r["rewards"][HELPFULNESS] for r in records) / max(1, len(records))
    v = sum(r["rewards"][VERBOSITY] for r in records) / max(1, len(records))
    print(f"score: {len(records)} responses → {args.out} | mean helpfulness {h:.1f} verbosity {v:.1f} | "
          f"{len(records) / max(dt, 1e-9):.1f} responses/s | {dt:.0f}s")


if __name__ == "__main__":
    main()
