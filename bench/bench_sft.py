"""SFT training throughput: finetune.py's RSF step vs TRL SFTTrainer, side by side in one process.

Same model (SmolLM2-135M-Instruct, fp32 master weights), same rows (--lengths, see benchlib), same number of rows per
step, same trainable parameters (the embeddings, tied to the LM head, are frozen in both, as finetune.py always does),
bf16 autocast where common.setup picks it, loss on the response tokens only (TRL: pre-tokenized input_ids +
completion_mask). Ours is finetune.py's TRAINING STEP block built from the functions it runs (runtime/: plan_batches,
collate, token_logps, get_lr) and its optimizer settings; TRL batches with its default random sampler. TRL runs with its
defaults (gradient checkpointing on) and with checkpointing off. A step is timed end to end (collation, forward,
backward, clipping, optimizer); throughput is real (non-padding) tokens per second.

    flock /tmp/heavy.lock /work/venv-bench/bin/python bench/bench_sft.py [--lengths natural]
"""
import argparse
import random
import shutil
import tempfile

import benchlib as B
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from runtime.batching import collate, plan_batches
from runtime.logprobs import token_logps
from runtime.models import get_lr


def our_block(model, opt, params, rows, args, pad_id, autocast, lr=5e-5):
    """finetune.py's --loss sft step (grad_accum 1) over one epoch of `rows`, batched by plan_batches as finetune.py
    does (the rows of one prompt side by side). → (seconds, real tokens) of the steps after --warmup."""
    n = len(rows) // args.batch_size
    plan = plan_batches([r["prompt_id"] for r in rows], args.batch_size, n, random.Random(args.seed))
    secs, toks = [], []
    for k, idx in enumerate(plan):
        t = B.now()
        for g in opt.param_groups:
            g["lr"] = get_lr(k, n, 0, lr)
        ids, attn, lmask = collate([(rows[i]["ids"], rows[i]["n_prompt"]) for i in idx], pad_id)
        with autocast():
            logp, row = token_logps(model, ids, attn, lmask)
        seq = torch.zeros(len(idx)).index_add_(0, row, logp)  # noqa: F841 (finetune.py's forward builds it too)
        loss = -logp.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        secs.append(B.now() - t)
        toks.append(int(attn.sum()))
    return secs[args.warmup:], toks[args.warmup:]


def make_trl(path, tok, rows, args, dtype, gc, out_dir):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.model.embed_tokens.requires_grad_(False)  # the same trainable set as finetune.py
    data = Dataset.from_list([{"input_ids": r["ids"],
                               "completion_mask": [0] * r["n_prompt"] + [1] * (len(r["ids"]) - r["n_prompt"])}
                              for r in rows])
    return B.trl_trainer(SFTTrainer, SFTConfig, model, args, out_dir, dtype, gc, args.batch_size, 5e-5,
                         completion_only_loss=True, train_dataset=data, processing_class=tok)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.add_common_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="rows per step (run_all.sh's SFT uses 8)")
    p.add_argument("--skip-trl-default", action="store_true", help="only TRL with gradient checkpointing off")
    args = p.parse_args()
    assert args.warmup >= 1, "a TRL step is timed from the end of the previous one: --warmup must be ≥ 1"
    _, dtype, autocast, path = B.init(args)
    tok = AutoTokenizer.from_pretrained(path)
    rows = B.bench_rows(tok, args.batch_size * (args.warmup + args.steps), args.seq_len, lengths=args.lengths)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.model.embed_tokens.requires_grad_(False)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.95), weight_decay=0.0)
    ours_pos = B.Positions(model.model)

    tmp = tempfile.mkdtemp(prefix="bench-sft-")
    tools = {"ours": None, "trl (gc off)": make_trl(path, tok, rows, args, dtype, False, tmp + "/a")}
    if not args.skip_trl_default:
        tools["trl (defaults: gc on)"] = make_trl(path, tok, rows, args, dtype, True, tmp + "/b")
    raw, pads = {k: [] for k in tools}, {k: [] for k in tools}
    for rep in range(args.repeats):
        for name, t in tools.items():
            if t is None:
                secs, toks = our_block(model, opt, params, rows, args, tok.pad_token_id, autocast)
                pos = ours_pos
            else:
                t[0].train()
                (secs, toks), pos = t[1].timed(args.warmup), t[2]
            raw[name].append(sum(toks) / sum(secs))
            pads[name].append(pos.take())
            print(f"repeat {rep + 1}/{args.repeats} | {name:22s} | {raw[name][-1]:7.1f} tokens/s | "
                  f"steps {B.fmt_raw(secs, 2)} s | tokens {' '.join(map(str, toks))}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    B.report(f"sft-{args.lengths}", f"SFT, {args.batch_size} rows per step, {args.lengths} lengths (<= {args.seq_len} "
             f"tokens), {dtype}, {args.threads} threads, median of {args.repeats} x {args.steps} steps", raw, pads, 1.3,
             {"args": vars(args), "dtype": str(dtype)})


if __name__ == "__main__":
    main()
