"""Micro-batches for the training stages: finetune.py's plan of row indices per optimizer step (groups kept together,
unpaired RPO's rejected halves, the ranks' shares) and its packed or padded tensors; train_rm.py's shuffled,
tokenised batches, its length-sorted forward and its held-out predictions shared by the ranks."""
import itertools
import math
import random
from collections import defaultdict

import numpy as np
import torch

from common import ATTRIBUTES, reward_forward, rm_encode, rm_text
from runtime.dist import all_gather, all_max, rank_world


def total_steps(args, n_rows, world):
    """Optimizer steps for --epochs over n_rows at the global batch --batch-size × --grad-accum × ranks, at most
    --max-steps (when set)."""
    total = max(1, int(args.epochs * math.ceil(n_rows / (args.batch_size * args.grad_accum * world))))
    return min(total, args.max_steps) if args.max_steps else total


# ----------------------------------------------------------------------------- finetune.py
def plan_steps(args, rows, paired, rank, world, rng):
    """→ (optimizer steps, this rank's micro-batches of chosen rows, of rejected rows). Every rank takes its own
    micro-batches of one planned stream: micro-batch k of a step on rank r is the one a single process would run as
    micro-batch k·world + r (so 1 process × --grad-accum 2·A = 2 ranks × A)."""
    total = total_steps(args, len(rows), world)
    groups = [r["group"] for r in rows]
    plan = plan_batches(groups, args.batch_size, total * args.grad_accum * world, rng)
    # the rejected answers of each micro-batch: the same pairs' (dpo, rpo_paired), other prompts' (rpo_unpaired)
    rplan = [] if args.loss == "sft" else plan if paired else plan_rejected(groups, plan, random.Random(args.seed + 1))
    return total, plan[rank::world], rplan[rank::world]


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


def plan_rejected(groups, plan, rng):
    """Unpaired RPO: the rejected half of each micro-batch of `plan`, drawn from its own shuffled stream of rows and
    never from a group (prompt) whose chosen answer is in that micro-batch, so the chosen and the rejected answers of
    a step have different prompts. Every row's rejected answer is used once per pass of the stream."""
    pool, out = [], []
    for batch in plan:
        taken = {groups[i] for i in batch}
        if all(g in taken for g in groups):
            raise SystemExit(f"error: rpo_unpaired needs prompts outside each micro-batch, but one batch holds all "
                             f"{len(taken)}: lower --batch-size")
        pick = []
        while len(pick) < len(batch):
            free = [k for k, i in enumerate(pool) if groups[i] not in taken]
            if not free:
                pool += rng.sample(range(len(groups)), len(groups))
                continue
            pick.append(pool.pop(free[0]))
        out.append(pick)
    return out


def pack(seqs, pad_id, packed=True):
    """[(ids, n_prompt)] → input_ids, position_ids, loss_mask (R, T) and where each sequence went [(row, start)]:
    the sequences laid end to end in R ≤ len(seqs) rows no longer than the longest one (first-fit decreasing; with
    packed=False one sequence per row, right-padded). position_ids restart at 0 at every sequence and at the padding
    after the last one, so with no attention mask a causal model's attention stays within each sequence
    (transformers builds that block-causal mask from the position ids): the same log-probs as one padded row each,
    computed on fewer positions (the default run's hindsight RSF micro-batches: 1.57 → 1.23 positions per token)."""
    T = max(len(s) for s, _ in seqs)
    free, where = [], [None] * len(seqs)  # free positions left in each row
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0])):
        n = len(seqs[i][0])
        r = next((k for k, f in enumerate(free) if f >= n), None) if packed else None
        if r is None:
            free.append(T)
            r = len(free) - 1
        where[i] = (r, T - free[r])
        free[r] -= n
    ids = torch.full((len(free), T), pad_id)
    pos = torch.zeros((len(free), T), dtype=torch.long)
    lmask = torch.zeros((len(free), T), dtype=torch.bool)
    for i, (s, n) in enumerate(seqs):
        r, t = where[i]
        ids[r, t:t + len(s)] = torch.tensor(s)
        pos[r, t:t + len(s)] = torch.arange(len(s))
        lmask[r, t + n:t + len(s)] = True
    for r, f in enumerate(free):
        pos[r, T - f:] = torch.arange(f)  # the padding: a sequence of its own
    return ids, pos, lmask, where


