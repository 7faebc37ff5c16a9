"""Stage 3 of DPA: score every sampled response with the multi-objective reward model.

r(x, y) ∈ R^K on a 0-100 scale. --rm takes any of these formats, told apart by the folder's files:
- regression RM (train_rm.py --method regression), or any AutoModelForSequenceClassification folder: a bias-free
  head on the last real token (common.reward_forward). A folder with 10 unnamed outputs and no meta.json is read as
  the released DPA RM (RLHFlow/RewardModel-Mistral-7B-for-DPA-v1): common.ATTRIBUTES order, plain-string [INST]
  template; one with train_rm.py's output names but no meta.json (an unfinished run) is refused unless --template.
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
Scored batches (every output: rewards [, gating, score]) are appended to OUT.partial; an interrupted run resumes from
it and writes the same bytes as an uninterrupted one. Empty answers are scored like any other (they are real policy
outputs) and counted.

    python score.py --samples runs/demo/samples.jsonl --rm runs/demo/rm --out runs/demo/scored.jsonl

Several devices: `torchrun --nproc_per_node=8 score.py ...` (rank r scores batches r, r + 8, ...; rank 0 writes OUT);
several machines: `score.py ... --shard i/N` per job (→ OUT.part-i-of-N), then `score.py ... --merge N` with the same
flags. Batches are planned over the whole input and dealt out, so OUT is the file one process writes. Every rank or
job logs its own batches to OUT.part-i-of-N.partial and resumes from it. --judge runs where OUT is written.
"""
import argparse
import math
import time

from common import ATTRIBUTES, HELPFULNESS, VERBOSITY
from runtime.dist import all_sum, collect_parts, dist_setup, drop_logs, is_main, part_path, shard_spec
from runtime.io import (DataError, check_fields, check_flags, check_output, check_rm_lengths, check_unique,
                        claim_output, cli, file_digest, read_jsonl, stage_main, write_jsonl)
from runtime.models import setup
from runtime.resume import model_stamp, open_partial
from tools.reward_models import load_rm


def add_judge(records, device):
    """The demo judge's ground-truth ratings (tools/judge.py) as each record's `judge` field, NaN ratings left out."""
    from tools.judge import Judge
    judged = Judge(device).rate([r["prompt"] for r in records], [r["response"] for r in records],
                                [r.get("truncated", False) for r in records])
    for r, j in zip(records, judged):
        r["judge"] = {a: round(float(v), 3) for a, v in zip(ATTRIBUTES, j) if v == v}


