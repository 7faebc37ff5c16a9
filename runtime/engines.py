"""The two sampling engines of sample.py and steer.py: transformers' `generate` (--engine hf, the default) and vLLM's
offline `LLM.generate` (--engine vllm).

Both get the same input: the caller renders each prompt with the model's own chat template, and the HF tokenizer
turns that text into token ids (no special tokens added) for either engine. Both return, per prompt, the new token
ids up to the end-of-turn token and whether the answer ended there (False: cut at max_new_tokens).

HF decoding is our own loop (`sample_shrinking`): a row that ends leaves the batch and its KV cache, so a batch costs
the tokens its answers have, not batch size × its longest answer (`--static-cache` keeps transformers' `generate`).

Seeds. HF samples a batch from torch's global generator, seeded once per batch. vLLM seeds every request on its own,
with seeds drawn from the batch's seed, so an answer depends on its batch and row only, never on what else the
engine has in flight. The two engines draw different samples from the same distribution; greedy answers agree
(up to floating-point differences between their kernels).

vLLM is optional and imported only for --engine vllm: it pins its own transformers, so it lives in its own virtual
environment (`bash setup.sh --vllm` → .venv-vllm). One engine per process: data parallel is sample.py's --shard i/N
(one job per GPU or group of GPUs), tensor parallel within a job is --tensor-parallel-size.
"""
import inspect
import os
import random

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from runtime.models import load_pretrained

VLLM_INSTALL = "bash setup.sh --vllm, then run with .venv-vllm/bin/python"


def add_engine_args(p):
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="hf: transformers generate; vllm: vLLM offline inference (own venv: bash setup.sh --vllm)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="vLLM: GPUs one engine spans (tensor parallel); data parallel: one --shard job per engine")


class VLLMPolicy:
    """A vLLM engine on one model folder, with the attributes the stages read from an HF model (config, device)."""

    def __init__(self, path, dtype, seed, tensor_parallel_size=1, trust_remote_code=False):
        try:
            import vllm
        except ImportError:
            raise SystemExit(f"error: --engine vllm needs vLLM, which is not installed in this environment; "
                             f"install it with: {VLLM_INSTALL}") from None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("error: --engine vllm runs one engine per process, not under torchrun: run one "
                             "`--shard i/N` job per GPU (or per --tensor-parallel-size GPUs), then --merge N")
        self.SamplingParams = vllm.SamplingParams
        self.config = load_pretrained(AutoConfig, path, trust_remote_code=trust_remote_code)
        self.device = "vllm"
        # generation_config="vllm": no sampling defaults from the model's generation_config.json, so vLLM samples
        # with exactly the settings HF gets
        self.llm = vllm.LLM(model=path, tokenizer=path, dtype=str(dtype).removeprefix("torch."), seed=seed,
                            tensor_parallel_size=tensor_parallel_size, trust_remote_code=trust_remote_code,
                            generation_config="vllm")

    def generate(self, prompt_ids, gen, seed, eos_token_id):
        rng = random.Random(seed)  # one seed per request, drawn from the batch's seed
        params = [self.SamplingParams(temperature=gen.temperature, top_p=gen.top_p, max_tokens=gen.max_new_tokens,
                                      seed=rng.randrange(2 ** 31), detokenize=False,
                                      # stop at the tokenizer's end token only, as HF does (not also at other ids
                                      # listed as eos in generation_config.json)
                                      ignore_eos=True, stop_token_ids=[eos_token_id])
                  for _ in prompt_ids]
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        rows = []
        for out in outs:  # in request order
            c = out.outputs[0]
            ids = [t for t in c.token_ids if t != eos_token_id]  # the stop token, when vLLM keeps it
            rows.append((ids, c.finish_reason == "stop"))
        return rows


def load_policy(engine, path, dtype, device, seed, tensor_parallel_size=1, trust_remote_code=False):
    """--engine hf: the transformers model on device, in eval mode; vllm: a VLLMPolicy."""
    if engine == "vllm":
        return VLLMPolicy(path, dtype, seed, tensor_parallel_size, trust_remote_code)
    model = load_pretrained(AutoModelForCausalLM, path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval()


@torch.no_grad()
def generate(policy, tok, texts, gen, seed=None):
    """Sample one answer per rendered prompt text → [(new token ids without the end token, ended)].
    gen: temperature, top_p, max_new_tokens (and static_cache, HF only). seed: the batch's seed (HF: None keeps
    torch's generator as it is). tok: the HF tokenizer, left padding."""
    if isinstance(policy, VLLMPolicy):
        prompt_ids = tok(texts, add_special_tokens=False)["input_ids"]  # the same ids as HF's, without the padding
        return policy.generate(prompt_ids, gen, seed, tok.eos_token_id)
    static = getattr(gen, "static_cache", False)
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False,  # static cache: few distinct shapes
              pad_to_multiple_of=64 if static else None).to(policy.device)
    if seed is not None:
        torch.manual_seed(seed)
    if not static:
        return sample_shrinking(policy, enc["input_ids"], enc["attention_mask"], gen, tok.eos_token_id)
    out = policy.generate(**enc, do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=0,
                          max_new_tokens=gen.max_new_tokens, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, cache_implementation="static")
    rows = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():  # (B, <= max_new_tokens) new tokens
        ended = tok.eos_token_id in row
        rows.append((row[:row.index(tok.eos_token_id)] if ended else row, ended))
    return rows


def top_p_filter(logits, top_p):
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens whose probability reaches top_p (the
    most likely token always), the rest get -inf. logits: (B, V) → (B, V)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop_sorted = probs.cumsum(-1) - probs >= top_p  # the mass ranked above a token already reaches top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def sample_shrinking(model, ids, mask, gen, eos_token_id):
    """Ancestral sampling with a KV cache whose batch shrinks: a row that emits the end token leaves the batch (its
    cache rows are dropped), so each decoding step computes only the answers still being written, not the whole
    batch until its longest answer ends (what `generate` does). ids, mask: (B, P) left-padded prompts.
    Returns [(new token ids without the end token, ended)] in row order; torch's global generator draws the tokens."""
    from transformers import DynamicCache
    n = ids.shape[0]
    cache = DynamicCache()  # transformers renamed forward's past_key_values to cache (5.2x)
    kv = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P) positions that skip the left padding
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kv, use_cache=True,
                   logits_to_keep=1).logits[:, -1]  # (B, V)
    live = torch.arange(n)                          # which original row each batch row is
    next_pos = pos[:, -1] + 1                       # (B,)
    new, ended = [[] for _ in range(n)], [False] * n
    for step in range(gen.max_new_tokens):
        probs = top_p_filter(logits.float() / gen.temperature, gen.top_p).softmax(-1)
        token = torch.multinomial(probs, 1)[:, 0]   # (B,)
        for row, t in zip(live.tolist(), token.tolist()):
            if t == eos_token_id:
                ended[row] = True
            else:
                new[row].append(t)
        going = token != eos_token_id
        if step == gen.max_new_tokens - 1 or not going.any():
            break
        if not going.all():  # finished rows leave the batch and its cache
            keep = going.nonzero()[:, 0]
            cache.batch_select_indices(keep.to(ids.device))
            live, token, mask, next_pos = live[keep.cpu()], token[keep], mask[keep], next_pos[keep]
        mask = torch.cat([mask, mask.new_ones(len(token), 1)], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       **kv, use_cache=True).logits[:, -1]
        next_pos = next_pos + 1
    return [(new[i], ended[i]) for i in range(n)]
