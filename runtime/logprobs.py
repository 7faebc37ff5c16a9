"""The policy's per-token log-probs for finetune.py: the LM head runs only where a label exists, and a frozen,
bias-free head (tied to the frozen embeddings) runs in chunks, so the (N, V) logits never exist whole."""
import torch
import torch.nn.functional as F


class LabelLogProbs(torch.autograd.Function):
    """log softmax(h Wᵀ)[y] per position, chunk by chunk, for a frozen, bias-free LM head W. → (N,) fp32
    h: (N, H), W: (V, H), y: (N,). The gradient w.r.t. h, ∂ log p_y / ∂h = −(softmax(h Wᵀ) − e_y) W, is formed in the
    forward pass, so neither the (N, V) logits nor their gradient outlive one chunk (RSF on the demo data, 8 rows per
    step: peak RSS 0.3-0.5 GB lower than with full logits; README, Performance). Under autocast the matmuls run in the
    autocast dtype. Same values and gradients as cross-entropy on full logits (tests/test_perf.py)."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk):
        if torch.is_autocast_enabled(h.device.type):
            weight = weight.to(torch.get_autocast_dtype(h.device.type))  # cast the 49k x H head once, not per chunk
        logp = torch.empty(len(h), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None  # (N, H) ∂ log p / ∂h
        for i in range(0, len(h), chunk):
            logits = F.linear(h[i:i + chunk].to(weight.dtype), weight).float()  # (c, V)
            y = labels[i:i + chunk, None]  # (c, 1)
            lse = torch.logsumexp(logits, -1, keepdim=True)  # (c, 1)
            logp[i:i + chunk] = (logits.gather(1, y) - lse)[:, 0]
            if grad is not None:
                p = logits.sub_(lse).exp_()  # softmax, in place of the logits
                p.scatter_add_(1, y, torch.full(y.shape, -1.0, device=p.device))  # softmax − one-hot
                grad[i:i + chunk] = -(p.to(weight.dtype) @ weight)
        ctx.save_for_backward(grad)
        return logp

    @staticmethod
    def backward(ctx, g):  # g: (N,) → (N, H)
        (grad,) = ctx.saved_tensors
        return g[:, None].to(grad.dtype) * grad, None, None, None


def token_logps(model, ids, attn, lmask, pos=None, chunk=512):
    """log π(y_t | y_<t, x) for every response token, and the row it belongs to. → (N,), (N,)
    Rows are right-padded (attn: the attention mask) or packed (attn None, pos: position ids restarting at every
    sequence; batching.pack). The 49k-wide LM head runs only where a label exists: prompt and padding positions never
    make logits; a frozen, bias-free head (tied to the frozen embeddings) runs in chunks of `chunk` positions
    (LabelLogProbs)."""
    h = model.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state  # (B,T,H)
    tmask = lmask[:, 1:]  # (B, T-1) position t predicts token t+1
    head, labels = model.lm_head, ids[:, 1:][tmask]
    if head.weight.requires_grad or head.bias is not None:  # an untied, trainable head: plain logits
        logp = -F.cross_entropy(head(h[:, :-1][tmask]).float(), labels, reduction="none")  # (N,)
    else:
        logp = LabelLogProbs.apply(h[:, :-1][tmask], head.weight, labels, chunk)  # (N,)
    rows = torch.arange(len(ids), device=ids.device).unsqueeze(1).expand_as(tmask)[tmask]
    return logp, rows
