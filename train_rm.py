"""Stage 1 of DPA: train the multi-objective reward model r(x, y) ∈ R^K on a 0-100 scale.

The DPA reward model (arXiv 2402.18571 §3; RLHFlow/RewardModel-Mistral-7B-for-DPA-v1) is an LM backbone with a
bias-free linear head on the last token's final hidden state, trained by plain multi-output regression:
    min  Σ_k mask_k (w_kᵀ f(x, y) − r_k)²  / Σ_k mask_k          (missing ratings are masked, not imputed)
Targets are divided by 100 while training and the head is scaled back, so the saved model predicts 0-100.

reads  JSONL {prompt, response, labels: {attribute: 0-100 or null}}     (data/rm_train.jsonl by default)
writes an AutoModelForSequenceClassification folder + meta.json + eval.json (held-out MSE and Pearson per attribute)

    python train_rm.py --data data/rm_train.jsonl --out runs/demo/rm
"""
import argparse
import itertools
import json
import math
import os
import random
import time

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from common import (ATTRIBUTES, DEFAULT_MODEL, HELPFULNESS, VERBOSITY, DataError, read_jsonl, resolve_model,
                    reward_forward, rm_text, setup)


def masked_mse(pred, target, mask):
    """Mean squared error over the labelled cells only. pred, target, mask: (B, K) → scalar.
    Cells with mask 0 (missing ratings; their target may hold any finite placeholder) add nothing."""
    return ((pred - target) ** 2 * mask).sum() / mask.sum().clamp(min=1)


