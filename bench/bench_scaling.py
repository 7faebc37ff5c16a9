"""How each stage's time grows with rows and with length, and what one DPA round costs.

Inference stages are timed on real work at two sizes (rows x 4) and three lengths:
  sample  sample.generate_batch, batch 32: 32 and 128 prompts at 64 new tokens; 32 prompts at 64 / 128 / 256
  score   score.score_texts, batch 32: 64 and 256 answers (natural lengths); 64 answers of 128 / 256 / 384 tokens
Training stages run a whole number of optimizer steps over their rows (steps = rows x epochs / batch), so their time
is rows x (seconds per row at that length): the per-row cost is measured from the step time (1 warmup + --steps
timed) at three row lengths, 128 / 256 / 384 tokens (DPA system prompt and prompt ≈ 65 tokens, the rest answer):
  sft     finetune.py's RSF step, 8 rows      dpo  finetune.py's DPO step + reference pass, 4 pairs
  rm      train_rm.py's step, 16 rows, 16 of 30 layers frozen
1024 rows are not run: the table extrapolates them linearly from the measured sizes (marked "≈").

Then the cost model of one round of run_all.sh's default recipe (600 answers of <= 160 new tokens, 600 scored, 75
SFT steps x 8 rows, 98 DPO steps x 4 pairs (2 epochs), mean row ≈ 190 tokens), next to the times the README reports
for the default run.

    flock /tmp/heavy.lock /work/venv-bench/bin/python bench/bench_scaling.py
"""
import argparse
import json
import os
import tempfile
from types import SimpleNamespace

import bench_dpo
import bench_rm_speed
import bench_sft
import benchlib as B
import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from common import ATTRIBUTES, reward_forward, rm_text
from runtime.io import read_jsonl
from sample import generate_batch, make_jobs
from score import score_texts

LENGTHS = (128, 256, 384)


def sample(policy, tok, jobs, n, max_new):
    """sample.py's generate_batch over the first n jobs in batches of 32; → seconds."""
    gen = SimpleNamespace(temperature=0.8, top_p=1.0, max_new_tokens=max_new)
    t = B.now()
    with torch.no_grad():
        for b in range(0, n, 32):
            torch.manual_seed(b)
            generate_batch(policy, tok, jobs[b:b + 32], gen, "cpu")
    return B.now() - t


