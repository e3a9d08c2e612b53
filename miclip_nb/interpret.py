"""Localize concepts in units and describe units with concepts, by similarity in CLIP space.

A unit u_i (neuron i, or SAE feature i) is embedded as

    e_i = normalize(E_n(v_i * onehot_i) - E_n(0))

the encoder's response to that unit alone at activation ``v_i``, minus its response to silence,
so that a bias term cannot reintroduce the activation-magnitude assumption. ``v_i`` is 1 by
default (``value="one"``) or the unit's typical positive activation (``value="typical"``: the mean
of the training activations plus one standard deviation, read from the encoder's statistics).
For a linear encoder the two give the same direction up to sign-free scaling, so the ranking is
identical; for the MLP encoder they can differ.

Two scoring rules rank units for a concept (our choice where the paper says "cosine similarity"):

- ``"cosine"`` (the paper's rule): s(u, c) = cos(e_u, E_c(c)).
- ``"posterior"`` (the default wherever a reference vocabulary is at hand, e.g. the classes of
  the delta-accuracy tables): the probability the aligned space gives concept c against the K
  concepts of the reference when unit u alone is active, as the encoder's concept InfoNCE term
  reads it, log p(c | u) = s(u, c) / T - log sum_k exp(s(u, k) / T), with T the temperature that
  term learned (:func:`concept_temperature`). A unit is localized for c when c stands out in the
  unit's *description*, not merely when its embedding lies near c's: text embeddings of related
  concepts share most of their direction (the six ToyCLIP class prompts have pairwise cosines of
  0.35-0.75), so under plain cosine a unit that points at what all classes share scores high for
  every class, while its posterior stays flat. The shift is per unit, so :func:`describe` ranks
  concepts exactly as under cosine: localization and description are two readings of one matrix.

Measured on the toy models (``tests/test_miclip_toy.py``, ``tests/test_sae.py``): removing each
class's top-5 units of toy_cnn ``stages.2`` costs 16.3 accuracy points under the posterior and 11.4
under cosine (random units 1.5; mean of 3 alignment seeds); the top-5 SAE features of toy_vit cost
4.6 / 8.6 points against 3.0 / 7.6 (SAE seeds 0 / 1); the ground-truth AUROC of the top-5 units for
the 16 concepts (:mod:`miclip_nb.shapes.groundtruth`) is 0.756 against 0.740 on toy_cnn, 0.696 against
0.686 on toy_vit. Standardising each unit's cosines over the concepts instead (a z-score) removed
more on toy_cnn neurons (18.2) but far less on SAE features (1.2 / 2.2): it amplifies features
whose profile is nearly flat, where the posterior leaves them flat.

Unit embeddings remember what they were made for. :func:`unit_embeddings` returns a
:class:`UnitEmbeddings` tensor whose ``provenance`` (:class:`UnitProvenance`: the target model's
identity, the layer, the pooling, neurons or SAE features) comes from the encoder's ``meta``; the
panels (:mod:`miclip_nb.widgets`) check it with :func:`check_unit_embeddings` before they put
embeddings of one layer beside the activations of another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ._paths import data_dir
from .align import NeuronEncoder
from .embed import EmbeddingBackend, build_concept_bank, validate_concepts


UNIT_KINDS = ("neuron", "SAE feature")


@dataclass(frozen=True)
class UnitProvenance:
    """What a set of unit embeddings was made for; None where the encoder did not record it."""

    model: str | None = None  # the target model's identity (store.model_identity), as encoder.meta["model"]
    layer: str | None = None  # the model's layer whose units (or whose SAE's features) they are
    pooling: str | None = None  # how the activations the encoder learned from were pooled
    unit_kind: str = "neuron"  # one of UNIT_KINDS
    sae: str | None = None  # the SAE's fingerprint (TopKSAE.fingerprint) for SAE features

    def __post_init__(self) -> None:
        if self.unit_kind not in UNIT_KINDS:
            raise ValueError(f"unit_kind must be one of {UNIT_KINDS}, got {self.unit_kind!r}")

    @classmethod
    def from_encoder_meta(cls, meta: dict) -> "UnitProvenance":
        """Read an encoder's ``meta`` ("model", "layer", "pooling"). An encoder trained on an SAE
        code store has the store's model string, ``<model>|source=<key>|layer=<layer>|sae=<sae>|...``
        (sae.sae_store_spec): its units are that SAE's features at that layer."""
        model, layer, pooling = meta.get("model"), meta.get("layer"), meta.get("pooling")
        base, sep, rest = (model or "").partition("|source=")
        if not sep:
            return cls(model, layer, pooling)
        fields = dict(part.partition("=")[::2] for part in rest.split("|")[1:])
        return cls(base, fields.get("layer"), pooling, "SAE feature", fields.get("sae"))


#: Operations whose result holds the same embeddings of the same units (maybe elsewhere).
_SAME_UNITS = {torch.Tensor.clone, torch.clone, torch.Tensor.detach, torch.detach, torch.Tensor.to, torch.Tensor.cpu,
               torch.Tensor.cuda, torch.Tensor.contiguous, torch.Tensor.float, torch.Tensor.double}


