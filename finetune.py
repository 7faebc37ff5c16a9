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
Candidates with an empty response are skipped and counted (an empty answer is never a target); rows longer than
--max-len are cut and counted. --save-every N writes OUT/checkpoint.pt (model, optimizer, step, RNG states, DPO
reference log-probs; atomically); --resume continues from it.

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

from common import (ATTRIBUTES, DEFAULT_MODEL, HELPFULNESS, VERBOSITY, DataError, best_of_n, chat_messages,
                    check_fields, check_output_dir, check_unique, cli, degree_to_vector, directional_reward,
                    file_digest, load_checkpoint, parse_degrees, read_jsonl, resolve_model, rng_state,
                    save_checkpoint, set_rng_state, setup, write_jsonl)


# ----------------------------------------------------------------------------- selection
def reward_matrix(records, path, lines=None):
    """(N, K) rewards in ATTRIBUTES order; errors name the line and field. Every record must rate the two DPA axes,
    with the same attribute names as the first record (a file scored by two reward models is an error); attributes
    a record does not rate count 0 (only helpfulness and verbosity enter vᵀr)."""
    out = np.zeros((len(records), len(ATTRIBUTES)))
    lines = lines or range(1, len(records) + 1)
    first = None
    for i, (line, r) in enumerate(zip(lines, records)):
        rw = r.get("rewards")
        if not isinstance(rw, dict):
            raise DataError(f"{path}:{line}: field 'rewards' missing or not an object: run score.py first")
        for a in (HELPFULNESS, VERBOSITY):
            if a not in rw:
                raise DataError(f"{path}:{line}: field 'rewards' has no '{a}' (it has {sorted(rw)[:4]}…): DPA needs "
                                f"a reward model that rates helpfulness and verbosity")
        if first is None:
            first = (line, set(rw))
        elif set(rw) != first[1]:
            raise DataError(f"{path}:{line}: field 'rewards' has {len(rw)} attributes but line {first[0]} has "
                            f"{len(first[1])} (differing: {sorted(set(rw) ^ first[1])[:4]}): scored by different RMs?")
        for a, v in rw.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise DataError(f"{path}:{line}: field 'rewards.{a}' must be a finite number, got {v!r}")
        for k, a in enumerate(ATTRIBUTES):
            out[i, k] = rw.get(a, 0.0)
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


def token_logps(model, ids, attn, lmask):
    """log π(y_t | y_<t, x) for every response token, and the row it belongs to. → (N,), (N,)
    The 49k-wide LM head runs only where a label exists: prompt and padding positions never make logits."""
    h = model.model(input_ids=ids, attention_mask=attn).last_hidden_state  # (B, T, H)
    tmask = lmask[:, 1:]  # (B, T-1) position t predicts token t+1
    logits = model.lm_head(h[:, :-1][tmask]).float()  # (N, V)
    logp = -F.cross_entropy(logits, ids[:, 1:][tmask], reduction="none")  # (N,)
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


