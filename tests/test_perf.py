"""The performance changes measured in bench/ keep the math: finetune.py's chunked LM head (runtime/logprobs.py)
gives the same log-probs and gradients as full logits, its packed rows the same as padded ones, and train_rm.py's
length-sorted chunks (runtime/batching.py) give the same predictions and gradients as one padded forward. Tiny random model only (the timings live in bench/,
not in tests).

    python -m pytest tests/test_perf.py -q
"""
import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import reward_forward, rm_text
from runtime import batching, logprobs
from tools import policy_data


# ----------------------------------------------------------------------------- runtime.logprobs.LabelLogProbs
@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_label_logprobs_equals_cross_entropy_values_and_gradient(chunk):
    torch.manual_seed(0)
    N, H, V = 37, 16, 101
    h = torch.randn(N, H, requires_grad=True)
    W, y, g = torch.randn(V, H), torch.randint(0, V, (N,)), torch.randn(N)
    ref = -F.cross_entropy(F.linear(h, W), y, reduction="none")  # (N,)
    (ref * g).sum().backward()
    ref_grad, h.grad = h.grad.clone(), None
    out = logprobs.LabelLogProbs.apply(h, W, y, chunk)
    (out * g).sum().backward()
    assert out.dtype == torch.float32 and out.shape == (N,)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(h.grad, ref_grad, atol=1e-5)
    with torch.no_grad():  # the DPO reference pass: values only, no gradient formed
        assert torch.allclose(logprobs.LabelLogProbs.apply(h, W, y, chunk), ref, atol=1e-5)


def test_label_logprobs_hand_computed_and_empty():
    h = torch.tensor([[1.0, 0.0]], requires_grad=True)
    W = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]])  # logits (2, 0, 0) for h
    out = logprobs.LabelLogProbs.apply(h, W, torch.tensor([0]), 4)
    assert out.item() == pytest.approx(-np.log(1 + 2 * np.exp(-2)), abs=1e-6)  # 2 − log(e² + 1 + 1)
    out.backward()
    p = np.array([np.exp(2), 1, 1]) / (np.exp(2) + 2)  # ∂/∂h = W_y − Σ_v p_v W_v
    assert h.grad[0].tolist() == pytest.approx([2 - 2 * p[0], -p[2]], abs=1e-6)
    empty = torch.zeros(0, 2, requires_grad=True)
    e = logprobs.LabelLogProbs.apply(empty, W, torch.zeros(0, dtype=torch.long), 4)
    e.sum().backward()  # a micro-batch without response tokens still backpropagates
    assert e.shape == (0,) and empty.grad.shape == (0, 2)


def test_token_logps_chunked_head_equals_full_logits_and_gradients(tiny_model_dir, tokenizer):
    """finetune.py freezes the embeddings, so the tied head runs chunked; an untied trainable head runs the plain
    path. Both give the same log-probs and the same gradients for the decoder layers."""
    from transformers import AutoModelForCausalLM
    tok = tokenizer
    seqs = [policy_data.encode(tok, "Hi", 0, "Hello there, friend.", False, 512),
            policy_data.encode(tok, "Tell me a longer story please?", 45, "Once upon a time", True, 512)]
    ids, attn, lmask = batching.collate(seqs, tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    grads, logps = [], []
    for frozen in (True, False):
        model.model.embed_tokens.requires_grad_(not frozen)  # tied: the head's weight is the same tensor
        model.zero_grad(set_to_none=True)
        logp, rows = logprobs.token_logps(model, ids, attn, lmask, chunk=5)
        logp.sum().backward()
        logps.append(logp.detach())
        grads.append([q.grad.clone() for q in model.model.layers.parameters()])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.allclose(logps[0], logps[1], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))
    assert rows.tolist() == [i for i, (s, n) in enumerate(seqs) for _ in range(len(s) - n)]


def test_pack_lays_sequences_end_to_end_within_the_longest():
    seqs = [([1] * 5, 2), ([2] * 3, 1), ([3] * 2, 1), ([4] * 4, 2)]
    ids, pos, lmask, where = batching.pack(seqs, pad_id=0)
    assert ids.shape == (3, 5)  # first-fit decreasing: [5], [4], [3 + 2]
    assert where == [(0, 0), (2, 0), (2, 3), (1, 0)]
    assert ids[2].tolist() == [2, 2, 2, 3, 3] and ids[1].tolist() == [4, 4, 4, 4, 0]
    assert pos[2].tolist() == [0, 1, 2, 0, 1] and pos[1].tolist() == [0, 1, 2, 3, 0]  # the padding: its own sequence
    assert lmask[2].tolist() == [False, True, True, False, True] and lmask[1].tolist() == [False, False, True, True,
                                                                                             False]
    ids, pos, lmask, where = batching.pack(seqs, pad_id=0, packed=False)  # one right-padded row each
    assert ids.shape == (4, 5) and where == [(0, 0), (2, 0), (3, 0), (1, 0)] and pos[3].tolist() == [0, 1, 0, 1, 2]


