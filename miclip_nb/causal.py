"""Causal scores: what removing one unit alone does to the classifier's logits.

A unit can be described confidently and do nothing. Descriptions (MiClip's, CLIP-Dissect's,
NetDissect's, Act-Values') read what a unit responds to; none reads whether the classifier reads
the unit. Two channels with the same activation statistics (one the head reads, one it ignores) get
the same descriptions, and only an intervention tells them apart. This module puts a causal score
beside every description and every localized unit:

    effect(u, c) = mean over images of [logit_c(x) - logit_c(x with unit u scaled by 0)]

the drop of class c's logit when unit u alone is removed (at every location / token), averaged over
class c's images when labels are given, else over all the images. Positive = the class needs the
unit; ~0 = the classifier does not read it (whatever its description).

How it runs (:class:`UnitEffects`): one forward pass records the layer's outputs
(:func:`miclip_nb.steer.cache_layer_outputs`); each unit then costs only the part of the model after
the layer (:func:`miclip_nb.steer.tail_module`) over the cached outputs, and each unit's effects
are computed once and cached, so panels can ask lazily. A model that cannot be split at the layer
falls back on full forward passes with a hook that edits the layer's output. Units are the layer's
neurons, or with ``edit_factory`` (``units.UnitSpace.edit_factory``, e.g. an SAE's feature edit)
whatever that edit addresses.

Helpers: :func:`causal_score` (a concept's score: its class's effect when it names a class, else the
largest class effect), :func:`describe_with_effects` / :func:`localize_with_effects` (annotate
``interpret.describe`` / ``interpret.localize`` results), :func:`confirm` and
:class:`ConfirmedSelector` (localize by a method, confirm by ablation: re-rank each class's top
candidates by their effect on that class).
"""

from __future__ import annotations

from typing import Callable, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ._progress import bars_off
from .capture import hooked_activations, unwrap_output
from .intervention import _model_and_preprocess
from .steer import SplitError, _model_device, cache_layer_outputs, edit_layer, neuron_edit, tail_module, unit_dim

__all__ = ["UnitEffects", "unit_effects", "causal_score", "class_label", "top_effects", "describe_with_effects",
           "localize_with_effects", "confirm", "ConfirmedSelector"]