def packing_is_exact(logps_of, data, plan, pad_id, tol, tries=16):
    """Whether packed rows give this model the log-probs of padded ones: logps_of(idx, packed) → summed log-probs of
    the chosen sequences of rows idx (S,), run without gradients on the first of the planned micro-batches (up to
    `tries`) whose packing puts two or more sequences in one row. A model whose code does not build the block-causal
    mask from the position ids (a --trust-remote-code architecture, an attention kernel) lets packed sequences attend
    to each other: → False, and finetune.py trains on padded rows. tol, the largest |Δ| allowed per response token:
    with the mask < 1e-5 in fp32 and ≤ 0.05 in bf16 (SmolLM2-135M); without it 0.59 on SmolLM2-135M (the sequence
    placed second in a row) and 0.001 on the tests' random tiny Llama. Every rank runs the same two forwards (FSDP2
    needs the same collectives everywhere) and all must pass. → (ok, the largest |Δ| per response token)"""
    idx = next((c for c in plan[:tries] if len(pack([data[i][0] for i in c], pad_id)[0]) < len(c)), plan[0])
    with torch.no_grad():
        delta = (logps_of(idx, True) - logps_of(idx, False)).abs().cpu()  # (S,) nats
    diff = (delta / torch.tensor([max(1, len(data[i][0][0]) - data[i][0][1]) for i in idx])).max().item()
    worst = all_max(diff)
    return worst <= tol, worst


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


# ----------------------------------------------------------------------------- train_rm.py
def batches(rows, tok, batch_size, max_len, template, shuffle, rng):
    idx = list(range(len(rows)))
    if shuffle:
        rng.shuffle(idx)
    for i in range(0, len(idx), batch_size):
        b = [rows[j] for j in idx[i:i + batch_size]]
        enc = rm_encode(tok, [rm_text(tok, r["prompt"], r["response"], template) for r in b], template,
                        return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        yield enc, torch.tensor(np.stack([r["target"] for r in b])), torch.tensor(np.stack([r["mask"] for r in b]))


def batch_stream(rows, tok, args, rng, rank, world):
    """train_rm.py's micro-batches (batches, shuffled by rng), epoch after epoch: the stream never runs dry, training
    ends where its step count says. Rank r takes micro-batches r, r + world, ...: 1 process × --grad-accum 2·A runs
    what 2 ranks × A run."""
    stream = (b for _ in itertools.count() for b in batches(rows, tok, args.batch_size, args.max_len, args.template,
                                                            True, rng))
    return itertools.islice(stream, rank, None, world)


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


@torch.no_grad()
def predict_rows(fwd, rows, tok, args, device, autocast):
    """(N, K) rewards on 0-100 for rating rows (only prompt and response are read). fwd: reward_forward as
    runtime.dist.parallelize wraps it. Under torchrun rank r predicts rows r, r + world, ... (padded with copies of
    row 0, so every rank runs as many batches: FSDP2 gathers layers collectively) and the ranks share their
    predictions."""
    rank, world = rank_world()
    mine = rows[rank::world]
    mine += rows[:1] * (-(-len(rows) // world) - len(mine))  # pad: every rank holds ceil(N / world) rows
    fwd.eval()
    preds = []
    for enc, _, _ in batches(mine, tok, args.batch_size * 2, args.max_len, args.template, False, None):
        with autocast():
            preds.append(fwd(enc["input_ids"].to(device), enc["attention_mask"].to(device)).cpu())
    fwd.train()
    preds = torch.cat(preds).numpy() if preds else np.zeros((0, len(ATTRIBUTES)), np.float32)  # (N / world, K)
    return np.stack(all_gather(preds), axis=1).reshape(-1, len(ATTRIBUTES))[:len(rows)]  # row k·world + r


def predict_heldout(fwd, val, val_pairs, tok, args, device, autocast):
    """predict_rows on every held-out text, the rating rows' and both answers of each held-out pair, each run once →
    (the (N, K) predictions for the rows of val, predict(items) → (rewards (n, K), None) for pairwise_metrics)."""
    z = np.zeros(len(ATTRIBUTES), np.float32)  # every held-out text (rows and pairs) is run once
    held = list(dict.fromkeys([(r["prompt"], r["response"]) for r in val] + [(q["prompt"], x) for q in val_pairs
                                                              for x in (q["chosen"], q["rejected"])]))
    memo = dict(zip(held, predict_rows(fwd, [{"prompt": a, "response": b, "target": z, "mask": z} for a, b in held], tok,
                                              args, device, autocast)))
    pred = np.stack([memo[(r["prompt"], r["response"])] for r in val]) if val else np.zeros((0, len(ATTRIBUTES)))

    def predict(its):
        return np.stack([memo[it] for it in its]), None
    return pred, predict
