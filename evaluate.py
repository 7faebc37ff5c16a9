"""Evaluate steering: per policy and direction, the mean rewards and lengths on held-out prompts.

DPA's claim is arithmetic control: as θ goes from −45° to +45° answers get longer (verbosity up) while helpfulness
stays high, and each RSF round pushes the front of (verbosity, helpfulness) points outwards (DPA Fig. "validation
rewards"). This script turns scored evaluation samples (sample.py --degrees ... → score.py --judge) into:
  - a table per (policy, θ): mean ± standard error of the RM's helpfulness and verbosity, the judge's (ground truth),
    mean length in tokens / words / characters, truncation rate  → OUT.jsonl and OUT.csv
  - Spearman(θ, mean verbosity) and Spearman(θ, mean length) per policy, and the length ratio at the extreme angles
  - OUT.png: mean verbosity (x) vs mean helpfulness (y), one curve per policy, points labelled by θ (needs matplotlib)

    python evaluate.py base=runs/demo/eval-0.jsonl round1=runs/demo/eval-1.jsonl --out runs/demo/eval
"""
import argparse
import csv
import math
import os
from collections import defaultdict

import numpy as np

from common import ATTRIBUTES, HELPFULNESS, VERBOSITY, best_of_n, degree_to_vector
from runtime.io import (DataError, atomic_write, check_fields, check_finite, check_output, cli, parse_degrees,
                        read_jsonl, stage_main, write_jsonl)
from tools.stats import spearman


