"""The contracts every DPA stage must agree on, and nothing else (the runtime that makes the stages resumable, strict
and distributed lives in runtime/; a reader can skip it).

- the reward attributes (order, scale) and the two a direction acts on,
- direction θ ↔ unit vector v ↔ integer weights ↔ the DPA system prompt (DPA README, arXiv 2402.18571),
- the directional reward R = vᵀr and best-of-n selection,
- the text a reward model reads for (prompt, response) and its readout.
- user text → model input (chat_text, rm_text; the template plumbing they call is runtime/chat.py).
"""
import math

import numpy as np
import torch

from runtime.chat import neutral, render_chat  # template plumbing: special-token strings stay text

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


# ----------------------------------------------------------------------------- user text → model input
def chat_text(tok, messages, add_generation_prompt=True):
    """The one place a conversation becomes policy input text: every message's content neutralised (neutral), then
    the tokenizer's chat template (render_chat). Tokenize the result with add_special_tokens=False."""
    msgs = [dict(m, content=neutral(tok, m["content"])) for m in messages]
    return render_chat(tok, msgs, add_generation_prompt)  # the system prompt where the template takes it


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



# ----------------------------------------------------------------------------- reward-model input
DPA_RM_TEMPLATE = ("[INST] You must read the following conversation carefully and rate the assistant's response from "
                   "score 0-100 in these aspects: helpfulness, correctness, coherence, honesty, complexity, verbosity"
                   "\n\nUser: {prompt}\n\nAssistant: {response} [/INST]")
DPA_MARKERS = ("[INST]", "[/INST]")  # the DPA template's turn markers: plain text, neutralised in user text too


def rm_text(tokenizer, prompt, response, template="chat"):
    """The text a reward model reads for (prompt, response): the chat template ending at the response's end-of-turn
    token, or the released DPA RM's plain-string [INST] template (dpa_armo.md §1.2). No direction appears here:
    the RM rates the answer, the direction only weighs the ratings."""
    if template == "dpa":
        return DPA_RM_TEMPLATE.format(prompt=neutral(tokenizer, prompt, DPA_MARKERS),
                                      response=neutral(tokenizer, response, DPA_MARKERS))
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return chat_text(tokenizer, msgs, add_generation_prompt=False).rstrip("\n")


def rm_encode(tokenizer, texts, template="chat", **kw):
    """Token ids of rm_text(...) texts. A chat template writes its own special tokens (BOS) into the text; the DPA
    template is a plain string, tokenized as the released RM's model card does, with the tokenizer's own special
    tokens (a Mistral tokenizer's BOS <s>)."""
    return tokenizer(texts, add_special_tokens=template == "dpa", **kw)


def reward_forward(model, input_ids, attention_mask):
    """Multi-objective reward of a right-padded batch: bias-free linear head on the final-layer hidden state of the
    last real token (dpa_armo.md §1.2, §3). model: an AutoModelForSequenceClassification. → (B, K) fp32."""
    h = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    last = attention_mask.sum(1) - 1  # (B,) right padding: index of the last real token (the end-of-turn token)
    return model.score(h[torch.arange(len(h), device=h.device), last]).float()  # (B, K)