class UnitEffects:
    """The effects of removing single units of ``layer`` on every class's logit, computed lazily and
    cached per unit (see the module docstring).

    target: a zoo.TargetModel or an nn.Module (images -> (N, C) logits); images: (N, 3, H, W)
    preprocessed; labels: (N,) class indices (class c's effect is averaged over its own images;
    classes without images get NaN) or None (every class over every image). edit_factory:
    ``edit_factory(units, mode, beta)`` (default steer.neuron_edit); with one, pass ``n_units``
    (the edit's unit count) to have units checked. beta: the scale a unit is set to (0 = removal).
    ``split`` says how it runs: "tail" (cached layer outputs, the part after the layer per unit) or
    "hook" (a full forward per unit, for models that cannot be split).

    Calling it with units gives (len(units), C) effects; :meth:`of` gives one unit's (C,).
    Raises ValueError for empty images, labels that do not fit the images, or a unit out of range;
    LayerNotFoundError for an unknown layer.
    """

    def __init__(self, target, layer: str, images: torch.Tensor, *, labels=None, edit_factory: Callable | None = None,
                 n_units: int | None = None, beta: float = 0.0, batch_size: int = 256, device=None,
                 progress: bool = False):
        self.model = _model_and_preprocess(target)[0].eval()
        self.layer, self.beta, self.batch_size, self.progress = layer, float(beta), int(batch_size), progress
        self.images = torch.as_tensor(images)
        if self.images.ndim < 2 or self.images.shape[0] == 0:
            raise ValueError(f"need a batch of images (N, ...), got shape {tuple(self.images.shape)}")
        n = self.images.shape[0]
        self.labels = None if labels is None else torch.as_tensor(labels).long().flatten()
        if self.labels is not None and self.labels.numel() != n:
            raise ValueError(f"{self.labels.numel()} labels for {n} images")
        if self.labels is not None and bool((self.labels < 0).any()):
            raise ValueError("labels must be >= 0 (class indices)")
        self.make_edit = edit_factory or neuron_edit
        self.device = torch.device(device) if device is not None else _model_device(self.model)
        self._cache: dict[int, torch.Tensor] = {}
        try:
            self._tail = tail_module(self.model, layer, self.images[:2].to(self.device))
            self._acts, _ = cache_layer_outputs(self.model, self.images, layer, self.batch_size, self.device)
            self.split = "tail"
            width = self._acts.shape[unit_dim(self._acts)]
            self._base = self._logits(None)
        except SplitError:
            self._tail = self._acts = None
            self.split = "hook"
            with torch.no_grad(), hooked_activations(self.model, layer, "none") as seen:
                self.model(self.images[:1].to(self.device))
            width = seen[layer].shape[unit_dim(seen[layer])]
            self._base = self._logits(None)
        self.n_units = int(n_units) if n_units is not None else (int(width) if edit_factory is None else None)
        self.n_classes = int(self._base.shape[1])
        if self.labels is not None and int(self.labels.max()) >= self.n_classes:
            raise ValueError(f"label {int(self.labels.max())} is out of range for {self.n_classes} classes")

    @torch.no_grad()
    def _logits(self, unit: int | None) -> torch.Tensor:
        """(N, C) float logits with ``unit`` scaled by beta (None: unedited)."""
        edit = None if unit is None else self.make_edit([unit], "scale", self.beta)
        out = []
        autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        if self.split == "tail":
            for start in range(0, self._acts.shape[0], self.batch_size):
                x = self._acts[start : start + self.batch_size].to(self.device)
                if edit is not None:
                    x = edit(x)
                with torch.autocast(**autocast):
                    out.append(self._tail(x).float().cpu())
            return torch.cat(out)
        for start in range(0, self.images.shape[0], self.batch_size):
            x = self.images[start : start + self.batch_size].to(self.device)
            with torch.autocast(**autocast):
                if edit is None:
                    out.append(unwrap_output(self.model(x)).float().cpu())
                else:
                    with edit_layer(self.model, self.layer, edit):
                        out.append(unwrap_output(self.model(x)).float().cpu())
        return torch.cat(out)

    def _reduce(self, drop_nc: torch.Tensor) -> torch.Tensor:
        """(N, C) logit drops -> (C,) per-class means (own images with labels, else all)."""
        drop = drop_nc.double()
        if self.labels is None:
            return drop.mean(0).float()
        sums = torch.zeros(self.n_classes, dtype=torch.float64).index_add_(0, self.labels, drop.gather(1, self.labels[:, None])[:, 0])
        counts = torch.bincount(self.labels, minlength=self.n_classes).double()
        out = (sums / counts.clamp_min(1)).float()
        out[counts == 0] = float("nan")
        return out

    def _check(self, unit: int) -> int:
        unit = int(unit)
        if unit < 0 or (self.n_units is not None and unit >= self.n_units):
            raise ValueError(f"unit {unit} out of range (0..{(self.n_units or 0) - 1})")
        return unit

    def of(self, unit: int) -> torch.Tensor:
        """(C,) the drop of each class's logit when ``unit`` alone is removed (cached)."""
        unit = self._check(unit)
        if unit not in self._cache:
            self._cache[unit] = self._reduce(self._base - self._logits(unit))
        return self._cache[unit]

    def __call__(self, units: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """(len(units), C) effects of the units (None: every unit, when their number is known)."""
        if units is None:
            if self.n_units is None:
                raise ValueError("name the units (the number of units an edit_factory addresses is unknown: pass n_units)")
            units = range(self.n_units)
        units = [self._check(u) for u in (units.flatten().tolist() if isinstance(units, torch.Tensor) else units)]
        todo = [u for u in dict.fromkeys(units) if u not in self._cache]
        for u in tqdm(todo, desc="unit effects", disable=bars_off(self.progress) or len(todo) < 2):
            self.of(u)
        if not units:
            return torch.zeros(0, self.n_classes)
        return torch.stack([self._cache[u] for u in units])

    @property
    def computed(self) -> list[int]:
        """The units whose effects are cached so far."""
        return sorted(self._cache)


def unit_effects(target, layer: str, images: torch.Tensor, units: Sequence[int] | torch.Tensor | None = None, *,
                 labels=None, classes: Sequence[int] | None = None, edit_factory: Callable | None = None,
                 n_units: int | None = None, beta: float = 0.0, batch_size: int = 256, device=None,
                 progress: bool = False) -> torch.Tensor:
    """(len(units), len(classes)) the mean drop of each class's logit when each unit alone is scaled
    by ``beta`` (0: removed), from one cached pass (see :class:`UnitEffects`).

    images: (N, 3, H, W) preprocessed; units: unit indices (None: every unit of the layer, or
    ``n_units`` with an ``edit_factory``); labels: (N,) class indices (each class over its own
    images, NaN for classes without images) or None (every class over every image); classes: the
    columns to return (default all C, in order). Raises as :class:`UnitEffects`, and IndexError for
    a class out of range.
    """
    effects = UnitEffects(target, layer, images, labels=labels, edit_factory=edit_factory, n_units=n_units, beta=beta,
                          batch_size=batch_size, device=device, progress=progress)(units)
    if classes is None:
        return effects
    classes = [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < effects.shape[1]]
    if bad:
        raise IndexError(f"class {bad[0]} out of range for {effects.shape[1]} classes")
    return effects[:, classes]


# --------------------------------------------------------------------------------------------
# Reading the effects beside descriptions and localized units


def _effects_row(effects, unit: int) -> torch.Tensor:
    """One unit's (C,) effects from a UnitEffects, a (U, C) tensor or a callable unit -> (C,)."""
    if isinstance(effects, UnitEffects):
        return effects.of(unit)
    if isinstance(effects, torch.Tensor):
        return effects[int(unit)]
    return torch.as_tensor(effects(int(unit)))


def _class_index(concept: str | None, class_names: Sequence[str] | None) -> int | None:
    if concept is None or not class_names:
        return None
    lookup = {str(n).strip().lower(): i for i, n in enumerate(class_names)}
    return lookup.get(str(concept).strip().lower())


def causal_score(effects_c: torch.Tensor, concept: str | int | None = None,
                 class_names: Sequence[str] | None = None) -> tuple[float, int | None]:
    """(score, class index) of one unit for a concept: the effect on the concept's class when the
    concept names a class (a class index, or a name among ``class_names``, case-insensitive), else
    the largest class effect and its class. effects_c: (C,) the unit's effects. NaN classes are
    skipped; all NaN gives (nan, None)."""
    effects_c = torch.as_tensor(effects_c).float().flatten()
    index = int(concept) if isinstance(concept, int) else _class_index(concept, class_names)
    if index is not None:
        return float(effects_c[index]), index
    finite = torch.nan_to_num(effects_c, nan=-float("inf"))
    if not bool(torch.isfinite(finite).any()):
        return float("nan"), None
    best = int(finite.argmax())
    return float(effects_c[best]), best


def class_label(cls: int | None, class_names: Sequence[str] | None = None) -> str | int | None:
    """The name of class index ``cls`` among ``class_names`` (without names: the index itself;
    None stays None), as the causal scores' ``causal_class`` columns show it."""
    if cls is None:
        return None
    return class_names[cls] if class_names is not None else cls


def top_effects(effects_c: torch.Tensor, class_names: Sequence[str] | None = None, k: int = 3) -> list[tuple[str, float]]:
    """The unit's ``k`` largest class effects, [(class name or index, drop)] largest first (NaN
    classes left out). effects_c: (C,)."""
    effects_c = torch.as_tensor(effects_c).float().flatten()
    order = torch.argsort(torch.nan_to_num(effects_c, nan=-float("inf")), descending=True).tolist()
    rows = [(str(class_label(i, class_names)), float(effects_c[i]))
            for i in order if not torch.isnan(effects_c[i])]
    return rows[:k]


def describe_with_effects(descriptions: Sequence[tuple[str, float]], effects_c: torch.Tensor,
                          class_names: Sequence[str] | None = None) -> pd.DataFrame:
    """An ``interpret.describe`` result with a causal score beside each description.

    descriptions: [(concept, similarity)] best first; effects_c: (C,) the unit's effects
    (:class:`UnitEffects`.of). Returns a DataFrame: rank (1..), concept, score (the similarity),
    causal (:func:`causal_score`: the class's effect when the concept names a class, else the
    unit's largest class effect), causal_class (the class that effect is on).
    """
    rows = []
    for rank, (concept, score) in enumerate(descriptions, 1):
        value, cls = causal_score(effects_c, concept, class_names)
        rows.append({"rank": rank, "concept": concept, "score": float(score), "causal": value,
                     "causal_class": class_label(cls, class_names)})
    return pd.DataFrame(rows, columns=["rank", "concept", "score", "causal", "causal_class"])


def localize_with_effects(units: Sequence[int] | torch.Tensor, scores: Sequence[float] | torch.Tensor, effects,
                          concept: str | int | None = None, class_names: Sequence[str] | None = None) -> pd.DataFrame:
    """An ``interpret.localize`` result (units (tau,), scores (tau,)) with each unit's causal score.

    effects: a :class:`UnitEffects` (computes only these units), a (U, C) tensor or a callable
    unit -> (C,). concept: the concept localized (a class index or name: its class's effect; else
    each unit's largest class effect). Returns a DataFrame: rank, unit, score, causal, causal_class.
    """
    units = torch.as_tensor(units).flatten().tolist()
    scores = torch.as_tensor(scores).flatten().tolist()
    if len(units) != len(scores):
        raise ValueError(f"{len(units)} units but {len(scores)} scores")
    rows = []
    for rank, (u, s) in enumerate(zip(units, scores), 1):
        value, cls = causal_score(_effects_row(effects, u), concept, class_names)
        rows.append({"rank": rank, "unit": int(u), "score": float(s), "causal": value,
                     "causal_class": class_label(cls, class_names)})
    return pd.DataFrame(rows, columns=["rank", "unit", "score", "causal", "causal_class"])


# --------------------------------------------------------------------------------------------
# Localize by a method, confirm by ablation


def confirm(scores_cu: torch.Tensor, effects, *, top_k: int = 20, tau: int = 5,
            classes: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
    """Each class's ``tau`` units: the method's ``top_k`` candidates for the class (by
    ``scores_cu``, NaN never picked), re-ranked by their effect on that class (largest drop first;
    equal effects keep the method's order). Only the candidates' effects are computed.

    scores_cu: (C, U) a method's scores whose rows are the classes (the columns of ``effects``);
    effects: a :class:`UnitEffects`, a (U, C) tensor or a callable unit -> (C,). Returns
    ``{class: LongTensor (tau,)}``. Raises ValueError unless 1 <= tau <= top_k <= U.
    """
    if scores_cu.ndim != 2:
        raise ValueError(f"scores must be (classes, units), got {tuple(scores_cu.shape)}")
    n_units = scores_cu.shape[1]
    if not 1 <= tau <= top_k <= n_units:
        raise ValueError(f"need 1 <= tau <= top_k <= units ({n_units}), got tau={tau}, top_k={top_k}")
    classes = range(scores_cu.shape[0]) if classes is None else [int(c) for c in classes]
    out = {}
    for c in classes:
        row = torch.nan_to_num(scores_cu[c].float(), nan=-float("inf"))
        out[int(c)] = _by_drop(torch.topk(row, top_k).indices.tolist(), effects, c)[:tau]
    return out


def _by_drop(candidates: list[int], effects, c: int) -> torch.Tensor:
    """The candidates ordered by their effect on class c, largest first (NaN last; ties keep order)."""
    drops = [float(_effects_row(effects, u)[c]) for u in candidates]
    order = sorted(range(len(candidates)), key=lambda i: (drops[i] != drops[i], -drops[i] if drops[i] == drops[i] else 0.0, i))
    return torch.tensor([candidates[i] for i in order], dtype=torch.long)


class ConfirmedSelector:
    """A selector (select.UnitSelector) that localizes by a method and confirms by ablation: class
    c's units are its ``top_k`` candidates under ``scores_cu`` (or under another selector's
    ``select(c, top_k)``), re-ranked by their effect on class c (:func:`confirm`).

    scores: a (C, U) score matrix or a selector; effects: a :class:`UnitEffects` (lazily computes
    only the candidates), a (U, C) tensor or a callable unit -> (C,).
    """

    def __init__(self, scores, effects, top_k: int = 20, name: str | None = None):
        self.scores, self.effects, self.top_k = scores, effects, int(top_k)
        base = getattr(scores, "name", None)
        self.name = name or (f"{base} + ablation" if base else "confirmed by ablation")

    def select(self, concept: int, tau: int) -> torch.Tensor:
        """Indices (tau,) of class ``concept``'s confirmed units, best first."""
        if isinstance(self.scores, torch.Tensor):
            return confirm(self.scores, self.effects, top_k=self.top_k, tau=tau, classes=[concept])[int(concept)]
        if tau > self.top_k:
            raise ValueError(f"tau={tau} is larger than top_k={self.top_k}")
        candidates = torch.as_tensor(self.scores.select(int(concept), self.top_k)).flatten().tolist()
        return _by_drop(candidates, self.effects, int(concept))[:tau]
