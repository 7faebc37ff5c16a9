"""Build the demo reward-model training set (data/rm_train.jsonl): a stand-in for HelpSteer/UltraFeedback ratings.

Seeded and transparent, in three steps:
 1. Responses: for every training prompt, sample.py's sampler draws --n responses from the embedded policy at a random
    direction, each under a random length hint (plain / brief / detail), so lengths and quality vary widely. Each
    response is then replaced by one of {itself, its sentence-boundary prefixes} drawn at random (sample.py
    --prefixes), so the ratings cover every length from one sentence to the token cap, as the policy's candidate
    pools do.
 2. Hard negatives, made without sampling (fractions of the sampled rows): a response paired with another prompt
    (off-topic), a response cut mid-way (truncated), and a response with a sentence repeated (repetitive).
 3. Labels: judge.py rates every row on the 0-100 scale (helpfulness, coherence, complexity, verbosity); the other six
    attributes stay null and are masked in train_rm.py.

The committed file was made by the command below (≈ 8 min on 2 CPU cores). With real data, train on HelpSteer or
UltraFeedback ratings instead: any JSONL of {prompt, response, labels: {attribute: 0-100 or null}} works.

    python -m tools.make_demo_data --prompts data/prompts_train.jsonl --out data/rm_train.jsonl
"""
import argparse
import os
import random
import subprocess
import sys
import tempfile

from common import ATTRIBUTES, SCHEMA_VERSION
from runtime.io import read_jsonl, write_jsonl
from tools.judge import Judge


def negatives(rows, rng, frac):
    """Off-topic, cut and repetitive variants of sampled rows (each a copy with a new id and kind)."""
    out = []
    for kind in ("off_topic", "cut", "repeat"):
        for r in rng.sample(rows, int(frac * len(rows))):
            r = dict(r, id=f"{r['id']}/{kind}", kind=kind)
            if kind == "off_topic":
                other = rng.choice([x for x in rows if x["prompt_id"] != r["prompt_id"]])
                r["response"], r["truncated"] = other["response"], other["truncated"]
            elif kind == "cut":
                words = r["response"].split()
                r["response"], r["truncated"] = " ".join(words[:max(3, rng.randint(len(words) // 4, len(words) // 2))]), True
            else:
                sentences = [s for s in r["response"].split(". ") if s]
                s = rng.choice(sentences) if sentences else r["response"]
                r["response"] = r["response"] + (" " + s.rstrip(".") + ".") * rng.randint(2, 5)
            out.append(r)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default="data/prompts_train.jsonl")
    p.add_argument("--n", type=int, default=2, help="sampled responses per prompt")
    p.add_argument("--negatives", type=float, default=0.12, help="fraction of rows per kind of hard negative")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="data/rm_train.jsonl")
    args = p.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        # each response gets its own random hint: sample once per hint on a random third of the prompts
        prompts = read_jsonl(args.prompts, required=("id", "prompt"))
        rows = []
        for h, hint in enumerate(("plain", "brief", "detail")):
            part = os.path.join(tmp, f"{hint}.jsonl")
            write_jsonl(part, [r for i, r in enumerate(prompts) if (i + h) % 3 != 0])
            subprocess.run([sys.executable, "sample.py", "--prompts", part, "--out", part + ".out", "--n", "1", "--prefixes",
                            "--hints", hint, "--seed", str(args.seed + h), "--temperature", "0.9",
                            "--max-new-tokens", str(args.max_new_tokens)], check=True)
            drawn = {}
            for r in read_jsonl(part + ".out"):  # an answer, then its prefixes
                drawn.setdefault(r.get("prefix_of", r["id"]), []).append(r)
            rows += [rng.choice(versions) for versions in drawn.values()]
    rows = [dict(r, kind="prefix" if "prefix_of" in r else "sampled") for r in rows]
    rows += negatives(rows, rng, args.negatives)  # of full answers and prefixes alike
    labels = Judge().rate([r["prompt"] for r in rows], [r["response"] for r in rows], [r["truncated"] for r in rows])
    out = [{"id": r["id"], "prompt_id": r["prompt_id"], "prompt": r["prompt"], "response": r["response"],
            "kind": r["kind"], "truncated": r["truncated"], "degree": r["degree"], "hint": r["hint"],
            "labels": {a: (None if v != v else round(float(v), 2)) for a, v in zip(ATTRIBUTES, lab)},
            "labeller": "judge.py", "model": r["model"], "seed": args.seed, "gen": r["gen"],
            "schema_version": SCHEMA_VERSION} for r, lab in zip(rows, labels)]
    rng.shuffle(out)
    write_jsonl(args.out, out)
    print(f"make_demo_data: {len(out)} rows ({sum(r['kind'] == 'sampled' for r in out)} sampled, {sum(r['kind'] == 'prefix' for r in out)} prefixes) → {args.out}")


if __name__ == "__main__":
    main()