def pearson(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def get_lr(step, total, warmup, lr):
    """Linear warmup, then cosine decay to 10% of lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def load_rows(path, attributes):
    """→ list of (text fields, target (K,), mask (K,)); errors name file, line and field."""
    rows = []
    for i, rec in zip(*read_jsonl(path, required=("prompt", "response", "labels"), with_lines=True)):
        if not isinstance(rec["labels"], dict):
            raise DataError(f"{path}:{i}: field 'labels' must be an object of attribute → 0-100 or null")
        unknown = set(rec["labels"]) - set(attributes)
        if unknown:
            raise DataError(f"{path}:{i}: field 'labels' has unknown attributes {sorted(unknown)}")
        target, mask = np.zeros(len(attributes), np.float32), np.zeros(len(attributes), np.float32)
        for k, a in enumerate(attributes):
            v = rec["labels"].get(a)
            if v is None:
                continue
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise DataError(f"{path}:{i}: field 'labels.{a}' must be a finite number or null, got {v!r}")
            target[k], mask[k] = v / 100.0, 1.0
        rows.append((rec["prompt"], rec["response"], target, mask, rec.get("prompt_id", rec["prompt"])))
    return rows


def batches(rows, tok, batch_size, max_len, template, shuffle, rng):
    idx = list(range(len(rows)))
    if shuffle:
        rng.shuffle(idx)
    for i in range(0, len(idx), batch_size):
        b = [rows[j] for j in idx[i:i + batch_size]]
        enc = tok([rm_text(tok, r[0], r[1], template) for r in b], return_tensors="pt", padding=True,
                  truncation=True, max_length=max_len, add_special_tokens=False)
        yield enc, torch.tensor(np.stack([r[2] for r in b])), torch.tensor(np.stack([r[3] for r in b]))


def sorted_forward(model, input_ids, attention_mask, rows):
    """reward_forward on a right-padded batch in chunks of `rows` rows of similar length, each cut to its own longest
    row. Same (B, K) predictions and gradients as one call on the whole batch (padding after the last real token
    changes nothing), far less padding computed: 1.12x the real tokens instead of 1.48x for random batches of 16 of
    the demo data (bench/README.md). rows <= 0: the whole batch in one call."""
    if rows <= 0 or rows >= len(input_ids):
        return reward_forward(model, input_ids, attention_mask)
    lengths = attention_mask.sum(1)  # (B,)
    order = torch.argsort(lengths, descending=True)  # (B,)
    parts = []
    for c in range(0, len(order), rows):
        idx = order[c:c + rows]
        T = int(lengths[idx].max())
        parts.append(reward_forward(model, input_ids[idx, :T], attention_mask[idx, :T]))  # (rows, K)
    return torch.cat(parts)[torch.argsort(order)]  # (B, K) back in batch order


@torch.no_grad()
def evaluate(model, rows, tok, args, device, autocast):
    model.eval()
    preds, targets, masks = [], [], []
    for enc, t, m in batches(rows, tok, args.batch_size * 2, args.max_len, args.template, False, None):
        with autocast():
            preds.append(reward_forward(model, enc["input_ids"].to(device), enc["attention_mask"].to(device)).cpu())
        targets.append(t), masks.append(m)
    model.train()
    p, t, m = torch.cat(preds).numpy(), torch.cat(targets).numpy() * 100, torch.cat(masks).numpy()  # 0-100 scale
    out = {}
    for k, a in enumerate(args.attributes):
        sel = m[:, k] > 0
        if sel.sum():
            r = pearson(p[sel, k], t[sel, k])
            out[a] = {"mse": float(((p[sel, k] - t[sel, k]) ** 2).mean()), "pearson": None if r != r else r,
                      "n": int(sel.sum())}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    p.add_argument("--data", default="data/rm_train.jsonl", help="JSONL with prompt, response, labels")
    p.add_argument("--val-frac", type=float, default=0.1, help="fraction of prompts held out for evaluation")
    p.add_argument("--template", default="chat", choices=["chat", "dpa"], help="RM input format (see common.rm_text)")
    p.add_argument("--max-len", type=int, default=320)
    # Model
    p.add_argument("--backbone", default=DEFAULT_MODEL, help="embedded default, local folder or hub id")
    p.add_argument("--freeze-layers", type=int, default=0, help="freeze embeddings and the lowest N decoder layers")
    # Optimization
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--chunk-rows", type=int, default=4,
                   help="rows per forward pass: a batch runs in length-sorted chunks (less padding); 0 = all at once")
    p.add_argument("--lr", type=float, default=3e-5, help="backbone learning rate")
    p.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the linear head")
    p.add_argument("--warmup", type=int, default=5, help="warmup steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    # Output
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (0 = run all epochs)")
    args = p.parse_args()
    args.attributes = ATTRIBUTES

    device, dtype, autocast = setup(args.seed, args.device, args.dtype)
    rows = load_rows(args.data, args.attributes)
    rng = random.Random(args.seed)
    groups = sorted({r[4] for r in rows})
    val_groups = set(rng.sample(groups, max(1, int(args.val_frac * len(groups))))) if args.val_frac > 0 else set()
    train = [r for r in rows if r[4] not in val_groups]
    val = [r for r in rows if r[4] in val_groups]
    if not train:
        raise SystemExit(f"error: no training rows left in {args.data} after holding out {len(val)} for evaluation")

    path = resolve_model(args.backbone)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # the RM input ends with the end-of-turn token; a pad id different from it keeps HF's own
        # "last non-pad token" rule pointing at that token too
        tok.pad_token = tok.convert_ids_to_tokens(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(args.attributes), problem_type="regression", dtype=torch.float32,
        id2label=dict(enumerate(args.attributes)), label2id={a: k for k, a in enumerate(args.attributes)})
    model.config.pad_token_id = tok.pad_token_id
    torch.nn.init.zeros_(model.score.weight)  # fp32 master weights; start from r = 0, the head learns fast
    frozen = [model.model.embed_tokens, *model.model.layers[:args.freeze_layers]]
    for m in frozen:
        m.requires_grad_(False)
    model.to(device).train()
    head = list(model.score.parameters())
    body = [q for n, q in model.named_parameters() if q.requires_grad and not n.startswith("score.")]
    opt = torch.optim.AdamW([{"params": body, "lr": args.lr, "base": args.lr},
                             {"params": head, "lr": args.head_lr, "base": args.head_lr}],
                            betas=(0.9, 0.95), weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train) / (args.batch_size * args.grad_accum))
    total = max(1, int(args.epochs * steps_per_epoch))
    total = min(total, args.max_steps) if args.max_steps else total
    print(f"train_rm: {len(train)} train / {len(val)} val rows | {total} steps | {sum(q.numel() for q in body) / 1e6:.1f}M "
          f"trainable | {device} {dtype}")

    step, t0 = 0, time.time()
    stream = (b for _ in itertools.count()  # epochs end where `total` says; the stream never runs dry
              for b in batches(train, tok, args.batch_size, args.max_len, args.template, True, rng))
    while step < total:
        t1 = time.time()
        for g in opt.param_groups:
            g["lr"] = get_lr(step, total, args.warmup, g["base"])
        # ---------------- TRAINING STEP BEGIN
        for _ in range(args.grad_accum):
            enc, target, mask = next(stream)
            with autocast():
                pred = sorted_forward(model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                      args.chunk_rows)
            loss = masked_mse(pred, target.to(device), mask.to(device)) / args.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # ---------------- TRAINING STEP END
        step += 1
        print(f"step {step}/{total} | mse {loss.item() * args.grad_accum * 1e4:.1f} (0-100 scale) | "
              f"lr {opt.param_groups[0]['lr']:.1e} | {time.time() - t1:.1f}s", flush=True)

    with torch.no_grad():
        model.score.weight.mul_(100.0)  # predictions on the 0-100 scale
    metrics = evaluate(model, val, tok, args, device, autocast) if val else {}
    for a, m in metrics.items():
        print(f"  {a:38s} mse {m['mse']:7.1f}  pearson {m['pearson'] if m['pearson'] is not None else float('nan'):.3f}"
              f"  (n={m['n']})")
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    meta = {"attributes": args.attributes, "scale": [0, 100], "template": args.template, "helpfulness": HELPFULNESS,
            "verbosity": VERBOSITY, "backbone": args.backbone, "steps": total, "seconds": round(time.time() - t0, 1),
            "args": {k: v for k, v in vars(args).items() if k != "attributes"}, "eval": metrics}
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    hv = [metrics.get(a, {}).get("pearson") for a in (HELPFULNESS, VERBOSITY)]
    hv = [float("nan") if x is None else x for x in hv]
    print(f"train_rm: {total} steps in {time.time() - t0:.0f}s → {args.out} | held-out pearson helpfulness {hv[0]:.3f} "
          f"verbosity {hv[1]:.3f}")


if __name__ == "__main__":
    main()
