"""Stage 4 of DPA: fine-tune the policy on its own best responses (rejection-sampling fine-tuning), or on
directional preference pairs with DPO.

RSF (--loss sft, DPA §3): for each prompt x and direction v keep y* = argmax_y vᵀr(x, y) among the scored samples
(best-of-n) and minimise −log π(y* | system(v), x) on the assistant tokens only.
  --select sampled    v is the direction each response was sampled under (the paper's loop)
  --select hindsight  every sample of x competes for every v in --target-degrees: one set of samples scored once gives
                      a best response per direction at no extra sampling cost (hindsight relabelling)
DPO (--loss dpo, Rafailov et al. 2023, Eq. 7): −log σ(β[(log π(y⁺) − log π_ref(y⁺)) − (log π(y⁻) − log π_ref(y⁻))])
with summed response log-probs; reference log-probs are computed once before training (the reference is the
starting policy). Pairs come from the scores:
  --pairs mirrored    y⁺ = argmax R_{+a}, y⁻ = argmax R_{−a}; two pairs with the preference flipped by the
                      direction: system(+a): y⁺ ≻ y⁻ and system(−a): y⁻ ≻ y⁺ (the contrast teaches v, not a mean)
  --pairs best-worst  per (prompt, sampled θ): best vs worst by R_θ under system(θ)
--nll-coef adds the SFT loss on the chosen responses, which keeps them fluent.

reads  scored JSONL (score.py)      writes a save_pretrained folder + meta.json (+ the training rows as JSONL)

    python finetune.py --scored runs/demo/scored.jsonl --select hindsight --out runs/demo/policy-1
"""
import argparse
import json
import math
import os
import random
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import (ATTRIBUTES, DEFAULT_MODEL, DataError, best_of_n, chat_messages, degree_to_vector,
                    directional_reward, read_jsonl, resolve_model, setup, write_jsonl)


# ----------------------------------------------------------------------------- selection
def reward_matrix(records, path, lines=None):
    """(N, K) rewards in ATTRIBUTES order; errors name the line and field."""
    out = np.zeros((len(records), len(ATTRIBUTES)))
    lines = lines or range(1, len(records) + 1)
    for i, (line, r) in enumerate(zip(lines, records)):
        rw = r.get("rewards")
        if not isinstance(rw, dict):
            raise DataError(f"{path}:{line}: field 'rewards' missing or not an object: run score.py first")
        for k, a in enumerate(ATTRIBUTES):
            v = rw.get(a, 0.0)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise DataError(f"{path}:{line}: field 'rewards.{a}' must be a finite number, got {v!r}")
            out[i, k] = v
    return out


def select_sft(records, rewards, select, target_degrees):
    """RSF targets: [(prompt, degree, response, truncated)] = best-of-n per (prompt, direction)."""
    groups = defaultdict(list)
    for i, r in enumerate(records):
        groups[r["prompt_id"] if select == "hindsight" else (r["prompt_id"], r["degree"])].append(i)
    rows = []
    for key, idx in groups.items():
        degrees = target_degrees if select == "hindsight" else [records[idx[0]]["degree"]]
        for deg in degrees:
            best = idx[best_of_n(rewards[idx], degree_to_vector(deg))]
            rows.append({"prompt": records[best]["prompt"], "degree": deg, "response": records[best]["response"],
                         "truncated": records[best].get("truncated", False), "source_id": records[best]["id"],
                         "group": str(key)})
    return rows


