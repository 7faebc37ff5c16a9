"""The one reward-model loader of score.py and steer.py: every RM format, told apart by the folder's files.

- regression RM (train_rm.py --method regression), or any AutoModelForSequenceClassification folder: a bias-free
  head on the last real token (common.reward_forward). A folder with 10 unnamed outputs and no meta.json is read as
  the released DPA RM (RLHFlow/RewardModel-Mistral-7B-for-DPA-v1): common.ATTRIBUTES order, plain-string [INST]
  template; one with train_rm.py's output names but no meta.json (an unfinished run) is refused unless --template.
- probe or gated RM (train_rm.py --method probe|gate; meta.json + armo.safetensors): the frozen backbone named in
  meta.json gives the last-token feature (→ rewards) and the end-of-user-turn feature (→ gating weights, score).
- a model with its own code (config auto_map; runs only with trust_remote_code): ArmoRM-style models return
  rewards, gating_output and score (their [0, 1] rewards and score are written ×100, reward_scale); one that returns
  only logits is read as a K-output regression RM.
"""
import os
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from common import ATTRIBUTES, HELPFULNESS, VERBOSITY, reward_forward, rm_encode, rm_text
from runtime.dist import is_main, shard
from runtime.io import DataError, read_meta
from runtime.models import load_pretrained, resolve_model
from tools.armo import ARMO_FILE, compute_features, encode_items, load_armo


def load_rm(rm, device, dtype, template="auto", trust_remote_code=False, reward_scale=None, max_len=320,
            batch_size=32):
    """A reward model of any format above → namespace(kind, names, template, tok, path, score), where
    score(prompts, responses, where, done=None, on_batch=None, part=(0, 1)) → {"rewards": [K values per item]
    [, "gating", "score"]} in input order (where: 'file:line' per item, for errors). The RM must rate helpfulness
    and verbosity (vᵀr needs both)."""
    if os.path.isdir(rm) and os.path.exists(os.path.join(rm, ARMO_FILE)):
        found = load_armo_scorer(rm, device, dtype, template, trust_remote_code, max_len, batch_size)
    else:
        found = load_hf_scorer(rm, device, dtype, template, trust_remote_code, reward_scale, max_len, batch_size)
    kind, names, template, scorer, tok, path = found
    missing = {HELPFULNESS, VERBOSITY} - set(names)
    if missing:
        raise SystemExit(f"error: reward model {rm} has no {sorted(missing)} output: DPA needs both "
                         f"(its attributes: {names})")
    return SimpleNamespace(kind=kind, names=names, template=template, tok=tok, path=path, score=scorer)


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


def run_batches(n, keys, batch_size, compute, done=None, on_batch=None, part=(0, 1)):
    """The batching and resume logic shared by every RM format. Items are ordered by keys (longest first: peak memory
    shows up at once) and cut into batches; compute(indices) → {name: [value per index]}.
    done: {index: {name: value}} finished by an interrupted run (batches it covers are skipped); on_batch(indices,
    rows) runs after each computed batch with rows = [{name: value}] (score.py appends them to OUT.partial).
    part (i, n): only batches i, i + n, ... (a rank's or a job's share); the other items stay None.
    → {name: [value per item]} in input order."""
    done = done or {}
    order = sorted(range(n), key=lambda i: -keys[i])
    out = {}
    for i in tqdm(shard(range(0, len(order), batch_size), *part), desc="score", unit="batch", disable=not is_main()):
        idx = order[i:i + batch_size]
        if all(j in done for j in idx):
            rows = [done[j] for j in idx]
        else:
            cols = compute(idx)
            rows = [{name: v[r] for name, v in cols.items()} for r in range(len(idx))]
            if on_batch:
                on_batch(idx, rows)
        for j, row in zip(idx, rows):
            for name, v in row.items():
                out.setdefault(name, [None] * n)[j] = v
    return out


@torch.no_grad()
def score_texts(forward, tok, texts, batch_size, max_len, device, done=None, on_batch=None, part=(0, 1),
                template="chat"):
    """Run forward(input_ids, attention_mask) → {name: (B, ...) tensor} over RM input texts in length-sorted,
    right-padded batches (tokenized by common.rm_encode for `template`). → {name: [value per text]} in input order.
    done / on_batch: resume hooks (run_batches)."""
    def compute(idx):
        enc = rm_encode(tok, [texts[j] for j in idx], template, return_tensors="pt", padding=True, truncation=True,
                        max_length=max_len).to(device)
        return {name: v.float().tolist() for name, v in forward(enc["input_ids"], enc["attention_mask"]).items()}
    return run_batches(len(texts), [len(t) for t in texts], batch_size, compute, done, on_batch, part)


