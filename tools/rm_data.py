"""Reward-model data from real rating schemas, converted into the project's one row format (read by train_rm.py).

    row   {prompt, response, labels: {attribute: 0-100 or None}, prompt_id}     (the RM schema of the README)
    pair  {prompt, chosen, rejected, prompt_id}                                 (chosen is preferred)

A source is a local JSONL file or a hub dataset name (loaded with `datasets`); both go through the same converter.

 schema         hub names / fields                          labels (0-100: the centre of the rating's bin)
 rm             - / {prompt, response, labels}              as written
 helpsteer      nvidia/HelpSteer, nvidia/HelpSteer2 /       helpsteer-{helpfulness, correctness, coherence,
                {prompt, response, helpfulness, ...}        complexity, verbosity} = 20·s + 10, s ∈ 0..4 (DPA README)
 ultrafeedback  openbmb/UltraFeedback / {instruction,       a row per completion: ultrafeedback-overall_score
                completions: [{response, overall_score,     = 10·s − 5, s ∈ [1, 10]; ultrafeedback-{instruction_
                annotations: {aspect: {Rating}}}]}          following, truthfulness, honesty, helpfulness} = 20·s − 10,
                                                            s ∈ 1..5
 binarized      HuggingFaceH4/ultrafeedback_binarized /     pairs; each response also a row with ultrafeedback-
                {prompt, chosen, rejected, score_chosen,    overall_score = 10·score − 5 (UltraFeedback overall
                score_rejected} (or scores in `metadata`)   scores, 1-10); chosen/rejected: strings or message lists
                                                            (the last assistant message is the response)

The bin-centre rule: a rating with n levels splits [0, 100] into n equal bins and maps to its bin's centre, so
HelpSteer's 0-4 → 10, 30, …, 90 (as the released DPA RM does), UltraFeedback's aspect ratings 1-5 → 10, …, 90 and its
overall score 1-10 → 5, 15, …, 95. Fractional scores (means) use the same linear map. A missing rating ("N/A", null,
absent) stays missing (None → NaN → masked in the loss). A pair whose chosen score is not above the rejected one,
or whose two responses are equal, is dropped and counted.

train_rm.py reads its --data and --pairs with load_data (one table of rating rows, to_row) and holds out prompts with
split_heldout.
"""
import bisect
import math
import os
import random

import numpy as np

from common import ATTRIBUTES, HELPFULNESS
from runtime.io import DataError, check_fields, read_jsonl

SCHEMAS = ("rm", "helpsteer", "ultrafeedback", "binarized")
HUB = {  # hub name → (schema, default split)
    "nvidia/HelpSteer": ("helpsteer", "train"),
    "nvidia/HelpSteer2": ("helpsteer", "train"),
    "openbmb/UltraFeedback": ("ultrafeedback", "train"),
    "HuggingFaceH4/ultrafeedback_binarized": ("binarized", "train_prefs"),
}
HELPSTEER = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
UF_ASPECTS = ("instruction_following", "truthfulness", "honesty", "helpfulness")
UF_OVERALL = "ultrafeedback-overall_score"


def bin_centre(s, lo, hi):
    """A rating s on the integer scale lo..hi → the centre of its bin when [0, 100] is cut into hi-lo+1 equal bins."""
    return (s - lo + 0.5) * 100.0 / (hi - lo + 1)


def _rating(rec, field, lo, hi, where):
    """A rating field → its bin centre; None when missing ('N/A', null, absent); out of range: an error."""
    v = rec.get(field) if isinstance(rec, dict) else None
    if v is None or (isinstance(v, str) and v.strip().upper() in ("N/A", "NA", "")):
        return None
    try:
        s = float(v)
    except (TypeError, ValueError):
        raise DataError(f"{where}: field '{field}' must be a number in [{lo}, {hi}] or missing, got {v!r}") from None
    if not (math.isfinite(s) and lo <= s <= hi):
        raise DataError(f"{where}: field '{field}' must be a number in [{lo}, {hi}] or missing, got {v!r}")
    return bin_centre(s, lo, hi)


def _text(rec, field, where):
    v = rec.get(field)
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(v).__name__}")
    return v


