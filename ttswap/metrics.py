"""Accuracy metrics used to compare a converted model with torch."""

from __future__ import annotations

import torch


def pcc(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors, flattened (the metric tt-metal's model tests use).
    Two constant, equal tensors correlate perfectly; a constant against a varying one gives 0."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    if a.shape != b.shape:
        raise ValueError(f"pcc of tensors with {a.numel()} and {b.numel()} elements")
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    if denom == 0:
        return 1.0 if torch.equal(a, b) else 0.0
    return float((a @ b) / denom)


def top1_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    return float((logits_a.argmax(-1) == logits_b.argmax(-1)).double().mean())
