"""Achieved FLOP/s of each stage's inner work against this machine's measured matmul peak, in one process.

  peak      torch.matmul in the stage dtype on the policy's own layer shapes and on a large square one; the best of
            them is the peak that the stages are compared with (what this CPU, this torch and this dtype can reach)
  sample    sample.generate_batch (sample.py's batched generation) on --batch DPA prompts, <= --max-new-tokens
  score     the reward model's backbone forward (no LM head) on --batch answers, the way score.py batches them
  train     one SFT step (forward + backward + AdamW) of the policy, --batch rows of --seq-len tokens, as finetune.py

Useful FLOPs per token are counted from the model's shapes (model_flops): 2·N for a forward, 6·N for a training
step, N = matmul weights touched per token (every linear layer; the tied LM head only where logits are computed),
plus attention 4·layers·d·context per token (forward). Sampling counts the prompt tokens once and every answer token
kept; the decoding steps of rows that already ended, and left padding, are work done but not useful, so a batch of
answers of very different lengths shows a low rate. The machine's AVX2-only case on a bf16 CPU:

    flock /tmp/heavy.lock .venv/bin/python bench/bench_peak.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 flock /tmp/heavy.lock .venv/bin/python bench/bench_peak.py
"""
import argparse
import platform
from types import SimpleNamespace

import benchlib as B
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from runtime.io import read_jsonl
from common import chat_messages
from sample import HINTS, generate_batch, make_jobs


def model_flops(cfg, tokens, context, forward_only=True, lm_head=True):
    """Useful FLOPs for `tokens` tokens with mean attention `context`: 2·N·t forward (6·N·t train) + attention."""
    d, L, kv = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads * (cfg.hidden_size //
                                                                               cfg.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * cfg.intermediate_size  # q, o; k, v; gate, up, down
    n = L * per_layer + (d * cfg.vocab_size if lm_head else 0)
    attn = 4 * L * d * context  # QKᵀ and AV: 2·d·context each, per layer
    return (2 * n + attn) * tokens * (1 if forward_only else 3)


def gemm_peak(dtype, shapes, reps):
    """Best FLOP/s of torch.matmul over shapes (M, K, N) in dtype (bf16 on CPUs with native bf16, else fp32)."""
    best = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.matmul(a, b)
        times = []
        for _ in range(reps):
            t = B.now()
            torch.matmul(a, b)
            times.append(B.now() - t)
        best[f"{m}x{k}x{n}"] = 2 * m * k * n / min(times)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.add_common_args(p, repeats=3, lengths=False)
    p.add_argument("--batch", type=int, default=32, help="prompts (sample), answers (score), rows (train)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args()
    device, dtype, autocast, path = B.init(args)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    cfg = policy.config
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = [(2048, d, f), (2048, f, d), (2048, d, d), (args.batch, d, f), (2048, 2048, 2048)]
    peaks = gemm_peak(dtype, shapes, reps=5)
    peak = max(peaks.values())
    cpu = platform.processor() or "cpu"
    print(f"peak: {torch.backends.cpu.get_cpu_capability()} {dtype} {args.threads} threads | " +
          " | ".join(f"{k} {v / 1e9:.1f}" for k, v in peaks.items()) + f" GFLOP/s | peak {peak / 1e9:.1f} ({cpu})")

    # sampling: sample.py's own batched generation under random DPA directions
    prompts = read_jsonl(f"{B.REPO}/data/prompts_train.jsonl")[:args.batch]
    jobs = make_jobs(prompts, 1, ["plain"], [], (-45.0, 45.0), args.seed)
    gen = SimpleNamespace(temperature=0.8, top_p=1.0, max_new_tokens=args.max_new_tokens, static_cache=False)
    n_prompt = [len(tok(tok.apply_chat_template(chat_messages(j["prompt"], j["degree"], HINTS[j["hint"]]), tokenize=False,
                                             add_generation_prompt=True), add_special_tokens=False)["input_ids"])
                for j in jobs]
    rates = {"sample": [], "score": [], "train": []}
    for rep in range(args.repeats):
        torch.manual_seed(rep)
        t = B.now()
        with torch.no_grad():
            res = generate_batch(policy, tok, jobs, gen, device)
        dt = B.now() - t
        useful = sum(model_flops(cfg, n_prompt[i] + k, (n_prompt[i] + k) / 2) for i, (_, k, _) in enumerate(res))
        rates["sample"].append(useful / dt)
    answers = [text for text, _, _ in res]

    # scoring: the RM backbone (no LM head) on the answers just sampled, padded batch as score.py forms it
    backbone = AutoModel.from_pretrained(path, dtype=dtype).eval()
    enc = tok([a or "." for a in answers], return_tensors="pt", padding=True)
    n_tok = int(enc["attention_mask"].sum())
    for rep in range(args.repeats):
        t = B.now()
        with torch.no_grad():
            backbone(**enc)
        rates["score"].append(model_flops(cfg, n_tok, enc["input_ids"].shape[1] / 2, lm_head=False) / (B.now() - t))

    # training: one SFT step of the policy (fp32 master weights, autocast as finetune.py), full rows
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, cfg.vocab_size, (args.batch // 4 or 1, args.seq_len))
    for rep in range(args.warmup + args.repeats):
        t = B.now()
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rep >= args.warmup:
            rates["train"].append(model_flops(cfg, ids.numel(), args.seq_len / 2, forward_only=False) / (B.now() - t))

    rows = [[k, f"{B.median(v) / 1e9:.1f}", B.fmt_raw([x / 1e9 for x in v]), f"{B.median(v) / peak:.0%}"]
            for k, v in rates.items()]
    B.print_table(f"Achieved useful GFLOP/s vs the measured matmul peak ({peak / 1e9:.1f} GFLOP/s, {dtype}, "
                  f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} threads)",
                  ["stage", "GFLOP/s (median)", "raw", "of peak"], rows)
    B.save(f"peak-{torch.backends.cpu.get_cpu_capability().lower()}", {
        "args": vars(args), "dtype": str(dtype), "peaks": peaks, "peak": peak, "rates": rates,
        "tokens": {"sample_new": sum(k for _, k, _ in res), "score": n_tok, "train": ids.numel()}})


if __name__ == "__main__":
    main()
