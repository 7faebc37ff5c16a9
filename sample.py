"""Stage 2 of DPA: sample responses from the policy under directional system prompts.

For each prompt x draw a direction θ ~ U[lo, hi] (or take every angle of a fixed list), render the DPA system prompt
"... maximize weighted rating = helpfulness*{round(100 cos θ)} + verbosity*{round(100 sin θ)}" and draw n responses
y ~ π(·|x, v) (DPA §3, step 1-2). Exploration hints (--hints brief,detail) add extra samples whose system prompt
carries a length hint; they only widen the candidate pool for best-of-n: finetune.py trains every row under the
plain DPA prompt of its target direction.

reads  prompts JSONL   {id, prompt}
writes samples JSONL   one record per response (schema in README): id, prompt_id, prompt, degree, weights, hint,
                       response, n_tokens, truncated, model, seed, gen
Finished batches are appended to OUT.partial as they come; an interrupted run (even kill -9) resumes from it and writes
the same bytes as an uninterrupted one (each batch has its own seed).

    python sample.py --prompts data/prompts_train.jsonl --out runs/demo/samples.jsonl --n 2 --hints plain,brief,detail

Several devices: `torchrun --nproc_per_node=8 sample.py ...` (rank r draws batches r, r + 8, ...; rank 0 writes OUT);
several machines: `sample.py ... --shard i/N` per job (→ OUT.part-i-of-N), then `sample.py ... --merge N` with the same
flags. A batch's seed depends on its index only, so OUT is the file one process writes. Every rank or job logs its
own batches to OUT.part-i-of-N.partial and resumes from it.

--engine vllm samples with vLLM instead of transformers (its own venv: `bash setup.sh --vllm`; runtime/engines.py):
the same jobs, batches, records and per-batch seeds, the same prompt token ids; one engine per process, so data
parallel is --shard i/N (one job per GPU), and --tensor-parallel-size K spreads one engine over K GPUs.
"""
import argparse
import random
import re
import time

from tqdm import tqdm
from transformers import AutoTokenizer

from common import SCHEMA_VERSION, chat_messages, chat_text, degree_to_vector, vector_to_weights
from runtime.chat import system_via
from runtime.dist import all_sum, collect_parts, dist_setup, drop_logs, is_main, part_path, shard, shard_spec
from runtime.engines import add_engine_args, generate, load_policy
from runtime.io import (DataError, check_fields, check_flags, check_output, check_unique, claim_output, cli,
                        degree_id, file_digest, parse_degrees, read_jsonl, stage_main, write_jsonl)
from runtime.models import DEFAULT_MODEL, load_pretrained, resolve_model, setup
from runtime.resume import model_stamp, open_partial

HINTS = {"plain": None,
         "brief": "Answer in one or two short sentences.",
         "detail": "Answer thoroughly, with several detailed paragraphs.",
         "sentence": "Answer in one sentence.",
         "few": "Answer in two or three sentences.",
         "paragraph": "Answer in one short paragraph.",
         "paragraphs": "Answer in two paragraphs."}


SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def sentence_prefixes(text, min_words=10, growth=1.6):
    """The prefixes of an answer that end where a sentence ends, at roughly geometric lengths: each has at least
    min_words words and growth × the words of the one before; the longest complete one is always kept. List markers
    ("1.") and abbreviations with inner dots ("e.g.") are not sentence ends. The whole answer is not one of them."""
    ends, whole = [], text.strip()
    for m in SENTENCE_END.finditer(text):
        prefix = text[:m.end()].rstrip()
        word = prefix.split()[-1]
        if not (re.fullmatch(r"\(?\d+[.)]", word) or word.count(".") > 1 or prefix == whole):
            ends.append(prefix)
    out = []
    for prefix in ends:
        n = len(prefix.split())
        if n >= min_words and n >= growth * (len(out[-1].split()) if out else 0):
            out.append(prefix)
    if ends and len(ends[-1].split()) >= min_words and (not out or out[-1] != ends[-1]):
        out.append(ends[-1])  # the longest complete answer, e.g. a truncated answer cut back to its last sentence
    return out


def with_prefixes(records, tok):
    """Each record followed by its sentence-boundary prefixes as extra candidates (not truncated; id ID/pWORDS)."""
    out = []
    for r in records:
        out.append(r)
        for p in sentence_prefixes(r["response"]):
            out.append(dict(r, id=f"{r['id']}/p{len(p.split())}", response=p, truncated=False,
                            n_tokens=len(tok(p, add_special_tokens=False)["input_ids"]), prefix_of=r["id"]))
    return out


def make_jobs(prompts, n, hints, degrees, degree_range, seed):
    """One job per response to draw: (prompt record, θ, hint, k). θ is drawn once per prompt (shared by its hints)."""
    rng = random.Random(seed)
    jobs = []
    for rec in prompts:
        angles = degrees if degrees else [round(rng.uniform(*degree_range), 2)]
        for deg in angles:
            for hint in hints:
                for k in range(n):
                    jobs.append({"prompt_id": rec["id"], "prompt": rec["prompt"], "degree": deg, "hint": hint,
                                 "id": f"{rec['id']}/{degree_id(deg)}/{hint}/{k}"})
    check_unique("sample ids", range(1, len(jobs) + 1), jobs)  # unique by construction; a collision is an error
    return jobs


