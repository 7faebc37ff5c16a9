"""What every bench script shares: the repo on sys.path, offline hub, threads and dtype, the benchmark rows, timing
and the result table. Nothing here is a stage: the stage code is imported from the repository itself.

Rows are built from data/rm_train.jsonl (answers the embedded policy sampled, committed with the project), in one of
two shapes (--lengths):
  fixed    each answer is extended with the answers that follow it in the file until the row fills --seq-len tokens,
           then cut there: every row of every batch has the same length, no tool gains or loses by padding, and the
           comparison is of the work done per token;
  natural  each answer as it is, cut at --seq-len: rows of different lengths (tens to hundreds of tokens), so how a
           tool forms its batches (and how much padding it computes) counts too, as it does in a real run.
"""
import json
import os
import statistics
import sys
import time
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from common import rm_text
from runtime.io import read_jsonl
from runtime.models import DEFAULT_MODEL, resolve_model, setup

RESULTS = os.path.join(REPO, "runs", "bench")


def add_common_args(p, repeats=3, steps=3, warmup=1, lengths=True):
    p.add_argument("--model", default=DEFAULT_MODEL)
    if lengths:
        p.add_argument("--lengths", default="fixed", choices=["fixed", "natural"],
                       help="fixed: every row exactly --seq-len tokens; natural: the answers' own lengths, cut there")
    p.add_argument("--repeats", type=int, default=repeats, help="timed blocks per tool (median reported)")
    p.add_argument("--steps", type=int, default=steps, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps before each block")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bf16 autocast on CPUs with native bf16, fp32 elsewhere (common.setup)")
    p.add_argument("--seed", type=int, default=0)


def init(args):
    """Threads, seed, device and dtype exactly as the stages pick them. → (device, dtype, autocast factory, path)."""
    device, dtype, autocast = setup(args.seed, "cpu", args.dtype, threads=args.threads)
    return device, dtype, autocast, resolve_model(args.model)


# ----------------------------------------------------------------------------- data
def bench_rows(tok, n, seq_len, by_prompt=False, lengths="fixed"):
    """n records of rm_train.jsonl (sorted by prompt with by_prompt, so that pairs of one prompt can be formed).
    fixed: the response is extended (with the next records' answers) until both the policy row (DPA system prompt +
    prompt + response) and the reward-model text reach seq_len tokens; natural: the response as it is.
    → list of dicts: prompt, prompt_id, degree, response, truncated, labels, ids (policy row, ≤ seq_len tokens),
    n_prompt, rm_ids (reward-model text, ≤ seq_len tokens)."""
    from tools.policy_data import encode
    recs = read_jsonl(os.path.join(REPO, "data", "rm_train.jsonl"))
    if by_prompt:
        recs = sorted(recs, key=lambda r: r["prompt_id"])  # stable: file order inside a prompt
    out = []
    for i in range(n):
        r = recs[i % len(recs)]
        resp, j, trunc = r["response"], i + 1, lengths == "fixed" or r.get("truncated", False)
        while True:
            ids, n_prompt = encode(tok, r["prompt"], r["degree"], resp, trunc, seq_len)
            rm_ids = tok(rm_text(tok, r["prompt"], resp), add_special_tokens=False)["input_ids"][:seq_len]
            if lengths == "natural" or (len(ids) == seq_len and len(rm_ids) == seq_len):
                break
            resp += "\n\n" + recs[j % len(recs)]["response"]
            j += 1
        out.append({"prompt": r["prompt"], "prompt_id": r["prompt_id"], "degree": r["degree"], "response": resp,
                    "truncated": trunc, "labels": r["labels"], "ids": ids, "n_prompt": n_prompt, "rm_ids": rm_ids})
    return out


def bench_pairs(rows):
    """Preference pairs from rows of the same prompt (chosen = the higher labelled helpfulness), in file order."""
    by_prompt = defaultdict(list)
    for r in rows:
        by_prompt[r["prompt_id"]].append(r)
    pairs = []
    for group in by_prompt.values():
        for a, b in zip(group[0::2], group[1::2]):
            ha, hb = (x["labels"].get("helpsteer-helpfulness") or 0 for x in (a, b))
            pairs.append((a, b) if ha >= hb else (b, a))
    return pairs


# ----------------------------------------------------------------------------- timing and reporting
def now():
    return time.perf_counter()