# ----------------------------------------------------------------------------- one converter per schema
def from_rm(rec, where):
    """The project's own schema: {prompt, response, labels: {attribute: 0-100 or null}} → [row]."""
    path, sep, line = where.rpartition(":")
    check_fields(path if sep else where, line if sep else "-", rec, prompt="text", response="str", prompt_id="id?")
    labels = rec.get("labels")
    if not isinstance(labels, dict):
        raise DataError(f"{where}: field 'labels' must be an object of attribute → 0-100 or null")
    unknown = set(labels) - set(ATTRIBUTES)
    if unknown:
        raise DataError(f"{where}: field 'labels' has unknown attributes {sorted(unknown)}")
    for a, v in labels.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or not 0 <= v <= 100):
            raise DataError(f"{where}: field 'labels.{a}' must be a number in [0, 100] (the rating scale) or null, "
                            f"got {v!r}")
    prompt = _text(rec, "prompt", where)
    return [{"prompt": prompt, "response": _text(rec, "response", where), "labels": dict(labels),
             "prompt_id": str(rec.get("prompt_id", prompt))}], []


def from_helpsteer(rec, where):
    """HelpSteer: {prompt, response, helpfulness, correctness, coherence, complexity, verbosity (0-4)} → [row]."""
    labels = {f"helpsteer-{a}": _rating(rec, a, 0, 4, where) for a in HELPSTEER}
    prompt = _text(rec, "prompt", where)
    return [{"prompt": prompt, "response": _text(rec, "response", where), "labels": labels, "prompt_id": prompt}], []


def from_ultrafeedback(rec, where):
    """UltraFeedback (fine-grained): {instruction, completions: [{response, overall_score (1-10),
    annotations: {aspect: {Rating: '1'-'5' or 'N/A'}}}]} → one row per completion."""
    prompt = _text(rec, "instruction", where)
    comps = rec.get("completions")
    if not isinstance(comps, list):
        raise DataError(f"{where}: field 'completions' must be a list")
    rows = []
    for j, c in enumerate(comps):
        at = f"{where}: completions[{j}]"
        if not isinstance(c, dict):
            raise DataError(f"{at} must be an object")
        ann = c.get("annotations") or {}
        labels = {UF_OVERALL: _rating(c, "overall_score", 1, 10, at)}
        for a in UF_ASPECTS:
            labels[f"ultrafeedback-{a}"] = _rating(ann.get(a) or {}, "Rating", 1, 5, f"{at}.annotations.{a}")
        rows.append({"prompt": prompt, "response": _text(c, "response", at), "labels": labels, "prompt_id": prompt})
    return rows, []


def _response(v, field, where):
    """A string, or a message list whose last assistant message is the response."""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        said = [m.get("content") for m in v if isinstance(m, dict) and m.get("role") == "assistant"]
        if said and isinstance(said[-1], str):
            return said[-1]
    raise DataError(f"{where}: field '{field}' must be a string or a message list ending in an assistant message")


def from_binarized(rec, where):
    """Binarized preferences {prompt, chosen, rejected, score_chosen, score_rejected} → (rows, [pair] or [])."""
    prompt = rec.get("prompt")
    if prompt is None and isinstance(rec.get("chosen"), list):  # conversational rows without a prompt column
        prompt = next((m.get("content") for m in rec["chosen"] if isinstance(m, dict) and m.get("role") == "user"),
                      None)
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' must be a string")
    chosen, rejected = _response(rec.get("chosen"), "chosen", where), _response(rec.get("rejected"), "rejected", where)
    scores = rec if "score_chosen" in rec or "score_rejected" in rec else (rec.get("metadata") or {})
    sc, sr = _rating(scores, "score_chosen", 1, 10, where), _rating(scores, "score_rejected", 1, 10, where)
    pid = str(rec.get("prompt_id", prompt))
    rows = [{"prompt": prompt, "response": chosen, "labels": {UF_OVERALL: sc}, "prompt_id": pid}]
    if rejected != chosen:
        rows.append({"prompt": prompt, "response": rejected, "labels": {UF_OVERALL: sr}, "prompt_id": pid})
    tie = rejected == chosen or (sc is not None and sr is not None and sc <= sr)
    return rows, ([] if tie else [{"prompt": prompt, "chosen": chosen, "rejected": rejected, "prompt_id": pid}])


CONVERTERS = {"rm": from_rm, "helpsteer": from_helpsteer, "ultrafeedback": from_ultrafeedback,
              "binarized": from_binarized}


