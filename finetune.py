"""Stage 4 of DPA: fine-tune the policy on its own best responses (rejection-sampling fine-tuning), or on
directional preference pairs with DPO or RPO.

RSF (--loss sft, DPA §3): for each prompt x and direction v keep y* = argmax_y vᵀr(x, y) among the scored samples
(best-of-n) and minimise −log π(y* | system(v), x) on the assistant tokens only.
  --select sampled    v is the direction each response was sampled under (the paper's loop)
  --select hindsight  every sample of x competes for every v in --target-degrees: one set of samples scored once gives
                      a best response per direction at no extra sampling cost (hindsight relabelling)
  --decision-coef λ   hindsight: + λ × the mean NLL of the decision tokens, where the targets of two angles of one
                      prompt part (often an answer and its own shorter prefix: end of answer vs. the next sentence).
                      The angle decides only these tokens, a sliver of the plain per-token mean
DPO (--loss dpo, Rafailov et al. 2023, Eq. 7): −log σ(β[(log π(y⁺) − log π_ref(y⁺)) − (log π(y⁻) − log π_ref(y⁻))])
with summed response log-probs; reference log-probs are computed once before training (the reference is the
starting policy). Pairs come from the scores:
  --pairs mirrored    y⁺ = argmax R_{+a}, y⁻ = argmax R_{−a}; two pairs with the preference flipped by the
                      direction: system(+a): y⁺ ≻ y⁻ and system(−a): y⁻ ≻ y⁺ (the contrast teaches v, not a mean)
  --pairs best-worst  per (prompt, sampled θ): best vs worst by R_θ under system(θ)
  --pairs neighbours  along --pair-degrees a1 < a2 < …: where the winners y1 = argmax R_{a1}, y2 = argmax R_{a2} of
                      neighbouring angles differ, system(a2): y2 ≻ y1 and system(a1): y1 ≻ y2 (order along θ,
                      not only its sign)
--nll-coef adds the SFT loss on the chosen responses, which keeps them fluent.
RPO (--loss rpo_paired | rpo_unpaired): Relative Preference Optimization (Yin et al. 2024, arXiv 2402.10958; not
NeMo-Aligner's reward-aware RPO nor TRL's former rpo_alpha). Every chosen answer of a micro-batch is contrasted with
every rejected one, Δ_ij = h(x_i, y_i⁺) − h(x_j, y_j⁻) with h = log π − log π_ref, each contrast weighted by how alike
the two prompts are: ω_ij = softmax_j(cos(e(x_i), e(x_j)) / τ), e = all-MiniLM-L6-v2 prompt embeddings (computed once
per dataset and cached); loss = mean_ij −log σ(β ω_ij Δ_ij) (see rpo_loss for the reference code's conventions).
  rpo_paired     a micro-batch holds M pairs; its diagonal Δ_ii is DPO's margin
  rpo_unpaired   the chosen and the rejected answers of a micro-batch come from different pairs with different prompts,
                 as when answers are only rated one by one (a thumbs-up set and a thumbs-down set)
Preference data (--prefs FILE instead of --scored): JSONL or .jsonl.gz with prompt/chosen/rejected as plain strings or
TRL conversational messages, or HH-RLHF dialogues (chosen/rejected only; see pref_data.read_prefs). These carry no direction and
are encoded with the plain chat template; --loss sft trains on the chosen answers.

reads  scored JSONL (score.py) or preference JSONL    writes a save_pretrained folder + meta.json (+ training rows)
Candidates with an empty response are skipped and counted (an empty answer is never a target); rows longer than
--max-len are cut and counted. --save-every N writes OUT/checkpoint.pt (model, optimizer, step, RNG states, DPO/RPO
reference log-probs; atomically); --resume continues from it.

    python finetune.py --scored runs/demo/scored.jsonl --select hindsight --out runs/demo/policy-1
    python finetune.py --prefs pairs.jsonl --loss rpo_paired --init runs/demo/policy-1 --out runs/demo/rpo
    torchrun --nproc_per_node=8 finetune.py ... [--fsdp]   # 8 devices: DDP, or FSDP2 with --fsdp (README)

Under torchrun every rank takes its own micro-batches of each optimizer step (the global batch is --batch-size ×
--grad-accum × ranks) and the gradients are averaged once per step; rank 0 logs and writes OUT.
"""
import argparse
import contextlib
import os
import random
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from runtime import lora
from runtime.batching import pack, packing_is_exact, plan_steps
from runtime.chat import system_via
from runtime.dist import all_gather, all_mean, dist_setup, grad_sync, is_main, parallelize, save_model
from runtime.io import (check_flags, check_output_dir, cli, file_digest, parse_degrees, publish_dir, stage_main,
                        temp_dir, write_json, write_jsonl)