@stage_main
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
    p.add_argument("--out", required=True, help="scored JSONL (written atomically; resumes from OUT.partial)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT and discard OUT.partial: start over")
    p.add_argument("--shard", default="", help="i/N: score only part i of N (one job of a job array) → OUT.part-i-of-N")
    p.add_argument("--merge", type=int, default=0, help="N: join the N parts (made with the same flags) into OUT")
    args = p.parse_args(argv)
    check_flags(args, max_len="count", batch_size="count", reward_scale="pos")

    _, _, device = dist_setup(args.device)  # torchrun: one process per device; else (0, 1, device)
    device, dtype, _ = setup(0, device, args.dtype)
    part = shard_spec(args.shard, args.merge)  # (i, n, how): which batches this process scores
    mine_out = part_path(args.out, *part[:2]) if part[2] == "job" else args.out  # the file this process writes
    # the log of this process's finished batches: every rank and job keeps its own
    partial = (part_path(args.out, *part[:2]) if part[2] in ("job", "torchrun") else args.out) + ".partial"
    check_output(mine_out, args.overwrite, [args.samples])
    check_output(partial, True, [args.samples])
    claim_output(mine_out if is_main() else partial)  # one writer per output; leftovers of killed runs go
    lines, records = read_jsonl(args.samples, required=("prompt", "response"), with_lines=True)
    for i, r in zip(lines, records):
        check_fields(args.samples, i, r, prompt="text", response="str", id="id?")
    check_unique(args.samples, lines, records)
    if not records:
        raise DataError(f"{args.samples}: no records to score")

    t0, mine, done, n_new, n_cut = time.time(), [], {}, 0, 0
    if part[2] != "merge":  # a merge only joins the parts: no model
        rm = load_rm(args.rm, device, dtype, args.template, args.trust_remote_code, args.reward_scale, args.max_len,
                     args.batch_size)
        kind, names, template, scorer, tok, path = rm.kind, rm.names, rm.template, rm.score, rm.tok, rm.path
        print(f"score: {kind} reward model {args.rm} | {len(names)} attributes | template {template}")

        t0 = time.time()
        n_cut = check_rm_lengths(tok, [r["prompt"] for r in records], [r["response"] for r in records],
                                 [f"{args.samples}:{i}" for i in lines], template, args.max_len)
        job = {"samples": file_digest(args.samples), "rm": args.rm, "rm_files": model_stamp(path), "kind": kind,
               "template": template, "reward_scale": args.reward_scale, "max_len": args.max_len,
               "batch_size": args.batch_size, "device": device, "dtype": str(dtype),
               **({"part": list(part[:2])} if part[2] != "all" else {})}
        finished, append = open_partial(partial, job, args.overwrite)
        done = {k: row for e in finished for k, row in zip(e["index"], e["rows"])}

        def on_batch(idx, rows):  # rows: [{rewards [, gating, score]}], every output the final records carry
            nonlocal n_new
            for j, row in zip(idx, rows):
                values = [x for v in row.values() for x in (v if isinstance(v, list) else [v])]
                if not all(math.isfinite(x) for x in values):
                    raise DataError(f"{args.samples}:{lines[j]}: the reward model gave non-finite rewards {row} "
                                    f"(broken weights or fp16 overflow? try --dtype float32)")
            append([{"index": idx, "rows": rows}])
            n_new += len(rows)
        res = scorer([r["prompt"] for r in records], [r["response"] for r in records],
                     [f"{args.samples}:{i}" for i in lines], done, on_batch, part[:2])
        for k, r in enumerate(records):
            if res.get("rewards", [None] * len(records))[k] is None:
                continue  # another rank's or job's record
            r = dict(r, rewards={a: round(v, 3) for a, v in zip(names, res["rewards"][k])}, rm=args.rm)
            if "score" in res:
                r["score"] = round(res["score"][k], 4)
            if "gating" in res:
                r["gating"] = {a: round(v, 5) for a, v in zip(names, res["gating"][k])}
            mine.append((k, r))
    resumed, n_new = (int(all_sum(x)) for x in (len(done), n_new))  # every rank's
    scored = collect_parts(mine, len(records), args.out, part)  # input order, from every rank or job
    if scored is not None:
        ours = ("rewards", "rm", "score", "gating", "judge")  # the fields this stage writes
        if any({k: v for k, v in s.items() if k not in ours} != {k: v for k, v in r.items() if k not in ours}
               or s["rm"] != args.rm for r, s in zip(records, scored)):
            raise DataError(f"{args.out}: the parts hold other records than {args.samples} scored by {args.rm}: "
                            f"merge with the flags that made them")
        records = scored
        if args.judge:  # after the merge: the judge sees every record, as in a single process
            add_judge(records, device)
        write_jsonl(args.out, records)
    drop_logs(args.out, partial, part)  # after OUT is written: this process's log, and merged parts
    if scored is None:  # a --shard job (its part is written) or a rank > 0 (its records went to rank 0)
        print(f"score: part {part[0]}/{part[1]}: {len(mine)} responses → {mine_out}")
        return
    dt = time.time() - t0
    h = sum(r["rewards"][HELPFULNESS] for r in records) / max(1, len(records))
    v = sum(r["rewards"][VERBOSITY] for r in records) / max(1, len(records))
    n_empty = sum(not r["response"].strip() for r in records)
    print(f"score: {len(records)} responses → {args.out} | mean helpfulness {h:.1f} verbosity {v:.1f} | "
          f"{len(records) / max(dt, 1e-9):.1f} responses/s | {dt:.0f}s | {n_empty} empty | {n_cut} cut at --max-len"
          + (f" | resumed {resumed} from {partial}, scored {n_new}" if resumed else "")
          + (f" | merged {part[1]} parts" if part[2] == "merge" else ""))

if __name__ == "__main__":
    cli(main)
