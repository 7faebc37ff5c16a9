"""Stage 1 of DPA: train the multi-objective reward model r(x, y) ∈ R^K on a 0-100 scale.

Three methods, one data path (rm_data.py: the demo schema, HelpSteer, UltraFeedback, binarized preferences):

--method regression (default)  the DPA reward model (arXiv 2402.18571 §3; RLHFlow/RewardModel-Mistral-7B-for-DPA-v1):
    a fine-tuned LM backbone with a bias-free linear head on the last token's final hidden state, trained by
        min  Σ_k mask_k (w_kᵀ f(x, y) − r_k)²  / Σ_k mask_k          (missing ratings are masked, not imputed)
    Targets are divided by 100 while training and the head is scaled back, so the saved model predicts 0-100.
    Writes an AutoModelForSequenceClassification folder (no remote code) + meta.json + eval.json.
--method probe   ArmoRM stage 1 (arXiv 2406.12845): the backbone stays frozen; its last-token features are computed
    once (cached on disk, keyed by data + backbone) and each objective gets its own ridge regression w_k (no bias),
    with α picked on a validation split. Rows missing objective k are left out of w_k's fit.
--method gate    ArmoRM stage 2, on top of the probe: a gating MLP on the prompt feature f(x) (hidden state at the end
    of the user turn) weights the de-biased rewards, R(x, y) = Σ_k g_k(f(x)) · (r T)_k, trained with a Bradley-Terry
    loss on preference pairs. T removes verbosity: r'_i = r_i − λ_i r_verbosity.
    probe/gate write a folder: meta.json (backbone reference, attributes, scale, template, α, λ) + armo.safetensors
    (regression_weight (K, H), reward_transform_matrix (K, K), gate.* and logit_scale) + eval.json; score.py loads it.

Rows with an empty response are skipped and counted; inputs longer than --max-len are cut and counted.
--save-every N writes OUT/checkpoint.pt (model, optimizer, step, RNG states; atomically); --resume continues from it
(regression only: probe and gate fit in seconds on the cached features, so they start over).

Every method prints and saves held-out per-attribute MSE and Pearson, and with preference pairs (--pairs, or pairs in
--data) the held-out pairwise accuracy: chosen vs rejected by --prefer's reward, and by the gate's score.

    python train_rm.py --data data/rm_train.jsonl --out runs/demo/rm
    python train_rm.py --method gate --data data/rm_train.jsonl --pairs data/rm_train.jsonl --out runs/demo/rm-gate
    torchrun --nproc_per_node=8 train_rm.py ... [--fsdp]   # regression on 8 devices: DDP, or FSDP2 with --fsdp

Under torchrun (regression only) every rank takes its own micro-batches of each optimizer step (the global batch is
--batch-size × --grad-accum × ranks), the gradients are averaged once per step, the ranks share the held-out
predictions, and rank 0 logs and writes OUT. probe and gate run in one process.
"""
import argparse
import functools
import hashlib
import itertools
import json
import math
import os
import random
import time

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

import rm_data
from common import (ATTRIBUTES, CACHE_DIR, DEFAULT_MODEL, HELPFULNESS, VERBOSITY, DataError, all_gather, all_mean,
                    check_output_dir, cli, dist_setup, file_digest, grad_sync, is_main, load_checkpoint, parallelize,
                    rank_world, resolve_model, reward_forward, rm_prompt_text, rm_text, rng_state, save_checkpoint,
                    save_model, set_rng_state, setup)


# ============================================================================= shared math
def masked_mse(pred, target, mask):
    """Mean squared error over the labelled cells only. pred, target, mask: (B, K) → scalar.
    Cells with mask 0 (missing ratings; their target may hold any finite placeholder) add nothing."""
    return ((pred - target) ** 2 * mask).sum() / mask.sum().clamp(min=1)