@pytest.mark.parametrize("decision_coef", [0.0, 0.5])
def test_finetune_packed_rows_equal_padded_rows(tiny_model_dir, tokenizer, decision_coef):
    """finetune.py --pack: a micro-batch's sequences laid end to end give the same summed log-probs per row (in
    micro-batch order), the same sft_loss and the same gradients as one padded row each, and those equal the
    attention-masked padded forward of batching.collate."""
    from transformers import AutoModelForCausalLM

    import finetune
    tok = tokenizer
    texts = ["Hi.", "Hello there, friend. How are you today?", "Once upon a time", "A much longer answer " * 30]
    data = [(policy_data.encode(tok, "Q?", 15 * i, a, False, 512), policy_data.encode(tok, "Q?", 15 * i, a[:5], False,
                                                                                      512)) for i, a in enumerate(texts)]
    decide = [[len(c[0]) - 1] for c, _ in data]  # each target's end-of-turn token
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.model.embed_tokens.requires_grad_(False)
    seqs = [data[i][0] for i in (0, 1, 2, 3)] + [data[i][1] for i in (3, 1)]
    assert batching.pack(seqs, tok.pad_token_id)[0].shape[0] < len(seqs)  # something is packed
    with torch.no_grad():  # the masked padded forward, summed per row
        logp, row = logprobs.token_logps(model, *batching.collate(seqs, tok.pad_token_id))
        masked = torch.zeros(len(seqs)).index_add_(0, row, logp)
    out = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        seq, nll = finetune.micro_batch_logps(lambda *a: logprobs.token_logps(model, *a), data, [0, 1, 2, 3], [3, 1],
                                              tok.pad_token_id, "cpu", contextlib.nullcontext, packed, decide,
                                              decision_coef)
        (seq.sum() + nll).backward()
        out.append((seq.detach(), nll.detach(), [q.grad.clone() for q in model.model.layers.parameters()]))
    (s1, n1, g1), (s2, n2, g2) = out
    assert s1.shape == (6,) and torch.allclose(s1, masked, atol=1e-5)
    assert torch.allclose(s1, s2, atol=1e-5) and torch.allclose(n1, n2, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))


def test_packing_check_turns_packing_off_for_a_model_that_does_not_mask_by_position_ids(tiny_model_dir, tokenizer,
                                                                                          monkeypatch):
    """batching.packing_is_exact: with transformers' block-causal mask from the position ids, packed rows give the
    padded log-probs (Δ ≈ 0); with that mask gone (as in model code that ignores position ids) the sequence placed
    second in a row sees the first, and the check fails, so finetune.py trains on padded rows."""
    import transformers.masking_utils as masking
    from transformers import AutoModelForCausalLM

    import finetune
    tok = tokenizer
    texts = ["Hi.", "Hello there, friend. How are you today?", "Once upon a time", "A much longer answer " * 30]
    data = [(policy_data.encode(tok, "Q?", 15 * i, a, False, 512), None) for i, a in enumerate(texts)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def logps_of(idx, packed):
        return finetune.micro_batch_logps(lambda *a: logprobs.token_logps(model, *a), data, idx, (), tok.pad_token_id,
                                          "cpu", contextlib.nullcontext, packed)[0]
    plan = [[3], [0, 1, 2, 3]]  # the first micro-batch packs nothing: the check takes the second
    ok, diff = batching.packing_is_exact(logps_of, data, plan, tok.pad_token_id, 1e-4)
    assert ok and diff < 1e-5
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    ok, diff = batching.packing_is_exact(logps_of, data, plan, tok.pad_token_id, 1e-4)
    assert not ok and diff > 1e-4
    assert batching.packing_is_exact(logps_of, data, [[3]], tok.pad_token_id, 1e-4) == (True, 0.0)  # nothing to pack


# ----------------------------------------------------------------------------- runtime.batching.sorted_forward
@pytest.mark.parametrize("rows", [1, 2, 3, 0])
def test_rm_sorted_forward_equals_one_padded_forward(tiny_model_dir, tokenizer, rows):
    """Length-sorted chunks cut to their own longest row: the same predictions and gradients as the whole padded
    batch in one forward, rows back in batch order."""
    from transformers import AutoModelForSequenceClassification
    tok = tokenizer
    tok.padding_side = "right"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3, dtype=torch.float32)
    texts = [rm_text(tok, q, a) for q, a in [("Hi", "Hello."), ("Why is the sky blue?", "Light " * 30),
                                             ("2+2?", "4"), ("Name a fruit.", "An apple, a pear " * 5),
                                             ("Ok?", "Yes, fine.")]]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert len(set(enc["attention_mask"].sum(1).tolist())) == 5  # five different lengths
    out = []
    for fn in (lambda: reward_forward(model, enc["input_ids"], enc["attention_mask"]),
               lambda: batching.sorted_forward(model, enc["input_ids"], enc["attention_mask"], rows)):
        model.zero_grad(set_to_none=True)
        pred = fn()
        (pred * torch.arange(1.0, 16.0).view(5, 3)).sum().backward()  # a different weight per cell
        out.append((pred.detach(), [q.grad.clone() for q in model.parameters() if q.grad is not None]))
    (p0, g0), (p1, g1) = out
    assert p1.shape == (5, 3) and torch.allclose(p0, p1, atol=1e-5)
    assert len(g0) == len(g1) > 0 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g0, g1))