from runtime.logprobs import token_logps
from runtime.models import CACHE_DIR, DEFAULT_MODEL, get_lr, load_pretrained, resolve_model, setup
from runtime.resume import (check_finite_loss, check_finite_weights, job_fingerprint, load_checkpoint, load_training,
                            rng_state, save_training, set_rng_state)
from tools.policy_data import decision_positions, encode_rows
from tools.pref_data import DEFAULT_EMBEDDER, embed_prompts, prompt_text
from tools.targets import training_rows


# ----------------------------------------------------------------------------- losses
def sft_loss(logp, row, n_chosen, decision=None, decision_coef=0.0):
    """RSF's loss (DPA §3, step 4): −log π(y* | system(v), x) per token, averaged over the response tokens of the
    first n_chosen rows (the targets; for DPO/RPO the chosen answers, as the --nll-coef term), plus decision_coef ×
    the mean NLL of the decision tokens alone (--decision-coef: where two angles' targets of one prompt part).
    logp (N,): log π of every response token; row (N,): the row each token belongs to (token_logps);
    decision (N,) bool or None → scalar."""
    chosen = row < n_chosen
    loss = -logp[chosen].mean()
    if decision_coef and decision is not None:
        marked = decision & chosen
        if marked.any():
            loss = loss - decision_coef * logp[marked].mean()
    return loss


def sequence_logps(logp, row, n_rows):
    """Summed response log-probs per row: log π(y | x) = Σ_t log π(y_t | y_<t, x). (N,), (N,) → (n_rows,)."""
    return torch.zeros(n_rows, device=logp.device).index_add_(0, row, logp)


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """DPO (Rafailov et al. 2023, Eq. 7). All inputs (B,) summed response log-probs → losses (B,), margins (B,).
    loss = −log σ(β[(π_c − ref_c) − (π_r − ref_r)]); margin = the term inside, before β."""
    margin = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin), margin


def rpo_weights(e_chosen, e_rejected, tau):
    """RPO's prompt-similarity weights (Yin et al. 2024, arXiv 2402.10958). e_chosen (C, D): embeddings of the chosen
    answers' prompts; e_rejected (R, D): of the rejected answers' prompts → ω (C, R), every row summing to 1:
        ω_ij = softmax_j( cos(e_chosen_i, e_rejected_j) / τ )
    The reference code writes softmax_j(−(1 − cos)/τ), the same thing (the constant cancels), and takes the cosine in
    the policy's bf16; here it is fp32. ω is a constant weight: detached, it never trains the embeddings."""
    a = F.normalize(e_chosen.detach().float(), dim=-1)
    b = F.normalize(e_rejected.detach().float(), dim=-1)
    return torch.softmax(a @ b.T / tau, dim=1)


def rpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, weights, beta):
    """RPO (Yin et al. 2024, arXiv 2402.10958), as its reference code computes it.
    pi/ref_chosen (C,), pi/ref_rejected (R,): summed response log-probs; weights ω (C, R) from rpo_weights
    → loss (), Δ (C, R).
        h = log π − log π_ref                   (the implicit reward, over β); the reference never gets a gradient
        Δ_ij = h(x_i, y_i⁺) − h(x_j, y_j⁻)      every chosen answer against every rejected one
        loss = 1/(C·R) Σ_ij −log σ(β ω_ij Δ_ij)  ω scales the logit inside the sigmoid; the mean runs over all cells
    Paired (C = R = M, pair i's answers share prompt x_i): Δ_ii is DPO's margin, so M = 1 is DPO exactly, and ω = I
    gives mean_i DPO_i / M + (1 − 1/M)·log 2 (each off-diagonal cell is −log σ(0) = log 2, with zero gradient).
    Since rows of ω sum to 1, the logit of a cell is at most β·Δ and the effective β of the diagonal is β·ω_ii
    (≈ β/2 to β/M with unrelated prompts)."""
    h_chosen = pi_chosen - ref_chosen.detach()  # (C,)
    h_rejected = pi_rejected - ref_rejected.detach()  # (R,)
    delta = h_chosen[:, None] - h_rejected[None, :]  # (C, R)
    return -F.logsigmoid(beta * weights * delta).mean(), delta


def micro_batch_logps(fwd, data, idx, ridx, pad_id, device, autocast, packed=True, decide=None, decision_coef=0.0):
    """One micro-batch through the policy: summed log-probs of the chosen answers (sft: the targets) of rows idx, then
    of the rejected answers of rows ridx → (len(idx) + len(ridx),), and sft_loss on the chosen answers → scalar
    (decide: each row's decision-token positions, decision_positions; weighted by decision_coef).
    packed: the sequences laid end to end in rows no longer than the longest (batching.pack), each attending only to
    itself: the same log-probs and gradients as one padded row per sequence, on fewer positions."""
    seqs = [data[i][0] for i in idx] + [data[i][1] for i in ridx]
    ids, pos, lmask, where = pack(seqs, pad_id, packed)
    owner = torch.full(ids.shape, -1, dtype=torch.long)  # (R, T): the sequence at each position
    dmask = torch.zeros_like(lmask)  # (R, T): the decision tokens of the targets
    for i, ((s, _), (r, t)) in enumerate(zip(seqs, where)):
        owner[r, t:t + len(s)] = i
        if decide is not None and i < len(idx):
            dmask[r, [t + k for k in decide[idx[i]]]] = True
    with autocast():
        logp, _ = fwd(ids.to(device), None, lmask.to(device), pos.to(device))  # (N,) in row-major label order
    labels = lmask[:, 1:]  # position t predicts token t + 1
    row, dec = owner[:, 1:][labels].to(device), dmask[:, 1:][labels].to(device)
    return (sequence_logps(logp, row, len(seqs)),  # (S,), scalar
            sft_loss(logp, row, len(idx), dec if decide is not None else None, decision_coef))


def micro_batch_loss(args, forward, idx, ridx, ref, omega, paired, stats):
    """The loss of one micro-batch: sft_loss on the RSF targets, or DPO/RPO (+ --nll-coef × sft_loss on the chosen);
    adds margin, accuracy (and RPO's ω_ii) to stats, averaged over --grad-accum."""
    if args.loss == "sft":
        return forward(idx)[1]
    seq, nll = forward(idx, ridx)
    pc, pr = seq.view(2, -1)
    if args.loss == "dpo":
        losses, margin = dpo_loss(pc, pr, ref[0], ref[1], args.beta)
        pref = losses.mean()
    else:  # margin: DPO's diagonal when paired; every chosen-vs-rejected cell when unpaired
        pref, delta = rpo_loss(pc, pr, ref[0], ref[1], omega, args.beta)
        margin = delta.diagonal() if paired else delta.flatten()
        if paired:  # the diagonal's share of each row: its effective β is β·ω_ii
            stats["w_ii"] += omega.diagonal().mean().item() / args.grad_accum
    stats["margin"] += margin.mean().item() / args.grad_accum
    stats["acc"] += (margin > 0).float().mean().item() / args.grad_accum
    return pref + args.nll_coef * nll


