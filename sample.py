"""Stage 2 of DPA: sample responses from the policy under directional system prompts.

For each prompt x draw a direction θ ~ U[lo, hi] (or take every angle of a fixed list), render the DPA system prompt
"... maximize weighted rating = helpfulness*{round(100 cos θ)} + verbosity*{round(100 sin θ)}" and draw n responses
y ~ π(·|x, v) (DPA §3, step 1-2). Exploration hints (--hints brief,detail) add extra samples whose system prompt
carries a length hint; they only widen the candidate pool for best-of-n: finetune.py trains every row under the
plain DPA prompt of its target direction.

reads  prompts JSONL   {id, prompt}
writes samples JSONL   one record per response (schema in README): id, prompt_id, prompt, degree, weights, hint,
                       response, n_tokens, truncated, model, seed, gen

    python sample.py --prompts data/prompts_train.jsonl --out runs/demo/samples.jsonl --n 2 --hints plain,brief,detail

Several devices: `torchrun --nproc_per_node=8 sample.py ...` (each rank draws every 8th batch, rank 0 writes OUT);
several machines: `sample.py ... --shard i/N` per job, then `sample.py ... --merge N` with the same flags. Each
batch's seed depends on its global index only, so OUT is the same file a single process writes.
"""
import argparse
import json
import os
import random
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import (DEFAULT_MODEL, SCHEMA_VERSION, DataError, all_mean, chat_messages, check_output, collect_parts,
                    degree_to_vector, dist_setup, is_main, part_path, read_jsonl, resolve_model, setup, shard,
                    shard_spec, vector_to_weights, write_jsonl)

HINTS = {"plain": None,
         "brief": "Answer in one or two short sentences.",
         "detail": "Answer thoroughly, with several detailed paragraphs."}


def make_jobs(prompts, n, hints, degrees, degree_range, seed):
    """One job per response to draw: (prompt record, θ, hint, k). θ is drawn once per prompt (shared by its hints)."""
    rng = random.Random(seed)
    jobs = []
    for rec in prompts:
        angles = degrees if degrees else [round(rng.uniform(*degree_range), 2)]
        for deg in angles:
            for hint in hints:
                for k in range(n):
                    jobs.append({"prompt_id": rec["id"], "prompt": rec["prompt"], "degree": deg, "hint": hint,
                                 "id": f"{rec['id']}/{deg:g}/{hint}/{k}"})
    return jobs