class UnitEmbeddings(torch.Tensor):
    """A (U, D) tensor of unit embeddings that carries its ``provenance`` (a UnitProvenance).

    It is a tensor everywhere: every torch operation on it (``emb[units]``, ``emb @ x``,
    ``F.normalize(emb)``) returns a plain tensor, since a subset or a product is no longer "the
    embeddings of that layer's units"; ``clone``, ``detach``, ``to``, ``cpu``, ``cuda``,
    ``contiguous``, ``float`` and ``double`` keep the provenance, and so do in-place edits
    (``emb[rare] = 0``). ``torch.save`` / ``torch.load`` keep it too (importing this module allows
    the two classes for ``torch.load``'s default ``weights_only=True``). Build one with
    :func:`unit_embeddings`, or ``UnitEmbeddings(tensor, UnitProvenance(...))``; check one with
    :func:`check_unit_embeddings`.
    """

    provenance: UnitProvenance | None = None

    @staticmethod
    def __new__(cls, data: torch.Tensor, provenance: UnitProvenance) -> "UnitEmbeddings":
        emb = torch.Tensor._make_subclass(cls, torch.as_tensor(data).detach(), False)
        emb.provenance = provenance
        return emb

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))  # plain tensors, or the very object an in-place op edited
        first = args[0] if args else None
        if (func in _SAME_UNITS and isinstance(first, cls) and isinstance(out, torch.Tensor) and out is not first
                and out.shape == first.shape):
            return cls(out, first.provenance)
        return out

    def __deepcopy__(self, memo: dict) -> "UnitEmbeddings":
        memo[id(self)] = copied = self.clone()  # torch's default asks subclasses for new_empty
        return copied


torch.serialization.add_safe_globals([UnitEmbeddings, UnitProvenance])


