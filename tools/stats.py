"""Rank statistics shared by evaluate.py (Spearman of θ vs verbosity) and tools/armo.py (the gate's de-bias)."""
import torch


def average_ranks(x):
    """Ranks 0..N-1 of x (N,), ties sharing their mean rank. → (N,) float64."""
    xs, order = torch.sort(torch.as_tensor(x).double(), stable=True)
    _, inverse, counts = torch.unique_consecutive(xs, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = torch.empty_like(xs)
    ranks[order] = ((ends - counts - 1 + ends) / 2)[inverse]  # mean of positions end-count .. end-1
    return ranks


def spearman(x, y):
    """Spearman rank correlation of two (N,) tensors or lists (ties share their mean rank); NaN when either side is
    constant or has fewer than two values."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = (rx.norm() * ry.norm()).item()
    return float("nan") if den == 0 else (rx @ ry).item() / den