def pearson(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def average_ranks(x):
    """Ranks 0..N-1 of x (N,), ties sharing their mean rank. → (N,) float64."""
    xs, order = torch.sort(x.double(), stable=True)
    _, inverse, counts = torch.unique_consecutive(xs, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = torch.empty_like(xs)
    ranks[order] = ((ends - counts - 1 + ends) / 2)[inverse]  # mean of positions end-count .. end-1
    return ranks


def spearman(x, y):
    """Spearman rank correlation of two (N,) tensors; NaN when either side is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = (rx.norm() * ry.norm()).item()
    return float("nan") if den == 0 else (rx @ ry).item() / den


def pair_accuracy(s_chosen, s_rejected):
    """Fraction of pairs ranked right, s_chosen > s_rejected (ties count half). (P,), (P,) → float."""
    s_chosen, s_rejected = np.asarray(s_chosen, float), np.asarray(s_rejected, float)
    return float(((s_chosen > s_rejected) + 0.5 * (s_chosen == s_rejected)).mean()) if len(s_chosen) else float("nan")


def get_lr(step, total, warmup, lr):
    """Linear warmup, then cosine decay to 10% of lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ============================================================================= data
def to_tuple(row, attributes):
    """rm_data row → (prompt, response, target (K,) on 0-1, mask (K,), prompt group, where: 'file:line')."""
    target, mask = np.zeros(len(attributes), np.float32), np.zeros(len(attributes), np.float32)
    for k, a in enumerate(attributes):
        v = row["labels"].get(a)
        if v is not None:
            target[k], mask[k] = v / 100.0, 1.0
    return row["prompt"], row["response"], target, mask, row["prompt_id"], row.get("where", "")


def drop_empty(src, rows):
    """A rated row whose response is empty is skipped and counted: its labels rate a text that is not there."""
    empty = [r["where"] for r in rows if not r["response"].strip()]
    if empty:
        at = [w[len(src) + 1:] if w.startswith(f"{src}:") else w for w in empty]
        print(f"train_rm: skipped {len(empty)} rows of {src} with an empty response (lines "
              f"{', '.join(at[:10])}{', …' if len(at) > 10 else ''})")
    kept = [r for r in rows if r["response"].strip()]
    if not kept:
        raise DataError(f"{src}: no usable rows")
    return kept


def load_data(args):
    """--data sources (one table, each row labelled where its source rates) + --pairs → rating rows as tuples,
    preference pairs, and a summary of what was read."""
    args.data = [os.path.abspath(s) if os.path.exists(s) else s for s in args.data]  # one spelling per file
    args.pairs = os.path.abspath(args.pairs) if args.pairs and os.path.exists(args.pairs) else args.pairs
    loaded = {src: rm_data.load(src, args.schema, args.split, args.limit) for src in args.data}
    loaded = {src: (drop_empty(src, v[0]), *v[1:]) for src, v in loaded.items()}
    rows = [r for src in args.data for r in loaded[src][0]]
    pairs = [q for src in args.data for q in loaded[src][1]]
    info = {"sources": [loaded[src][2] for src in args.data]}
    groups = [sorted({r["prompt_id"] for r in loaded[src][0]} | {q["prompt_id"] for q in loaded[src][1]})
              for src in args.data]  # prompt groups per source
    if args.prefer is None:
        binarized = any(i["schema"] == "binarized" for i in info["sources"])
        args.prefer = rm_data.UF_OVERALL if binarized and not args.pairs else HELPFULNESS
    if args.prefer not in args.attributes:
        raise SystemExit(f"error: --prefer {args.prefer!r} is not one of {args.attributes}")
    if args.pairs:
        p_rows, p_pairs, _ = loaded.get(args.pairs) or rm_data.load(args.pairs, "auto", args.split, args.limit)
        pairs = p_pairs or rm_data.pairs_from_ratings(p_rows, args.prefer, args.min_gap)
        if args.pairs not in loaded:
            groups.append(sorted({q["prompt_id"] for q in pairs}))
        info["pairs_source"] = args.pairs if p_pairs else f"{args.pairs} ({args.prefer} gap ≥ {args.min_gap})"
    info.update(rows=len(rows), pairs=len(pairs))
    return [to_tuple(r, args.attributes) for r in rows], pairs, groups, info


def check_lengths(rows, tok, args):
    """Inputs longer than --max-len are cut (→ their count); a prompt that fills --max-len on its own is an error."""
    n_ids = [len(x) for x in tok([rm_text(tok, r[0], r[1], args.template) for r in rows],
                                 add_special_tokens=False)["input_ids"]]
    for r in (r for r, n in zip(rows, n_ids) if n > args.max_len):
        n_prompt = len(tok(rm_text(tok, r[0], "", args.template), add_special_tokens=False)["input_ids"])
        if n_prompt >= args.max_len:
            raise DataError(f"{r[5]}: field 'prompt' takes {n_prompt} tokens of the RM input; --max-len "
                            f"{args.max_len} leaves no room for the response")
    return sum(n > args.max_len for n in n_ids)


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
    row. Same (B, K) predictions and gradients as one call on the whole batch (a causal model: padding after the last
    real token changes nothing before it) and less padding computed (1.08x the real tokens instead of 1.33x for
    batches of 16 demo answers), but on 2 CPU cores the smaller matmuls cost as much as the padding saved, so it is
    opt-in (README, Performance). rows <= 0: the whole batch in one call."""
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


def attribute_metrics(pred, rows, attributes):
    """Held-out MSE and Pearson per labelled attribute. pred: (N, K) on 0-100; rows: the N tuples."""
    t, m = np.stack([r[2] for r in rows]) * 100, np.stack([r[3] for r in rows])
    out = {}
    for k, a in enumerate(attributes):
        sel = m[:, k] > 0
        if sel.sum():
            r = pearson(pred[sel, k], t[sel, k])
            out[a] = {"mse": float(((pred[sel, k] - t[sel, k]) ** 2).mean()), "pearson": None if r != r else r,
                      "n": int(sel.sum())}
    return out


# ============================================================================= method 1: regression (DPA RM)
@torch.no_grad()
def predict_rows(fwd, rows, tok, args, device, autocast):
    """(N, K) rewards on 0-100 for rating-row tuples (only prompt and response are read). fwd: reward_forward as
    common.parallelize wraps it. Under torchrun rank r predicts rows r, r + world, ... (padded with copies of row 0,
    so every rank runs as many batches: FSDP2 gathers layers collectively) and the ranks share their predictions."""
    rank, world = rank_world()
    mine = rows[rank::world]
    mine += rows[:1] * (-(-len(rows) // world) - len(mine))  # pad: every rank holds ceil(N / world) rows
    fwd.eval()
    preds = []
    for enc, _, _ in batches(mine, tok, args.batch_size * 2, args.max_len, args.template, False, None):
        with autocast():
            preds.append(fwd(enc["input_ids"].to(device), enc["attention_mask"].to(device)).cpu())
    fwd.train()
    preds = torch.cat(preds).numpy() if preds else np.zeros((0, len(args.attributes)), np.float32)  # (N / world, K)
    return np.stack(all_gather(preds), axis=1).reshape(-1, len(args.attributes))[:len(rows)]  # row k·world + r


def train_regression(args, train, tok, path, device, dtype, autocast, rng, ckpt=None, n_cut=0):
    """Fine-tune backbone + bias-free head with masked MSE; → the model, predicting on 0-100, and its forward
    (reward_forward as common.parallelize wraps it: DDP/FSDP2 under torchrun). ckpt: OUT/checkpoint.pt to resume
    from; --save-every writes it."""
    rank, world = rank_world()
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(args.attributes), problem_type="regression", dtype=torch.float32,
        id2label=dict(enumerate(args.attributes)), label2id={a: k for k, a in enumerate(args.attributes)},
        trust_remote_code=args.trust_remote_code)
    model.config.pad_token_id = tok.pad_token_id
    torch.nn.init.zeros_(model.score.weight)  # fp32 master weights; start from r = 0, the head learns fast
    frozen = [model.model.embed_tokens, *model.model.layers[:args.freeze_layers]]
    for m in frozen:
        m.requires_grad_(False)
    model.to(device).train()
    fwd = parallelize(model, functools.partial(sorted_forward, rows=args.chunk_rows), args.fsdp, args.compile,
                      dtype)  # DDP/FSDP2 under torchrun, else plain
    head = list(model.score.parameters())
    body = [q for n, q in model.named_parameters() if q.requires_grad and not n.startswith("score.")]
    opt = torch.optim.AdamW([{"params": body, "lr": args.lr, "base": args.lr},
                             {"params": head, "lr": args.head_lr, "base": args.head_lr}],
                            betas=(0.9, 0.95), weight_decay=0.0, fused=device.startswith("cuda") or None)
    steps_per_epoch = math.ceil(len(train) / (args.batch_size * args.grad_accum * world))  # global batch
    total = max(1, int(args.epochs * steps_per_epoch))
    total = min(total, args.max_steps) if args.max_steps else total
    print(f"train_rm: {len(train)} train / {len(args.val_rows)} val rows | {total} steps | "
          f"{sum(q.numel() for q in body) / 1e6:.1f}M trainable | {device} {dtype}"
          + (f" | {n_cut} rows cut at --max-len {args.max_len}" if n_cut else ""))

    step, log = 0, []
    stream = (b for _ in itertools.count()  # epochs end where `total` says; the stream never runs dry
              for b in batches(train, tok, args.batch_size, args.max_len, args.template, True, rng))
    # rank r takes micro-batches r, r + world, ...: 1 process × --grad-accum 2·A runs what 2 ranks × A run
    stream = itertools.islice(stream, rank, None, world)
    job = {k: v for k, v in vars(args).items()
           if k not in ("attributes", "out", "save_every", "resume", "overwrite", "val_groups", "val_rows")}
    job["data"] = [file_digest(s) if os.path.isfile(s) else s for s in args.data]
    if args.pairs:
        job["pairs"] = file_digest(args.pairs) if os.path.isfile(args.pairs) else args.pairs
    job["world"] = world
    job = json.loads(json.dumps(job, default=str))
    if ckpt:
        state = load_checkpoint(ckpt, job)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
        for _ in range(step * args.grad_accum):  # replay the shuffled batch stream up to where the run stopped
            next(stream)
        set_rng_state(state["rng"])
        print(f"train_rm: resumed from {ckpt} at step {step}")
    while step < total:
        t1 = time.time()
        for g in opt.param_groups:
            g["lr"] = get_lr(step, total, args.warmup, g["base"])
        # ---------------- TRAINING STEP BEGIN
        mse = 0.0
        for k in range(args.grad_accum):
            grad_sync(fwd, k == args.grad_accum - 1)  # ranks average gradients once per step
            enc, target, mask = next(stream)
            with autocast():
                pred = fwd(enc["input_ids"].to(device), enc["attention_mask"].to(device))
            loss = masked_mse(pred, target.to(device), mask.to(device)) / args.grad_accum
            loss.backward()
            mse += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # ---------------- TRAINING STEP END
        step += 1
        log.append({"step": step, "mse": all_mean(mse) * 1e4})  # the mean over the global batch's micro-batches
        print(f"step {step}/{total} | mse {log[-1]['mse']:.1f} (0-100 scale) | "
              f"lr {opt.param_groups[0]['lr']:.1e} | {time.time() - t1:.1f}s", flush=True)
        if args.save_every and step % args.save_every == 0 and step < total and is_main():  # DDP: ranks agree
            save_checkpoint(os.path.join(args.out, "checkpoint.pt"),
                            {"fingerprint": job, "step": step, "log": log, "model": model.state_dict(),
                             "opt": opt.state_dict(), "rng": rng_state()})
    with torch.no_grad():
        model.score.weight.mul_(100.0)  # predictions on the 0-100 scale
    args.steps, args.log = total, log
    return model, fwd


# ============================================================================= frozen features (probe and gate)
def user_turn_end(full_text, prompt_text, offsets):
    """Index of the token that ends the user turn: the token covering the last character of `prompt_text` (the
    conversation rendered without the assistant turn) inside `full_text` (rendered with it). offsets: (start, end)
    character spans of full_text's tokens. Found from the rendered template, so no token id is hard-coded."""
    if not prompt_text or not full_text.startswith(prompt_text):
        raise ValueError("the template renders the conversation without the assistant turn differently from its "
                         "start with it, so the end of the user turn cannot be located for the gating feature: "
                         f"{prompt_text[-60:]!r} is not a prefix of {full_text[:80]!r}…")
    n = len(prompt_text)
    ends = [i for i, (s, e) in enumerate(offsets) if e > s and s < n]
    if not ends:
        raise ValueError(f"no token of {full_text[:80]!r} covers the user turn")
    return ends[-1]


def encode_items(tok, items, template, max_len):
    """(prompt, response) items → [(token ids truncated to max_len, index of the user turn's last token or -1 when
    the truncation cut into the prompt)]. Same text and truncation as the regression method."""
    out = []
    for prompt, response in items:
        full = rm_text(tok, prompt, response, template)
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        try:
            end = user_turn_end(full, rm_prompt_text(tok, prompt, template), enc["offset_mapping"])
        except ValueError as e:
            raise SystemExit(f"error: template {template!r} of {tok.name_or_path}: {e}") from None
        ids = enc["input_ids"][:max_len]
        out.append((ids, end if end < len(ids) else -1))
    return out


@torch.no_grad()
def compute_features(backbone, encoded, batch_size, device, autocast, pad_id=0):
    """Final-layer hidden states (after the final norm) of a frozen backbone, from one forward pass per item: at the
    last real token (response feature, ArmoRM stage 1) and at the end of the user turn (prompt feature, stage 2; causal
    attention makes it see the prompt only). Length-sorted right-padded batches; output in input order.
    encoded: [(ids, prompt_end)] → resp (N, H), prompt (N, H) fp32 (zeros where prompt_end is -1), prompt_ok (N,)."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    H = backbone.config.hidden_size
    resp, prompt = torch.zeros(len(encoded), H), torch.zeros(len(encoded), H)
    ok = torch.tensor([e[1] >= 0 for e in encoded])
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        T = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(encoded[i][0])] = torch.tensor(encoded[i][0])
            mask[r, :len(encoded[i][0])] = 1
        with autocast():
            h = backbone(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state  # (B, T, H)
        rows = torch.arange(len(idx), device=h.device)
        resp[idx] = h[rows, mask.sum(1).to(h.device) - 1].float().cpu()
        pe = torch.tensor([max(encoded[i][1], 0) for i in idx], device=h.device)
        prompt[idx] = h[rows, pe].float().cpu()
    prompt[~ok] = 0
    return resp, prompt, ok


def backbone_fingerprint(path):
    """What identifies a backbone's weights: the hub id, or a local folder's config and weight files (size, mtime)."""
    if not os.path.isdir(path):
        return path
    parts = [os.path.abspath(path)]
    for f in sorted(os.listdir(path)):
        if f == "config.json" or f.endswith((".safetensors", ".bin")):
            st = os.stat(os.path.join(path, f))
            parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def cached_features(args, items, tok, path, device, dtype, autocast):
    """compute_features over `items`, each item computed once: features are stored per item (keyed by a hash of its
    prompt and response) in shards under --feature-cache/<hash of backbone, dtype, template, max_len>/, so a later run
    on the same or overlapping data computes only the items it has not seen. → resp, prompt, prompt_ok, seconds."""
    config = json.dumps([backbone_fingerprint(path), str(dtype), args.template, args.max_len])
    folder = os.path.join(args.feature_cache, hashlib.sha256(config.encode()).hexdigest()[:16])
    keys = [hashlib.sha256(json.dumps(it).encode()).hexdigest()[:32] for it in items]
    have = {}
    for shard in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if shard.endswith(".safetensors"):
            with safe_open(os.path.join(folder, shard), "pt") as f:
                shard_keys = json.loads(f.metadata()["keys"])
                t = {n: f.get_tensor(n) for n in ("response", "prompt", "prompt_ok")}
            have.update({k: (t["response"][i], t["prompt"][i], bool(t["prompt_ok"][i]))
                         for i, k in enumerate(shard_keys)})
    missing = list(dict.fromkeys(k for k in keys if k not in have))
    t0 = time.time()
    if missing:
        todo = [items[keys.index(k)] for k in missing]
        backbone = AutoModel.from_pretrained(path, dtype=torch.float32,
                                             trust_remote_code=getattr(args, "trust_remote_code", False))
        backbone = backbone.to(device).eval()
        resp, prompt, ok = compute_features(backbone, encode_items(tok, todo, args.template, args.max_len),
                                            args.batch_size, device, autocast, tok.pad_token_id or 0)
        del backbone
        os.makedirs(folder, exist_ok=True)
        file = os.path.join(folder, f"shard-{hashlib.sha256(''.join(missing).encode()).hexdigest()[:16]}.safetensors")
        save_file({"response": resp, "prompt": prompt, "prompt_ok": ok.to(torch.uint8)}, f"{file}.tmp.{os.getpid()}",
                  metadata={"keys": json.dumps(missing)})
        os.replace(f"{file}.tmp.{os.getpid()}", file)
        have.update({k: (resp[i], prompt[i], bool(ok[i])) for i, k in enumerate(missing)})
    dt = time.time() - t0
    print(f"features: {len(items)} items, {len(items) - len(missing)} from the cache {folder}, {len(missing)} computed"
          f" in {dt:.1f}s ({len(missing) / max(dt, 1e-9):.1f}/s)")
    rows = [have[k] for k in keys]
    return (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
            torch.tensor([r[2] for r in rows]), dt)


# ============================================================================= method 2: probe (ArmoRM stage 1)
RIDGE_ALPHAS = [10.0 ** e for e in range(-4, 5)]  # the decades 1e-4 … 1e4 ArmoRM sweeps


def ridge_path(X, y, alphas):
    """Ridge regression without intercept for every α: w_α = argmin ‖Xw − y‖² + α‖w‖² = (XᵀX + αI)⁻¹ Xᵀy, from one
    eigendecomposition XᵀX = Q diag(s) Qᵀ: w_α = Q diag(1 / (s + α)) Qᵀ Xᵀy.  X (N, H), y (N,) → (A, H) float64."""
    X, y = X.double(), y.double()
    s, Q = torch.linalg.eigh(X.T @ X)
    b = Q.T @ (X.T @ y)                                                     # (H,)
    a = torch.tensor(alphas, dtype=torch.float64)[:, None]                  # (A, 1)
    return (b / (s.clamp(min=0) + a)) @ Q.T                                 # (A, H)


def fit_probe(F, Y, fit_idx, val_idx, alphas):
    """One ridge per objective on the rows labelled for it (ArmoRM stage 1). F (N, H) features, Y (N, K) targets on
    0-100 with NaN = missing; α with the lowest validation MSE, then refit on fit ∪ val rows with that α.
    → W (K, H) float32, {k: α or None (no label: w_k = 0)}, {k: validation MSE per α}."""
    W, chosen, sweep = torch.zeros(Y.shape[1], F.shape[1]), {}, {}
    for k in range(Y.shape[1]):
        fi = [i for i in fit_idx if not math.isnan(Y[i, k])]
        vi = [i for i in val_idx if not math.isnan(Y[i, k])]
        if not fi + vi:
            chosen[k] = None
            continue
        alpha = 1.0  # when one side has no labels: the middle of the grid
        if fi and vi:
            path = ridge_path(F[fi], Y[fi, k], alphas)                          # (A, H)
            mse = ((F[vi].double() @ path.T - Y[vi, k, None].double()) ** 2).mean(0)  # (A,)
            sweep[k] = mse.tolist()
            alpha = alphas[int(mse.argmin())]
        W[k] = ridge_path(F[fi + vi], Y[fi + vi, k], [alpha])[0].float()
        chosen[k] = alpha
    return W, chosen, sweep


# ============================================================================= method 3: gate (ArmoRM stage 2)
DEBIAS_GRID = [0, .01, .025, .05, .075, .1, .125, .15] + [round(.2 + .05 * i, 3) for i in range(16)]  # … .95


class GatingNetwork(torch.nn.Module):
    """g(f) = β · softmax(MLP(f) / τ), softmax over the K objectives (ArmoRM stage 2). MLP: n_hidden ReLU layers of
    `hidden` units; τ fixed (ArmoRM: 10); β = logit_scale learnable. f (B, H) → (B, K), rows sum to β.
    ArmoRM starts β at 1 on rewards in [0, 1]; on our 0-100 rewards the same starting score is β = 0.01 (with β = 1,
    BT logits of tens of nats made the gate flee to the zeroed verbosity objective: a constant loss of log 2).
    Objectives marked inactive (no training label at all, so their reward is 0) get weight 0."""

    def __init__(self, in_dim, n_objectives, hidden=1024, n_hidden=3, temperature=10.0, dropout=0.0, active=None,
                 scale_init=0.01):
        super().__init__()
        self.register_buffer("active", torch.ones(n_objectives, dtype=torch.bool) if active is None else active)
        layers, d = [], in_dim
        for _ in range(n_hidden):
            layers += [torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
            d = hidden
        self.mlp = torch.nn.Sequential(*layers, torch.nn.Linear(d, n_objectives))
        self.temperature = temperature
        self.logit_scale = torch.nn.Parameter(torch.full((1,), scale_init))

    def forward(self, f):
        logits = self.mlp(f).masked_fill(~self.active, float("-inf")) / self.temperature  # (B, K)
        return torch.softmax(logits, dim=-1) * self.logit_scale  # dim -1: over the objectives of each row


class ArmoHead(torch.nn.Module):
    """The ArmoRM head on frozen features. rewards r = W f(x, y)  (bias-free probe, (B, K));
    with a gate: gating g = g(f(x)) (B, K) and score R = Σ_k g_k (r T)_k = Σ_j r_j (g Tᵀ)_j (B,)."""

    def __init__(self, W, T=None, gate=None):
        super().__init__()
        self.register_buffer("regression_weight", W.float())                                      # (K, H)
        self.register_buffer("reward_transform_matrix", torch.eye(len(W)) if T is None else T.float())  # (K, K)
        self.gate = gate

    def forward(self, f_response, f_prompt=None):
        rewards = f_response @ self.regression_weight.T                                           # (B, K)
        if self.gate is None:
            return rewards, None, None
        gating = self.gate(f_prompt)                                                              # (B, K)
        return rewards, gating, (gating * (rewards @ self.reward_transform_matrix)).sum(-1)       # (B,)


def debias_matrix(R, verb, grid=DEBIAS_GRID, threshold=0.03):
    """Verbosity de-bias transform of ArmoRM stage 2. R (N, K): rewards of a reference set; verb: verbosity's index.
    λ_i = the smallest λ on the grid with Spearman(r_i − λ r_verb, r_verb) ≤ threshold (1 when none passes; a constant
    column counts as uncorrelated); λ_verb = 1. → T (K, K) with r' = r T, i.e. r'_i = r_i − λ_i r_verb:
    T = I − e_verb λᵀ, so T's verbosity column is zero (r'_verb ≡ 0; in the column-vector form r' = Tᵀ r it is
    Tᵀ's verbosity row), and λ (K,)."""
    K = R.shape[1]
    lam = torch.ones(K)
    for i in range(K):
        if i == verb:
            continue
        for g in grid:
            rho = spearman(R[:, i] - g * R[:, verb], R[:, verb])
            if math.isnan(rho) or rho <= threshold:
                lam[i] = g
                break
    T = torch.eye(K)
    T[verb] -= lam
    return T, lam


def bt_loss(score_chosen, score_rejected):
    """Bradley-Terry loss −log σ(R_c − R_r), mean over pairs. (P,), (P,) → scalar."""
    return torch.nn.functional.softplus(score_rejected - score_chosen).mean()


def train_gate(gate, f_prompt, r_chosen, r_rejected, T, args):
    """Fit the gate (and β) on pairs with the BT loss; backbone and W stay frozen, so the rewards are precomputed.
    The transform T is applied to both rewards (the reference script computes it and then leaves it unused), and the
    softmax runs over objectives for each pair (not over the pair axis). f_prompt (P, H), r_* (P, K)."""
    rc, rr = r_chosen @ T, r_rejected @ T                                   # (P, K) de-biased rewards
    opt = torch.optim.AdamW(gate.parameters(), lr=args.gate_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.gate_steps)
    gen = torch.Generator().manual_seed(args.seed)
    gate.train()
    for step in range(args.gate_steps):
        idx = torch.randint(len(f_prompt), (args.gate_batch,), generator=gen)  # ArmoRM: batches drawn with replacement
        g = gate(f_prompt[idx])                                             # (B, K)
        sc, sr = (g * rc[idx]).sum(-1), (g * rr[idx]).sum(-1)               # (B,)
        loss = bt_loss(sc, sr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.gate_steps:
            print(f"gate step {step + 1}/{args.gate_steps} | bt loss {loss.item():.4f} | batch acc "
                  f"{pair_accuracy(sc.detach(), sr.detach()):.3f} | β {gate.logit_scale.item():.4f} | "
                  f"lr {sched.get_last_lr()[0]:.1e}", flush=True)
    return gate.eval()


# ============================================================================= probe/gate folder format
ARMO_FILE = "armo.safetensors"


def save_armo(out, head, meta):
    """meta.json (backbone reference, attributes, scale, template, max_len, gate shape, α, λ) + armo.safetensors."""
    tensors = {"regression_weight": head.regression_weight, "reward_transform_matrix": head.reward_transform_matrix}
    if head.gate is not None:
        tensors.update({f"gate.{k}": v for k, v in head.gate.state_dict().items()})
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, ARMO_FILE))
    write_meta(out, meta)


def write_meta(out, meta):
    """meta.json last, atomically: its presence marks a finished run."""
    with open(os.path.join(out, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))


def load_armo(folder):
    """A probe/gate folder → (ArmoHead, meta)."""
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    t = load_file(os.path.join(folder, ARMO_FILE))
    gate = None
    if meta.get("gate"):
        g = meta["gate"]
        gate = GatingNetwork(g["in_dim"], len(meta["attributes"]), g["hidden"], g["n_hidden"], g["temperature"])
        gate.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("gate.")})
        gate.eval()
    return ArmoHead(t["regression_weight"], t["reward_transform_matrix"], gate).eval(), meta