@torch.no_grad()
def unit_embeddings(encoder: NeuronEncoder, value: str | float = "one", batch_size: int = 4096) -> UnitEmbeddings:
    """Embed every unit: (U, D) unit-norm rows (zero rows for constant units), as UnitEmbeddings
    whose provenance is read from ``encoder.meta`` (:meth:`UnitProvenance.from_encoder_meta`).

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
    return UnitEmbeddings(emb, UnitProvenance.from_encoder_meta(encoder.meta))


def check_unit_embeddings(unit_emb_ud: torch.Tensor, *, n_units: int | None = None, model: str | None = None,
                          layer: str | None = None, unit_kind: str | None = None, sae: str | None = None) -> None:
    """Raise ValueError unless unit embeddings (U, D) fit where they are about to be used.

    n_units: how many units (or SAE features) there are there: U must equal it (any tensor).
    model (store.model_identity of the target), layer, unit_kind, sae (TopKSAE.fingerprint): must
    equal the provenance of UnitEmbeddings (a plain tensor carries none, so only U is checked);
    arguments left None, and provenance fields that are None, are not checked. The message names
    what the embeddings were made for and what they are used for.
    """
    if unit_emb_ud.ndim != 2:
        raise ValueError(f"unit embeddings must be (U, D), got shape {tuple(unit_emb_ud.shape)}")
    provenance = getattr(unit_emb_ud, "provenance", None)
    if provenance is not None:
        used = {"model": model, "layer": layer, "unit_kind": unit_kind, "sae": sae}
        wrong = {key: value for key, value in used.items()
                 if value is not None and getattr(provenance, key) is not None and getattr(provenance, key) != value}
        if wrong:
            made = ", ".join(f"{key}={getattr(provenance, key)!r}" for key in wrong)
            raise ValueError(f"these unit embeddings were made for {made}, but are used for "
                             f"{', '.join(f'{key}={value!r}' for key, value in wrong.items())}")
    if n_units is not None and unit_emb_ud.shape[0] != n_units:
        where = f" at layer {layer!r}" if layer is not None else ""
        raise ValueError(f"the unit embeddings have {unit_emb_ud.shape[0]} rows, but there are {n_units} "
                         f"{unit_kind or 'unit'}s{where}: they were made for other units")


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


SCORINGS = ("posterior", "cosine")
#: Temperature of the posterior for an encoder without a training history (AlignConfig's initial value).
DEFAULT_TEMPERATURE = 0.07


def concept_temperature(encoder: NeuronEncoder) -> float:
    """The temperature the encoder's neuron-concept InfoNCE term learned (``meta["history"]``), or
    :data:`DEFAULT_TEMPERATURE` for an encoder built by hand."""
    temperature = encoder.meta.get("history", {}).get("temperature", {}).get("concept")
    return float(temperature) if temperature else DEFAULT_TEMPERATURE


def _check_scoring(scoring: str) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")


def concept_unit_scores(unit_emb_ud: torch.Tensor, concept_emb_cd: torch.Tensor, scoring: str = "posterior",
                        reference_kd: torch.Tensor | None = None, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """(C, U) scores of every unit for every concept (higher = better; see the module docstring).

    unit_emb_ud: (U, D) unit embeddings; concept_emb_cd: (C, D) text embeddings (normalised here).
    ``scoring="cosine"``: cosines. ``"posterior"``: log p(c | u) against the K concepts of
    ``reference_kd`` (default: ``concept_emb_cd`` itself) at ``temperature`` (use
    :func:`concept_temperature` of the encoder); zero rows (constant or dropped units) score -inf,
    so they are never localized. Raises ValueError for an unknown scoring, mismatched sizes, fewer
    than 2 reference concepts, or a temperature that is not positive.
    """
    _check_scoring(scoring)
    if unit_emb_ud.ndim != 2 or concept_emb_cd.ndim != 2 or unit_emb_ud.shape[1] != concept_emb_cd.shape[1]:
        raise ValueError(f"need (U, D) units and (C, D) concepts, got {tuple(unit_emb_ud.shape)} and {tuple(concept_emb_cd.shape)}")
    units = unit_emb_ud.float()
    cos = F.normalize(concept_emb_cd.float(), dim=-1) @ units.T
    if scoring == "cosine":
        return cos
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    ref = cos if reference_kd is None else F.normalize(reference_kd.float(), dim=-1) @ units.T
    if ref.shape[0] < 2:
        raise ValueError("the posterior needs a reference vocabulary of at least 2 concepts (or use scoring='cosine')")
    scores = cos / temperature - torch.logsumexp(ref / temperature, dim=0)
    return scores.masked_fill((units == 0).all(1)[None], float("-inf"))


def localize(unit_emb_ud: torch.Tensor, concept_emb_d: torch.Tensor, tau: int = 5,
             reference_kd: torch.Tensor | None = None, temperature: float = DEFAULT_TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """L_c: the ``tau`` units that fit a concept best.

    unit_emb_ud: (U, D) unit embeddings; concept_emb_d: (D,) text embedding. Without
    ``reference_kd``, units are ranked by cosine similarity (the paper's rule); with a (K, D)
    reference vocabulary (e.g. the class embeddings, or the concept set of the question), by the
    posterior log p(c | u) against it at ``temperature`` (module docstring). Returns (unit
    indices (tau,), scores (tau,)), best first: cosines, or log-probabilities with a reference.
    """
    scoring = "cosine" if reference_kd is None else "posterior"
    scores = concept_unit_scores(unit_emb_ud, concept_emb_d.reshape(1, -1), scoring, reference_kd, temperature)[0]
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


def concept_set(name: str | Sequence[str]) -> list[str]:
    """A concept vocabulary: "imagenet" (1000 class names), "words" (20,000 frequent English words,
    shipped in data/), a plug-in's (:mod:`miclip_nb.plugins`, e.g. the Shapes world's "shapes"), or
    your own list (validated).

    Raises ValueError for an invalid list, plugins.UnknownNameError for an unknown name.
    """
    if isinstance(name, str):
        if name == "imagenet":
            from .zoo import imagenet_class_names

            names = imagenet_class_names()
            seen: set[str] = set()  # a few ImageNet names repeat ("crane", "maillot"): keep the first
            return [n for n in names if not (n.lower() in seen or seen.add(n.lower()))]
        if name == "words":
            path = Path(data_dir()) / "words_en_20k.txt"
            return path.read_text().split()
        from . import plugins

        return validate_concepts(plugins.get("concepts", name)())
    return validate_concepts(name)


def encode_concepts(backend: EmbeddingBackend, concepts: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
    """(C, D) unit-norm concept embeddings of concept words, in the order given.

    Each word reaches the backend as typed, in the backend's own prompts (embed.concept_texts:
    open_clip templates for a real CLIP, "a star" for the Shapes world's ToyCLIP) or in
    ``templates``. Raises ValueError for an invalid concept list.
    """
    return build_concept_bank(backend, validate_concepts(concepts), templates)


def localization_table(unit_emb_ud: torch.Tensor, concept_emb_cd: torch.Tensor, concepts: Sequence[str], *,
                       reference_kd: torch.Tensor | None = None, temperature: float = DEFAULT_TEMPERATURE, tau: int = 5):
    """The top-``tau`` units of each concept under both rankings, side by side: a DataFrame with rows
    = rank (1..tau) and columns = (concept, scoring), scoring "posterior" (against ``reference_kd``,
    default the concepts themselves) and "cosine". concept_emb_cd: (C, D) for the C ``concepts``.
    Raises ValueError for mismatched counts, and as :func:`concept_unit_scores`."""
    import pandas as pd

    if concept_emb_cd.shape[0] != len(concepts):
        raise ValueError(f"{concept_emb_cd.shape[0]} concept embeddings for {len(concepts)} concepts")
    reference = concept_emb_cd if reference_kd is None else reference_kd
    columns = {}
    for scoring in SCORINGS:
        scores = concept_unit_scores(unit_emb_ud, concept_emb_cd, scoring, reference, temperature)
        for name, row in zip(concepts, scores):
            columns[(name, scoring)] = top_k(row, tau, "units")[0].tolist()
    table = pd.DataFrame(columns, index=pd.Index(range(1, tau + 1), name="rank"))
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["concept", "scoring"])
    return table[[(c, s) for c in concepts for s in SCORINGS]]
