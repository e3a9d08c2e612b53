"""Unit-selection methods behind one interface, so one harness can compare them.

A selector is any object with a ``name`` and ``select(concept: int, tau: int) -> LongTensor`` of
unit indices, best first, where ``concept`` indexes the concepts it was built for (for the
delta-accuracy tables: the class index). MiClip and the random control live here; the baselines
(Act-Values, Network Dissection, CLIP-Dissect, Captum) follow the same protocol.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from .interpret import DEFAULT_TEMPERATURE, concept_unit_scores, top_k


@runtime_checkable
class UnitSelector(Protocol):
    name: str

    def select(self, concept: int, tau: int) -> torch.Tensor:
        """Indices (tau,) of the units chosen for concept index ``concept``, best first."""


class ScoreSelector:
    """Selects the top-tau units of a precomputed (C, U) score matrix (higher = better)."""

    def __init__(self, name: str, scores_cu: torch.Tensor):
        if scores_cu.ndim != 2:
            raise ValueError(f"scores must be (concepts, units), got {tuple(scores_cu.shape)}")
        self.name, self.scores_cu = name, scores_cu.float()

    def select(self, concept: int, tau: int) -> torch.Tensor:
        """Indices (tau,) of the highest-scoring units for ``concept``."""
        return top_k(self.scores_cu[concept], tau, "units")[0]


class MiClipSelector:
    """MiClip localization: the units that fit each concept best in CLIP space.

    unit_emb_ud: (U, D) from interpret.unit_embeddings; concept_emb_cd: (C, D) text embeddings.
    scoring: "posterior" (default: log p(concept | unit) against the C concepts at
    ``temperature``, the encoder's interpret.concept_temperature) or "cosine" (the paper's plain
    cosine); see :mod:`miclip_nb.interpret`. Raises ValueError for mismatched sizes or an unknown
    scoring.
    """

    name = "MiClip"

    def __init__(self, unit_emb_ud: torch.Tensor, concept_emb_cd: torch.Tensor, name: str = "MiClip",
                 scoring: str = "posterior", temperature: float = DEFAULT_TEMPERATURE):
        if unit_emb_ud.shape[1] != concept_emb_cd.shape[1]:
            raise ValueError("unit and concept embeddings have different sizes")
        self.unit_emb_ud, self.concept_emb_cd, self.name, self.scoring = unit_emb_ud, concept_emb_cd, name, scoring
        self.temperature = temperature
        self.scores_cu = concept_unit_scores(unit_emb_ud, concept_emb_cd, scoring, temperature=temperature)

    def select(self, concept: int, tau: int) -> torch.Tensor:
        """Indices (tau,) of the best-scoring units for concept index ``concept``."""
        return top_k(self.scores_cu[concept], tau, "units")[0]


class RandomSelector:
    """The control: ``tau`` units drawn uniformly without replacement, seeded by (seed, concept).

    ``among``: (U,) bool, draw only among these units (e.g. SAE features that fire at all: removing a
    feature that never fires changes nothing, which would flatter any method compared with it).
    Raises ValueError when tau exceeds the units there are to draw from."""

    name = "Random"

    def __init__(self, n_units: int, seed: int = 0, among: torch.Tensor | None = None):
        self.n_units, self.seed = n_units, seed
        self.pool = torch.arange(n_units) if among is None else torch.nonzero(torch.as_tensor(among).bool()).flatten()
        if among is not None and torch.as_tensor(among).numel() != n_units:
            raise ValueError(f"among has {torch.as_tensor(among).numel()} entries for {n_units} units")

    def select(self, concept: int, tau: int) -> torch.Tensor:
        """Indices (tau,) of random units for ``concept`` (the same for the same seed and concept)."""
        if tau > self.pool.numel():
            raise ValueError(f"tau={tau} is larger than the number of units to draw from ({self.pool.numel()})")
        gen = torch.Generator().manual_seed(self.seed * 100_003 + concept)
        return self.pool[torch.randperm(self.pool.numel(), generator=gen)[:tau]]


def selection(selector: UnitSelector, concepts: Sequence[int], tau: int = 5) -> dict[int, torch.Tensor]:
    """``{concept: selector.select(concept, tau)}`` for every concept index."""
    return {int(c): selector.select(int(c), tau) for c in concepts}
