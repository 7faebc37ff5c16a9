"""ArmoRM (arXiv 2406.12845) for train_rm.py --method probe | gate, and its folder format read by score.py.

Stage 1, the probe: the backbone stays frozen; its last-token features are computed once (cached on disk, keyed by
data + backbone) and each objective gets its own ridge regression w_k (no bias), α picked on a validation split.
Stage 2, the gate: a gating MLP on the prompt feature f(x) (hidden state at the end of the user turn) weights the
de-biased rewards, R(x, y) = Σ_k g_k(f(x)) · (r T)_k, trained with a Bradley-Terry loss on preference pairs.
The folder: meta.json + armo.safetensors (regression_weight (K, H), reward_transform_matrix (K, K), gate.*,
logit_scale). train_rm.py holds the regression method and the evaluation shared by all three, rm_data.py the data
path.
"""
import hashlib
import json
import math
import os
import random
import time

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from common import ATTRIBUTES, DPA_MARKERS, DPA_RM_TEMPLATE, VERBOSITY, chat_text, rm_encode, rm_text
from runtime.chat import neutral
from runtime.io import atomic_write, read_meta, write_json
from runtime.models import get_lr
from runtime.resume import check_finite_loss, model_stamp
from tools.stats import spearman


# ============================================================================= shared math (pairs)
def pair_accuracy(s_chosen, s_rejected):
    """Fraction of pairs ranked right, s_chosen > s_rejected (ties count half). (P,), (P,) → float."""
    s_chosen, s_rejected = np.asarray(s_chosen, float), np.asarray(s_rejected, float)
    return float(((s_chosen > s_rejected) + 0.5 * (s_chosen == s_rejected)).mean()) if len(s_chosen) else float("nan")


# ============================================================================= frozen features (probe and gate)
def rm_prompt_text(tokenizer, prompt, template="chat"):
    """The start of rm_text(...) that ends with the user turn: the conversation rendered without the assistant turn.
    Its last token is where a gated RM reads the prompt feature (ArmoRM stage 2, dpa_armo.md §2.2)."""
    if template == "dpa":
        return DPA_RM_TEMPLATE[:DPA_RM_TEMPLATE.index("{prompt}")] + neutral(tokenizer, prompt, DPA_MARKERS)
    return chat_text(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=False).rstrip("\n")


def user_turn_end(full_text, prompt_text, offsets):
    """Index of the token that ends the user turn: the token covering the last character of `prompt_text` (the
    conversation rendered without the assistant turn) inside `full_text` (rendered with it). offsets: (start, end)
    character spans of full_text's tokens. Found from the rendered template, so no token id is hard-coded."""
    if not prompt_text or not full_text.startswith(prompt_text):
        raise ValueError("the template renders the conversation without the assistant turn differently from its "
                         "start with it, so the end of the user turn cannot be located for the gating feature: "
                         f"{prompt_text[-60:]!r} is not a prefix of {full_text[:80]!r}…")
    n = len(prompt_text)
    ends = [i for i, (s, e) in enumerate(offsets) if e > s and s < n]
    if not ends:
        raise ValueError(f"no token of {full_text[:80]!r} covers the user turn")
    return ends[-1]


def encode_items(tok, items, template, max_len):
    """(prompt, response) items → [(token ids truncated to max_len, index of the user turn's last token or -1 when
    the truncation cut into the prompt)]. Same text and truncation as the regression method."""
    out = []
    for prompt, response in items:
        full = rm_text(tok, prompt, response, template)
        enc = rm_encode(tok, full, template, return_offsets_mapping=True)
        try:
            end = user_turn_end(full, rm_prompt_text(tok, prompt, template), enc["offset_mapping"])
        except ValueError as e:
            raise SystemExit(f"error: template {template!r} of {tok.name_or_path}: {e}") from None
        ids = enc["input_ids"][:max_len]
        out.append((ids, end if end < len(ids) else -1))
    return out


