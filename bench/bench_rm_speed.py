"""Reward-model training throughput: train_rm.py's step vs TRL RewardTrainer, side by side in one process.

Same sequences: --pairs-per-step preference pairs of rows of one prompt (reward-model text, --lengths as in
benchlib). TRL trains a scalar Bradley-Terry head on the pairs (2 x pairs sequences per step, pre-tokenized
chosen_ids/rejected_ids); ours regresses the 10 attributes on the same 2 x pairs texts as rows (train_rm.py's own
batches(), in runtime/batching.py: shuffled, tokenisation inside the step, right padding, one forward per batch as
train_rm.py's default, masked MSE, two-group AdamW; --also-chunked N adds ours with train_rm.py --chunk-rows N, the
batch run in length-sorted chunks of N rows, runtime.batching.sorted_forward). Same trainable
parameters in both: embeddings and the lowest --freeze-layers decoder layers frozen (run_all.sh freezes 16). TRL runs
with its defaults (gradient checkpointing on) and with checkpointing off. Throughput is real (non-padding) tokens/s.

    flock /tmp/heavy.lock /work/venv-bench/bin/python bench/bench_rm_speed.py [--lengths natural]
"""
import argparse
import json
import os
import random
import shutil
import tempfile

import benchlib as B
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tools import rm_data
from common import ATTRIBUTES
from runtime.batching import batches, sorted_forward
from runtime.models import get_lr
from tools.rm_data import to_row
from train_rm import masked_mse


def load_rows(jsonl, n):
    """train_rm.py's reading of an rm-schema JSONL (rm_data.load, then to_row) → the n rating rows, in file order."""
    rows = [to_row(r, ATTRIBUTES) for r in rm_data.load(jsonl, "rm")[0]]
    assert len(rows) == n, f"{jsonl}: {len(rows)} distinct rows of {n} (duplicates dropped)"
    return rows


def load_rm(path, num_labels, pad_id, freeze_layers):
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32,
                                                               problem_type="regression")
    model.config.pad_token_id = pad_id
    torch.nn.init.zeros_(model.score.weight)
    for m in [model.model.embed_tokens, *model.model.layers[:freeze_layers]]:
        m.requires_grad_(False)
    return model.train()


def our_block(model, opt, rows, tok, args, autocast, chunk_rows):
    """train_rm.py's step (grad_accum 1) over one epoch of its own batches(); → (seconds, real tokens) of the steps
    after --warmup."""
    n_steps = args.warmup + args.steps
    stream = batches(rows, tok, 2 * args.pairs_per_step, args.seq_len, "chat", True, random.Random(args.seed))
    times, toks = [], []
    for step in range(n_steps):
        t = B.now()
        for g in opt.param_groups:
            g["lr"] = get_lr(step, n_steps, 0, g["base"])
        enc, target, mask = next(stream)
        with autocast():
            pred = sorted_forward(model, enc["input_ids"], enc["attention_mask"], chunk_rows)
        loss = masked_mse(pred, target, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(B.now() - t)
        toks.append(int(enc["attention_mask"].sum()))
    return times[args.warmup:], toks[args.warmup:]


def make_trl(path, tok, pairs, args, dtype, gc, out_dir):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer
    model = load_rm(path, 1, tok.pad_token_id, args.freeze_layers)
    data = Dataset.from_list([{"chosen_ids": c["rm_ids"], "rejected_ids": r["rm_ids"]} for c, r in pairs])
    return B.trl_trainer(RewardTrainer, RewardConfig, model, args, out_dir, dtype, gc, args.pairs_per_step, 1e-4,
                         train_dataset=data, processing_class=tok)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.add_common_args(p)
    p.add_argument("--pairs-per-step", type=int, default=8, help="TRL pairs per step; ours trains 2x as many rows "
                                                                  "(run_all.sh's train_rm uses 16 rows)")
    p.add_argument("--freeze-layers", type=int, default=16, help="as run_all.sh")
    p.add_argument("--also-chunked", type=int, default=0, metavar="N", help="also time ours with --chunk-rows N")
    p.add_argument("--skip-trl-default", action="store_true", help="only TRL with gradient checkpointing off")
    args = p.parse_args()
    assert args.warmup >= 1, "a TRL step is timed from the end of the previous one: --warmup must be ≥ 1"
    _, dtype, autocast, path = B.init(args)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    tok.pad_token = tok.convert_ids_to_tokens(0)  # as train_rm.py: a pad id that differs from the end-of-turn token

    n_pairs = args.pairs_per_step * (args.warmup + args.steps)
    pairs = B.bench_pairs(B.bench_rows(tok, 3 * n_pairs, args.seq_len, by_prompt=True, lengths=args.lengths))[:n_pairs]
    assert len(pairs) == n_pairs, f"only {len(pairs)} pairs of one prompt in the data; lower --steps"
    tmp = tempfile.mkdtemp(prefix="bench-rm-")
    jsonl = os.path.join(tmp, "rows.jsonl")  # chosen1, rejected1, chosen2, ... read back as train_rm.py reads them
    with open(jsonl, "w") as f:
        f.writelines(json.dumps({"prompt": r["prompt"], "response": r["response"], "labels": r["labels"],
                                 "prompt_id": r["prompt_id"]}) + "\n" for pair in pairs for r in pair)
    rows = load_rows(jsonl, 2 * n_pairs)

    model = load_rm(path, len(ATTRIBUTES), tok.pad_token_id, args.freeze_layers)
    ours_pos = B.Positions(model.model)
    head = list(model.score.parameters())
    body = [q for n, q in model.named_parameters() if q.requires_grad and not n.startswith("score.")]
    opt = torch.optim.AdamW([{"params": body, "lr": 1e-4, "base": 1e-4}, {"params": head, "lr": 1e-3, "base": 1e-3}],
                            betas=(0.9, 0.95), weight_decay=0.0)

    tools = {"ours": 0}
    if args.also_chunked:
        tools[f"ours, --chunk-rows {args.also_chunked}"] = args.also_chunked
    tools |= {"trl (gc off)": make_trl(path, tok, pairs, args, dtype, False, tmp + "/a")}
    if not args.skip_trl_default:
        tools["trl (defaults: gc on)"] = make_trl(path, tok, pairs, args, dtype, True, tmp + "/b")
    raw, pads = {k: [] for k in tools}, {k: [] for k in tools}
    for rep in range(args.repeats):
        for name, t in tools.items():
            if isinstance(t, int):
                (secs, toks), pos = our_block(model, opt, rows, tok, args, autocast, t), ours_pos
            else:
                t[0].train()
                (secs, toks), pos = t[1].timed(args.warmup), t[2]
            raw[name].append(sum(toks) / sum(secs))
            pads[name].append(pos.take())
            print(f"repeat {rep + 1}/{args.repeats} | {name:22s} | {raw[name][-1]:7.1f} tokens/s | "
                  f"steps {B.fmt_raw(secs, 2)} s | tokens {' '.join(map(str, toks))}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    B.report(f"rm-speed-{args.lengths}", f"RM training, {2 * args.pairs_per_step} sequences per step, {args.lengths} lengths "
             f"(<= {args.seq_len} tokens), {args.freeze_layers} of 30 layers frozen, {dtype}, {args.threads} threads, "
             f"median of {args.repeats} x {args.steps} steps", raw, pads, 1.2, {"args": vars(args), "dtype": str(dtype)})

if __name__ == "__main__":
    main()
