"""Preference objectives on real human pairs: DPO vs RPO (paired, unpaired) vs SFT on the chosen answers.

Data: Anthropic HH-RLHF helpful-base, test split (../shared/data/hh_rlhf_helpful, read in place, never copied into the
repository). pref_data.read_prefs splits each dialogue pair into prompt turns + chosen/rejected answer. Pairs whose
prompt and both answers fit --max-len tokens under the SmolLM2 chat template (so nothing is cut) are shuffled with
--seed; the first --train are the training pairs (written to OUT/train.jsonl in TRL conversational form, which
finetune.py reads back), the next --heldout are held out.

Each objective trains SmolLM2-135M-Instruct from the same start with the same flags (finetune.py as a subprocess:
--lr, --beta, --epochs, --batch-size; RPO's τ 0.5 and all-MiniLM-L6-v2 prompt embeddings; no NLL term). Then, on the
held-out pairs, the implicit reward r(x, y) = β·[log π(y|x) − log π_start(y|x)] (summed over answer tokens) ranks the
chosen answer above the rejected one or not: accuracy (ties count ½) and mean margin r(y⁺) − r(y⁻). The start model's
implicit reward is 0 everywhere (accuracy ½ by definition), so the table also gives each model's raw log-likelihood
accuracy, log π(y⁺|x) > log π(y⁻|x), which the start model has too. pairs/s = training pairs per second of optimizer
steps (sft: chosen answers per second); "wall" is the whole finetune.py run (load, reference pass, embeddings, save).

    flock /tmp/heavy.lock python bench/bench_pref.py                       # ≈ 11 min on 2 CPU cores
    python bench/bench_pref.py --train 16 --heldout 8 --objectives dpo     # a quick check
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from runtime.io import write_jsonl  # noqa: E402
from runtime.models import DEFAULT_MODEL, resolve_model, setup  # noqa: E402
from runtime.batching import collate  # noqa: E402
from runtime.logprobs import token_logps  # noqa: E402
from tools.policy_data import encode  # noqa: E402
from tools.pref_data import read_prefs  # noqa: E402

HH = os.path.join(REPO, "..", "shared", "data", "hh_rlhf_helpful", "helpful-base_test.jsonl.gz")


@torch.no_grad()
def pair_logps(model_dir, pairs, pad_id, autocast, batch_size=8):
    """Summed answer log-probs of every held-out pair under the model → (chosen (N,), rejected (N,))."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        seqs = [s for p in pairs[i:i + batch_size] for s in p["enc"]]  # chosen, rejected, chosen, …
        ids, attn, lmask = collate(seqs, pad_id)
        with autocast():
            logp, row = token_logps(model, ids, attn, lmask)
        out.append(torch.zeros(len(seqs)).index_add_(0, row, logp.float()))
    seq = torch.cat(out).view(-1, 2)
    return seq[:, 0], seq[:, 1]


def accuracy(diff):
    """Fraction of pairs where diff > 0, ties counting ½."""
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    p.add_argument("--data", default=HH, help="HH-RLHF JSONL(.gz) with chosen/rejected dialogues")
    p.add_argument("--train", type=int, default=64, help="training pairs")
    p.add_argument("--heldout", type=int, default=64, help="held-out pairs")
    p.add_argument("--max-len", type=int, default=256, help="tokens per sequence (prompt + answer), nothing cut")
    # Model
    p.add_argument("--init", default=DEFAULT_MODEL)
    # Optimization (the same for every objective)
    p.add_argument("--objectives", default="sft,dpo,rpo_paired,rpo_unpaired")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    # Output
    p.add_argument("--out", default=os.path.join(REPO, "runs", "bench-pref"))
    args = p.parse_args()

    t_start = time.time()
    _, _, autocast = setup(args.seed)
    start = resolve_model(args.init)
    tok = AutoTokenizer.from_pretrained(start)
    rows, n_same = read_prefs(args.data)
    fits = []
    for r in rows:
        enc = [encode(tok, r["prompt"], None, r[k], False, 10 ** 6) for k in ("chosen", "rejected")]
        if all(len(ids) <= args.max_len for ids, _ in enc):
            fits.append(dict(r, enc=enc))
    random.Random(args.seed).shuffle(fits)
    train, held = fits[:args.train], fits[args.train:args.train + args.heldout]
    if len(held) < args.heldout:
        raise SystemExit(f"error: only {len(fits)} pairs fit --max-len {args.max_len}")
    os.makedirs(args.out, exist_ok=True)
    train_file = os.path.join(args.out, "train.jsonl")
    write_jsonl(train_file, [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                              "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in train])
    print(f"bench_pref: {len(rows)} pairs in {args.data} ({n_same} with chosen == rejected), {len(fits)} fit "
          f"{args.max_len} tokens → {len(train)} train, {len(held)} held out")

    ref_c, ref_r = pair_logps(start, held, tok.pad_token_id, autocast)
    results = [{"objective": "start", "heldout_acc": 0.5, "margin": 0.0, "loglik_acc": accuracy(ref_c - ref_r)}]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for obj in args.objectives.split(","):
        out = os.path.join(args.out, obj)
        cmd = [sys.executable, os.path.join(REPO, "finetune.py"), "--prefs", train_file, "--loss", obj,
               "--init", args.init, "--max-len", str(args.max_len), "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--beta", str(args.beta),
               "--tau", str(args.tau), "--warmup", "2", "--seed", str(args.seed), "--out", out]
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        with open(os.path.join(out, "meta.json")) as f:
            meta = json.load(f)
        step_s = sum(s["seconds"] for s in meta["log"])
        pc, pr = pair_logps(out, held, tok.pad_token_id, autocast)
        reward_diff = args.beta * ((pc - ref_c) - (pr - ref_r))  # r(y⁺) − r(y⁻), r = β·h
        results.append({"objective": obj, "steps": meta["steps"], "train_pairs": len(train),
                        "pairs_per_s": meta["steps"] * args.batch_size / step_s, "wall_s": wall,
                        "final_loss": meta["log"][-1]["loss"], "heldout_acc": accuracy(reward_diff),
                        "margin": reward_diff.mean().item(), "loglik_acc": accuracy(pc - pr)})
        print(f"bench_pref: {obj} done in {wall:.0f}s", flush=True)

    print(f"\nheld-out preference accuracy on {len(held)} HH-RLHF pairs, SmolLM2-135M-Instruct, {len(train)} train "
          f"pairs, lr {args.lr:g}, β {args.beta:g}, batch {args.batch_size}, {args.epochs:g} epoch(s)")
    print("| objective | steps | pairs/s | wall s | acc of β·h | mean β·h margin | acc of log π |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if r["objective"] == "start":
            print(f"| start | – | – | – | 0.500 (h ≡ 0) | 0.000 | {r['loglik_acc']:.3f} |")
        else:
            print(f"| {r['objective']} | {r['steps']} | {r['pairs_per_s']:.2f} | {r['wall_s']:.0f} | "
                  f"{r['heldout_acc']:.3f} | {r['margin']:+.3f} | {r['loglik_acc']:.3f} |")
    with open(os.path.join(args.out, "bench_pref.json"), "w") as f:
        json.dump({"args": vars(args), "results": results, "seconds": round(time.time() - t_start)}, f, indent=1)
    print(f"bench_pref: {time.time() - t_start:.0f}s → {args.out}/bench_pref.json")


if __name__ == "__main__":
    main()