def select_pairs(records, rewards, pairs, pair_degrees):
    """Preference pairs [(prompt, degree, chosen, rejected, …)] from scored samples (see the module docstring)."""
    groups = defaultdict(list)
    for i, r in enumerate(records):
        groups[r["prompt_id"] if pairs == "mirrored" else (r["prompt_id"], r["degree"])].append(i)
    out = []

    def pair(deg, c, r, group):
        out.append({"prompt": records[c]["prompt"], "degree": deg, "group": group, "chosen": records[c]["response"],
                    "rejected": records[r]["response"], "chosen_truncated": records[c].get("truncated", False),
                    "rejected_truncated": records[r].get("truncated", False)})
    for key, idx in groups.items():
        if pairs == "mirrored":
            for a in pair_degrees:
                up = idx[best_of_n(rewards[idx], degree_to_vector(a))]
                down = idx[best_of_n(rewards[idx], degree_to_vector(-a))]
                if up != down:  # the same answer wins both ways: nothing to contrast
                    pair(a, up, down, f"{key}/{a:g}")
                    pair(-a, down, up, f"{key}/{a:g}")
        else:
            deg = records[idx[0]]["degree"]
            scores = directional_reward(rewards[idx], degree_to_vector(deg))
            if scores.max() > scores.min():
                pair(deg, idx[int(np.argmax(scores))], idx[int(np.argmin(scores))], str(key))
    return out


# ----------------------------------------------------------------------------- tokens and losses
def encode(tok, prompt, degree, response, truncated, max_len):
    """(input ids, number of prompt tokens): system(θ) + user prompt + response [+ end-of-turn if it ended].
    The loss later covers positions ≥ the prompt length only (pad == eos here, so masking by pad id would also hide
    the end-of-turn token and the model would never learn to stop)."""
    text = tok.apply_chat_template(chat_messages(prompt, degree), tokenize=False, add_generation_prompt=True)
    p_ids = tok(text, add_special_tokens=False)["input_ids"]
    r_ids = tok(response, add_special_tokens=False)["input_ids"] + ([] if truncated else [tok.eos_token_id])
    if len(p_ids) >= max_len:
        raise DataError(f"prompt of {len(p_ids)} tokens does not fit --max-len {max_len}: {prompt[:60]!r}")
    return (p_ids + r_ids)[:max_len], len(p_ids)


def collate(seqs, pad_id):
    """[(ids, n_prompt)] → input_ids, attention_mask, loss_mask (B, T): right padding; loss_mask marks response tokens."""
    T = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), T), pad_id)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    lmask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, n) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        lmask[i, n:len(s)] = True
    return ids, attn, lmask