# ----------------------------------------------------------------------------- format: probe / gated RM (train_rm.py)
def load_armo_scorer(rm, device, dtype, template, trust_remote_code, max_len, batch_size):
    head, meta = load_armo(rm)
    path = resolve_model(meta["backbone"], trust_remote_code)
    tok = load_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
    backbone = load_pretrained(AutoModel, path, dtype=dtype, trust_remote_code=trust_remote_code)
    backbone = backbone.to(device).eval()
    template = meta["template"] if template == "auto" else template

    @torch.no_grad()
    def scorer(prompts, responses, where, done=None, on_batch=None, part=(0, 1)):
        encoded = encode_items(tok, list(zip(prompts, responses)), template, max_len)
        if head.gate is not None:
            bad = [w for w, e in zip(where, encoded) if e[1] < 0]
            if bad:
                raise DataError(f"{bad[0]}: field 'prompt' is longer than --max-len {max_len} tokens: the gate "
                                f"reads the end of the user turn ({len(bad)} such records)")

        def compute(idx):
            f_resp, f_prompt, _ = compute_features(backbone, [encoded[j] for j in idx], batch_size, device,
                                                   nullcontext, tok.pad_token_id or 0)
            rewards, gating, score = head(f_resp, f_prompt)
            out = {"rewards": rewards.tolist()}
            if gating is not None:
                out.update(gating=gating.tolist(), score=score.tolist())
            return out
        return run_batches(len(encoded), [len(e[0]) for e in encoded], batch_size, compute, done, on_batch,
                           part)
    return meta.get("method", "probe"), meta["attributes"], template, scorer, tok, rm


# ----------------------------------------------------------------------------- format: sequence classifier / own code
def load_hf_scorer(rm, device, dtype, template, trust_remote_code, reward_scale, max_len, batch_size):
    path = resolve_model(rm, trust_remote_code)  # a local folder with its own code is refused here
    meta = read_meta(path) if os.path.isdir(path) else {}
    config = load_pretrained(AutoConfig, path, trust_remote_code=trust_remote_code)
    own_code = bool(getattr(config, "auto_map", None))
    if own_code and not trust_remote_code:
        raise SystemExit(f"error: {rm} ships its own model code ({config.auto_map}); read it, then pass "
                         f"--trust-remote-code to run it")
    tok = load_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
    tok.padding_side = "right"  # the readouts take the last real token of right-padded rows
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = load_pretrained(AutoModelForSequenceClassification, path, dtype=dtype,
                            trust_remote_code=trust_remote_code).to(device).eval()
    k = getattr(config, "num_objectives", None) or config.num_labels
    names = attribute_names(k, meta, config)
    if len(names) != k:
        raise SystemExit(f"error: reward model {rm} has {k} outputs but its meta.json names {len(names)} "
                         f"attributes")
    named = [config.id2label.get(i) for i in range(k)] == ATTRIBUTES  # train_rm.py names its outputs
    if not meta and not own_code and named and template == "auto":  # a train_rm.py folder that lost its finished mark
        raise SystemExit(f"error: {rm} looks like a train_rm.py folder but has no meta.json (an unfinished run, or "
                         f"the file was deleted), so its input template is unknown; re-run train_rm.py, or "
                         f"(score.py) pass --template chat|dpa if you know it")
    released_dpa = not meta and not own_code and names == ATTRIBUTES and not named  # the released DPA RM layout
    template = template if template != "auto" else meta.get("template", "dpa" if released_dpa else "chat")

    def forward(input_ids, attention_mask):
        if not own_code:
            return {"rewards": reward_forward(model, input_ids, attention_mask)}
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        if getattr(out, "rewards", None) is None:  # custom code with a plain K-output head
            return {"rewards": out.logits}
        scale = 100.0 if reward_scale is None else reward_scale  # ArmoRM rates on [0, 1]
        res = {"rewards": out.rewards * scale}
        if getattr(out, "gating_output", None) is not None:
            res["gating"] = out.gating_output
        if getattr(out, "score", None) is not None:
            res["score"] = out.score.reshape(len(input_ids)) * scale
        return res

    def scorer(prompts, responses, where, done=None, on_batch=None, part=(0, 1)):
        texts = [rm_text(tok, p, r, template) for p, r in zip(prompts, responses)]
        return score_texts(forward, tok, texts, batch_size, max_len, device, done, on_batch, part, template)
    kind = "own-code" if own_code else ("released-dpa" if released_dpa else "regression")
    return kind, names, template, scorer, tok, path
