"""Stage 3 of DPA: score every sampled response with the multi-objective reward model.

r(x, y) ∈ R^K on a 0-100 scale from the RM trained by train_rm.py (or any folder with the same layout: an
AutoModelForSequenceClassification whose labels are the attribute names). Batches are sorted by length so little
compute goes to padding; the output keeps the input order. With --judge the demo's ground-truth judge (judge.py) rates
the same responses, so evaluation can show the learned RM next to the truth.

reads  samples JSONL (sample.py)      writes the same records + rewards {attribute: value}, rm [, judge {...}]
Scored batches are appended to OUT.partial; an interrupted run resumes from it and writes the same bytes as an
uninterrupted one. Empty answers are scored like any other (they are real policy outputs) and counted.

    python score.py --samples runs/demo/samples.jsonl --rm runs/demo/rm --out runs/demo/scored.jsonl
"""
import argparse
import json
import math
import os
import time

import torch
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from common import (ATTRIBUTES, HELPFULNESS, VERBOSITY, DataError, check_fields, check_output,
                    check_unique, cli, file_digest, model_stamp, open_partial, read_jsonl, resolve_model,
                    reward_forward, rm_text, setup, write_jsonl)


@torch.no_grad()
def score_texts(model, tok, texts, batch_size, max_len, device, done=None, on_batch=None):
    """Reward vectors for a list of RM input texts, in input order. → list of (K,) lists.
    done: {index: row} finished by an interrupted run (batches it covers are skipped); on_batch(indices, rows) runs
    after each scored batch (score.py appends them to OUT.partial)."""
    done = done or {}
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # longest first: peak memory shows up at once
    out = [None] * len(texts)
    for i in tqdm(range(0, len(order), batch_size), desc="score", unit="batch"):
        idx = order[i:i + batch_size]
        if all(j in done for j in idx):
            rows = [done[j] for j in idx]
        else:
            enc = tok([texts[j] for j in idx], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_len, add_special_tokens=False).to(device)
            rows = reward_forward(model, enc["input_ids"], enc["attention_mask"]).tolist()  # (B, K)
            if on_batch:
                on_batch(idx, rows)
        for j, row in zip(idx, rows):
            out[j] = row
    return out


def check_lengths(tok, texts, records, lines, args, template):
    """RM inputs longer than --max-len are cut (counted); a prompt that alone fills --max-len leaves no answer to
    rate: error. → number of cut inputs."""
    n_ids = [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]
    for k in (k for k, n in enumerate(n_ids) if n > args.max_len):
        n_prompt = len(tok(rm_text(tok, records[k]["prompt"], "", template), add_special_tokens=False)["input_ids"])
        if n_prompt >= args.max_len:
            raise DataError(f"{args.samples}:{lines[k]}: field 'prompt' takes {n_prompt} tokens of the RM input; "
                            f"--max-len {args.max_len} leaves no room for the response")
    return sum(n > args.max_len for n in n_ids)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    p.add_argument("--samples", required=True, help="JSONL with prompt and response (sample.py output)")
    p.add_argument("--max-len", type=int, default=320)
    # Model
    p.add_argument("--rm", required=True, help="reward-model folder (train_rm.py output) or hub id")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")
    p.add_argument("--judge", action="store_true", help="also add the demo judge's ground-truth ratings")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    # Output
    p.add_argument("--out", required=True, help="scored JSONL (written atomically; resumes from OUT.partial)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT and discard OUT.partial: start over")
    args = p.parse_args(argv)

    device, dtype, _ = setup(0, args.device, args.dtype)
    partial = args.out + ".partial"
    check_output(args.out, args.overwrite, [args.samples])
    check_output(partial, True, [args.samples])
    lines, records = read_jsonl(args.samples, required=("prompt", "response"), with_lines=True)
    for i, r in zip(lines, records):
        check_fields(args.samples, i, r, prompt="text", response="str", id="id?")
    check_unique(args.samples, lines, records)
    if not records:
        raise DataError(f"{args.samples}: no records to score")

    path = resolve_model(args.rm, args.trust_remote_code)
    meta_path = os.path.join(path, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    tok.padding_side = "right"  # reward_forward reads the last real token of right-padded rows
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype,
                                                               trust_remote_code=args.trust_remote_code)
    model = model.to(device).eval()
    names = meta.get("attributes") or [model.config.id2label[k] for k in range(model.config.num_labels)]
    missing = {HELPFULNESS, VERBOSITY} - set(names)
    if len(names) != model.config.num_labels:
        raise SystemExit(f"error: reward model {args.rm} has {model.config.num_labels} outputs but its meta.json names "
                         f"{len(names)} attributes")
    if missing:
        raise SystemExit(f"error: reward model {args.rm} has no {sorted(missing)} output: DPA needs both "
                         f"(its attributes: {names})")

    t0 = time.time()
    texts = [rm_text(tok, r["prompt"], r["response"], meta.get("template", "chat")) for r in records]
    n_cut = check_lengths(tok, texts, records, lines, args, meta.get("template", "chat"))
    job = {"samples": file_digest(args.samples), "rm": args.rm, "rm_files": model_stamp(path), "max_len": args.max_len,
           "batch_size": args.batch_size, "device": device, "dtype": str(dtype)}
    finished, append = open_partial(partial, job, args.overwrite)
    done = {k: row for e in finished for k, row in zip(e["index"], e["rewards"])}
    n_new = 0

    def on_batch(idx, rows):
        nonlocal n_new
        for j, row in zip(idx, rows):
            if not all(math.isfinite(x) for x in row):
                raise DataError(f"{args.samples}:{lines[j]}: the reward model gave non-finite rewards {row} "
                                f"(broken weights or fp16 overflow? try --dtype float32)")
        append([{"index": idx, "rewards": rows}])
        n_new += len(rows)
    rewards = score_texts(model, tok, texts, args.batch_size, args.max_len, device, done, on_batch)
    judged = None
    if args.judge:
        from judge import Judge
        judged = Judge(device).rate([r["prompt"] for r in records], [r["response"] for r in records],
                                    [r.get("truncated", False) for r in records])
    for k, r in enumerate(records):
        r["rewards"] = {a: round(v, 3) for a, v in zip(names, rewards[k])}
        r["rm"] = args.rm
        if judged is not None:
            r["judge"] = {a: round(float(v), 3) for a, v in zip(ATTRIBUTES, judged[k]) if v == v}
    write_jsonl(args.out, records)
    if os.path.exists(partial):
        os.remove(partial)
    dt = time.time() - t0
    h = sum(r["rewards"][HELPFULNESS] for r in records) / max(1, len(records))
    v = sum(r["rewards"][VERBOSITY] for r in records) / max(1, len(records))
    n_empty = sum(not r["response"].strip() for r in records)
    print(f"score: {len(records)} responses → {args.out} | mean helpfulness {h:.1f} verbosity {v:.1f} | "
          f"{len(records) / max(dt, 1e-9):.1f} responses/s | {dt:.0f}s | {n_empty} empty | {n_cut} cut at --max-len"
          + (f" | resumed {len(done)} from {partial}, scored {n_new}" if done else ""))


if __name__ == "__main__":
    cli(main)
