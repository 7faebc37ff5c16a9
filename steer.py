"""Stage 5 of DPA: answer with a chosen trade-off between helpfulness and verbosity.

The user picks a direction — an angle θ (--degree -15) or weights (--weights 80 -60, normalised to a unit vector) —
and the policy answers under the DPA system prompt "... maximize weighted rating = helpfulness*97 +
verbosity*-26". Works with any checkpoint of finetune.py, the base model, or the released DPA-v1 model (same
template). --best-of-n N with --rm adds inference-time steering that needs no training: draw N answers and return
the one with the largest vᵀr under the reward model.

    python steer.py --model runs/demo/policy-1 --degree -15 "How do I boil an egg?"
    python steer.py --model runs/demo/policy-1 --degrees=-45,-15,15,45 "How do I boil an egg?"   # one model load
    echo "How do I boil an egg?" | python steer.py --weights 71 71
"""
import argparse
import os
import sys

import numpy as np
from transformers import AutoTokenizer

from common import (best_of_n, chat_messages, chat_text, degree_to_vector, directional_reward, system_prompt,
                    vector_to_degree, weights_to_vector)
from runtime.engines import add_engine_args, generate, load_policy
from runtime.io import check_flags, cli, parse_degrees, stage_main
from runtime.models import DEFAULT_MODEL, load_pretrained, resolve_model, setup
from tools.reward_models import load_rm


def read_prompts(path):
    """One prompt per non-blank line of a UTF-8 text file; errors name the file and line."""
    if os.path.isdir(path) or not os.path.exists(path):
        raise SystemExit(f"error: --file {path}: {'is a directory' if os.path.isdir(path) else 'no such file'}")
    prompts = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                raise SystemExit(f"error: {path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if line:
                prompts.append(line)
    return prompts


@stage_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    p.add_argument("prompts", nargs="*", help="prompts to answer (default: --file, else one per line on stdin)")
    p.add_argument("--file", help="a text file with one prompt per line")
    direction = p.add_mutually_exclusive_group()
    direction.add_argument("--degree", type=float, default=0.0, help="θ in degrees: v = (cos θ, sin θ)")
    direction.add_argument("--weights", type=float, nargs=2, metavar=("HELP", "VERB"), help="any non-zero weights")
    direction.add_argument("--degrees", help="comma list of angles, e.g. --degrees=-45,45: every prompt at each in "
                                             "turn, the same answers as one --degree run per angle")
    # Model
    p.add_argument("--model", default=DEFAULT_MODEL, help="policy: checkpoint folder, embedded default or hub id")
    p.add_argument("--rm", help="reward model for --best-of-n reranking")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")
    add_engine_args(p)  # --engine hf|vllm, --tensor-parallel-size
    p.add_argument("--best-of-n", type=int, default=1, help="sample N answers, keep the best by vᵀr (needs --rm)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    # Output
    p.add_argument("--verbose", action="store_true", help="print the rendered system prompt and all candidates")
    args = p.parse_args(argv)
    check_flags(args, best_of_n="count", temperature="pos", top_p="prob", max_new_tokens="count", seed="seed",
                degree="finite", weights="finite", tensor_parallel_size="count")

    try:
        vs = ([weights_to_vector(*args.weights)] if args.weights else
              [degree_to_vector(d) for d in (parse_degrees(args.degrees, "--degrees") if args.degrees
                                             else [args.degree])])
        directions = [(v, vector_to_degree(v)) for v in vs]
        for _, degree in directions:
            degree_to_vector(degree)  # the DPA prompt covers helpfulness weights ≥ 0: θ in [-90°, 90°]
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.best_of_n > 1 and not args.rm:
        raise SystemExit("error: --best-of-n needs --rm (the reward model that ranks the candidates)")
    prompts = args.prompts or (read_prompts(args.file) if args.file else [l.strip() for l in sys.stdin if l.strip()])
    if not prompts:
        raise SystemExit("error: no prompt given (positional, --file or stdin)")
    device, dtype, _ = setup(args.seed, args.device)
    trust = args.trust_remote_code
    path = resolve_model(args.model, trust)
    tok = load_pretrained(AutoTokenizer, path, trust_remote_code=trust)
    tok.padding_side = "left"
    model = load_policy(args.engine, path, dtype, device, args.seed, args.tensor_parallel_size, trust)
    rm = load_rm(args.rm, device, dtype, trust_remote_code=trust) if args.rm else None  # score.py's loader

    for v, degree in directions:
        if args.verbose:
            print(f"[system] {system_prompt(degree)}\n")
        for i, prompt in enumerate(prompts):
            text = chat_text(tok, chat_messages(prompt, degree))
            # the seed depends on the prompt only: every angle gets the same random draws (runtime/engines.py)
            rows = generate(model, tok, [text] * args.best_of_n, args, args.seed * 100_003 + i)
            answers = [tok.decode(ids, skip_special_tokens=True).strip() for ids, _ in rows]
            best = 0
            if rm:
                r = np.array(rm.score([prompt] * len(answers), answers,
                                      [f"candidate {k}" for k in range(len(answers))])["rewards"])  # (N, K)
                best = best_of_n(r, v, rm.names)
                if args.verbose:
                    for k, a in enumerate(answers):
                        print(f"[candidate {k}] vᵀr = {directional_reward(r[k], v, rm.names):.1f}: {a[:80]!r}")
            print(f"[user] {prompt}\n[assistant θ={degree:g}°] {answers[best]}\n")


if __name__ == "__main__":
    cli(main)