def score(rm, tok, texts, max_len):
    t = B.now()
    score_texts(lambda i, a: {"rewards": reward_forward(rm, i, a)}, tok, texts, 32, max_len, "cpu")
    return B.now() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.add_common_args(p, repeats=1, steps=2, lengths=False)
    args = p.parse_args()
    _, dtype, autocast, path = B.init(args)
    tok = AutoTokenizer.from_pretrained(path)
    out = {}  # (stage, what) → seconds

    # ---------------------------------------------------------------- sampling
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    prompts = read_jsonl(f"{B.REPO}/data/prompts_train.jsonl")
    jobs = make_jobs(prompts[:128], 1, ["plain"], [], (-45.0, 45.0), args.seed)

    sample(policy, tok, jobs, 8, 4)  # warm-up
    for n, m in ((32, 64), (128, 64), (32, 128), (32, 256)):
        out["sample", f"{n} prompts x {m} new"] = sample(policy, tok, jobs, n, m)
        print(f"sample {n} prompts x {m} new tokens: {out['sample', f'{n} prompts x {m} new']:.1f}s", flush=True)
    del policy

    # ---------------------------------------------------------------- scoring
    tok.padding_side = "right"
    tok.pad_token = tok.convert_ids_to_tokens(0)
    rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(ATTRIBUTES), dtype=dtype).eval()
    rm.config.pad_token_id = tok.pad_token_id
    recs = read_jsonl(f"{B.REPO}/data/rm_train.jsonl")
    natural = [rm_text(tok, r["prompt"], r["response"]) for r in recs[:256]]
    score(rm, tok, natural[:8], 320)  # warm-up
    for n in (64, 256):
        out["score", f"{n} answers (natural)"] = score(rm, tok, natural[:n], 320)
        print(f"score {n} answers: {out['score', f'{n} answers (natural)']:.1f}s", flush=True)
    long_rows = B.bench_rows(tok, 64, max(LENGTHS))
    for L in LENGTHS:
        out["score", f"64 answers x {L} tokens"] = score(rm, tok, [tok.decode(r["rm_ids"]) for r in long_rows], L)
        print(f"score 64 answers x {L} tokens: {out['score', f'64 answers x {L} tokens']:.1f}s", flush=True)
    del rm

    # ---------------------------------------------------------------- training: seconds per row at each length
    a = SimpleNamespace(seed=args.seed, warmup=args.warmup, steps=args.steps, batch_size=8, pairs_per_step=4,
                        beta=0.1, freeze_layers=16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.model.embed_tokens.requires_grad_(False)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    n_rows = a.batch_size * (a.warmup + a.steps)
    for L in LENGTHS:
        a.seq_len = L
        rows = B.bench_rows(tok, max(n_rows, 6 * a.pairs_per_step * (a.warmup + a.steps)), L, by_prompt=True)
        secs, _ = bench_sft.our_block(model, opt, params, rows[:n_rows], a, tok.pad_token_id, autocast)
        out["sft", f"row of {L} tokens"] = np.mean(secs) / a.batch_size
        pairs = B.bench_pairs(rows)[:a.pairs_per_step * (a.warmup + a.steps)]
        secs, _, _ = bench_dpo.our_block(model, opt, params, pairs, a, tok.pad_token_id, autocast)
        out["dpo", f"pair of {L} tokens"] = np.mean(secs) / a.pairs_per_step
        print(f"sft {out['sft', f'row of {L} tokens']:.2f} s/row | dpo {out['dpo', f'pair of {L} tokens']:.2f} s/pair "
              f"at {L} tokens", flush=True)
    del model, opt, params

    rm = bench_rm_speed.load_rm(path, len(ATTRIBUTES), tok.pad_token_id, a.freeze_layers)
    head = list(rm.score.parameters())
    body = [q for n, q in rm.named_parameters() if q.requires_grad and not n.startswith("score.")]
    opt = torch.optim.AdamW([{"params": body, "lr": 1e-4, "base": 1e-4}, {"params": head, "lr": 1e-3, "base": 1e-3}],
                            betas=(0.9, 0.95), weight_decay=0.0)
    a.pairs_per_step = 8  # train_rm's batch of 16 rows
    tmp = tempfile.mkdtemp(prefix="bench-scaling-")
    for L in LENGTHS:
        a.seq_len = L
        rows = B.bench_rows(tok, 16 * (a.warmup + a.steps), L)
        jsonl = os.path.join(tmp, f"rm{L}.jsonl")
        with open(jsonl, "w") as f:
            f.writelines(json.dumps({"prompt": r["prompt"], "response": r["response"], "labels": r["labels"],
                                     "prompt_id": r["prompt_id"]}) + "\n"
                         for r in rows)
        secs, _ = bench_rm_speed.our_block(rm, opt, bench_rm_speed.load_rows(jsonl, len(rows)), tok, a, autocast, 0)
        out["rm", f"row of {L} tokens"] = np.mean(secs) / 16
        print(f"rm {out['rm', f'row of {L} tokens']:.2f} s/row at {L} tokens", flush=True)

    # ---------------------------------------------------------------- tables
    def interp(stage, what, L):
        xs = np.array(LENGTHS, float)
        ys = np.array([out[stage, f"{what} of {x} tokens"] for x in LENGTHS])
        return float(np.interp(L, xs, ys))

    table = []
    for stage, unit in (("sft", "row"), ("dpo", "pair"), ("rm", "row")):
        for L in LENGTHS:
            s = out[stage, f"{unit} of {L} tokens"]
            table.append([stage, f"{unit}s of {L} tokens", f"{64 * s:.0f}", f"{256 * s:.0f}", f"≈ {1024 * s:.0f}"])
    s64, s256 = out["score", "64 answers (natural)"], out["score", "256 answers (natural)"]
    table.append(["score", "answers, natural lengths", f"{s64:.1f}", f"{s256:.1f}", f"≈ {s256 * 4:.0f}"])
    for L in LENGTHS:
        s = out["score", f"64 answers x {L} tokens"]
        table.append(["score", f"answers of {L} tokens", f"{s:.1f}", f"≈ {4 * s:.0f}", f"≈ {16 * s:.0f}"])
    p32, p128 = out["sample", "32 prompts x 64 new"], out["sample", "128 prompts x 64 new"]
    table.append(["sample (batch 32)", "prompts, 64 new tokens", f"≈ {2 * p32:.0f}", f"≈ {2 * p128:.0f}",
                  f"≈ {8 * p128:.0f}"])
    for m in (64, 128, 256):
        s = out["sample", f"32 prompts x {m} new"]
        table.append(["sample (batch 32)", f"prompts, {m} new tokens", f"≈ {2 * s:.0f}", f"≈ {8 * s:.0f}",
                      f"≈ {32 * s:.0f}"])
    B.print_table(f"Seconds per stage for 64 / 256 / 1024 rows ({dtype}, {args.threads} threads; training: one epoch, "
                  f"from the measured step time; ≈: extrapolated linearly from the measured size)",
                  ["stage", "rows", "64", "256", "1024"], table)
    print(f"measured: sample 32 → 128 prompts {p128 / p32:.2f}x the time (4x the rows); score 64 → 256 answers "
          f"{s256 / s64:.2f}x; sample 64 → 256 new tokens "
          f"{out['sample', '32 prompts x 256 new'] / out['sample', '32 prompts x 64 new']:.2f}x; "
          f"sft 128 → 384-token rows {out['sft', 'row of 384 tokens'] / out['sft', 'row of 128 tokens']:.2f}x")

    # one round of the default recipe: 600 answers (mean ≈ 127 of <= 160 new tokens; batches of 100 run to 160),
    # 600 scored (mean ≈ 190 tokens), SFT 75 steps x 8 rows, DPO 98 steps x 4 pairs, rows ≈ 190 tokens (≤ 320)
    per_pos = out["sample", "32 prompts x 128 new"] / (32 * 128)
    model_round = {"sample (600 answers, <= 160 new tokens)": per_pos * 600 * 160,
                   "score (600 answers)": s256 / 256 * 600,
                   "hindsight SFT (75 steps x 8 rows)": interp("sft", "row", 190) * 600,
                   "mirrored DPO (98 steps x 4 pairs)": interp("dpo", "pair", 190) * 392}
    measured = {"sample (600 answers, <= 160 new tokens)": 275, "score (600 answers)": 41,  # README, default run
                "hindsight SFT (75 steps x 8 rows)": 339, "mirrored DPO (98 steps x 4 pairs)": 506}
    total = sum(model_round.values())
    B.print_table("One round of run_all.sh's default recipe: cost model from the rates above vs the default run "
                  "(README, 2 cores)", ["stage", "model (s)", "share", "measured in the default run (s)"],
                  [[k, f"{v:.0f}", f"{v / total:.0%}", measured[k]] for k, v in model_round.items()] +
                  [["round total", f"{total:.0f}", "100%", sum(measured.values())]])
    B.save("scaling", {"args": vars(args), "dtype": str(dtype), "seconds": {f"{k[0]} | {k[1]}": v for k, v in out.items()},
                       "round_model_s": model_round, "round_measured_s": measured})
    print(f"ratio: modelled round / measured round = {total / sum(measured.values()):.2f}x")


if __name__ == "__main__":
    main()
