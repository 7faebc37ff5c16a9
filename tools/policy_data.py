"""finetune.py's inputs: scored samples (score.py) read and checked into a reward matrix, preference pairs
(pref_data.read_prefs) as training rows, and every row's answers encoded into token ids under its prompt."""
from collections import defaultdict

import numpy as np

from common import ATTRIBUTES, HELPFULNESS, VERBOSITY, chat_messages, chat_text
from runtime.chat import neutral
from runtime.io import DataError, check_fields, check_finite, check_unique, read_jsonl
from tools.pref_data import prompt_text, read_prefs


# ----------------------------------------------------------------------------- reading
def reward_matrix(records, path, lines=None):
    """(N, K) rewards in ATTRIBUTES order; errors name the line and field. Every record must rate the two DPA axes,
    with the same attribute names as the first record (a file scored by two reward models is an error); attributes
    a record does not rate count 0 (only helpfulness and verbosity enter vᵀr)."""
    out = np.zeros((len(records), len(ATTRIBUTES)))
    lines = lines or range(1, len(records) + 1)
    first = None
    for i, (line, r) in enumerate(zip(lines, records)):
        rw = r.get("rewards")
        if not isinstance(rw, dict):
            raise DataError(f"{path}:{line}: field 'rewards' missing or not an object: run score.py first")
        for a in (HELPFULNESS, VERBOSITY):
            if a not in rw:
                raise DataError(f"{path}:{line}: field 'rewards' has no '{a}' (it has {sorted(rw)[:4]}…): DPA needs "
                                f"a reward model that rates helpfulness and verbosity")
        if first is None:
            first = (line, set(rw))
        elif set(rw) != first[1]:
            raise DataError(f"{path}:{line}: field 'rewards' has {len(rw)} attributes but line {first[0]} has "
                            f"{len(first[1])} (differing: {sorted(set(rw) ^ first[1])[:4]}): scored by different RMs?")
        for a, v in rw.items():
            check_finite(f"{path}:{line}", f"rewards.{a}", v)
        for k, a in enumerate(ATTRIBUTES):
            out[i, k] = rw.get(a, 0.0)
    return out


def read_scored(path):
    """--scored → (records, their (N, K) rewards (reward_matrix), the first line of each prompt, for error messages).
    Candidates with an empty response are skipped and counted: an empty answer is never a training target."""
    lines, records = read_jsonl(path, required=("id", "prompt_id", "prompt", "degree", "response"), with_lines=True)
    for i, r in zip(lines, records):
        check_fields(path, i, r, id="id", prompt_id="id", prompt="text", degree="degree", response="str",
                     truncated="bool?")
    check_unique(path, lines, records)
    rewards = reward_matrix(records, path, lines)
    empty = [k for k, r in enumerate(records) if not r["response"].strip()]
    if empty:  # an empty answer is never a training target (and a reward model may well prefer it at θ < 0)
        print(f"finetune: skipped {len(empty)} candidates of {path} with an empty response (lines "
              f"{', '.join(str(lines[k]) for k in empty[:10])}{', …' if len(empty) > 10 else ''})")
        keep = [k for k in range(len(records)) if records[k]["response"].strip()]
        lines, records, rewards = [lines[k] for k in keep], [records[k] for k in keep], rewards[keep]
    prompt_line = {}
    for i, r in zip(lines, records):
        prompt_line.setdefault(r["prompt"], i)
    return records, rewards, prompt_line


def read_pref_rows(path, loss):
    """--prefs → (rows: the preference pairs, or for --loss sft their chosen answers as SFT rows; a note on the pairs
    skipped because chosen == rejected)."""
    rows, n_same = read_prefs(path)
    note = f" ({n_same} skipped: chosen == rejected)" if n_same else ""
    if loss == "sft":  # SFT on the chosen answers: the usual baseline for preference data
        rows = [{"prompt": r["prompt"], "degree": None, "response": r["chosen"], "truncated": False,
                 "group": r["group"], "line": r["line"]} for r in rows]
    return rows, note


# ----------------------------------------------------------------------------- token ids
def prompt_messages(prompt, degree):
    """The conversation the answer follows: DPA's [system(θ), user] for a direction; with no direction (degree None,
    preference data) the data's own turns, a plain string being one user turn, under the plain chat template."""
    if degree is not None:
        return chat_messages(prompt, degree)
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def encode(tok, prompt, degree, response, truncated, max_len):
    """(input ids, number of prompt tokens): system(θ) + user prompt + response [+ end-of-turn if it ended].
    The loss later covers positions ≥ the prompt length only (pad == eos here, so masking by pad id would also hide
    the end-of-turn token and the model would never learn to stop)."""
    p_ids = tok(chat_text(tok, prompt_messages(prompt, degree)), add_special_tokens=False)["input_ids"]
    r_ids = tok(neutral(tok, response), add_special_tokens=False)["input_ids"] + ([] if truncated else [tok.eos_token_id])
    if len(p_ids) >= max_len:
        raise DataError(f"prompt of {len(p_ids)} tokens does not fit --max-len {max_len}: {prompt_text(prompt)[:60]!r}")
    return (p_ids + r_ids)[:max_len], len(p_ids)


def encode_rows(tok, rows, args, prompt_line):
    """Token ids of every row's answers (encode) → (data, the rows kept, skipped-row messages, number of cut
    sequences). A preference row whose prompt does not fit --max-len is skipped; a scored prompt must fit."""
    data, kept, too_long, n_cut = [], [], [], 0
    for r in rows:
        answers = ([(r["response"], r["truncated"])] if args.loss == "sft" else
                   [(r["chosen"], r["chosen_truncated"]), (r["rejected"], r["rejected_truncated"])])
        try:
            enc = [encode(tok, r["prompt"], r["degree"], a, t, args.max_len) for a, t in answers]
        except DataError as e:  # long dialogues of a preference set are skipped and counted; our own prompts must fit
            if not args.prefs:
                raise DataError(f"{args.scored}:{prompt_line[r['prompt']]}: field 'prompt': {e}") from None
            too_long.append(f"{args.prefs}:{r['line']}: {e}")
            continue
        n_cut += sum(len(ids) == args.max_len and n + len(tok(neutral(tok, a), add_special_tokens=False)["input_ids"])
                     + (not t) > args.max_len for (ids, n), (a, t) in zip(enc, answers))
        data.append(enc)
        kept.append(r)
    return data, kept, too_long, n_cut


def decision_positions(data, rows):
    """Hindsight RSF's decision tokens: in every target, the tokens where it parts from the target of another angle of
    the same prompt (rows sharing a group), i.e. the first token after their common prefix — the end of the shorter
    answer, or the token that continues it. Only there does the angle decide the next token; before it the two
    targets agree, after it the context differs. → per row, the sorted positions in its token ids (data[i][0][0])."""
    groups = defaultdict(list)
    for i, r in enumerate(rows):
        groups[r["group"]].append(i)
    out = [[] for _ in rows]
    for idx in groups.values():
        answers = {i: data[i][0][0][data[i][0][1]:] for i in idx}  # response ids (+ end of turn)
        for i in idx:
            marks = set()
            for j in idx:
                a, b = answers[i], answers[j]
                if a == b:
                    continue
                k = next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                if k < len(a):  # a truncated answer that is a prefix of the other has no token to decide there
                    marks.add(data[i][0][1] + k)
            out[i] = sorted(marks)
    return out