def generate_batch(model, tok, jobs, args, device):
    """Left-padded batched sampling; returns (response text, new-token count, truncated) per job."""
    texts = [tok.apply_chat_template(chat_messages(j["prompt"], j["degree"], HINTS[j["hint"]]),
                                     tokenize=False, add_generation_prompt=True) for j in jobs]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False,  # static cache: few distinct shapes
              pad_to_multiple_of=64 if args.static_cache else None).to(device)
    out = model.generate(**enc, do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                         max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, cache_implementation="static" if args.static_cache else None)
    new = out[:, enc["input_ids"].shape[1]:]  # (B, <= max_new_tokens)
    results = []
    for row in new.tolist():
        ended = tok.eos_token_id in row
        ids = row[:row.index(tok.eos_token_id)] if ended else row
        results.append((tok.decode(ids, skip_special_tokens=True).strip(), len(ids), not ended))
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    p.add_argument("--prompts", required=True, help="JSONL with id and prompt")
    p.add_argument("--limit", type=int, default=0, help="use the first N prompts (0 = all)")
    p.add_argument("--degrees", default="", help="fixed angles for every prompt, e.g. -45,0,45 (default: one random θ)")
    p.add_argument("--degree-range", type=float, nargs=2, default=(-45.0, 45.0), help="θ ~ U[lo, hi] in degrees")
    p.add_argument("--n", type=int, default=4, help="responses per prompt, direction and hint")
    p.add_argument("--hints", default="plain", help=f"comma list of system-prompt hints from {list(HINTS)}")
    # Model
    p.add_argument("--model", default=DEFAULT_MODEL, help="policy: embedded default, local folder or hub id")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--static-cache", action="store_true",
                   help="preallocated KV cache; on CUDA transformers then compiles the decoding step (pays for long "
                        "generations at small batch); prompts are padded to a multiple of 64 tokens to reuse it")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    # Output
    p.add_argument("--out", required=True, help="samples JSONL (written atomically; resumes from OUT.partial)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--shard", default="", help="i/N: draw only part i of N (a job of a job array) → OUT.part-i-of-N")
    p.add_argument("--merge", type=int, default=0, help="N: join the N parts (made with the same flags) into OUT")
    args = p.parse_args()

    _, world, device = dist_setup(args.device)  # torchrun: one process per device; else (0, 1, device)
    device, dtype, _ = setup(args.seed, device, args.dtype)
    part = shard_spec(args.shard, args.merge)  # (i, n, how): which batches this process draws
    check_output(args.out, args.overwrite, [args.prompts])
    hints = args.hints.split(",")
    for h in hints:
        if h not in HINTS:
            raise SystemExit(f"error: unknown hint {h!r}; choose from {list(HINTS)}")
    degrees = [float(d) for d in args.degrees.split(",")] if args.degrees else []
    for d in degrees + list(args.degree_range):
        degree_to_vector(d)  # raises on angles outside [-90, 90]
    lines, prompts = read_jsonl(args.prompts, required=("id", "prompt"), with_lines=True)
    for i, rec in zip(lines, prompts):
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise DataError(f"{args.prompts}:{i}: field 'prompt' must be a non-empty string")
    if len({r["id"] for r in prompts}) != len(prompts):
        raise DataError(f"{args.prompts}: duplicate ids")
    prompts = prompts[:args.limit] if args.limit else prompts

    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"  # batched generation continues every row from its last real token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval() if part[2] != "merge" else None

    jobs = make_jobs(prompts, args.n, hints, degrees, tuple(args.degree_range), args.seed)
    # length-sorted batches waste less padding; each batch gets its own seed, so a resumed run draws the same samples
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i]["prompt"]))
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    mine = shard(range(len(batches)), part[0], part[1])  # batch b goes to part b % n (all of them in one process)
    partial = (args.out if part[2] == "all" else part_path(args.out, part[0], part[1])) + ".partial"
    done = {r["id"]: r for r in read_jsonl(partial)} if os.path.exists(partial) and not args.overwrite else {}
    gen = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
    t0, n_tok = time.time(), 0
    with open(partial, "a" if done else "w", encoding="utf-8") if mine else nullcontext() as f:
        for b in tqdm(mine, desc="sample", unit="batch", disable=not is_main()):
            batch = batches[b]
            if all(jobs[i]["id"] in done for i in batch):
                continue
            torch.manual_seed(args.seed * 100_003 + b)
            with torch.no_grad():
                results = generate_batch(model, tok, [jobs[i] for i in batch], args, device)
            for i, (text, n, trunc) in zip(batch, results):
                j = jobs[i]
                rec = {"id": j["id"], "prompt_id": j["prompt_id"], "prompt": j["prompt"], "degree": j["degree"],
                       "weights": list(vector_to_weights(degree_to_vector(j["degree"]))), "hint": j["hint"],
                       "response": text, "n_tokens": n, "truncated": trunc, "model": args.model, "seed": args.seed,
                       "gen": gen, "schema_version": SCHEMA_VERSION}
                done[rec["id"]] = rec
                n_tok += n
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    n_tok = all_mean(n_tok) * world  # new tokens of all ranks
    # input order, whatever order (and on whichever rank or job) the batches ran
    records = collect_parts([(i, done[jobs[i]["id"]]) for b in mine for i in batches[b]], len(jobs), args.out, part)
    if records is None:  # a --shard job (its part is written) or a rank > 0 (its records went to rank 0)
        if mine:
            os.remove(partial)
        print(f"sample: part {part[0]}/{part[1]} → {part_path(args.out, part[0], part[1])}")
        return
    if [(r["id"], r["gen"], r["model"]) for r in records] != [(j["id"], gen, args.model) for j in jobs]:
        raise DataError(f"{args.out}: the parts hold other records than these flags make: merge with the same flags")
    write_jsonl(args.out, records)
    if mine:
        os.remove(partial)
    if part[2] == "merge":
        for i in range(part[1]):
            os.remove(part_path(args.out, i, part[1]))
    dt = time.time() - t0
    trunc = sum(r["truncated"] for r in records) / max(1, len(records))
    mean_len = sum(r["n_tokens"] for r in records) / max(1, len(records))
    print(f"sample: {len(records)} responses ({len(prompts)} prompts) → {args.out} | mean {mean_len:.0f} tokens | "
          f"truncated {trunc:.0%} | {n_tok / max(dt, 1e-9):.0f} new tok/s | {dt:.0f}s")


if __name__ == "__main__":
    main()