def mean_se(xs):
    xs = np.asarray(xs, float)
    return float(xs.mean()), float(xs.std(ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else 0.0


def table(policy, records):
    """Rows of the evaluation table for one policy's scored samples: one per direction θ, sorted by θ."""
    by_deg = defaultdict(list)
    for r in records:
        by_deg[r["degree"]].append(r)
    rows = []
    for deg in sorted(by_deg):
        rs = by_deg[deg]
        row = {"policy": policy, "degree": deg, "n": len(rs)}
        for key, src, attr in (("help", "rewards", HELPFULNESS), ("verb", "rewards", VERBOSITY),
                               ("judge_help", "judge", HELPFULNESS), ("judge_verb", "judge", VERBOSITY)):
            if all(src in r for r in rs):
                row[key], row[key + "_se"] = mean_se([r[src][attr] for r in rs])
        row["tokens"], row["tokens_se"] = mean_se([r["n_tokens"] for r in rs])
        row["words"] = float(np.mean([len(r["response"].split()) for r in rs]))
        row["chars"] = float(np.mean([len(r["response"]) for r in rs]))
        row["truncated"] = float(np.mean([r["truncated"] for r in rs]))
        rows.append(row)
    return rows


def paired_steps(records):
    """Neighbouring angles compared on the same prompts: for θ1 < θ2 adjacent, the mean over prompts of
    tokens(θ2) − tokens(θ1) (a prompt's samples at one angle averaged first) and its standard error. Every angle sees
    the same prompts, so the prompt's own length need (a one-liner or an essay) cancels in the difference, and a step
    the policy makes is resolved with fewer prompts than the unpaired means' SEs suggest. → [(θ1, θ2, mean, se)]"""
    per = defaultdict(lambda: defaultdict(list))  # θ → prompt → tokens
    for r in records:
        per[r["degree"]][r.get("prompt_id", r.get("prompt"))].append(r["n_tokens"])
    degs = sorted(per)
    out = []
    for a, b in zip(degs, degs[1:]):
        both = sorted(set(per[a]) & set(per[b]), key=str)
        if both:
            out.append((a, b, *mean_se([np.mean(per[b][q]) - np.mean(per[a][q]) for q in both])))
    return out


def rerank(records, degrees):
    """Inference-time DPA with no training: for each prompt and θ keep the best of its candidates by vᵀr (the
    RM-scored samples of one prompt, drawn under any direction or hint), relabelled with θ. → records for table()."""
    by_prompt = defaultdict(list)
    for r in records:
        by_prompt[r["prompt_id"]].append(r)
    out = []
    for rs in by_prompt.values():
        rewards = np.array([[r["rewards"][a] for a in ATTRIBUTES] for r in rs])
        for deg in degrees:
            out.append(dict(rs[best_of_n(rewards, degree_to_vector(deg))], degree=deg))
    return out


def summary(rows, base=None):
    """Controllability of one policy: Spearman(θ, verbosity), Spearman(θ, length), length ratio max θ / min θ, the
    worst truncation rate, and how many neighbouring angles differ in mean tokens by more than twice the standard
    error of their difference (a dial the sample size can resolve). With the base policy's rows (same angles) also
    the comparison DPA's figures make:
      help_0_gain      helpfulness at θ = 0 minus the base's (training must not buy control with quality)
      judge_help_wins  at how many angles the judge's helpfulness is at least the base's
      front_wins       at how many angles the policy's mean point lies beyond the base's in the direction v, i.e. a
                       higher mean directional reward vᵀr̄ = cos θ·help + sin θ·verb: the front moved outwards there"""
    deg = [r["degree"] for r in rows]
    out = {"policy": rows[0]["policy"], "spearman_verb": spearman(deg, [r["verb"] for r in rows]),
           "spearman_len": spearman(deg, [r["tokens"] for r in rows]),
           "len_ratio": rows[-1]["tokens"] / max(rows[0]["tokens"], 1e-9),
           "max_truncated": max(r["truncated"] for r in rows),
           "adjacent_separated": sum(b["tokens"] - a["tokens"] > 2 * math.hypot(a["tokens_se"], b["tokens_se"])
                                     for a, b in zip(rows, rows[1:])),
           "adjacent_pairs": len(rows) - 1}
    if base is not None:
        ref = {r["degree"]: r for r in base}
        common = [r for r in rows if r["degree"] in ref]
        vr = lambda r: float(degree_to_vector(r["degree"]) @ np.array([r["help"], r["verb"]]))  # noqa: E731
        out["front_wins"] = sum(vr(r) > vr(ref[r["degree"]]) for r in common)
        out["front_angles"] = len(common)
        if all("judge_help" in r for r in common + base):
            out["judge_help_wins"] = sum(r["judge_help"] >= ref[r["degree"]]["judge_help"] for r in common)
        zero = [r for r in common if r["degree"] == 0]
        out["help_0_gain"] = zero[0]["help"] - ref[0.0]["help"] if zero else float("nan")
    return out


def targets_met(s):
    """The steering targets of the default run (README): Spearman(θ, tokens) and Spearman(θ, verbosity) ≥ 0.95,
    tokens at the largest θ ≥ 2.3 × at the smallest (the paper's 763 → 1778 characters), the judge's helpfulness at
    least the base's at every angle, the front beyond the base's at every angle, at most 20 % truncated at any angle.
    → {target: bool}"""
    every = s.get("front_angles", -1)
    return {"spearman_len>=0.95": s["spearman_len"] >= 0.95, "spearman_verb>=0.95": s["spearman_verb"] >= 0.95,
            "len_ratio>=2.3": s["len_ratio"] >= 2.3, "judge_help>=base_all": s.get("judge_help_wins", -2) == every,
            "front_wins_all": s.get("front_wins", -2) == every, "truncated<=20%": s["max_truncated"] <= 0.2}


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("evaluate: matplotlib not installed, no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        rs = [r for r in rows if r["policy"] == policy]
        ax.plot([r["verb"] for r in rs], [r["help"] for r in rs], "o-", label=policy)
        for r in rs:
            ax.annotate(f"{r['degree']:g}°", (r["verb"], r["help"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("mean verbosity reward (RM, 0-100)")
    ax.set_ylabel("mean helpfulness reward (RM, 0-100)")
    ax.set_title("Directional control on held-out prompts")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


@stage_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scored", nargs="+", help="NAME=scored.jsonl, one per policy, in round order")
    p.add_argument("--rerank", action="append", default=[], metavar="NAME=scored.jsonl",
                   help="also tabulate best-of-n reranking by vᵀr over these candidates (no training)")
    p.add_argument("--degrees", default="-45,-30,-15,0,15,30,45", help="angles for --rerank")
    p.add_argument("--out", required=True, help="output prefix: writes OUT.jsonl, OUT.csv, OUT.png")
    p.add_argument("--overwrite", action="store_true", help="replace existing OUT.* files")
    args = p.parse_args(argv)
    rows, summaries, base = [], [], None
    specs = [(s, *(s.partition("=")[::2] if "=" in s and not os.path.exists(s) else ("", s)))
             for s in args.scored + args.rerank]
    rerank_degrees = parse_degrees(args.degrees, "--degrees") if args.rerank else []
    for out in (args.out + ext for ext in (".jsonl", ".csv", ".png", "_summary.jsonl")):
        try:
            check_output(out, args.overwrite, [path for _, _, path in specs])
        except SystemExit as e:
            raise SystemExit(f"{e.code}; choose another --out" if "also an input" in str(e.code) else e.code) from None
    for spec, name, path in specs:
        lines, records = read_jsonl(path, required=("degree", "response", "n_tokens", "truncated", "rewards"),
                                    with_lines=True)
        if not records:
            raise DataError(f"{path}: no records to evaluate")
        for i, r in zip(lines, records):
            check_fields(path, i, r, degree="degree", response="str", rewards="object", truncated="bool",
                         n_tokens="count")
            for a in (HELPFULNESS, VERBOSITY):
                check_finite(f"{path}:{i}", f"rewards.{a}", r["rewards"].get(a))
        if spec in args.rerank:
            records = rerank(records, rerank_degrees)
        rs = table(name or path, records)
        rows += rs
        summaries.append(summary(rs, base))
        steps = paired_steps(records)
        summaries[-1]["adjacent_separated_paired"] = sum(m > 2 * se for _, _, m, se in steps)
        base = base or rs  # the first policy (round 0, the base) is the reference of the others
    write_jsonl(args.out + ".jsonl", rows)

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
            w.writeheader()
            w.writerows(rows)
    atomic_write(args.out + ".csv", write_csv)
    plot(rows, args.out + ".png")

    has_judge = all("judge_help" in r for r in rows)
    print(f"{'policy':10s} {'θ':>5s} {'help':>11s} {'verb':>11s}" + (f" {'judge h':>8s} {'judge v':>8s}" if has_judge else "")
          + f" {'tokens':>7s} {'words':>6s} {'trunc':>6s}")
    for r in rows:
        print(f"{r['policy']:10s} {r['degree']:5g} {r['help']:5.1f}±{r['help_se']:4.1f} {r['verb']:5.1f}±{r['verb_se']:4.1f}"
              + (f" {r['judge_help']:8.1f} {r['judge_verb']:8.1f}" if has_judge else "")
              + f" {r['tokens']:7.1f} {r['words']:6.1f} {r['truncated']:6.0%}")
    for s in summaries:
        print(f"evaluate: {s['policy']:10s} | spearman(θ, verbosity) {s['spearman_verb']:+.2f} | "
              f"spearman(θ, length) {s['spearman_len']:+.2f} | length ratio max/min θ {s['len_ratio']:.2f}"
              + (f" | help at 0° vs base {s['help_0_gain']:+.1f} | front beyond base at {s['front_wins']}/"
                 f"{s['front_angles']} angles" + (f" | judge help ≥ base at {s['judge_help_wins']}" if "judge_help_wins" in s
                                                  else "") + f" | targets met {sum(targets_met(s).values())}/6"
                 if "front_wins" in s else "")
              + f" | max truncated {s['max_truncated']:.0%} | neighbours apart > 2 SE {s['adjacent_separated']}/"
                f"{s['adjacent_pairs']} (paired by prompt {s['adjacent_separated_paired']})")
    write_jsonl(args.out + "_summary.jsonl", [{k: (None if v != v else v) for k, v in s.items()} for s in summaries])


if __name__ == "__main__":
    cli(main)
