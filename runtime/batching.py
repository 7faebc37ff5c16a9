"""Micro-batches for the training stages: finetune.py's plan of row indices per optimizer step (groups kept together,
unpaired RPO's rejected halves, the ranks' shares) and its padded tensors."""
import math
import random
from collections import defaultdict

import torch


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

