"""finetune.py's training targets from scored samples, the DPA part of its input (see finetune.py's docstring):
RSF's best response per (prompt, direction) (select_sft), directional preference pairs (select_pairs), and the target
diagnostic (target_curve: what RSF would learn per θ, before any training)."""
import math
from collections import defaultdict

import numpy as np

from common import ATTRIBUTES, HELPFULNESS, VERBOSITY, best_of_n, degree_to_vector, directional_reward
from tools.policy_data import read_pref_rows, read_scored
from tools.stats import spearman


# ----------------------------------------------------------------------------- selection
def select_sft(records, rewards, select, target_degrees):
    """RSF targets: [(prompt, degree, response, truncated)] = best-of-n per (prompt, direction)."""
    groups = defaultdict(list)
    for i, r in enumerate(records):
        groups[r["prompt_id"] if select == "hindsight" else (r["prompt_id"], r["degree"])].append(i)
    rows = []
    for key, idx in groups.items():
        degrees = target_degrees if select == "hindsight" else [records[idx[0]]["degree"]]
        for deg in degrees:
            best = idx[best_of_n(rewards[idx], degree_to_vector(deg))]
            rows.append({"prompt": records[best]["prompt"], "degree": deg, "response": records[best]["response"],
                         "truncated": records[best].get("truncated", False), "source_id": records[best]["id"],
                         "group": str(key)})
    return rows


def select_pairs(records, rewards, pairs, pair_degrees):
    """Preference pairs [(prompt, degree, chosen, rejected, …)] from scored samples (see finetune.py's docstring)."""
    groups = defaultdict(list)
    for i, r in enumerate(records):
        groups[(r["prompt_id"], r["degree"]) if pairs == "best-worst" else r["prompt_id"]].append(i)
    out = []

    def pair(deg, c, r, group):
        out.append({"prompt": records[c]["prompt"], "degree": deg, "group": group, "chosen": records[c]["response"],
                    "rejected": records[r]["response"], "chosen_truncated": records[c].get("truncated", False),
                    "rejected_truncated": records[r].get("truncated", False)})
    for key, idx in groups.items():
        if pairs == "mirrored":
            for a in pair_degrees:
                up = idx[best_of_n(rewards[idx], degree_to_vector(a))]
                down = idx[best_of_n(rewards[idx], degree_to_vector(-a))]
                if up != down:  # the same answer wins both ways: nothing to contrast
                    pair(a, up, down, f"{key}/{a:g}")
                    pair(-a, down, up, f"{key}/{a:g}")
        elif pairs == "neighbours":
            angles = sorted(pair_degrees)
            wins = [idx[best_of_n(rewards[idx], degree_to_vector(a))] for a in angles]
            for a1, a2, y1, y2 in zip(angles, angles[1:], wins, wins[1:]):
                if y1 != y2:
                    pair(a2, y2, y1, f"{key}/{a1:g}:{a2:g}")
                    pair(a1, y1, y2, f"{key}/{a1:g}:{a2:g}")
        else:
            deg = records[idx[0]]["degree"]
            scores = directional_reward(rewards[idx], degree_to_vector(deg))
            if scores.max() > scores.min():
                pair(deg, idx[int(np.argmax(scores))], idx[int(np.argmin(scores))], str(key))
    return out


def training_rows(args, target_degrees, pair_degrees):
    """--prefs or --scored → the rows to train on (RSF targets or preference pairs), the first line of each prompt in
    --scored (for error messages), and a note on what was skipped."""
    if args.prefs:
        rows, note = read_pref_rows(args.prefs, args.loss)
        return rows, {}, note
    records, rewards, prompt_line = read_scored(args.scored)
    print_target_curve(records, rewards, args.scored)
    if args.diagnose:
        return [], prompt_line, ""
    if args.loss == "sft":
        return select_sft(records, rewards, args.select, target_degrees), prompt_line, ""
    return select_pairs(records, rewards, args.pairs, pair_degrees), prompt_line, ""


# ----------------------------------------------------------------------------- target diagnostic
GRID = [float(d) for d in range(-45, 50, 5)]  # the fine grid of the target diagnostic


def flip_degree(ra, rb):
    """The angle where answers a and b tie under vᵀr: cos θ·Δh + sin θ·Δv = 0 → θ* = atan(−Δh/Δv), in degrees.
    ra, rb: (K,) rewards in ATTRIBUTES order; a wins below θ*, b above it when b is the more verbose one."""
    dh = ra[ATTRIBUTES.index(HELPFULNESS)] - rb[ATTRIBUTES.index(HELPFULNESS)]
    dv = ra[ATTRIBUTES.index(VERBOSITY)] - rb[ATTRIBUTES.index(VERBOSITY)]
    return math.degrees(math.atan(-dh / dv)) if dv else (90.0 if dh > 0 else -90.0)


def target_curve(records, rewards, degrees=GRID):
    """What RSF would learn, before any training: per θ of the grid the mean words, helpfulness and verbosity of the
    best-by-vᵀr answer of every prompt, and the angles where a prompt's winner flips between neighbouring grid points.
    A dial needs words rising over the whole grid and flips spread over it; a switch shows flat ends and every flip
    near 0°. → (rows [{degree, words, help, verb, distinct}], flips [degrees])"""
    groups = defaultdict(list)
    for i, r in enumerate(records):
        groups[r["prompt_id"]].append(i)
    best = {deg: [] for deg in degrees}
    flips = []
    for idx in groups.values():
        winners = [idx[best_of_n(rewards[idx], degree_to_vector(deg))] for deg in degrees]
        for deg, w in zip(degrees, winners):
            best[deg].append(w)
        flips += [flip_degree(rewards[a], rewards[b]) for a, b in zip(winners, winners[1:]) if a != b]
    h, v = ATTRIBUTES.index(HELPFULNESS), ATTRIBUTES.index(VERBOSITY)
    rows = [{"degree": deg, "words": float(np.mean([len(records[w]["response"].split()) for w in ws])),
             "help": float(rewards[ws, h].mean()), "verb": float(rewards[ws, v].mean()),
             "distinct": len(set(ws)) / len(ws)} for deg, ws in best.items()]
    return rows, flips


def print_target_curve(records, rewards, source):
    if not records:
        return
    rows, flips = target_curve(records, rewards)
    near = sum(abs(f) <= 10 for f in flips) / max(1, len(flips))
    rho = spearman([r["degree"] for r in rows], [r["words"] for r in rows])
    print(f"finetune: best-by-vᵀr answers of {source} per θ (the RSF targets' shape; a dial rises over the whole grid)")
    for key, fmt in (("degree", "{:5.0f}"), ("words", "{:5.0f}"), ("help", "{:5.1f}"), ("verb", "{:5.1f}")):
        print(f"  {key:>6} " + " ".join(fmt.format(r[key]) for r in rows))
    print(f"  Spearman(θ, words) {rho:+.3f} over {len(rows)} angles | {len(flips)} flips, {near:.0%} within ±10° "
          f"(quartiles {' / '.join(f'{q:+.0f}' for q in np.percentile(flips, [25, 50, 75]))})" if flips else
          f"  Spearman(θ, words) {rho:+.3f} | no flips: every prompt has one winner at every θ")