def check_context(tok, model, jobs, line_of, args):
    """Every prompt, under its system prompt, plus --max-new-tokens must fit the model's context window."""
    ctx = getattr(model.config, "max_position_embeddings", None)
    if not ctx:
        return
    seen = set()
    for j in jobs:
        key = (j["prompt_id"], j["degree"], j["hint"])
        if key in seen:
            continue
        seen.add(key)
        text = chat_text(tok, chat_messages(j["prompt"], j["degree"], HINTS[j["hint"]]))
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        if n + args.max_new_tokens > ctx:
            raise DataError(f"{args.prompts}:{line_of[j['prompt_id']]}: field 'prompt' takes {n} tokens with its "
                            f"system prompt; with --max-new-tokens {args.max_new_tokens} that exceeds the model's "
                            f"context of {ctx} tokens")


def generate_batch(model, tok, jobs, args, device, seed=None):
    """Batched sampling (left-padded for HF, one request per job for vLLM: runtime/engines.py) under each job's
    system prompt; returns (response text, new-token count, truncated) per job."""
    texts = [chat_text(tok, chat_messages(j["prompt"], j["degree"], HINTS[j["hint"]])) for j in jobs]
    return [(tok.decode(ids, skip_special_tokens=True).strip(), len(ids), not ended)
            for ids, ended in generate(model, tok, texts, args, seed)]


def read_inputs(args):
    """Check the flags and read --prompts (ids unique, the first --limit) → (hints, fixed degrees, lines, prompts)."""
    hints = args.hints.split(",")
    for h in hints:
        if h not in HINTS:
            raise SystemExit(f"error: unknown hint {h!r}; choose from {list(HINTS)}")
    if len(set(hints)) < len(hints):
        raise SystemExit(f"error: --hints {args.hints!r}: a hint is listed twice")
    degrees = parse_degrees(args.degrees, "--degrees") if args.degrees else []
    parse_degrees(",".join(map(str, args.degree_range)), "--degree-range", unique=False)
    lines, prompts = read_jsonl(args.prompts, required=("id", "prompt"), with_lines=True)
    for i, rec in zip(lines, prompts):
        check_fields(args.prompts, i, rec, id="id", prompt="text")
    check_unique(args.prompts, lines, prompts)
    lines = lines[:args.limit] if args.limit else lines
    prompts = prompts[:args.limit] if args.limit else prompts
    if not prompts:
        raise DataError(f"{args.prompts}: no prompts")
    return hints, degrees, lines, prompts