def train_armo(args, rows, pairs, tok, path, device, dtype, autocast):
    """Probe (and gate) on cached frozen features. → (head, predict(items) → (rewards, score or None), meta extras)."""
    items = list(dict.fromkeys([(r[0], r[1]) for r in rows] + [(p["prompt"], x) for p in pairs
                                                                 for x in (p["chosen"], p["rejected"])]))
    index = {it: i for i, it in enumerate(items)}
    F, P, _, feat_s = cached_features(args, items, tok, path, device, dtype, autocast)
    t0 = time.time()
    # stage 1: ridge per objective; α chosen on a split of the training prompts
    train = [r for r in rows if r[4] not in args.val_groups]
    rng = random.Random(args.seed + 1)
    groups = sorted({r[4] for r in train})
    sweep_val = set(rng.sample(groups, max(1, int(args.ridge_val_frac * len(groups))))) if len(groups) > 1 else set()
    Y = torch.full((len(items), len(args.attributes)), float("nan"))
    for r in train:
        i = index[(r[0], r[1])]  # the same text rated by several sources keeps every label
        Y[i] = torch.where(torch.tensor(r[3]) > 0, torch.tensor(r[2]) * 100, Y[i])
    fit_idx = [index[(r[0], r[1])] for r in train if r[4] not in sweep_val]
    val_idx = [index[(r[0], r[1])] for r in train if r[4] in sweep_val]
    W, alphas, sweep = fit_probe(F, Y, fit_idx, val_idx, args.ridge_alphas)
    for k, a in enumerate(args.attributes):
        if alphas[k] is not None:
            print(f"probe {a:38s} α {alphas[k]:g} | sweep val mse {min(sweep[k]) if k in sweep else float('nan'):.1f} "
                  f"| {int((~Y[fit_idx + val_idx, k].isnan()).sum())} labelled rows")
    extra = {"ridge_alpha": {a: alphas[k] for k, a in enumerate(args.attributes)}, "feature_seconds": round(feat_s, 1)}
    head = ArmoHead(W)
    if args.method == "gate":
        verb = args.attributes.index(VERBOSITY)
        tp = [p for p in pairs if p["prompt_id"] not in args.val_groups]
        if not tp:
            raise SystemExit("error: --method gate needs training preference pairs (--pairs, or pairs in --data)")
        ci = torch.tensor([index[(p["prompt"], p["chosen"])] for p in tp])
        ri = torch.tensor([index[(p["prompt"], p["rejected"])] for p in tp])
        ref = torch.cat([F[ci], F[ri]]) @ W.T  # reference set: the training pairs' responses, pooled
        T, lam = debias_matrix(ref, verb, threshold=args.debias_threshold)
        print("debias λ (others 0): " + ", ".join(f"{a} {lam[k]:g}" for k, a in enumerate(args.attributes) if lam[k]))
        torch.manual_seed(args.seed)
        gate = GatingNetwork(F.shape[1], len(args.attributes), args.gate_hidden, args.gate_layers,
                             args.gate_temperature, args.gate_dropout,
                             active=torch.tensor([a is not None for a in alphas.values()]),
                             scale_init=args.gate_scale_init)
        head = ArmoHead(W, T, train_gate(gate, P[ci], F[ci] @ W.T, F[ri] @ W.T, T, args))
        extra.update(gate={"in_dim": F.shape[1], "hidden": args.gate_hidden, "n_hidden": args.gate_layers,
                           "temperature": args.gate_temperature},
                     debias={"lambda": {a: float(lam[k]) for k, a in enumerate(args.attributes)},
                             "threshold": args.debias_threshold, "reference": "training pairs, chosen + rejected"},
                     gate_pairs=len(tp))
    extra["fit_seconds"] = round(time.time() - t0, 1)

    @torch.no_grad()
    def predict(its):
        i = torch.tensor([index[it] for it in its], dtype=torch.long)
        rewards, _, score = head(F[i], P[i])
        return rewards.numpy(), None if score is None else score.numpy()
    return head, predict, extra