# ----------------------------------------------------------------------------- main
def build_parser():
    """The flags, under # Data / # Model / # Optimization / # Output."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scored", help="scored samples JSONL (score.py output): RSF rows or directional pairs")
    src.add_argument("--prefs", help="preference JSONL(.gz): prompt/chosen/rejected, TRL messages or HH-RLHF")
    p.add_argument("--loss", default="sft", choices=["sft", "dpo", "rpo_paired", "rpo_unpaired"])
    p.add_argument("--select", default="sampled", choices=["sampled", "hindsight"], help="RSF targets (sft)")
    p.add_argument("--target-degrees", default="-45,-15,15,45", help="directions for --select hindsight")
    p.add_argument("--pairs", default="mirrored", choices=["mirrored", "best-worst", "neighbours"],
                   help="DPO/RPO pairs (--scored)")
    p.add_argument("--pair-degrees", default="45",
                   help="angles a for --pairs mirrored (pairs at ±a); the ascending angles of --pairs neighbours")
    p.add_argument("--diagnose", action="store_true",
                   help="print the best-by-vᵀr answers per θ of --scored (the target diagnostic) and exit")
    p.add_argument("--max-len", type=int, default=320, help="tokens per row (system + prompt + response)")
    # Model
    p.add_argument("--init", default=DEFAULT_MODEL, help="policy to start from (and DPO/RPO reference)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")
    p.add_argument("--freeze-layers", type=int, default=0,
                   help="freeze the lowest N decoder layers (the embeddings, tied to the LM head, always stay frozen)")
    p.add_argument("--embedder", default=DEFAULT_EMBEDDER,
                   help="RPO prompt embedder: the packaged all-MiniLM-L6-v2 (default), a local folder, or a hub id "
                        "(sentence-transformers/all-MiniLM-L6-v2)")
    p.add_argument("--embed-cache", default=os.path.join(CACHE_DIR, "prompt-embeddings"),
                   help="folder for the cached prompt embeddings (one file per dataset and embedder)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model with FSDP2 instead of DDP")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (pays on GPU)")
    lora.add_flags(p)  # --lora R, --lora-alpha, --lora-dropout, --lora-targets, --grad-checkpointing
    # Optimization
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows (sft) or pairs (dpo, rpo_paired) per micro-batch and rank; rpo_unpaired: chosen "
                        "answers, and as many rejected ones")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="lay each micro-batch's sequences end to end in rows no longer than its longest, each "
                        "attending only to itself (same gradients, less padding; checked on the first micro-batch: a "
                        "model that does not mask by position ids gets padded rows; --no-pack: one padded row each)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--beta", type=float, default=0.1, help="DPO/RPO β")
    p.add_argument("--tau", type=float, default=0.5, help="RPO temperature τ of the prompt-similarity softmax")
    p.add_argument("--nll-coef", type=float, default=0.0, help="weight of the SFT loss on chosen responses (dpo, rpo)")
    p.add_argument("--decision-coef", type=float, default=0.0,
                   help="sft --select hindsight: add this × the mean NLL of the decision tokens, where the targets of "
                        "two angles of one prompt part (the end of the shorter answer, or its continuation)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    # Output
    p.add_argument("--out", help="output folder (required unless --diagnose)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (0 = run all epochs)")
    p.add_argument("--save-every", type=int, default=0, help="write OUT/checkpoint.pt every N steps (0 = never)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if there is one")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (a finished or other run)")
    return p


@stage_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(args, max_len="count", freeze_layers="count0", epochs="pos", batch_size="count", grad_accum="count",
                lr="pos", warmup="count0", beta="pos", tau="pos", nll_coef="nonneg",
                decision_coef="nonneg", seed="seed", max_steps="count0", save_every="count0")
    if args.decision_coef and not (args.loss == "sft" and args.select == "hindsight" and args.scored):
        raise SystemExit("error: --decision-coef needs --loss sft --select hindsight --scored (angles of one prompt)")

    rank, world, device = dist_setup(args.device)  # torchrun: one process per device; else (0, 1, device)
    device, dtype, autocast = setup(args.seed, device, args.dtype)
    source = args.scored or args.prefs
    target_degrees = parse_degrees(args.target_degrees, "--target-degrees")
    pair_degrees = parse_degrees(args.pair_degrees, "--pair-degrees")
    if args.diagnose:  # the targets' shape only: no model, no output
        if not args.scored:
            raise SystemExit("error: --diagnose reads --scored (scored samples)")
        training_rows(args, target_degrees, pair_degrees)
        return
    if not args.out:
        raise SystemExit("error: --out is required (unless --diagnose)")
    ckpt = check_output_dir(args.out, args.overwrite, args.resume,
                            [source, resolve_model(args.init, args.trust_remote_code)])
    rows, prompt_line, note = training_rows(args, target_degrees, pair_degrees)
    if not rows:
        raise SystemExit(f"error: no training rows selected from {source} (every candidate tied?)")

    path = resolve_model(args.init, args.trust_remote_code)
    tok = load_pretrained(AutoTokenizer, path, trust_remote_code=args.trust_remote_code)
    model = load_pretrained(AutoModelForCausalLM, path, dtype=torch.float32,  # fp32 master weights
                            trust_remote_code=args.trust_remote_code).to(device)
    merge_adapters = lora.prepare(model, args)  # --lora / --grad-checkpointing (no-op without them)
    for m in [model.model.embed_tokens, *model.model.layers[:args.freeze_layers]]:
        m.requires_grad_(False)
    fwd = parallelize(model, token_logps, args.fsdp, args.compile, dtype)  # DDP/FSDP2 under torchrun, else plain
    data, rows, too_long, n_cut = encode_rows(tok, rows, args, prompt_line)
    if too_long:
        print(f"finetune: {len(too_long)} rows skipped, their prompt does not fit --max-len; first: {too_long[0]}")
        note += f" ({len(too_long)} skipped: prompt too long)"
    if not rows:
        raise SystemExit(f"error: no row of {source} fits --max-len {args.max_len}")
    paired = args.loss in ("dpo", "rpo_paired")
    unit = "rows" if args.loss == "sft" else "pairs"
    decide = decision_positions(data, rows) if args.decision_coef else None
    if decide is not None:
        note += f" ({sum(map(len, decide)) / len(decide):.1f} decision tokens per row)"

    def forward(idx, ridx=()):  # summed log-probs (chosen, then rejected) and sft_loss of one micro-batch
        return micro_batch_logps(fwd, data, idx, ridx, tok.pad_token_id, device, autocast, packed, decide,
                                 args.decision_coef)

    rng = random.Random(args.seed)
    total, plan, rplan = plan_steps(args, rows, paired, rank, world, rng)
    job = job_fingerprint(vars(args), world, **{"scored" if args.scored else "prefs": file_digest(source)})
    state = load_checkpoint(ckpt, job) if ckpt else None
    # a resumed run keeps its reference: the checkpoint holds every rank's list
    ref, omega = ([r.to(device) for r in state["ref"][rank]] if state else []), []
    model.eval()
    packed = args.pack  # packed rows only where this model's own code masks them as it masks padded ones
    if packed:  # checked in fp32 (FSDP2: in its compute dtype), per response token
        tol, t = 0.1 if args.fsdp and dtype != torch.float32 else 1e-4, time.time()
        packed, diff = packing_is_exact(lambda i, p: micro_batch_logps(fwd, data, i, (), tok.pad_token_id, device,
                                                                       contextlib.nullcontext, p)[0],
                                        data, plan, tok.pad_token_id, tol)
        print(f"finetune: packed rows checked against padded ones: ≤ {diff:.1e} nats per token ({time.time() - t:.1f}s)"
              if packed else f"finetune: packed rows change this model's log-probs by up to {diff:.4f} nats per token "
              "(it does not mask by position ids): padded rows instead")
    if args.loss != "sft" and not state:  # reference log-probs before the policy moves (the reference is the start
        # point), on the very micro-batches training will use, so padding and kernels match: margin 0 at step 1
        with torch.no_grad():  # each (2, B): chosen, rejected
            ref = [forward(idx, ridx)[0].view(2, -1).float() for idx, ridx in zip(plan, rplan)]
    if args.loss.startswith("rpo"):  # prompt embeddings once per dataset (cached on disk), then ω once per micro-batch
        emb = embed_prompts([prompt_text(r["prompt"]) for r in rows], args.embedder, args.embed_cache, device)
        omega = [rpo_weights(emb[idx], emb[ridx], args.tau).to(device) for idx, ridx in zip(plan, rplan)]  # (B, B)
    model.train()

    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=device.startswith("cuda") or None)
    print(f"finetune: {args.loss} on {len(data)} {unit}{note} | {total} steps | "
          f"{sum(q.numel() for q in params) / 1e6:.1f}M trainable | {device} {dtype}"
          + (f" | {n_cut} sequences cut at --max-len {args.max_len}" if n_cut else ""))
    t0, log, start = time.time(), [], 0
    if state:
        load_training(state, args.out, model, opt)  # FSDP2: each rank its own shards
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
            grad_sync(fwd, micro == (step + 1) * args.grad_accum - 1)  # ranks average gradients once per step
            loss = micro_batch_loss(args, forward, plan[micro], rplan[micro] if rplan else (),
                                    ref[micro] if ref else None, omega[micro] if omega else None, paired, stats)
            check_finite_loss(loss, step + 1, "--lr, --beta")
            (loss / args.grad_accum).backward()
            stats["loss"] += loss.item() / args.grad_accum
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # ---------------- TRAINING STEP END
        stats = dict(all_mean(stats), step=step + 1, lr=lr, seconds=round(time.time() - t1, 2))  # global batch
        log.append(stats)
        extra = "".join(f" | {k} {stats[k]:.2f}" for k in ("margin", "acc", "w_ii") if k in stats)
        print(f"step {step + 1}/{total} | loss {stats['loss']:.4f}{extra} | lr {lr:.1e} | {stats['seconds']:.1f}s",
              flush=True)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            refs = all_gather([r.cpu() for r in ref])  # every rank's reference log-probs
            save_training(args.out, model, opt,  # DDP: rank 0 writes; FSDP2: every rank its shards
                          {"fingerprint": job, "step": step + 1, "log": log, "ref": refs, "rng": rng_state()})

    model = merge_adapters()  # --lora: the adapters merged into the weights
    check_finite_weights(model, "--lr")
    stage = temp_dir(args.out) if is_main() else None  # everything is saved to OUT.tmp.PID, then renamed to OUT
    save_model(model, tok, stage)  # every rank (FSDP2 gathers the shards); rank 0 writes
    if not is_main():
        return
    write_jsonl(os.path.join(stage, "train_rows.jsonl"), rows)
    write_json(os.path.join(stage, "meta.json"), {  # meta.json last: the run is finished
        "init": args.init, "loss": args.loss, "system_via": system_via(tok), "rows": len(rows), "steps": total,
        "seconds": round(time.time() - t0, 1), "args": vars(args), "log": log})
    publish_dir(stage, args.out)  # replaces OUT (its checkpoint.pt and FSDP2 shard folders too) in one rename
    print(f"finetune: {args.loss} {total} steps on {len(rows)} {unit} in "
          f"{time.time() - t0:.0f}s → {args.out} | final loss {log[-1]['loss']:.4f}")


if __name__ == "__main__":
    cli(main)
