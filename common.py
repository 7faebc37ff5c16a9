"""The contracts every DPA stage must agree on, and nothing else (the runtime that makes the stages resumable, strict
and distributed lives in runtime/; a reader can skip it).

- the reward attributes (order, scale) and the two a direction acts on,
- direction θ ↔ unit vector v ↔ integer weights ↔ the DPA system prompt (DPA README, arXiv 2402.18571),
- the directional reward R = vᵀr and best-of-n selection,
- the text a reward model reads for (prompt, response) and its readout.
- user text → model input: special-token strings in a prompt or an answer stay text (neutral).
"""
import math
import re

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
ZWSP = "\u200b"  # zero-width space: splits a special-token string so the tokenizer no longer matches it


def neutral(tok, text, extra=()):
    """User text (a prompt, an answer) as plain text: every occurrence of a tokenizer's added/special token string
    (e.g. '<|im_start|>') gets a zero-width space after its first character, so tokenizing the rendered template never
    yields a special id from the text; special ids appear only where the template puts them. `extra`: other template
    markers to break the same way (the [INST] markers of the DPA RM template). Text without them is unchanged."""
    if not isinstance(text, str):
        return text
    pattern = getattr(tok, "_dpa_special_re", None)
    if pattern is None:
        added = [t.content for t in getattr(tok, "added_tokens_decoder", {}).values()]
        names = sorted({s for s in [*added, *getattr(tok, "all_special_tokens", [])] if s}, key=len, reverse=True)
        pattern = re.compile("|".join(map(re.escape, names))) if names else False
        try:
            tok._dpa_special_re = pattern
        except AttributeError:
            pass
    if pattern:
        text = pattern.sub(lambda m: m.group(0)[0] + ZWSP + m.group(0)[1:], text)
    for marker in extra:
        text = text.replace(marker, marker[0] + ZWSP + marker[1:])
    return text


def chat_text(tok, messages, add_generation_prompt=True):
    """The one place a conversation becomes policy input text: every message's content neutralised (neutral), then
    the tokenizer's chat template (render_chat). Tokenize the result with add_special_tokens=False."""
    msgs = [dict(m, content=neutral(tok, m["content"])) for m in messages]
    return render_chat(tok, msgs, add_generation_prompt)  # the system prompt where the template takes it


def chat_messages(prompt, degree, hint=None):
    """[system, user] messages for direction θ; an optional hint is appended to the system prompt."""
    system = system_prompt(degree) + (f" {hint}" if hint else "")
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


_SYSTEM_VIA = {}  # chat template → how it takes a system prompt (system_via)


def system_via(tokenizer):
    """How the tokenizer's chat template takes the DPA system prompt: "system" (a system turn of its own) or "user"
    (folded into the first user turn: templates without a system role, e.g. Mistral-Instruct v0.1, raise on a
    system message or drop it). Decided once per template by rendering a probe conversation."""
    key = tokenizer.chat_template
    if key not in _SYSTEM_VIA:
        probe = [{"role": "system", "content": "SYSTEM-PROBE"}, {"role": "user", "content": "hi"}]
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            _SYSTEM_VIA[key] = "system" if "SYSTEM-PROBE" in text else "user"
        except Exception as e:  # jinja2 TemplateError (raise_exception), or a template that cannot render at all
            try:
                tokenizer.apply_chat_template(probe[1:], tokenize=False, add_generation_prompt=True)
            except Exception as e2:
                raise SystemExit(f"error: the chat template of {tokenizer.name_or_path} renders neither a system nor "
                                 f"a user turn ({type(e2).__name__}: {e2})") from None
            _SYSTEM_VIA[key] = "user"
    return _SYSTEM_VIA[key]


def render_chat(tokenizer, messages, add_generation_prompt=True):
    """The model's own chat template on messages; a leading system message goes where system_via says: its own
    turn, or in front of the first user turn ("system\n\nuser", the folding Mistral's templates use)."""
    if messages and messages[0]["role"] == "system" and system_via(tokenizer) == "user":
        system, first, *rest = messages
        messages = [dict(first, content=f"{system['content']}\n\n{first['content']}"), *rest]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


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

