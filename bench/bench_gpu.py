"""Throughput of the GPU path on a randomly initialised ~1.1B-parameter Llama (TinyLlama-1.1B's shape).

train     finetune.py's SFT step as it runs there: fp32 master weights, bf16 autocast, sdpa attention, token_logps
          (the LM head only on response tokens), AdamW fused on CUDA, gradient clipping; optional --compile
          (each decoder layer, as finetune.py --compile). → tokens/s, MFU, peak memory.
generate  sample.py's call: model.generate with sampling, bf16 weights, batch 1 / 32 / 128, a fixed number of new
          tokens; the dynamic KV cache, or with --static-cache the static one (transformers then compiles the
          decoding step on CUDA, as sample.py --static-cache). → new tokens/s.

    python bench/bench_gpu.py                       # CUDA; the numbers go to runs/bench_gpu.json
    python bench/bench_gpu.py --compile --static-cache
    python bench/bench_gpu.py --tiny                # any machine, e.g. a CPU: a 2-layer model checks the code path

MFU = model FLOPs per second / the GPU's peak dense bf16 FLOPs (H100 SXM and H200: 989 TFLOP/s, H100 PCIe 756,
A100 312; --peak-tflops for others). Model FLOPs per trained token (recomputation not counted):
    6·P_decoder + 6·V·d·f + 6·L·T·d
P_decoder the decoder-layer parameters (+ final norm), V·d the LM head, run on the share f of tokens that carry a
label, L·T·d causal attention (QKᵀ and AV over half the T×T square, forward + backward). The input embeddings are
frozen, as in finetune.py, and cost nothing.
"""
import argparse
import json
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runtime.dist import parallelize
from runtime.models import setup
from runtime.logprobs import token_logps

PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "GH200": 989, "A100": 312}  # dense bf16, first match


def config(tiny):
    if tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)
    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096,
                       tie_word_embeddings=False)  # 1.10B parameters


def flops_per_token(cfg, seq, label_share):
    """Model FLOPs of one trained token (see the module docstring)."""
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = d * cfg.num_key_value_heads // cfg.num_attention_heads
    p_layer = d * d * 2 + d * kv * 2 + 3 * d * cfg.intermediate_size + 2 * d  # q, o; k, v; gate, up, down; 2 norms
    return 6 * (L * p_layer + d) + 6 * V * d * label_share + 6 * L * seq * d


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_train(cfg, args, device, autocast):
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device).train()  # fp32 master weights
    model.model.embed_tokens.requires_grad_(False)   # as finetune.py
    fwd = parallelize(model, token_logps, compile=args.compile)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=device.startswith("cuda") or None)
    B, T = args.batch, args.seq
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    attn = torch.ones_like(ids)
    lmask = torch.zeros_like(ids, dtype=torch.bool)
    lmask[:, T // 4:] = True  # the first quarter is the prompt: no labels there, as in SFT rows
    label_share = lmask[:, 1:].float().mean().item()

    def step():
        with autocast():
            logp, _ = fwd(ids, attn, lmask)
        (-logp.mean()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(args.warmup):
        step()
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = B * T / dt
    n_params = sum(q.numel() for q in model.parameters())
    out = {"params_B": n_params / 1e9, "batch": B, "seq": T, "step_s": dt, "tokens_per_s": tok_s,
           "model_tflops_per_s": tok_s * flops_per_token(cfg, T, label_share) / 1e12,
           "peak_mem_GB": torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None}
    return out  # the model and optimizer go with this frame


@torch.no_grad()
def bench_generate(cfg, args, device, dtype, batch):
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), device=device)
    kw = {"attention_mask": torch.ones_like(ids), "do_sample": True, "temperature": 0.8, "top_k": 0,
          "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,  # a fixed amount of work
          "pad_token_id": 0, "eos_token_id": cfg.vocab_size - 1,
          "cache_implementation": "static" if args.static_cache else None}
    model.generate(ids, **kw)  # warm-up (and compilation with --static-cache on CUDA)
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, **kw)
    sync(device)
    dt = time.perf_counter() - t0
    assert out.shape == (batch, args.prompt_len + args.new_tokens)
    del model
    return {"batch": batch, "new_tokens": args.new_tokens, "seconds": dt, "new_tokens_per_s": batch * args.new_tokens / dt}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model, small sizes: checks the code path anywhere")
    p.add_argument("--batch", type=int, default=0, help="training rows per step (default 8; --tiny 2)")
    p.add_argument("--seq", type=int, default=0, help="tokens per training row (default 1024; --tiny 64)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--gen-batches", default="1,32,128")
    p.add_argument("--prompt-len", type=int, default=0, help="default 128; --tiny 16")
    p.add_argument("--new-tokens", type=int, default=0, help="default 256; --tiny 16")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer for training")
    p.add_argument("--static-cache", action="store_true", help="static KV cache for generation")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=0, help="peak dense bf16 TFLOP/s of the device (for MFU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--out", default="runs/bench_gpu.json")
    args = p.parse_args()
    args.batch = args.batch or (2 if args.tiny else 8)
    args.seq = args.seq or (64 if args.tiny else 1024)
    args.prompt_len = args.prompt_len or (16 if args.tiny else 128)
    args.new_tokens = args.new_tokens or (16 if args.tiny else 256)

    device, dtype, autocast = setup(0, args.device, args.dtype)
    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0) if cuda else args.peak_tflops
    cfg = config(args.tiny)
    cfg._attn_implementation = "sdpa"
    print(f"bench_gpu: {name} | {dtype} | {'tiny' if args.tiny else '1.1B'} Llama | compile {args.compile} | "
          f"static cache {args.static_cache} | torch {torch.__version__}")
    res = {"device": name, "dtype": str(dtype), "torch": torch.__version__, "args": vars(args), "peak_tflops": peak}
    if not args.skip_train:
        tr = bench_train(cfg, args, device, autocast)
        tr["mfu"] = tr["model_tflops_per_s"] / peak if peak else None
        res["train"] = tr
        mem = f"{tr['peak_mem_GB']:.1f} GB" if tr["peak_mem_GB"] is not None else "-"
        mfu = f"{100 * tr['mfu']:.1f}%" if tr["mfu"] is not None else "- (no peak known)"
        print(f"| train | {tr['params_B']:.2f}B params | batch {tr['batch']} × {tr['seq']} tokens | "
              f"{tr['step_s'] * 1e3:.0f} ms/step | {tr['tokens_per_s']:,.0f} tokens/s | "
              f"{tr['model_tflops_per_s']:.1f} TFLOP/s | MFU {mfu} | peak memory {mem} |")
        if cuda:
            torch.cuda.empty_cache()
    if not args.skip_generate:
        res["generate"] = []
        for b in (int(x) for x in args.gen_batches.split(",")):
            g = bench_generate(cfg, args, device, dtype, b)
            res["generate"].append(g)
            print(f"| generate | batch {b:4d} | {args.prompt_len} prompt + {args.new_tokens} new tokens | "
                  f"{g['seconds']:.2f} s | {g['new_tokens_per_s']:,.0f} new tokens/s |")
            if cuda:
                torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"bench_gpu: → {args.out}")


if __name__ == "__main__":
    main()