def median(xs):
    return statistics.median(xs)


def fmt_raw(xs, nd=1):
    return " ".join(f"{x:.{nd}f}" for x in xs)


def print_table(title, header, rows):
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print()


def save(name, payload):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    payload = dict(payload, torch=torch.__version__, threads=torch.get_num_threads(),
                   time=time.strftime("%Y-%m-%d %H:%M:%S"))
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def trl_trainer(trainer_cls, config_cls, model, args, out_dir, dtype, gc, batch_size, lr, **extra):
    """A TRL trainer set up the same way in every bench: CPU, bf16 when the bench's dtype is, gradient checkpointing
    on or off (gc), warmup + timed steps, no logging, saving or data workers; `extra` holds the tool's own options
    (config fields, and train_dataset / processing_class / ref_model for the trainer). → (trainer, step timer,
    positions counter)."""
    trainer_keys = ("train_dataset", "processing_class", "ref_model")
    kw = {k: extra.pop(k) for k in trainer_keys if k in extra}
    cfg = config_cls(output_dir=out_dir, per_device_train_batch_size=batch_size, max_steps=args.warmup + args.steps,
                     learning_rate=lr, bf16=dtype == torch.bfloat16, gradient_checkpointing=gc, use_cpu=True,
                     max_length=args.seq_len, report_to="none", save_strategy="no", logging_steps=10_000,
                     disable_tqdm=True, dataloader_num_workers=0, seed=args.seed, **extra)
    timer = trl_step_timer()
    trainer = trainer_cls(model=model, args=cfg, callbacks=[timer], **kw)
    timer.trainer = trainer
    return trainer, timer, Positions(model.model)


def trl_step_timer():
    """A transformers TrainerCallback that records the wall clock (and TRL's count of real, non-padding tokens) at the
    end of every optimizer step, so a step's time is the gap between two step ends: data loading, collation, forward,
    backward, clipping and the optimizer. Set .trainer after building the trainer."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends, self.tokens, self.trainer = [], [], None

        def on_train_begin(self, args, state, control, **kw):
            self.ends, self.tokens = [], []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(now())
            self.tokens.append(self.trainer._total_train_tokens)

        def timed(self, warmup):
            """(seconds, real tokens) of every step after the first `warmup` ones."""
            e, t = self.ends, self.tokens
            return ([b - a for a, b in zip(e[warmup - 1:], e[warmup:])],
                    [b - a for a, b in zip(t[warmup - 1:], t[warmup:])])

    return StepTimer()


class Positions:
    """Counts the positions (rows x padded length) the backbone computes in training mode, and the real tokens
    among them: positions / tokens is the padding overhead of a tool's batches. A forward pre-hook on the backbone."""

    def __init__(self, backbone):
        self.positions = self.tokens = 0
        backbone.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        if torch.is_grad_enabled() and module.training:
            ids, attn = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
            if ids is not None:
                self.positions += ids.numel()
                self.tokens += int(attn.sum()) if attn is not None and attn.dim() == 2 else ids.numel()

    def take(self):
        out = self.positions / max(1, self.tokens)
        self.positions = self.tokens = 0
        return out


def report(name, title, raw, pads, target, extra=None):
    """Print the table and the ratio line (ours vs the fastest alternative), save the numbers. raw: tool → tokens/s
    per repeat (tool 'ours' first, then variants of ours named 'ours, ...'); pads: tool → padding overhead per
    repeat."""
    med = {k: median(v) for k, v in raw.items()}
    print_table(title, ["tool", "tokens/s (median)", "raw (per repeat)", "positions / real tokens", "ours / tool"],
                [[k, f"{med[k]:.1f}", fmt_raw(v), f"{median(pads[k]):.2f}" if pads.get(k) else "-",
                  f"{med['ours'] / med[k]:.2f}x"] for k, v in raw.items()])
    best = max((k for k in med if not k.startswith("ours")), key=med.get)  # variants of ours are not alternatives
    ratio = med["ours"] / med[best]
    save(name, dict(extra or {}, tokens_per_s=raw, padding=pads, median=med, fastest_alternative=best,
                    ratio=ratio, target=target))
    print(f"ratio: ours / {best} = {ratio:.2f}x (target >= {target}x: {'met' if ratio >= target else 'NOT met'})")
