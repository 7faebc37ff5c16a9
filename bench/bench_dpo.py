"""DPO training throughput: finetune.py's DPO step vs TRL DPOTrainer, side by side in one process.

Same pairs (two answers of one prompt, each row DPA system prompt + prompt + answer, --lengths as in benchlib), same
number of pairs per step, sigmoid DPO loss with β 0.1 and no NLL term, bf16 autocast where common.setup picks
it, same trainable parameters (embeddings frozen in both, as finetune.py does).

How the reference is counted. finetune.py computes the reference log-probs once, before training, on the very
micro-batches training will use (a no-grad forward of the starting policy). Here that precompute is timed per
micro-batch and each timed step is charged the reference pass of its own micro-batch, so "ours" = reference forward
+ training step. TRL is measured two ways: with its defaults (a reference model run inside every step, gradient
checkpointing on, checkpointing off too) and with precompute_ref_log_probs=True, whose precompute pass (run when
the trainer is built, over the whole dataset) is timed and spread evenly over the steps.

Throughput is real (non-padding) tokens per second.

    flock /tmp/heavy.lock /work/venv-bench/bin/python bench/bench_dpo.py [--lengths natural]
"""
import argparse
import random
import shutil
import tempfile

import benchlib as B
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import chat_messages
from finetune import dpo_loss
from runtime.batching import collate, plan_batches
from runtime.logprobs import token_logps
from runtime.models import get_lr