@torch.no_grad()
def compute_features(backbone, encoded, batch_size, device, autocast, pad_id=0):
    """Final-layer hidden states (after the final norm) of a frozen backbone, from one forward pass per item: at the
    last real token (response feature, ArmoRM stage 1) and at the end of the user turn (prompt feature, stage 2; causal
    attention makes it see the prompt only). Length-sorted right-padded batches; output in input order.
    encoded: [(ids, prompt_end)] → resp (N, H), prompt (N, H) fp32 (zeros where prompt_end is -1), prompt_ok (N,)."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    H = backbone.config.hidden_size
    resp, prompt = torch.zeros(len(encoded), H), torch.zeros(len(encoded), H)
    ok = torch.tensor([e[1] >= 0 for e in encoded])
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        T = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(encoded[i][0])] = torch.tensor(encoded[i][0])
            mask[r, :len(encoded[i][0])] = 1
        with autocast():
            h = backbone(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state  # (B, T, H)
        rows = torch.arange(len(idx), device=h.device)
        resp[idx] = h[rows, mask.sum(1).to(h.device) - 1].float().cpu()
        pe = torch.tensor([max(encoded[i][1], 0) for i in idx], device=h.device)
        prompt[idx] = h[rows, pe].float().cpu()
    prompt[~ok] = 0
    return resp, prompt, ok


def cached_features(args, items, tok, path, device, dtype, autocast):
    """compute_features over `items`, each item computed once: features are stored per item (keyed by a hash of its
    prompt and response) in shards under --feature-cache/<hash of backbone, dtype, template, max_len>/, so a later run
    on the same or overlapping data computes only the items it has not seen. → resp, prompt, prompt_ok, seconds."""
    config = json.dumps([model_stamp(path), str(dtype), args.template, args.max_len])
    folder = os.path.join(args.feature_cache, hashlib.sha256(config.encode()).hexdigest()[:16])
    keys = [hashlib.sha256(json.dumps(it).encode()).hexdigest()[:32] for it in items]
    have = {}
    for shard in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if shard.endswith(".safetensors"):
            with safe_open(os.path.join(folder, shard), "pt") as f:
                shard_keys = json.loads(f.metadata()["keys"])
                t = {n: f.get_tensor(n) for n in ("response", "prompt", "prompt_ok")}
            have.update({k: (t["response"][i], t["prompt"][i], bool(t["prompt_ok"][i]))
                         for i, k in enumerate(shard_keys)})
    missing = list(dict.fromkeys(k for k in keys if k not in have))
    t0 = time.time()
    if missing:
        todo = [items[keys.index(k)] for k in missing]
        backbone = AutoModel.from_pretrained(path, dtype=torch.float32,
                                             trust_remote_code=getattr(args, "trust_remote_code", False))
        backbone = backbone.to(device).eval()
        resp, prompt, ok = compute_features(backbone, encode_items(tok, todo, args.template, args.max_len),
                                            args.batch_size, device, autocast, tok.pad_token_id or 0)
        del backbone
        os.makedirs(folder, exist_ok=True)
        file = os.path.join(folder, f"shard-{hashlib.sha256(''.join(missing).encode()).hexdigest()[:16]}.safetensors")
        atomic_write(file, lambda tmp: save_file({"response": resp, "prompt": prompt, "prompt_ok": ok.to(torch.uint8)},
                                                 tmp, metadata={"keys": json.dumps(missing)}))
        have.update({k: (resp[i], prompt[i], bool(ok[i])) for i, k in enumerate(missing)})
    dt = time.time() - t0
    print(f"features: {len(items)} items, {len(items) - len(missing)} from the cache {folder}, {len(missing)} computed"
          f" in {dt:.1f}s ({len(missing) / max(dt, 1e-9):.1f}/s)")
    rows = [have[k] for k in keys]
    return (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
            torch.tensor([r[2] for r in rows]), dt)


# ============================================================================= method 2: probe (ArmoRM stage 1)
RIDGE_ALPHAS = [10.0 ** e for e in range(-4, 5)]  # the decades 1e-4 … 1e4 ArmoRM sweeps


def ridge_path(X, y, alphas):
    """Ridge regression without intercept for every α: w_α = argmin ‖Xw − y‖² + α‖w‖² = (XᵀX + αI)⁻¹ Xᵀy, from one
    eigendecomposition XᵀX = Q diag(s) Qᵀ: w_α = Q diag(1 / (s + α)) Qᵀ Xᵀy.  X (N, H), y (N,) → (A, H) float64."""
    X, y = X.double(), y.double()
    s, Q = torch.linalg.eigh(X.T @ X)
    b = Q.T @ (X.T @ y)                                                     # (H,)
    a = torch.tensor(alphas, dtype=torch.float64)[:, None]                  # (A, 1)
    return (b / (s.clamp(min=0) + a)) @ Q.T                                 # (A, H)


def fit_probe(F, Y, fit_idx, val_idx, alphas):
    """One ridge per objective on the rows labelled for it (ArmoRM stage 1). F (N, H) features, Y (N, K) targets on
    0-100 with NaN = missing; α with the lowest validation MSE, then refit on fit ∪ val rows with that α.
    → W (K, H) float32, {k: α or None (no label: w_k = 0)}, {k: validation MSE per α}."""
    W, chosen, sweep = torch.zeros(Y.shape[1], F.shape[1]), {}, {}
    for k in range(Y.shape[1]):
        fi = [i for i in fit_idx if not math.isnan(Y[i, k])]
        vi = [i for i in val_idx if not math.isnan(Y[i, k])]
        if not fi + vi:
            chosen[k] = None
            continue
        alpha = 1.0  # when one side has no labels: the middle of the grid
        if fi and vi:
            path = ridge_path(F[fi], Y[fi, k], alphas)                          # (A, H)
            mse = ((F[vi].double() @ path.T - Y[vi, k, None].double()) ** 2).mean(0)  # (A,)
            sweep[k] = mse.tolist()
            alpha = alphas[int(mse.argmin())]
        W[k] = ridge_path(F[fi + vi], Y[fi + vi, k], [alpha])[0].float()
        chosen[k] = alpha
    return W, chosen, sweep


# ============================================================================= method 3: gate (ArmoRM stage 2)
DEBIAS_GRID = [0, .01, .025, .05, .075, .1, .125, .15] + [round(.2 + .05 * i, 3) for i in range(16)]  # … .95


class GatingNetwork(torch.nn.Module):
    """g(f) = β · softmax(MLP(f) / τ), softmax over the K objectives (ArmoRM stage 2). MLP: n_hidden ReLU layers of
    `hidden` units; τ fixed (ArmoRM: 10); β = logit_scale learnable. f (B, H) → (B, K), rows sum to β.
    ArmoRM starts β at 1 on rewards in [0, 1]; on our 0-100 rewards the same starting score is β = 0.01 (with β = 1,
    BT logits of tens of nats made the gate flee to the zeroed verbosity objective: a constant loss of log 2).
    Objectives marked inactive (no training label at all, so their reward is 0) get weight 0."""

    def __init__(self, in_dim, n_objectives, hidden=1024, n_hidden=3, temperature=10.0, dropout=0.0, active=None,
                 scale_init=0.01):
        super().__init__()
        self.register_buffer("active", torch.ones(n_objectives, dtype=torch.bool) if active is None else active)
        layers, d = [], in_dim
        for _ in range(n_hidden):
            layers += [torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
            d = hidden
        self.mlp = torch.nn.Sequential(*layers, torch.nn.Linear(d, n_objectives))
        self.temperature = temperature
        self.logit_scale = torch.nn.Parameter(torch.full((1,), scale_init))

    def forward(self, f):
        logits = self.mlp(f).masked_fill(~self.active, float("-inf")) / self.temperature  # (B, K)
        return torch.softmax(logits, dim=-1) * self.logit_scale  # dim -1: over the objectives of each row


class ArmoHead(torch.nn.Module):
    """The ArmoRM head on frozen features. rewards r = W f(x, y)  (bias-free probe, (B, K));
    with a gate: gating g = g(f(x)) (B, K) and score R = Σ_k g_k (r T)_k = Σ_j r_j (g Tᵀ)_j (B,)."""

    def __init__(self, W, T=None, gate=None):
        super().__init__()
        self.register_buffer("regression_weight", W.float())                                      # (K, H)
        self.register_buffer("reward_transform_matrix", torch.eye(len(W)) if T is None else T.float())  # (K, K)
        self.gate = gate

    def forward(self, f_response, f_prompt=None):
        rewards = f_response @ self.regression_weight.T                                           # (B, K)
        if self.gate is None:
            return rewards, None, None
        gating = self.gate(f_prompt)                                                              # (B, K)
        return rewards, gating, (gating * (rewards @ self.reward_transform_matrix)).sum(-1)       # (B,)


def debias_matrix(R, verb, grid=DEBIAS_GRID, threshold=0.03):
    """Verbosity de-bias transform of ArmoRM stage 2. R (N, K): rewards of a reference set; verb: verbosity's index.
    λ_i = the smallest λ on the grid with Spearman(r_i − λ r_verb, r_verb) ≤ threshold (1 when none passes; a constant
    column counts as uncorrelated); λ_verb = 1. → T (K, K) with r' = r T, i.e. r'_i = r_i − λ_i r_verb:
    T = I − e_verb λᵀ, so T's verbosity column is zero (r'_verb ≡ 0; in the column-vector form r' = Tᵀ r it is
    Tᵀ's verbosity row), and λ (K,)."""
    K = R.shape[1]
    lam = torch.ones(K)
    for i in range(K):
        if i == verb:
            continue
        for g in grid:
            rho = spearman(R[:, i] - g * R[:, verb], R[:, verb])
            if math.isnan(rho) or rho <= threshold:
                lam[i] = g
                break
    T = torch.eye(K)
    T[verb] -= lam
    return T, lam


