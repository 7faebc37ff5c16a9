"""Stage 3 of DPA: score every sampled response with the multi-objective reward model.

r(x, y) ∈ R^K on a 0-100 scale. --rm takes any of these formats, told apart by the folder's files:
- regression RM (train_rm.py --method regression), or any AutoModelForSequenceClassification folder: a bias-free
  head on the last real token (common.reward_forward). A folder with 10 outputs and no meta.json is read as the
  released DPA RM (RLHFlow/RewardModel-Mistral-7B-for-DPA-v1): common.ATTRIBUTES order, plain-string [INST] template.
- probe or gated RM (train_rm.py --method probe|gate; meta.json + armo.safetensors): the frozen backbone named in
  meta.json gives the last-token feature (→ rewards) and the end-of-user-turn feature (→ gating weights, score).
- a model with its own code (config auto_map; runs only with --trust-remote-code): ArmoRM-style models return
  rewards, gating_output and score (RLHFlow/ArmoRM-Llama3-8B-v0.1, 19 objectives; their [0, 1] rewards and score are
  written ×100, --reward-scale); one that returns only logits is read as a K-output regression RM.
Batches are sorted by length (right padding, attention masks) so little compute goes to padding; the output keeps the
input order. With --judge the demo's ground-truth judge (judge.py) rates the same responses, so evaluation can show the
learned RM next to the truth.

reads  samples JSONL (sample.py)
writes the same records + rewards {attribute: value} (every output, in the RM's order), rm
       [+ score, gating {attribute: weight} for gated RMs; score = Σ_j rewards_j (gating Tᵀ)_j] [+ judge {...}]

    python score.py --samples runs/demo/samples.jsonl --rm runs/demo/rm --out runs/demo/scored.jsonl
"""
import argparse
import json
import os
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from common import (ATTRIBUTES, HELPFULNESS, VERBOSITY, DataError, check_output, read_jsonl, resolve_model,
                    reward_forward, rm_text, setup, write_jsonl)
from train_rm import ARMO_FILE, compute_features, encode_items, load_armo

# RLHFlow/ArmoRM-Llama3-8B-v0.1's objectives, in its output order (dpa_armo.md §2.1)
ARMO_OBJECTIVES = ATTRIBUTES + [
    "beavertails-is_safe", "prometheus-score", "argilla-overall_quality", "argilla-judge_lm", "code-complexity",
    "code-style", "code-explanation", "code-instruction-following", "code-readability"]


def attribute_names(k, meta, config):
    """Names of a K-output RM: meta.json, else the config's labels, else the known layouts (10: DPA, 19: ArmoRM)."""
    if meta.get("attributes"):
        return meta["attributes"]
    labels = [config.id2label.get(i, "") for i in range(k)] if len(getattr(config, "id2label", {})) == k else []
    if labels and not any(a.startswith("LABEL_") for a in labels):
        return labels
    return {10: ATTRIBUTES, 19: ARMO_OBJECTIVES}.get(k, [f"objective-{i}" for i in range(k)])


@torch.no_grad()
def score_texts(forward, tok, texts, batch_size, max_len, device):
    """Run forward(input_ids, attention_mask) → {name: (B, ...) tensor} over RM input texts in length-sorted,
    right-padded batches. → {name: [value per text]} in input order."""
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # longest first: peak memory shows up at once
    out = {}
    for i in tqdm(range(0, len(order), batch_size), desc="score", unit="batch"):
        idx = order[i:i + batch_size]
        enc = tok([texts[j] for j in idx], return_tensors="pt", padding=True, truncation=True, max_length=max_len,
                  add_special_tokens=False).to(device)
        for name, v in forward(enc["input_ids"], enc["attention_mask"]).items():
            col = out.setdefault(name, [None] * len(texts))
            for j, row in zip(idx, v.float().tolist()):
                col[j] = row
    return out


# ----------------------------------------------------------------------------- format: probe / gated RM (train_rm.py)
def load_armo_scorer(args, device, dtype):
    head, meta = load_armo(args.rm)
    path = resolve_model(meta["backbone"])
    tok = AutoTokenizer.from_pretrained(path)
    backbone = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
    template = meta["template"] if args.template == "auto" else args.template

    @torch.no_grad()
    def scorer(prompts, responses, where):
        encoded = encode_items(tok, list(zip(prompts, responses)), template, args.max_len)
        if head.gate is not None:
            bad = [w for w, e in zip(where, encoded) if e[1] < 0]
            if bad:
                raise DataError(f"{bad[0]}: field 'prompt' is longer than --max-len {args.max_len} tokens: the gate "
                                f"reads the end of the user turn ({len(bad)} such records)")
        f_resp, f_prompt, _ = compute_features(backbone, encoded, args.batch_size, device, nullcontext,
                                               tok.pad_token_id or 0)
        rewards, gating, score = head(f_resp, f_prompt)
        out = {"rewards": rewards.tolist()}
        if gating is not None:
            out.update(gating=gating.tolist(), score=score.tolist())
        return out
    return meta.get("method", "probe"), meta["attributes"], template, scorer