def our_block(model, opt, params, pairs, args, pad_id, autocast, lr=1.5e-5):
    """finetune.py's DPO path over one epoch of `pairs`: micro-batches from plan_batches, the reference pass over every
    micro-batch, then one step per micro-batch. → (seconds, real tokens, reference seconds) per step after --warmup;
    a step's seconds = its reference forward + its training step."""
    n = len(pairs) // args.pairs_per_step
    plan = plan_batches(list(range(len(pairs))), args.pairs_per_step, n, random.Random(args.seed))
    batches = [[(pairs[i][0]["ids"], pairs[i][0]["n_prompt"]) for i in idx] +
               [(pairs[i][1]["ids"], pairs[i][1]["n_prompt"]) for i in idx] for idx in plan]
    toks = [sum(len(s) for s, _ in b) for b in batches]

    def forward(seqs):
        ids, attn, lmask = collate(seqs, pad_id)
        with autocast():
            logp, row = token_logps(model, ids, attn, lmask)
        seq = torch.zeros(len(seqs)).index_add_(0, row, logp)
        return seq, -logp[row < len(seqs) // 2].mean()

    ref, ref_secs = [], []
    model.eval()
    with torch.no_grad():
        for seqs in batches:
            t = B.now()
            ref.append(forward(seqs)[0].view(2, -1).float())
            ref_secs.append(B.now() - t)
    model.train()
    times = []
    for k, seqs in enumerate(batches):
        t = B.now()
        for g in opt.param_groups:
            g["lr"] = get_lr(k, len(batches), 0, lr)
        seq, _ = forward(seqs)
        pc, pr = seq.view(2, -1)
        losses, margin = dpo_loss(pc, pr, ref[k][0], ref[k][1], args.beta)
        loss = losses.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item(), margin.mean().item(), (margin > 0).float().mean().item()
        times.append(B.now() - t)
    w = args.warmup
    return [a + b for a, b in zip(ref_secs[w:], times[w:])], toks[w:], ref_secs[w:]


def make_trl(path, tok, pairs, args, dtype, gc, precompute, out_dir):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.model.embed_tokens.requires_grad_(False)
    ref_model = None if precompute else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # plain-text prompt (the chat template already applied, as tools.policy_data.encode does) and answers; TRL appends
    # EOS and cuts prompt + answer at max_length = seq_len, so every sequence has seq_len tokens as ours
    data = Dataset.from_list([{
        "prompt": tok.apply_chat_template(chat_messages(c["prompt"], c["degree"]), tokenize=False,
                                          add_generation_prompt=True),
        "chosen": c["response"], "rejected": r["response"]} for c, r in pairs])
    return B.trl_trainer(DPOTrainer, DPOConfig, model, args, out_dir, dtype, gc, args.pairs_per_step, 1.5e-5,
                         beta=0.1, precompute_ref_log_probs=precompute, train_dataset=data, processing_class=tok,
                         ref_model=ref_model)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.add_common_args(p)
    p.add_argument("--pairs-per-step", type=int, default=4, help="pairs per micro-batch (run_all.sh's DPO uses 4)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--skip-trl-default", action="store_true", help="skip TRL with gradient checkpointing on")
    args = p.parse_args()
    assert args.warmup >= 1, "a TRL step is timed from the end of the previous one: --warmup must be ≥ 1"
    _, dtype, autocast, path = B.init(args)
    tok = AutoTokenizer.from_pretrained(path)
    n_pairs = args.pairs_per_step * (args.warmup + args.steps)
    pairs = B.bench_pairs(B.bench_rows(tok, 3 * n_pairs, args.seq_len, by_prompt=True, lengths=args.lengths))[:n_pairs]
    assert len(pairs) == n_pairs, f"only {len(pairs)} pairs of one prompt in the data; lower --steps"

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.model.embed_tokens.requires_grad_(False)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1.5e-5, betas=(0.9, 0.95), weight_decay=0.0)
    ours_pos = B.Positions(model.model)

    tmp = tempfile.mkdtemp(prefix="bench-dpo-")
    configs = {"trl (ref model, gc off)": (False, False)}
    if not args.skip_trl_default:
        configs["trl (defaults: ref model, gc on)"] = (True, False)
    configs["trl (precompute_ref_log_probs, gc off)"] = (False, True)
    trl = {name: make_trl(path, tok, pairs, args, dtype, gc, pre, f"{tmp}/{k}")
           for k, (name, (gc, pre)) in enumerate(configs.items()) if not pre}
    raw, pads = {k: [] for k in ["ours", *configs]}, {k: [] for k in ["ours", *configs]}
    ref_share = []
    n_batches = args.warmup + args.steps
    for rep in range(args.repeats):
        for name, series in raw.items():
            if name == "ours":
                secs, toks, ref_secs = our_block(model, opt, params, pairs, args, tok.pad_token_id, autocast)
                ref_share.append(sum(ref_secs) / sum(secs))
                pos = ours_pos
            else:
                if configs[name][1]:  # precompute: a fresh trainer per repeat, its precompute pass timed
                    trainer, timer, pos = make_trl(path, tok, pairs, args, dtype, configs[name][0], True,
                                                   f"{tmp}/pre{rep}")
                    pre = trainer._bench_precompute_secs / n_batches
                else:
                    (trainer, timer, pos), pre = trl[name], 0.0
                trainer.train()
                secs, toks = timer.timed(args.warmup)
                secs = [s + pre for s in secs]
                del trainer, timer
            series.append(sum(toks) / sum(secs))
            pads[name].append(pos.take())
            print(f"repeat {rep + 1}/{args.repeats} | {name:38s} | {series[-1]:7.1f} tokens/s | "
                  f"steps {B.fmt_raw(secs, 2)} s | tokens {' '.join(map(str, toks))}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"ours: the reference pass is {B.median(ref_share):.0%} of each step's time (median)")
    B.report(f"dpo-{args.lengths}", f"DPO, {args.pairs_per_step} pairs ({2 * args.pairs_per_step} sequences) per step, "
             f"{args.lengths} lengths (<= {args.seq_len} tokens), reference pass included, {dtype}, {args.threads} "
             f"threads, median of {args.repeats} x {args.steps} steps", raw, pads, 1.2,
             {"args": vars(args), "dtype": str(dtype), "ours_reference_share": ref_share})

def _time_precompute():
    """Record how long DPOTrainer's reference precompute pass takes (it runs inside DPOTrainer.__init__)."""
    from trl import DPOTrainer
    orig = DPOTrainer._precompute_ref_logps

    def timed(self, *a, **kw):
        t = B.now()
        out = orig(self, *a, **kw)
        self._bench_precompute_secs = getattr(self, "_bench_precompute_secs", 0.0) + B.now() - t
        return out
    DPOTrainer._precompute_ref_logps = timed


if __name__ == "__main__":
    _time_precompute()
    main()