def bt_loss(score_chosen, score_rejected):
    """Bradley-Terry loss −log σ(R_c − R_r), mean over pairs. (P,), (P,) → scalar."""
    return torch.nn.functional.softplus(score_rejected - score_chosen).mean()


def train_gate(gate, f_prompt, r_chosen, r_rejected, T, args):
    """Fit the gate (and β) on pairs with the BT loss; backbone and W stay frozen, so the rewards are precomputed.
    The transform T is applied to both rewards (the reference script computes it and then leaves it unused), and the
    softmax runs over objectives for each pair (not over the pair axis). f_prompt (P, H), r_* (P, K)."""
    rc, rr = r_chosen @ T, r_rejected @ T                                   # (P, K) de-biased rewards
    opt = torch.optim.AdamW(gate.parameters(), lr=args.gate_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    gate.train()
    for step in range(args.gate_steps):
        for group in opt.param_groups:  # cosine from gate_lr to 0, no warmup
            group["lr"] = get_lr(step, args.gate_steps, 0, args.gate_lr, floor=0.0)
        idx = torch.randint(len(f_prompt), (args.gate_batch,), generator=gen)  # ArmoRM: batches drawn with replacement
        g = gate(f_prompt[idx])                                             # (B, K)
        sc, sr = (g * rc[idx]).sum(-1), (g * rr[idx]).sum(-1)               # (B,)
        loss = bt_loss(sc, sr)
        check_finite_loss(loss, step + 1, "--gate-lr, --gate-scale-init")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.gate_steps:
            print(f"gate step {step + 1}/{args.gate_steps} | bt loss {loss.item():.4f} | batch acc "
                  f"{pair_accuracy(sc.detach(), sr.detach()):.3f} | β {gate.logit_scale.item():.4f} | "
                  f"lr {get_lr(step + 1, args.gate_steps, 0, args.gate_lr, floor=0.0):.1e}", flush=True)
    return gate.eval()


# ============================================================================= probe/gate folder format
ARMO_FILE = "armo.safetensors"


def save_armo(out, head, meta):
    """meta.json (backbone reference, attributes, scale, template, max_len, gate shape, α, λ) + armo.safetensors."""
    tensors = {"regression_weight": head.regression_weight, "reward_transform_matrix": head.reward_transform_matrix}
    if head.gate is not None:
        tensors.update({f"gate.{k}": v for k, v in head.gate.state_dict().items()})
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, ARMO_FILE))
    write_json(os.path.join(out, "meta.json"), meta)  # last: the run is finished