def detect_schema(rec, where):
    """Which schema a record is in, from its fields."""
    if "labels" in rec:
        return "rm"
    if "chosen" in rec and "rejected" in rec:
        return "binarized"
    if "completions" in rec and "instruction" in rec:
        return "ultrafeedback"
    if "response" in rec and any(a in rec for a in HELPSTEER):
        return "helpsteer"
    raise DataError(f"{where}: cannot tell the schema from the fields {sorted(rec)[:8]}: expected labels (rm), "
                    f"chosen/rejected (binarized), instruction/completions (ultrafeedback) or HelpSteer ratings")


# ----------------------------------------------------------------------------- sources
def read_source(source, split=None, limit=0):
    """A local JSONL file or a hub dataset name → (schema hint or None, [(where, record)]); limit N ≥ 1: the first N
    records, 0: all. Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) a hub name that is not in the local datasets cache
    fails at once."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise DataError(f"{source}: limit must be an integer >= 1, or 0 for all records, got {limit!r}")
    if os.path.exists(source):
        lines, recs = read_jsonl(source, with_lines=True)
        pairs = [(f"{source}:{i}", r) for i, r in zip(lines, recs)]
        return None, pairs[:limit] if limit else pairs
    if source.startswith((".", "/")) or source.count("/") != 1:
        raise DataError(f"{source}: no such file, and not a hub dataset name (owner/name)")
    schema, default_split = HUB.get(source, (None, "train"))
    split = split or default_split
    import datasets  # only hub sources need it
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    try:
        ds = datasets.load_dataset(source, split=f"{split}[:{limit}]" if limit else split)
    except Exception as e:
        if offline:
            raise SystemExit(f"error: {source!r} is a hub dataset but HF_HUB_OFFLINE=1 and it is not in the local "
                             f"datasets cache ({type(e).__name__}): download it on a connected machine, or pass a "
                             f"local JSONL file in the same schema") from None
        raise
    return schema, [(f"{source}[{split}] row {i}", dict(r)) for i, r in enumerate(ds)]


def load(source, schema="auto", split=None, limit=0):
    """source → (rows, pairs, info) through the schema's converter; info counts what was read and dropped."""
    hint, records = read_source(source, split, limit)
    if not records:
        raise DataError(f"{source}: no records")
    if schema == "auto":  # a file holds one schema: the first record tells which
        schema = hint or detect_schema(records[0][1], records[0][0])
    rows, pairs, seen, dropped = [], [], set(), 0
    for where, rec in records:
        r, p = CONVERTERS[schema](rec, where)
        for row in r:  # one row per distinct (prompt, response); where: 'file:line' for error messages
            row.setdefault("where", where)
            key = (row["prompt"], row["response"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
        pairs += p
        dropped += schema == "binarized" and not p
    return rows, pairs, {"source": source, "schema": schema, "records": len(records), "rows": len(rows),
                         "pairs": len(pairs), "pairs_dropped": dropped}


MAX_PAIRS_PER_ROW = 8  # rated rows of one prompt pair up in O(n), not O(n²): 2,000 answers → ≤ 16,000 pairs


def pairs_from_ratings(rows, attribute, min_gap, per_row=MAX_PAIRS_PER_ROW):
    """Preference pairs from rated rows of the same prompt: (a, b) with label_a − label_b ≥ min_gap on `attribute`,
    best-rated first. Each row a is the chosen answer of at most per_row pairs: with rows sorted by rating, the rows
    rated min_gap below a are a suffix (found by bisection); up to per_row of them are taken, evenly spread over it,
    so a prompt with n rated answers gives at most n·per_row pairs (every qualifying pair when the suffix is short,
    as for the few answers per prompt of the usual rating sets)."""
    by_prompt = {}
    for r in rows:
        if r["labels"].get(attribute) is not None:
            by_prompt.setdefault(r["prompt_id"], []).append(r)
    pairs = []
    for group in by_prompt.values():
        group = sorted(group, key=lambda r: -r["labels"][attribute])
        neg = [-r["labels"][attribute] for r in group]  # ascending
        for i, a in enumerate(group):
            start = bisect.bisect_left(neg, neg[i] + min_gap, lo=i + 1)  # first b with label_a − label_b ≥ min_gap
            n = len(group) - start
            picks = range(start, len(group)) if n <= per_row else (start + k * n // per_row for k in range(per_row))
            for j in picks:
                b = group[j]
                if a["response"] != b["response"]:
                    pairs.append({"prompt": a["prompt"], "chosen": a["response"], "rejected": b["response"],
                                  "prompt_id": a["prompt_id"]})
    return pairs


# ----------------------------------------------------------------------------- train_rm.py's table
def to_row(row, attributes):
    """rm_data row → {prompt, response, target (K,) on 0-1, mask (K,), group: the prompt's id, where: 'file:line'}."""
    target, mask = np.zeros(len(attributes), np.float32), np.zeros(len(attributes), np.float32)
    for k, a in enumerate(attributes):
        v = row["labels"].get(a)
        if v is not None:
            target[k], mask[k] = v / 100.0, 1.0
    return {"prompt": row["prompt"], "response": row["response"], "target": target, "mask": mask,
            "group": row["prompt_id"], "where": row.get("where", "")}


def drop_empty(src, rows):
    """A rated row whose response is empty is skipped and counted: its labels rate a text that is not there."""
    empty = [r["where"] for r in rows if not r["response"].strip()]
    if empty:
        at = [w[len(src) + 1:] if w.startswith(f"{src}:") else w for w in empty]
        print(f"train_rm: skipped {len(empty)} rows of {src} with an empty response (lines "
              f"{', '.join(at[:10])}{', …' if len(at) > 10 else ''})")
    kept = [r for r in rows if r["response"].strip()]
    if not kept:
        raise DataError(f"{src}: no usable rows")
    return kept


def load_data(args):
    """--data sources (one table, each row labelled where its source rates) + --pairs → rating rows (to_row),
    preference pairs, prompt groups per source, a summary of what was read, and the flags as resolved (--data and
    --pairs as absolute paths, --prefer's default)."""
    data = [os.path.abspath(s) if os.path.exists(s) else s for s in args.data]  # one spelling per file
    pairs_src = os.path.abspath(args.pairs) if args.pairs and os.path.exists(args.pairs) else args.pairs
    loaded = {src: load(src, args.schema, args.split, args.limit) for src in data}
    loaded = {src: (drop_empty(src, v[0]), *v[1:]) for src, v in loaded.items()}
    rows = [r for src in data for r in loaded[src][0]]
    pairs = [q for src in data for q in loaded[src][1]]
    info = {"sources": [loaded[src][2] for src in data]}
    groups = [sorted({r["prompt_id"] for r in loaded[src][0]} | {q["prompt_id"] for q in loaded[src][1]})
              for src in data]  # prompt groups per source
    prefer = args.prefer
    if prefer is None:
        binarized = any(i["schema"] == "binarized" for i in info["sources"])
        prefer = UF_OVERALL if binarized and not pairs_src else HELPFULNESS
    if prefer not in ATTRIBUTES:
        raise SystemExit(f"error: --prefer {prefer!r} is not one of {ATTRIBUTES}")
    if pairs_src:
        p_rows, p_pairs, _ = loaded.get(pairs_src) or load(pairs_src, "auto", args.split, args.limit)
        pairs = p_pairs or pairs_from_ratings(p_rows, prefer, args.min_gap)
        if pairs_src not in loaded:
            groups.append(sorted({q["prompt_id"] for q in pairs}))
        info["pairs_source"] = pairs_src if p_pairs else f"{pairs_src} ({prefer} gap ≥ {args.min_gap})"
    if not any(v is not None for r in rows for v in r["labels"].values()):
        raise DataError(f"{', '.join(data)}: every label is null: nothing to learn from")
    info.update(rows=len(rows), pairs=len(pairs))
    resolved = {"data": data, "pairs": pairs_src, "prefer": prefer}
    return [to_row(r, ATTRIBUTES) for r in rows], pairs, groups, info, resolved


def split_heldout(groups, val_frac, seed, rng):
    """The held-out prompts: a val_frac share of each source's prompt groups (load_data), drawn with rng for the first
    source and Random(seed + i) for source i, so a source's held-out prompts do not depend on what else is loaded."""
    val_groups = set()
    for i, g in enumerate(groups if val_frac > 0 else []):
        r = rng if i == 0 else random.Random(seed + i)
        val_groups |= set(r.sample(g, max(1, int(val_frac * len(g)))))
    return val_groups
