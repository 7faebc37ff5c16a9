"""Stage 1 of DPA: train the multi-objective reward model r(x, y) ∈ R^K on a 0-100 scale.

Three methods, one data path (rm_data.py: the demo schema, HelpSteer, UltraFeedback, binarized preferences);
the ArmoRM math of probe and gate lives in armo.py:

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
import json
import os
import random
import time

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from common import ATTRIBUTES, HELPFULNESS, VERBOSITY
from runtime import lora
from runtime.batching import batch_stream, predict_heldout, sorted_forward, total_steps
from runtime.dist import all_mean, dist_setup, grad_sync, is_main, parallelize, rank_world, save_model
from runtime.io import (check_flags, check_output_dir, check_rm_lengths, cli, file_digest, publish_dir, stage_main,
                        temp_dir, write_json)
from runtime.models import CACHE_DIR, DEFAULT_MODEL, get_lr, load_pretrained, resolve_model, setup
from runtime.resume import (check_finite_loss, check_finite_weights, job_fingerprint, resume_training, rng_state,
                            save_training)
from tools import rm_data
from tools.armo import RIDGE_ALPHAS, encode_items, pair_accuracy, save_armo, train_armo


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


def attribute_metrics(pred, rows, attributes):
    """Held-out MSE and Pearson per labelled attribute. pred: (N, K) on 0-100; rows: the N tuples."""
    t, m = np.stack([r["target"] for r in rows]) * 100, np.stack([r["mask"] for r in rows])
    out = {}
    for k, a in enumerate(attributes):
        sel = m[:, k] > 0
        if sel.sum():
            r = pearson(pred[sel, k], t[sel, k])
            out[a] = {"mse": float(((pred[sel, k] - t[sel, k]) ** 2).mean()), "pearson": None if r != r else r,
                      "n": int(sel.sum())}
    return out


# ============================================================================= method 1: regression (DPA RM)
def train_regression(args, flags, train, n_val, tok, path, device, dtype, autocast, rng, ckpt=None, n_cut=0):
    """Fine-tune backbone + bias-free head with masked MSE; → the model, predicting on 0-100, and its forward
    (reward_forward as runtime.dist.parallelize wraps it: DDP/FSDP2 under torchrun), the number of steps and the
    per-step log. flags: the flags as resolved (the job's fingerprint); ckpt: OUT/checkpoint.pt to resume from;
    --save-every writes it."""
    rank, world = rank_world()
    model = load_pretrained(
        AutoModelForSequenceClassification, path, num_labels=len(ATTRIBUTES), problem_type="regression",
        dtype=torch.float32, id2label=dict(enumerate(ATTRIBUTES)), label2id={a: k for k, a in enumerate(ATTRIBUTES)},
        trust_remote_code=args.trust_remote_code)
    model.config.pad_token_id = tok.pad_token_id
    torch.nn.init.zeros_(model.score.weight)  # fp32 master weights; start from r = 0, the head learns fast
    merge_adapters = lora.prepare(model, args, trainable=["score"])  # --lora / --grad-checkpointing
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
    total = total_steps(args, len(train), world)  # at the global batch
    print(f"train_rm: {len(train)} train / {n_val} val rows | {total} steps | "
          f"{sum(q.numel() for q in body) / 1e6:.1f}M trainable | {device} {dtype}"
          + (f" | {n_cut} rows cut at --max-len {args.max_len}" if n_cut else ""))

    stream = batch_stream(train, tok, args, rng, rank, world)  # this rank's shuffled micro-batches, epoch after epoch

    def replay(step):  # the shuffled batch stream, up to where an interrupted run stopped
        for _ in range(step * args.grad_accum):
            next(stream)
    inputs = {"data": [file_digest(s) if os.path.isfile(s) else s for s in flags["data"]]}
    if flags["pairs"]:
        inputs["pairs"] = file_digest(flags["pairs"]) if os.path.isfile(flags["pairs"]) else flags["pairs"]
    job = json.loads(json.dumps(job_fingerprint(flags, world, **inputs), default=str))
    step, log = resume_training(ckpt, job, args.out, model, opt, "train_rm", replay)
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
            check_finite_loss(loss, step + 1, "--lr, --head-lr")
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
        if args.save_every and step % args.save_every == 0 and step < total:  # DDP: rank 0 writes; FSDP2: all
            save_training(args.out, model, opt, {"fingerprint": job, "step": step, "log": log, "rng": rng_state()})
    model = merge_adapters()  # --lora: the adapters merged into the weights (the head trained in full)
    with torch.no_grad():
        model.score.weight.mul_(100.0)  # predictions on the 0-100 scale
    check_finite_weights(model, "--lr, --head-lr")
    return model, fwd, total, log


def pairwise_metrics(predict, val_pairs, prefer):
    """Held-out pairwise accuracy: chosen vs rejected by --prefer's reward, by the gate's score (gate only), and the
    baseline 'the longer answer wins'. predict(items) → (rewards (N, K), score (N,) or None)."""
    rc, sc = predict([(q["prompt"], q["chosen"]) for q in val_pairs])
    rr, sr = predict([(q["prompt"], q["rejected"]) for q in val_pairs])
    k = ATTRIBUTES.index(prefer)
    out = {"n": len(val_pairs), "attribute": prefer, "accuracy_attribute": pair_accuracy(rc[:, k], rr[:, k]),
           "accuracy_length": pair_accuracy([len(q["chosen"]) for q in val_pairs],  # baseline: longer wins
                                            [len(q["rejected"]) for q in val_pairs])}
    if sc is not None:
        out["accuracy_score"] = pair_accuracy(sc, sr)
    print("  pairwise accuracy (held out, n={n}): by {attribute} {accuracy_attribute:.3f}".format(**out)
          + (f" | by gated score {out['accuracy_score']:.3f}" if sc is not None else "")
          + f" | longer answer wins {out['accuracy_length']:.3f}")
    return out


# ============================================================================= main
def build_parser():
    """The flags, under # Data / # Model / # Optimization / # Output."""
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
    lora.add_flags(p)  # regression: --lora R, --lora-alpha, --lora-dropout, --lora-targets, --grad-checkpointing
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
    return p


@stage_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(args, limit="count0", min_gap="nonneg", val_frac="frac", max_len="count", freeze_layers="count0",
                ridge_alphas="pos", ridge_val_frac="frac", gate_hidden="count", gate_layers="count0",
                gate_temperature="pos", gate_dropout="frac", gate_scale_init="pos", debias_threshold="nonneg",
                epochs="pos", batch_size="count", grad_accum="count", chunk_rows="count0", lr="pos", head_lr="pos",
                warmup="count0", gate_steps="count", gate_batch="count", gate_lr="pos", seed="seed",
                max_steps="count0", log_every="count", save_every="count0")
    if args.method != "regression" and (args.save_every or args.resume):
        raise SystemExit(f"error: --save-every/--resume apply to --method regression only; --method {args.method} "
                         f"fits in seconds on cached features and starts over (use --overwrite to replace OUT)")
    if args.method != "regression" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(f"error: --method {args.method} runs in one process (it fits a probe on cached features); "
                         f"run it with python, not torchrun")

    _, _, device = dist_setup(args.device)  # torchrun: one process per device; else (0, 1, device)
    device, dtype, autocast = setup(args.seed, device, args.dtype)
    inputs = [*args.data, args.pairs, resolve_model(args.backbone, args.trust_remote_code)]
    ckpt = check_output_dir(args.out, args.overwrite, args.resume, inputs)
    t0 = time.time()
    rows, pairs, groups, info, resolved = rm_data.load_data(args)
    flags = dict(vars(args), **resolved)  # the flags as resolved, for the job fingerprint and meta.json
    prefer = resolved["prefer"]
    rng = random.Random(args.seed)
    val_groups = rm_data.split_heldout(groups, args.val_frac, args.seed, rng)  # per source
    train = [r for r in rows if r["group"] not in val_groups]
    val = [r for r in rows if r["group"] in val_groups]
    if not train:
        raise SystemExit(f"error: no training rows left in {' '.join(args.data)} after holding out {len(val)} for "
                         f"evaluation")

    path = resolve_model(args.backbone, args.trust_remote_code)
    tok = load_pretrained(AutoTokenizer, path, trust_remote_code=args.trust_remote_code)
    tok.padding_side = "right"
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # the RM input ends with the end-of-turn token; a pad id different from it keeps HF's own
        # "last non-pad token" rule pointing at that token too
        tok.pad_token = tok.convert_ids_to_tokens(0)
    n_cut = check_rm_lengths(tok, [r["prompt"] for r in rows], [r["response"] for r in rows],
                             [r["where"] for r in rows], args.template, args.max_len)
    if pairs:  # every method is scored on the same pairs: those whose prompt fits --max-len (the gate needs it)
        fits = [e[1] >= 0 for e in encode_items(tok, [(q["prompt"], q["chosen"]) for q in pairs], args.template,
                                                 args.max_len)]
        if not all(fits):
            print(f"pairs: {fits.count(False)} of {len(pairs)} dropped: prompt longer than --max-len {args.max_len}")
        pairs = [q for q, f in zip(pairs, fits) if f]
    val_pairs = [q for q in pairs if q["prompt_id"] in val_groups]
    sources = ", ".join(f"{i['source']} ({i['schema']}, {i['records']} records)" for i in info["sources"])
    print(f"data: {sources} → {len(rows)} rows, {len(pairs)} pairs ({len(val_pairs)} held out) | method {args.method}")

    if args.method == "regression":
        model, fwd, steps, log = train_regression(args, flags, train, len(val), tok, path, device, dtype, autocast,
                                                  rng, ckpt, n_cut)
        pred, predict = predict_heldout(fwd, val, val_pairs, tok, args, device, autocast)  # each text once
        extra = {}
    else:
        print(f"train_rm: {len(train)} train / {len(val)} val rows | {args.method} | {device} {dtype}"
              + (f" | {n_cut} rows cut at --max-len {args.max_len}" if n_cut else ""))
        head, predict, extra = train_armo(args, rows, pairs, val_groups, tok, path, device, dtype, autocast)
        pred = predict([(r["prompt"], r["response"]) for r in val])[0] if val else np.zeros((0, len(ATTRIBUTES)))
        steps, log = (args.gate_steps if args.method == "gate" else 0), []

    metrics = attribute_metrics(pred, val, ATTRIBUTES) if val else {}
    for a, m in metrics.items():
        print(f"  {a:38s} mse {m['mse']:7.1f}  pearson {m['pearson'] if m['pearson'] is not None else float('nan'):.3f}"
              f"  (n={m['n']})")
    if val_pairs:
        metrics["pairwise"] = pairwise_metrics(predict, val_pairs, prefer)
    backbone = args.backbone if args.backbone.startswith("embedded:") or not os.path.exists(args.backbone) \
        else os.path.abspath(args.backbone)
    meta = {"method": args.method, "attributes": ATTRIBUTES, "scale": [0, 100], "template": args.template,
            "max_len": args.max_len, "helpfulness": HELPFULNESS, "verbosity": VERBOSITY, "backbone": backbone,
            "steps": steps, "seconds": round(time.time() - t0, 1), "data": info, **extra,
            "args": dict(flags, steps=steps), "eval": metrics, "log": log}
    stage = temp_dir(args.out) if is_main() else None  # everything is saved to OUT.tmp.PID, then renamed to OUT
    if args.method == "regression":
        save_model(model, tok, stage)  # every rank (FSDP2 gathers the shards); rank 0 writes
    if not is_main():
        return
    write_json(os.path.join(stage, "eval.json"), metrics)
    if args.method == "regression":
        write_json(os.path.join(stage, "meta.json"), meta)  # last: the run is finished
    else:
        save_armo(stage, head, meta)
    publish_dir(stage, args.out)  # replaces OUT (and its checkpoint.pt) in one rename
    hv = [metrics.get(a, {}).get("pearson") for a in (HELPFULNESS, VERBOSITY)]
    hv = [float("nan") if x is None else x for x in hv]
    print(f"train_rm: {args.method} | {steps} steps in {time.time() - t0:.0f}s → {args.out} | held-out pearson "
          f"helpfulness {hv[0]:.3f} verbosity {hv[1]:.3f}")


if __name__ == "__main__":
    cli(main)