def load_armo(folder):
    """A probe/gate folder → (ArmoHead, meta)."""
    meta = read_meta(folder)
    for key in ("attributes", "backbone"):
        if key not in meta:
            raise SystemExit(f"error: {folder}/meta.json has no '{key}': not a finished train_rm.py probe/gate folder")
    try:
        t = load_file(os.path.join(folder, ARMO_FILE))
    except Exception as e:  # noqa: BLE001 — a truncated or corrupt safetensors file
        raise SystemExit(f"error: cannot load {folder}/{ARMO_FILE} ({type(e).__name__}: {e}); re-create the "
                         f"folder") from None
    gate = None
    if meta.get("gate"):
        g = meta["gate"]
        gate = GatingNetwork(g["in_dim"], len(meta["attributes"]), g["hidden"], g["n_hidden"], g["temperature"])
        gate.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("gate.")})
        gate.eval()
    return ArmoHead(t["regression_weight"], t["reward_transform_matrix"], gate).eval(), meta


def train_armo(args, rows, pairs, val_groups, tok, path, device, dtype, autocast):
    """Probe (and gate) on cached frozen features; rows: train_rm's rating rows, val_groups: the held-out prompts. → (head, predict(items) → (rewards, score or None), meta extras)."""
    items = list(dict.fromkeys([(r["prompt"], r["response"]) for r in rows] + [(p["prompt"], x) for p in pairs
                                                                 for x in (p["chosen"], p["rejected"])]))
    index = {it: i for i, it in enumerate(items)}
    F, P, _, feat_s = cached_features(args, items, tok, path, device, dtype, autocast)
    t0 = time.time()
    # stage 1: ridge per objective; α chosen on a split of the training prompts
    train = [r for r in rows if r["group"] not in val_groups]
    rng = random.Random(args.seed + 1)
    groups = sorted({r["group"] for r in train})
    sweep_val = set(rng.sample(groups, max(1, int(args.ridge_val_frac * len(groups))))) if len(groups) > 1 else set()
    Y = torch.full((len(items), len(ATTRIBUTES)), float("nan"))
    for r in train:
        i = index[(r["prompt"], r["response"])]  # the same text rated by several sources keeps every label
        Y[i] = torch.where(torch.tensor(r["mask"]) > 0, torch.tensor(r["target"]) * 100, Y[i])
    fit_idx = [index[(r["prompt"], r["response"])] for r in train if r["group"] not in sweep_val]
    val_idx = [index[(r["prompt"], r["response"])] for r in train if r["group"] in sweep_val]
    W, alphas, sweep = fit_probe(F, Y, fit_idx, val_idx, args.ridge_alphas)
    for k, a in enumerate(ATTRIBUTES):
        if alphas[k] is not None:
            print(f"probe {a:38s} α {alphas[k]:g} | sweep val mse {min(sweep[k]) if k in sweep else float('nan'):.1f} "
                  f"| {int((~Y[fit_idx + val_idx, k].isnan()).sum())} labelled rows")
    extra = {"ridge_alpha": {a: alphas[k] for k, a in enumerate(ATTRIBUTES)}, "feature_seconds": round(feat_s, 1)}
    head = ArmoHead(W)
    if args.method == "gate":
        verb = ATTRIBUTES.index(VERBOSITY)
        tp = [p for p in pairs if p["prompt_id"] not in val_groups]
        if not tp:
            raise SystemExit("error: --method gate needs training preference pairs (--pairs, or pairs in --data)")
        ci = torch.tensor([index[(p["prompt"], p["chosen"])] for p in tp])
        ri = torch.tensor([index[(p["prompt"], p["rejected"])] for p in tp])
        ref = torch.cat([F[ci], F[ri]]) @ W.T  # reference set: the training pairs' responses, pooled
        T, lam = debias_matrix(ref, verb, threshold=args.debias_threshold)
        print("debias λ (others 0): " + ", ".join(f"{a} {lam[k]:g}" for k, a in enumerate(ATTRIBUTES) if lam[k]))
        torch.manual_seed(args.seed)
        gate = GatingNetwork(F.shape[1], len(ATTRIBUTES), args.gate_hidden, args.gate_layers,
                             args.gate_temperature, args.gate_dropout,
                             active=torch.tensor([a is not None for a in alphas.values()]),
                             scale_init=args.gate_scale_init)
        head = ArmoHead(W, T, train_gate(gate, P[ci], F[ci] @ W.T, F[ri] @ W.T, T, args))
        extra.update(gate={"in_dim": F.shape[1], "hidden": args.gate_hidden, "n_hidden": args.gate_layers,
                           "temperature": args.gate_temperature},
                     debias={"lambda": {a: float(lam[k]) for k, a in enumerate(ATTRIBUTES)},
                             "threshold": args.debias_threshold, "reference": "training pairs, chosen + rejected"},
                     gate_pairs=len(tp))
    extra["fit_seconds"] = round(time.time() - t0, 1)

    @torch.no_grad()
    def predict(its):
        i = torch.tensor([index[it] for it in its], dtype=torch.long)
        rewards, _, score = head(F[i], P[i])
        return rewards.numpy(), None if score is None else score.numpy()
    return head, predict, extra