def main(argv=None):
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
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")
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
    p.add_argument("--save-every", type=int, default=0, help="write OUT/checkpoint.pt every N steps (0 = never)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if there is one")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (a finished or other run)")
    args = p.parse_args(argv)

    device, dtype, autocast = setup(args.seed, args.device, args.dtype)
    target_degrees = parse_degrees(args.target_degrees, "--target-degrees")
    pair_degrees = parse_degrees(args.pair_degrees, "--pair-degrees")
    ckpt = check_output_dir(args.out, args.overwrite, args.resume,
                            [args.scored, resolve_model(args.init, args.trust_remote_code)])
    lines, records = read_jsonl(args.scored, required=("id", "prompt_id", "prompt", "degree", "response"),
                                with_lines=True)
    for i, r in zip(lines, records):
        check_fields(args.scored, i, r, id="id", prompt_id="id", prompt="text", degree="degree", response="str",
                     truncated="bool?")
    check_unique(args.scored, lines, records)
    rewards = reward_matrix(records, args.scored, lines)
    empty = [k for k, r in enumerate(records) if not r["response"].strip()]
    if empty:  # an empty answer is never a training target (and a reward model may well prefer it at θ < 0)
        print(f"finetune: skipped {len(empty)} candidates of {args.scored} with an empty response (lines "
              f"{', '.join(str(lines[k]) for k in empty[:10])}{', …' if len(empty) > 10 else ''})")
        keep = [k for k in range(len(records)) if records[k]["response"].strip()]
        lines, records, rewards = [lines[k] for k in keep], [records[k] for k in keep], rewards[keep]
    prompt_line = {}
    for i, r in zip(lines, records):
        prompt_line.setdefault(r["prompt"], i)
    if args.loss == "sft":
        rows = select_sft(records, rewards, args.select, target_degrees)
    else:
        rows = select_pairs(records, rewards, args.pairs, pair_degrees)
    if not rows:
        raise SystemExit(f"error: no training rows selected from {args.scored} ({len(records)} usable candidates; "
                         f"every candidate tied?)")

    path = resolve_model(args.init, args.trust_remote_code)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,  # fp32 master weights
                                                 trust_remote_code=args.trust_remote_code).to(device)
    for m in [model.model.embed_tokens, *model.model.layers[:args.freeze_layers]]:
        m.requires_grad_(False)
    n_cut = 0

    def encode_row(r, response, truncated):
        """encode() with errors naming the scored file's line; rows cut at --max-len are counted."""
        nonlocal n_cut
        try:
            ids, n = encode(tok, r["prompt"], r["degree"], response, truncated, args.max_len)
        except DataError as e:
            raise DataError(f"{args.scored}:{prompt_line[r['prompt']]}: field 'prompt': {e}") from None
        n_cut += len(ids) == args.max_len and (
            n + len(tok(response, add_special_tokens=False)["input_ids"]) + (not truncated) > args.max_len)
        return ids, n
    if args.loss == "sft":
        data = [[encode_row(r, r["response"], r["truncated"])] for r in rows]
    else:
        data = [[encode_row(r, r["chosen"], r["chosen_truncated"]),
                 encode_row(r, r["rejected"], r["rejected_truncated"])] for r in rows]

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
    job = {k: v for k, v in vars(args).items() if k not in ("out", "save_every", "resume", "overwrite")}
    job["scored"] = file_digest(args.scored)
    state = load_checkpoint(ckpt, job) if ckpt else None
    ref = [r.to(device) for r in state["ref"]] if state else []  # a resumed run keeps its reference log-probs
    if args.loss == "dpo" and not state:
        # reference log-probs before the policy moves (the reference is the start point), computed on the very
        # micro-batches training will use, so padding and kernels match: margin 0 at step 1
        model.eval()
        with torch.no_grad():
            ref = [forward(idx)[0].view(2, -1).float() for idx in plan]  # each (2, B): chosen, rejected
    model.train()

    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    print(f"finetune: {args.loss} on {len(data)} {'rows' if args.loss == 'sft' else 'pairs'} | {total} steps | "
          f"{sum(q.numel() for q in params) / 1e6:.1f}M trainable | {device} {dtype}"
          + (f" | {n_cut} sequences cut at --max-len {args.max_len}" if n_cut else ""))
    t0, log, start = time.time(), [], 0
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, log = state["step"], state["log"]
        set_rng_state(state["rng"])
        print(f"finetune: resumed from {ckpt} at step {start}")
    for step in range(start, total):
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
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            save_checkpoint(os.path.join(args.out, "checkpoint.pt"),
                            {"fingerprint": job, "step": step + 1, "log": log, "model": model.state_dict(),
                             "opt": opt.state_dict(), "ref": ref, "rng": rng_state()})

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    write_jsonl(os.path.join(args.out, "train_rows.jsonl"), rows)
    with open(os.path.join(args.out, "meta.json.tmp"), "w") as f:  # meta.json last, atomically: the run is finished
        json.dump({"init": args.init, "loss": args.loss, "rows": len(rows), "steps": total,
                   "seconds": round(time.time() - t0, 1), "args": vars(args), "log": log}, f, indent=1)
    os.replace(os.path.join(args.out, "meta.json.tmp"), os.path.join(args.out, "meta.json"))
    if os.path.exists(os.path.join(args.out, "checkpoint.pt")):
        os.remove(os.path.join(args.out, "checkpoint.pt"))
    print(f"finetune: {args.loss} {total} steps on {len(rows)} {'rows' if args.loss == 'sft' else 'pairs'} in "
          f"{time.time() - t0:.0f}s → {args.out} | final loss {log[-1]['loss']:.4f}")


if __name__ == "__main__":
    cli(main)
