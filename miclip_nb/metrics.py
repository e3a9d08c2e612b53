"""Small, dependency-free metrics used across the package."""

from __future__ import annotations

import numpy as np
import torch


def auroc(scores, labels) -> np.ndarray:
    """Area under the ROC curve of ``scores`` for binary ``labels``, column by column.

    scores: (N,) or (N, U) array-like; labels: (N,) bool/0-1. Returns a float (for 1-D scores) or a
    (U,) float array. Ties get the average rank. Raises ValueError when labels hold only one class
    or the lengths differ.
    """
    s = torch.as_tensor(np.asarray(scores), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels)).bool()
    squeeze = s.ndim == 1
    if squeeze:
        s = s[:, None]
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores have {s.shape[0]} rows but labels {y.shape[0]}")
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative labels")
    ranks = _average_ranks(s)
    result = (ranks[y].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    out = result.numpy()
    return float(out[0]) if squeeze else out


def _average_ranks(s: torch.Tensor) -> torch.Tensor:
    """1-based ranks along dim 0 with ties averaged, for a (N, U) tensor."""
    order = s.argsort(dim=0)
    sorted_s = s.gather(0, order)
    n = s.shape[0]
    pos = torch.arange(1, n + 1, dtype=torch.float64)[:, None].expand_as(s)
    # Average the positions within each run of equal values.
    new_run = torch.ones_like(sorted_s, dtype=torch.bool)
    new_run[1:] = sorted_s[1:] != sorted_s[:-1]
    run_id = new_run.long().cumsum(0) - 1
    run_sum = torch.zeros_like(sorted_s).scatter_add_(0, run_id, pos)
    run_cnt = torch.zeros_like(sorted_s).scatter_add_(0, run_id, torch.ones_like(pos))
    avg = (run_sum / run_cnt.clamp_min(1)).gather(0, run_id)
    ranks = torch.empty_like(avg)
    ranks.scatter_(0, order, avg)
    return ranks


def best_unit_auroc(acts_nu, present_n) -> tuple[int, float]:
    """The unit whose activation best detects an attribute.

    acts_nu: (N, U) activations; present_n: (N,) bool, attribute present. Returns (unit index,
    AUROC) of the unit with the highest AUROC.
    """
    per_unit = auroc(acts_nu, present_n)
    best = int(np.argmax(per_unit))
    return best, float(per_unit[best])