# ============================================================================= main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    p.add_argument("--data", nargs="+", default=["data/rm_train.jsonl"],
                   help="ratings: JSONL files or hub datasets (see rm_data.py), merged into one table")
    p.add_argument("--schema", default="auto", choices=["auto", *rm_data.SCHEMAS], help="schema of every --data")
    p.add_argument("--split", default=None, help="hub split (default: the dataset's usual one)")
    p.add_argument("--limit", type=int, default=0, help="read only the first N source records (0 = all)")
    p.add_argument("--pairs", default=None, help="preference pairs: binarized file/hub set, or ratings to pair up by "
                                                  "--prefer (default: the pairs in --data, if any)")
    p.add_argument("--prefer", default=None, help="attribute that ranks chosen vs rejected for pairwise accuracy and "
                                                  "pairs rated rows (default: overall score for binarized data, "
                                                  "else helpfulness)")
    p.add_argument("--min-gap", type=float, default=10.0, help="rating gap (0-100) for pairs made from ratings")
    p.add_argument("--val-frac", type=float, default=0.1, help="fraction of prompts held out for evaluation")
    p.add_argument("--template", default="chat", choices=["chat", "dpa"], help="RM input format (see common.rm_text)")
    p.add_argument("--max-len", type=int, default=320)
    # Model
    p.add_argument("--method", default="regression", choices=["regression", "probe", "gate"])
    p.add_argument("--backbone", default=DEFAULT_MODEL, help="embedded default, local folder or hub id")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")
    p.add_argument("--freeze-layers", type=int, default=0, help="regression: freeze embeddings and the lowest N layers")
    p.add_argument("--fsdp", action="store_true", help="regression under torchrun: FSDP2 instead of DDP")
    p.add_argument("--compile", action="store_true", help="regression: torch.compile each decoder layer (pays on GPU)")
    p.add_argument("--ridge-alphas", type=float, nargs="+", default=RIDGE_ALPHAS, help="probe: α grid")
    p.add_argument("--ridge-val-frac", type=float, default=0.2, help="probe: training prompts that pick α")
    p.add_argument("--gate-hidden", type=int, default=1024)
    p.add_argument("--gate-layers", type=int, default=3, help="hidden layers of the gating MLP")
    p.add_argument("--gate-temperature", type=float, default=10.0)
    p.add_argument("--gate-dropout", type=float, default=0.2)
    p.add_argument("--gate-scale-init", type=float, default=0.01,
                   help="initial β (0.01 on 0-100 rewards = ArmoRM's 1 on [0, 1])")
    p.add_argument("--debias-threshold", type=float, default=0.03, help="max Spearman(r_i − λ r_verb, r_verb)")
    # Optimization
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16, help="rows per micro-batch (and rank)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--chunk-rows", type=int, default=0, help="regression: run each batch in length-sorted chunks of "
                   "N rows (same math, less padding; no faster on 2 CPU cores); 0 = the whole batch at once")
    p.add_argument("--lr", type=float, default=3e-5, help="backbone learning rate")
    p.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the linear head")
    p.add_argument("--warmup", type=int, default=5, help="warmup steps")
    p.add_argument("--gate-steps", type=int, default=2000)
    p.add_argument("--gate-batch", type=int, default=1024, help="pairs per gate step, drawn with replacement")
    p.add_argument("--gate-lr", type=float, default=1e-3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    # Output
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (0 = run all epochs)")
    p.add_argument("--feature-cache", default=os.path.join(CACHE_DIR, "features"), help="probe/gate feature files")
    p.add_argument("--log-every", type=int, default=100, help="gate: print every N steps")
    p.add_argument("--save-every", type=int, default=0,
                   help="regression: write OUT/checkpoint.pt every N steps (0 = never)")
    p.add_argument("--resume", action="store_true", help="regression: continue from OUT/checkpoint.pt if there is one")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (a finished or other run)")
    args = p.parse_args(argv)
    args.attributes = ATTRIBUTES
    if args.method != "regression" and (args.save_every or args.resume):
        raise SystemExit(f"error: --save-every/--resume apply to --method regression only; --method {args.method} "
                         f"fits in seconds on cached features and starts over (use --overwrite to replace OUT)")
    if args.method != "regression" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(f"error: --method {args.method} runs in one process (it fits a probe on cached features); "
                         f"run it with python, not torchrun")
    if args.fsdp and (args.save_every or args.resume):
        raise SystemExit("error: --save-every/--resume do not work with --fsdp (the optimizer state is sharded over "
                         "the ranks); checkpoint under DDP, or train without checkpoints")

    _, _, device = dist_setup(args.device)  # torchrun: one process per device; else (0, 1, device)
    device, dtype, autocast = setup(args.seed, device, args.dtype)
    inputs = [*args.data, args.pairs, resolve_model(args.backbone, args.trust_remote_code)]
    ckpt = check_output_dir(args.out, args.overwrite, args.resume, inputs)
    t0 = time.time()
    rows, pairs, groups, info = load_data(args)
    rng = random.Random(args.seed)
    args.val_groups = set()
    for i, g in enumerate(groups if args.val_frac > 0 else []):  # per source: its held-out prompts do not depend
        r = rng if i == 0 else random.Random(args.seed + i)       # on what else is loaded
        args.val_groups |= set(r.sample(g, max(1, int(args.val_frac * len(g)))))
    train = [r for r in rows if r[4] not in args.val_groups]
    args.val_rows = val = [r for r in rows if r[4] in args.val_groups]
    if not train:
        raise SystemExit(f"error: no training rows left in {' '.join(args.data)} after holding out {len(val)} for "
                         f"evaluation")

    path = resolve_model(args.backbone, args.trust_remote_code)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    tok.padding_side = "right"
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # the RM input ends with the end-of-turn token; a pad id different from it keeps HF's own
        # "last non-pad token" rule pointing at that token too
        tok.pad_token = tok.convert_ids_to_tokens(0)
    n_cut = check_lengths(rows, tok, args)
    if pairs:  # every method is scored on the same pairs: those whose prompt fits --max-len (the gate needs it)
        fits = [e[1] >= 0 for e in encode_items(tok, [(q["prompt"], q["chosen"]) for q in pairs], args.template,
                                                 args.max_len)]
        if not all(fits):
            print(f"pairs: {fits.count(False)} of {len(pairs)} dropped: prompt longer than --max-len {args.max_len}")
        pairs = [q for q, f in zip(pairs, fits) if f]
    val_pairs = [q for q in pairs if q["prompt_id"] in args.val_groups]
    sources = ", ".join(f"{i['source']} ({i['schema']}, {i['records']} records)" for i in info["sources"])
    print(f"data: {sources} → {len(rows)} rows, {len(pairs)} pairs ({len(val_pairs)} held out) | method {args.method}")

    if args.method == "regression":
        model, fwd = train_regression(args, train, tok, path, device, dtype, autocast, rng, ckpt, n_cut)
        z = np.zeros(len(args.attributes), np.float32)  # every held-out text (rows and pairs) is run once
        held = list(dict.fromkeys([(r[0], r[1]) for r in val] + [(q["prompt"], x) for q in val_pairs
                                                                  for x in (q["chosen"], q["rejected"])]))
        memo = dict(zip(held, predict_rows(fwd, [(a, b, z, z, None) for a, b in held], tok, args, device, autocast)))
        pred = np.stack([memo[(r[0], r[1])] for r in val]) if val else np.zeros((0, len(args.attributes)))

        def predict(its):
            return np.stack([memo[it] for it in its]), None
        extra = {}
    else:
        print(f"train_rm: {len(train)} train / {len(val)} val rows | {args.method} | {device} {dtype}"
              + (f" | {n_cut} rows cut at --max-len {args.max_len}" if n_cut else ""))
        head, predict, extra = train_armo(args, rows, pairs, tok, path, device, dtype, autocast)
        pred = predict([(r[0], r[1]) for r in val])[0] if val else np.zeros((0, len(args.attributes)))
        args.steps, args.log = (args.gate_steps if args.method == "gate" else 0), []

    metrics = attribute_metrics(pred, val, args.attributes) if val else {}
    for a, m in metrics.items():
        print(f"  {a:38s} mse {m['mse']:7.1f}  pearson {m['pearson'] if m['pearson'] is not None else float('nan'):.3f}"
              f"  (n={m['n']})")
    if val_pairs:
        rc, sc = predict([(q["prompt"], q["chosen"]) for q in val_pairs])
        rr, sr = predict([(q["prompt"], q["rejected"]) for q in val_pairs])
        k = args.attributes.index(args.prefer)
        metrics["pairwise"] = {"n": len(val_pairs), "attribute": args.prefer,
                               "accuracy_attribute": pair_accuracy(rc[:, k], rr[:, k]),
                               "accuracy_length": pair_accuracy([len(q["chosen"]) for q in val_pairs],  # baseline:
                                                                [len(q["rejected"]) for q in val_pairs])}  # longer wins
        if sc is not None:
            metrics["pairwise"]["accuracy_score"] = pair_accuracy(sc, sr)
        print("  pairwise accuracy (held out, n={n}): by {attribute} {accuracy_attribute:.3f}".format(
            **metrics["pairwise"]) + (f" | by gated score {metrics['pairwise']['accuracy_score']:.3f}"
                                      if sc is not None else "")
              + f" | longer answer wins {metrics['pairwise']['accuracy_length']:.3f}")

    backbone = args.backbone if args.backbone.startswith("embedded:") or not os.path.exists(args.backbone) \
        else os.path.abspath(args.backbone)
    meta = {"method": args.method, "attributes": args.attributes, "scale": [0, 100], "template": args.template,
            "max_len": args.max_len, "helpfulness": HELPFULNESS, "verbosity": VERBOSITY, "backbone": backbone,
            "steps": args.steps, "seconds": round(time.time() - t0, 1), "data": info, **extra,
            "args": {k: v for k, v in vars(args).items() if k not in ("attributes", "val_groups", "val_rows", "log")},
            "eval": metrics, "log": args.log}
    if args.method == "regression":
        save_model(model, tok, args.out)  # every rank (FSDP2 gathers the shards); rank 0 writes
    if not is_main():
        return
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    if args.method == "regression":
        write_meta(args.out, meta)  # meta.json last: the run is finished
    else:
        save_armo(args.out, head, meta)
    if os.path.exists(os.path.join(args.out, "checkpoint.pt")):
        os.remove(os.path.join(args.out, "checkpoint.pt"))
    hv = [metrics.get(a, {}).get("pearson") for a in (HELPFULNESS, VERBOSITY)]
    hv = [float("nan") if x is None else x for x in hv]
    print(f"train_rm: {args.method} | {args.steps} steps in {time.time() - t0:.0f}s → {args.out} | held-out pearson "
          f"helpfulness {hv[0]:.3f} verbosity {hv[1]:.3f}")


if __name__ == "__main__":
    cli(main)
