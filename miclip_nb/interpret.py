"""Localize concepts in units and describe units with concepts, by cosine similarity in CLIP space.

A unit u_i (neuron i, or SAE feature i) is embedded as

    e_i = normalize(E_n(v_i * onehot_i) - E_n(0))

the encoder's response to that unit alone at activation ``v_i``, minus its response to silence,
so that a bias term cannot reintroduce the activation-magnitude assumption. ``v_i`` is 1 by
default (``value="one"``) or the unit's typical positive activation (``value="typical"``: the mean
of the training activations plus one standard deviation, read from the encoder's statistics).
For a linear encoder the two give the same direction up to sign-free scaling, so the ranking is
identical; for the MLP encoder they can differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ._paths import data_dir
from .align import NeuronEncoder
from .embed import IDENTITY_TEMPLATES, EmbeddingBackend, build_concept_bank, validate_concepts


@torch.no_grad()
def unit_embeddings(encoder: NeuronEncoder, value: str | float = "one", batch_size: int = 4096) -> torch.Tensor:
    """Embed every unit: (U, D) unit-norm rows (zero rows for constant units).

    value: "one" (activation 1), "typical" (mean + std of the unit's training activations), or a
    number. Raises ValueError for another string.
    """
    n_units = encoder.config.n_units
    if value == "one":
        values = torch.ones(n_units)
    elif value == "typical":
        values = encoder.act_mean + encoder.act_std
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        values = torch.full((n_units,), float(value))
    else:
        raise ValueError(f"value must be 'one', 'typical' or a number, got {value!r}")
    base = encoder(torch.zeros(1, n_units))
    rows = []
    for start in range(0, n_units, batch_size):
        idx = torch.arange(start, min(start + batch_size, n_units))
        x = torch.zeros(len(idx), n_units)
        x[torch.arange(len(idx)), idx] = values[idx]
        rows.append(encoder(x) - base)
    emb = F.normalize(torch.cat(rows), dim=-1)
    emb[encoder.constant_mask] = 0.0
    return emb


def top_k(scores: torch.Tensor, tau: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, scores) of the ``tau`` largest entries of a 1-D tensor, best first.

    Raises ValueError when tau is not in 1..len(scores).
    """
    if not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be a positive integer, got {tau!r}")
    if tau > scores.numel():
        raise ValueError(f"tau={tau} is larger than the number of {what} ({scores.numel()})")
    values, indices = torch.topk(scores, tau)
    return indices, values


def localize(unit_emb_ud: torch.Tensor, concept_emb_d: torch.Tensor, tau: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """L_c: the ``tau`` units most similar to a concept.

    unit_emb_ud: (U, D) unit embeddings; concept_emb_d: (D,) text embedding. Returns
    (unit indices (tau,), cosine similarities (tau,)), best first.
    """
    scores = unit_emb_ud @ F.normalize(concept_emb_d.float(), dim=-1)
    return top_k(scores, tau, "units")


def describe(unit_emb_ud: torch.Tensor, unit: int, concept_bank_cd: torch.Tensor, concepts: Sequence[str], tau: int = 5) -> list[tuple[str, float]]:
    """D_u: the ``tau`` concepts most similar to unit ``unit``.

    concept_bank_cd: (C, D) unit-norm concept embeddings for ``concepts`` (C names). Returns
    [(concept, cosine similarity)] best first. Raises IndexError for a unit out of range.
    """
    if not 0 <= unit < unit_emb_ud.shape[0]:
        raise IndexError(f"unit {unit} out of range (0..{unit_emb_ud.shape[0] - 1})")
    if concept_bank_cd.shape[0] != len(concepts):
        raise ValueError(f"{concept_bank_cd.shape[0]} concept embeddings for {len(concepts)} concept names")
    idx, scores = top_k(concept_bank_cd @ unit_emb_ud[unit], tau, "concepts")
    return [(concepts[i], float(s)) for i, s in zip(idx.tolist(), scores.tolist())]


def shapes_concept_prompts() -> dict[str, str]:
    """The Shapes world's concepts and the prompts ToyCLIP was trained with ("star" -> "a star",
    "red" -> "red", "dots" -> "dots")."""
    from . import shapes

    prompts = {s: shapes.caption_for(shape=s) for s in shapes.SHAPES}
    prompts.update({c: shapes.caption_for(color=c) for c in shapes.COLORS})
    prompts.update({t: shapes.caption_for(texture=t) for t in shapes.TEXTURES})
    return prompts


def concept_set(name: str | Sequence[str]) -> list[str]:
    """A concept vocabulary: "shapes" (the world's 16 concepts), "imagenet" (1000 class names),
    "words" (20,000 frequent English words, shipped in data/), or your own list (validated).

    Raises ValueError for an unknown name or an invalid list.
    """
    if isinstance(name, str):
        if name == "shapes":
            from .shapes import CONCEPTS

            return list(CONCEPTS)
        if name == "imagenet":
            from .zoo import imagenet_class_names

            names = imagenet_class_names()
            seen: set[str] = set()  # a few ImageNet names repeat ("crane", "maillot"): keep the first
            return [n for n in names if not (n.lower() in seen or seen.add(n.lower()))]
        if name == "words":
            path = Path(data_dir()) / "words_en_20k.txt"
            return path.read_text().split()
        raise ValueError(f"unknown concept set {name!r}: use 'shapes', 'imagenet', 'words' or a list")
    return validate_concepts(name)


def default_templates(backend: EmbeddingBackend) -> tuple[str, ...]:
    """Prompt templates that suit a backend: ToyCLIP was trained on bare captions ("{}"); real CLIP
    models get open_clip-style templates ("a photo of a {}.")."""
    from .embed import DEFAULT_TEMPLATES

    return IDENTITY_TEMPLATES if "ToyCLIP" in str(getattr(backend, "fingerprint", "")) else DEFAULT_TEMPLATES


def encode_concepts(backend: EmbeddingBackend, concepts: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
    """(C, D) unit-norm concept embeddings, in the order given.

    Without ``templates``: Shapes-world concept words use the prompts ToyCLIP knows ("star" ->
    "a star", see :func:`shapes_concept_prompts`) and everything else
    :func:`default_templates`. Raises ValueError for an invalid concept list.
    """
    concepts = validate_concepts(concepts)
    if templates is not None:
        return build_concept_bank(backend, concepts, templates)
    prompts = shapes_concept_prompts()
    texts = [prompts.get(c, c) for c in concepts]
    return build_concept_bank(backend, texts, default_templates(backend))