# ----------------------------------------------------------------------------- format: sequence classifier / own code
def load_hf_scorer(args, device, dtype):
    path = resolve_model(args.rm)
    meta_path = os.path.join(path, "meta.json")
    meta = {}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    own_code = bool(getattr(config, "auto_map", None))
    if own_code and not args.trust_remote_code:
        raise SystemExit(f"error: {args.rm} ships its own model code ({config.auto_map}); read it, then pass "
                         f"--trust-remote-code to run it")
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"  # the readouts take the last real token of right-padded rows
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=dtype, trust_remote_code=args.trust_remote_code).to(device).eval()
    k = getattr(config, "num_objectives", None) or config.num_labels
    names = attribute_names(k, meta, config)
    released_dpa = not meta and not own_code and names == ATTRIBUTES  # the released DPA RM layout
    template = args.template if args.template != "auto" else meta.get("template", "dpa" if released_dpa else "chat")

    def forward(input_ids, attention_mask):
        if not own_code:
            return {"rewards": reward_forward(model, input_ids, attention_mask)}
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        if getattr(out, "rewards", None) is None:  # custom code with a plain K-output head
            return {"rewards": out.logits}
        scale = 100.0 if args.reward_scale is None else args.reward_scale  # ArmoRM rates on [0, 1]
        res = {"rewards": out.rewards * scale}
        if getattr(out, "gating_output", None) is not None:
            res["gating"] = out.gating_output
        if getattr(out, "score", None) is not None:
            res["score"] = out.score.reshape(len(input_ids)) * scale
        return res

    def scorer(prompts, responses, where):
        texts = [rm_text(tok, p, r, template) for p, r in zip(prompts, responses)]
        return score_texts(forward, tok, texts, args.batch_size, args.max_len, device)
    kind = "own-code" if own_code else ("released-dpa" if released_dpa else "regression")
    return kind, names, template, scorer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    p.add_argument("--samples", required=True, help="JSONL with prompt and response (sample.py output)")
    p.add_argument("--max-len", type=int, default=320)
    # Model
    p.add_argument("--rm", required=True, help="reward-model folder (train_rm.py output) or hub id")
    p.add_argument("--template", default="auto", choices=["auto", "chat", "dpa"],
                   help="RM input format (auto: meta.json's; the released DPA RM layout: dpa; else chat)")
    p.add_argument("--trust-remote-code", action="store_true", help="run a model folder's own code (ArmoRM-style)")
    p.add_argument("--reward-scale", type=float, default=None, help="multiply own-code rewards/score (default 100)")
    p.add_argument("--judge", action="store_true", help="also add the demo judge's ground-truth ratings")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    # Output
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    device, dtype, _ = setup(0, args.device, args.dtype)
    check_output(args.out, args.overwrite, [args.samples])
    lines, records = read_jsonl(args.samples, required=("prompt", "response"), with_lines=True)
    for i, r in zip(lines, records):
        for field in ("prompt", "response"):
            if not isinstance(r[field], str):
                raise DataError(f"{args.samples}:{i}: field '{field}' must be a string")

    armo = os.path.isdir(args.rm) and os.path.exists(os.path.join(args.rm, ARMO_FILE))
    kind, names, template, scorer = (load_armo_scorer if armo else load_hf_scorer)(args, device, dtype)
    missing = {HELPFULNESS, VERBOSITY} - set(names)
    if missing:
        raise SystemExit(f"error: reward model {args.rm} has no {sorted(missing)} output: DPA needs both "
                         f"(its attributes: {names})")
    print(f"score: {kind} reward model {args.rm} | {len(names)} attributes | template {template}")

    t0 = time.time()
    res = scorer([r["prompt"] for r in records], [r["response"] for r in records],
                 [f"{args.samples}:{i}" for i in lines])
    judged = None
    if args.judge:
        from judge import Judge
        judged = Judge(device).rate([r["prompt"] for r in records], [r["response"] for r in records],
                                    [r.get("truncated", False) for r in records])
    for k, r in enumerate(records):
        r["rewards"] = {a: round(v, 3) for a, v in zip(names, res["rewards"][k])}
        r["rm"] = args.rm
        if "score" in res:
            r["score"] = round(res["score"][k], 4)
        if "gating" in res:
            r["gating"] = {a: round(v, 5) for a, v in zip(names, res["gating"][k])}
        if judged is not None:
            r["judge"] = {a: round(float(v), 3) for a, v in zip(ATTRIBUTES, judged[k]) if v == v}
    write_jsonl(args.out, records)
    dt = time.time() - t0
    h = sum(r["rewards"][HELPFULNESS] for r in records) / max(1, len(records))
    v = sum(r["rewards"][VERBOSITY] for r in records) / max(1, len(records))
    print(f"score: {len(records)} responses → {args.out} | mean helpfulness {h:.1f} verbosity {v:.1f} | "
          f"{len(records) / max(dt, 1e-9):.1f} responses/s | {dt:.0f}s")


if __name__ == "__main__":
    main()