class LabelLogProbs(torch.autograd.Function):
    """log softmax(h Wᵀ)[y] per position, chunk by chunk, for a frozen, bias-free LM head W. → (N,) fp32
    h: (N, H), W: (V, H), y: (N,). The gradient w.r.t. h, ∂ log p_y / ∂h = −(softmax(h Wᵀ) − e_y) W, is formed in the
    forward pass, so neither the (N, V) logits nor their gradient outlive one chunk: at 8 rows x 320 tokens the step's
    peak memory drops by ≈ 2 GB (bench/README.md). Under autocast the matmuls run in the autocast dtype."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk):
        if torch.is_autocast_enabled(h.device.type):
            weight = weight.to(torch.get_autocast_dtype(h.device.type))  # cast the 49k x H head once, not per chunk
        logp = torch.empty(len(h), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None  # (N, H) ∂ log p / ∂h
        for i in range(0, len(h), chunk):
            logits = F.linear(h[i:i + chunk].to(weight.dtype), weight).float()  # (c, V)
            y = labels[i:i + chunk, None]  # (c, 1)
            lse = torch.logsumexp(logits, -1, keepdim=True)  # (c, 1)
            logp[i:i + chunk] = (logits.gather(1, y) - lse)[:, 0]
            if grad is not None:
                p = logits.sub_(lse).exp_()  # softmax, in place of the logits
                p.scatter_add_(1, y, torch.full(y.shape, -1.0, device=p.device))  # softmax − one-hot
                grad[i:i + chunk] = -(p.to(weight.dtype) @ weight)
        ctx.save_for_backward(grad)
        return logp

    @staticmethod
    def backward(ctx, g):  # g: (N,) → (N, H)
        (grad,) = ctx.saved_tensors
        return g[:, None].to(grad.dtype) * grad, None, None, None


def token_logps(model, ids, attn, lmask, chunk=512):
    """log π(y_t | y_<t, x) for every response token, and the row it belongs to. → (N,), (N,)
    The 49k-wide LM head runs only where a label exists: prompt and padding positions never make logits; a frozen,
    bias-free head (tied to the frozen embeddings) runs in chunks of `chunk` positions (LabelLogProbs)."""
    h = model.model(input_ids=ids, attention_mask=attn).last_hidden_state  # (B, T, H)
    tmask = lmask[:, 1:]  # (B, T-1) position t predicts token t+1
    head, labels = model.lm_head, ids[:, 1:][tmask]
    if head.weight.requires_grad or head.bias is not None:  # an untied, trainable head: plain logits
        logp = -F.cross_entropy(head(h[:, :-1][tmask]).float(), labels, reduction="none")  # (N,)
    else:
        logp = LabelLogProbs.apply(h[:, :-1][tmask], head.weight, labels, chunk)  # (N,)
    rows = torch.arange(len(ids), device=ids.device).unsqueeze(1).expand_as(tmask)[tmask]
    return logp, rows


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """DPO (Rafailov et al. 2023, Eq. 7). All inputs (B,) summed response log-probs → losses (B,), margins (B,).
    loss = −log σ(β[(π_c − ref_c) − (π_r − ref_r)]); margin = the term inside, before β."""
    margin = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin), margin


def plan_batches(groups, batch_size, n_batches, rng):
    """Micro-batches of row indices, epoch after epoch. Rows of one group (the angles of one prompt; the two mirrored
    pairs of one prompt) stay next to each other, so they usually share a micro-batch: the part of their gradients that
    does not depend on the direction (e.g. "longer is likelier") cancels inside one step instead of across steps."""
    members = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    keys, order, out = list(members), [], []
    while len(out) < n_batches:
        if len(order) < batch_size:
            order += [i for k in rng.sample(keys, len(keys)) for i in members[k]]  # a fresh permutation per epoch
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def get_lr(step, total, warmup, lr):
    """Linear warmup, then cosine decay to 10% of lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    p.add_argument("--scored", required=True, help="scored samples JSONL (score.py output)")
    p.add_argument("--loss", default="sft", choices=["sft", "dpo"])
    p.add_argument("--select", default="sampled", choices=["sampled", "hindsight"], help="RSF targets (sft)")
    p.add_argument("--target-degrees", default="-45,-15,15,45", help="directions for --select hindsight")
    p.add_argument("--pairs", default="mirrored", choices=["mirrored", "best-worst"], help="DPO pairs")
    p.add_argument("--pair-degrees", default="45", help="angles a for --pairs mirrored (pairs at ±a)")
    p.add_argument("--max-len", type=int, default=320, help="tokens per row (system + prompt + response)")
    # Model
    p.add_argument("--init", default=DEFAULT_MODEL, help="policy to start from (and DPO reference)")
    p.add_argument("--freeze-layers", type=int, default=0,
                   help="freeze the lowest N decoder layers (the embeddings, tied to the LM head, always stay frozen)")
    # Optimization
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8, help="rows (sft) or pairs (dpo) per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--beta", type=float, default=0.1, help="DPO β")
    p.add_argument("--nll-coef", type=float, default=0.0, help="weight of the SFT loss on chosen responses (dpo)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    # Output
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (0 = run all epochs)")
    args = p.parse_args()

    device, dtype, autocast = setup(args.seed, args.device, args.dtype)
    lines, records = read_jsonl(args.scored, required=("id", "prompt_id", "prompt", "degree", "response"),
                                with_lines=True)
    rewards = reward_matrix(records, args.scored, lines)
    if args.loss == "sft":
        rows = select_sft(records, rewards, args.select, [float(d) for d in args.target_degrees.split(",")])
    else:
        rows = select_pairs(records, rewards, args.pairs, [float(d) for d in args.pair_degrees.split(",")])
    if not rows:
        raise SystemExit(f"error: no training rows selected from {args.scored} (every candidate tied?)")

    path = resolve_model(args.init)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)  # fp32 master weights
    for m in [model.model.embed_tokens, *model.model.layers[:args.freeze_layers]]:
        m.requires_grad_(False)
    if args.loss == "sft":
        data = [[encode(tok, r["prompt"], r["degree"], r["response"], r["truncated"], args.max_len)] for r in rows]
    else:
        data = [[encode(tok, r["prompt"], r["degree"], r["chosen"], r["chosen_truncated"], args.max_len),
                 encode(tok, r["prompt"], r["degree"], r["rejected"], r["rejected_truncated"], args.max_len)]
                for r in rows]

    def forward(idx):
        """Summed log-probs of every sequence of rows idx (chosen first, then rejected) and the token-level NLL."""
        seqs = [data[i][0] for i in idx] + ([data[i][1] for i in idx] if args.loss == "dpo" else [])
        ids, attn, lmask = (x.to(device) for x in collate(seqs, tok.pad_token_id))
        with autocast():
            logp, row = token_logps(model, ids, attn, lmask)
        seq = torch.zeros(len(seqs), device=device).index_add_(0, row, logp)  # (S,)
        chosen_tok = row < len(idx)
        return seq, -logp[chosen_tok].mean()

    rng = random.Random(args.seed)
    per_step = args.batch_size * args.grad_accum
    total = max(1, int(args.epochs * math.ceil(len(data) / per_step)))
    total = min(total, args.max_steps) if args.max_steps else total
    plan = plan_batches([r["group"] for r in rows], args.batch_size, total * args.grad_accum, rng)
    ref = []
    if args.loss == "dpo":  # reference log-probs before the policy moves (the reference is the start point), computed
        model.eval()        # on the very micro-batches training will use, so padding and kernels match: margin 0 at step 1
        with torch.no_grad():
            ref = [forward(idx)[0].view(2, -1).float() for idx in plan]  # each (2, B): chosen, rejected
    model.train()

    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    print(f"finetune: {args.loss} on {len(data)} {'rows' if args.loss == 'sft' else 'pairs'} | {total} steps | "
          f"{sum(q.numel() for q in params) / 1e6:.1f}M trainable | {device} {dtype}")
    t0, log = time.time(), []
    for step in range(total):
        t1 = time.time()
        lr = get_lr(step, total, args.warmup, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        stats = defaultdict(float)
        # ---------------- TRAINING STEP BEGIN
        for micro in range(step * args.grad_accum, (step + 1) * args.grad_accum):
            seq, nll = forward(plan[micro])
            if args.loss == "sft":
                loss = nll
            else:
                pc, pr = seq.view(2, -1)
                losses, margin = dpo_loss(pc, pr, ref[micro][0], ref[micro][1], args.beta)
                loss = losses.mean() + args.nll_coef * nll
                stats["margin"] += margin.mean().item() / args.grad_accum
                stats["acc"] += (margin > 0).float().mean().item() / args.grad_accum
            (loss / args.grad_accum).backward()
            stats["loss"] += loss.item() / args.grad_accum
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # ---------------- TRAINING STEP END
        stats = dict(stats, step=step + 1, lr=lr, seconds=round(time.time() - t1, 2))
        log.append(stats)
        extra = f" | margin {stats['margin']:.2f} | acc {stats['acc']:.2f}" if args.loss == "dpo" else ""
        print(f"step {step + 1}/{total} | loss {stats['loss']:.4f}{extra} | lr {lr:.1e} | {stats['seconds']:.1f}s",
              flush=True)

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    write_jsonl(os.path.join(args.out, "train_rows.jsonl"), rows)
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump({"init": args.init, "loss": args.loss, "rows": len(rows), "steps": total,
                   "seconds": round(time.time() - t0, 1), "args": vars(args), "log": log}, f, indent=1)
    print(f"finetune: {args.loss} {total} steps on {len(rows)} {'rows' if args.loss == 'sft' else 'pairs'} in "
          f"{time.time() - t0:.0f}s → {args.out} | final loss {log[-1]['loss']:.4f}")


if __name__ == "__main__":
    main()