@stage_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    p.add_argument("--prompts", required=True, help="JSONL with id and prompt")
    p.add_argument("--limit", type=int, default=0, help="use the first N prompts (0 = all)")
    p.add_argument("--degrees", default="", help="fixed angles for every prompt, e.g. -45,0,45 (default: one random θ)")
    p.add_argument("--degree-range", type=float, nargs=2, default=(-45.0, 45.0), help="θ ~ U[lo, hi] in degrees")
    p.add_argument("--n", type=int, default=4, help="responses per prompt, direction and hint")
    p.add_argument("--hints", default="plain", help=f"comma list of system-prompt hints from {list(HINTS)}")
    p.add_argument("--prefixes", action="store_true",
                   help="also write each answer's sentence-boundary prefixes (≥ 10 words, lengths ×1.6 apart) as "
                        "candidates: a pool of many lengths that all end on a sentence, for best-of-n training")
    # Model
    p.add_argument("--model", default=DEFAULT_MODEL, help="policy: embedded default, local folder or hub id")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")
    add_engine_args(p)  # --engine hf|vllm, --tensor-parallel-size
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--static-cache", action="store_true",
                   help="preallocated KV cache; on CUDA transformers then compiles the decoding step (pays for long "
                        "generations at small batch); prompts are padded to a multiple of 64 tokens to reuse it")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    # Output
    p.add_argument("--out", required=True, help="samples JSONL (written atomically; resumes from OUT.partial)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT and discard OUT.partial: start over")
    p.add_argument("--shard", default="", help="i/N: draw only part i of N (one job of a job array) → OUT.part-i-of-N")
    p.add_argument("--merge", type=int, default=0, help="N: join the N parts (made with the same flags) into OUT")
    args = p.parse_args(argv)
    check_flags(args, limit="count0", n="count", batch_size="count", max_new_tokens="count", temperature="pos",
                top_p="prob", seed="seed", tensor_parallel_size="count")

    _, _, device = dist_setup(args.device)  # torchrun: one process per device; else (0, 1, device)
    device, dtype, _ = setup(args.seed, device, args.dtype)
    part = shard_spec(args.shard, args.merge)  # (i, n, how): which batches this process draws
    mine_out = part_path(args.out, *part[:2]) if part[2] == "job" else args.out  # the file this process writes
    # the log of this process's finished batches: every rank and job keeps its own
    partial = (part_path(args.out, *part[:2]) if part[2] in ("job", "torchrun") else args.out) + ".partial"
    check_output(mine_out, args.overwrite, [args.prompts])
    check_output(partial, True, [args.prompts])
    claim_output(mine_out if is_main() else partial)  # one writer per output; leftovers of killed runs go
    hints, degrees, lines, prompts = read_inputs(args)

    jobs = make_jobs(prompts, args.n, hints, degrees, tuple(args.degree_range), args.seed)
    # length-sorted batches waste less padding; each batch gets its own seed, so a resumed run draws the same samples
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i]["prompt"]))
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    mine = shard(range(len(batches)), *part[:2])  # batch b goes to part b % n (every batch in a single process)
    gen = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
    done, resumed, t0, n_tok, n_new = {}, 0, time.time(), 0, 0
    path = resolve_model(args.model, args.trust_remote_code)
    tok = load_pretrained(AutoTokenizer, path, trust_remote_code=args.trust_remote_code)
    if part[2] != "merge":  # a merge only joins the parts: no model
        tok.padding_side = "left"  # batched generation continues every row from its last real token
        model = load_policy(args.engine, path, dtype, device, args.seed, args.tensor_parallel_size,
                            args.trust_remote_code)
        check_context(tok, model, jobs, dict(zip((r["id"] for r in prompts), lines)), args)
        job = {"prompts": file_digest(args.prompts), "limit": args.limit, "degrees": degrees, "hints": hints,
               "degree_range": args.degree_range, "n": args.n, "model": args.model, "model_files": model_stamp(path),
               "gen": gen, "batch_size": args.batch_size, "static_cache": args.static_cache, "device": device,
               "dtype": str(dtype), "seed": args.seed,
               **({"engine": args.engine, "tensor_parallel_size": args.tensor_parallel_size}
                  if args.engine != "hf" else {}),
               **({"part": list(part[:2])} if part[2] != "all" else {})}
        finished, append = open_partial(partial, job, args.overwrite)
        done = {r["id"]: r for r in finished}
        resumed = len(done)
    for b in tqdm(mine, desc="sample", unit="batch", disable=not is_main()):
        batch = batches[b]
        if all(jobs[i]["id"] in done for i in batch):
            continue
        results = generate_batch(model, tok, [jobs[i] for i in batch], args, device, args.seed * 100_003 + b)
        new = []
        for i, (text, n, trunc) in zip(batch, results):
            j = jobs[i]
            rec = {"id": j["id"], "prompt_id": j["prompt_id"], "prompt": j["prompt"], "degree": j["degree"],
                   "weights": list(vector_to_weights(degree_to_vector(j["degree"]))), "hint": j["hint"],
                   "response": text, "n_tokens": n, "truncated": trunc, "model": args.model, "seed": args.seed,
                   "gen": gen, "system_via": system_via(tok), "schema_version": SCHEMA_VERSION}
            done[rec["id"]] = rec
            new.append(rec)
            n_tok += n
        n_new += len(new)
        append(new)  # one write per finished batch; a torn last line is dropped on resume

    n_tok, resumed, n_new = (int(all_sum(x)) for x in (n_tok, resumed, n_new))  # every rank's
    # input order, whatever order (and on whichever rank or job) the batches ran
    records = collect_parts([(i, done[jobs[i]["id"]]) for b in mine for i in batches[b]], len(jobs), args.out, part)
    if records is not None:
        if [(r["id"], r["model"], r["seed"], r["gen"]) for r in records] != [(j["id"], args.model, args.seed, gen)
                                                                             for j in jobs]:
            raise DataError(f"{args.out}: the parts hold other samples than these flags draw: merge with the flags "
                            f"that made them")
        if args.prefixes:  # derived from the finished samples alone: a resumed or merged run writes the same bytes
            records = with_prefixes(records, tok)
        write_jsonl(args.out, records)
    drop_logs(args.out, partial, part)  # after OUT is written: this process's log, and merged parts
    if records is None:  # a --shard job (its part is written) or a rank > 0 (its records went to rank 0)
        print(f"sample: part {part[0]}/{part[1]}: {sum(len(batches[b]) for b in mine)} responses → {mine_out}")
        return
    dt = time.time() - t0
    drawn = [r for r in records if "prefix_of" not in r]
    trunc = sum(r["truncated"] for r in drawn) / max(1, len(drawn))
    mean_len = sum(r["n_tokens"] for r in drawn) / max(1, len(drawn))
    print(f"sample: {len(drawn)} responses ({len(prompts)} prompts) → {args.out} | mean {mean_len:.0f} tokens | "
          f"truncated {trunc:.0%} | {n_tok / max(dt, 1e-9):.0f} new tok/s | {dt:.0f}s"
          + (f" | resumed {resumed} from {partial}, drew {n_new}" if resumed else "")
          + (f" | merged {part[1]} parts" if part[2] == "merge" else "")
          + (f" | + {len(records) - len(drawn)} sentence prefixes" if args.prefixes else ""))


if __name__ == "__main__":
    cli(main)
