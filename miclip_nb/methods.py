"""One registry of the unit-selection methods the tables compare, each declaring the units it works on.

A :class:`Method` turns the :class:`Evidence` of a run (the unit space, the store of per-image unit
values with labels, predictions and CLIP embeddings, the class text embeddings, and what the method
needs beyond: MiClip's aligned units, NetDissect's masks, Captum's images) into one
:class:`~miclip_nb.select.UnitSelector` per seed (or per draw, for random units), so the
delta-accuracy harness runs every method alike. Methods are looked up by key ("act_values") or by
table name ("Act-Values"); :func:`register` adds one.

| key | table name | units | what it reads |
|---|---|---|---|
| miclip | MiClip | neuron, sae | the aligned unit embeddings, ranked by log p(class \\| unit) (interpret) |
| miclip_cosine | MiClip (cosine) | neuron, sae | the same embeddings, ranked by cosine (the paper's rule) |
| image_only | Image-only aligner | neuron, sae | an encoder aligned with CLIP's image embeddings alone (Text-to-Concept), ranked as MiClip |
| random | Random (reference) | neuron, sae | nothing: ``n_random`` draws |
| act_values | Act-Values | neuron, sae | mean activation per class over the store (predicted class where labels are unknown) |
| netdissect | NetDissect | neuron | IoU of thresholded maps with concept masks |
| clip_dissect | CLIP-Dissect | neuron, sae | soft-WPMI of top-activating images' CLIP similarities (a ViT layer's class token, as its code reads) |
| captum_conductance / captum_ig / captum_gxa | Captum-* | neuron | attributions of the class logit |
| ablation | Ablation (reference) | neuron, sae | what removing each unit alone costs each class |

Seeds differ by the alignment seed (MiClip) or by the draw of the probing rows / images
(baselines: ``n_probe`` store rows, ``n_captum`` images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import baselines as bl
from .select import RandomSelector, ScoreSelector, UnitSelector
from .store import acts_field

__all__ = ["Evidence", "Method", "get", "keys", "register", "resolve", "table_name"]


@dataclass
class Evidence:
    """What the methods of one table read (fields a method does not need may stay None).

    space: units.UnitSpace (model, layer, neurons or SAE features); store: per-image unit values
    of the probing images (field ``acts/<layer>``, with ``label``, ``pred``, ``clip_image``);
    class_emb_cd: (C, D) class text embeddings; seeds: one selector per seed.
    """

    space: object  # units.UnitSpace
    store: object  # store.ActivationStore of the space's per-image unit values
    class_emb_cd: torch.Tensor  # (C, D) text embeddings of the classes
    seeds: tuple[int, ...] = (0,)  # one selector per seed (alignment seed / probing draw)
    n_random: int = 20  # draws of the random reference
    n_probe: int | None = 2000  # store rows per seed for Act-Values and CLIP-Dissect (None: all)
    n_captum: int = 300  # training images per seed for Captum and the ablation reference
    captum_steps: int = 16  # path steps of Captum IG / Conductance
    images: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None  # (n, seed) -> (images, labels)
    mask_probe: object = None  # baselines.MaskProbe for NetDissect
    miclip: Callable[[int], tuple[torch.Tensor, float]] | None = None  # seed -> (unit embeddings (U, D), temperature)
    image_only: Callable[[int], tuple[torch.Tensor, float]] | None = None  # the same, aligned on images alone
    pooled: Callable[[str], object] | None = None  # pooling -> the store of the same images pooled that way (neurons)
    device: str | None = None
    progress: bool = False

    @property
    def n_classes(self) -> int:
        """C, the number of classes (rows of the class embeddings)."""
        return int(self.class_emb_cd.shape[0])

    @property
    def n_units(self) -> int:
        """U, from the store's unit field."""
        return int(self.store.fields[acts_field(self.space.layer)][0])

    def require(self, what: str, method: str):
        """The field ``what``, or ValueError saying the method needs it."""
        value = getattr(self, what)
        if value is None:
            raise ValueError(f"{method} needs Evidence.{what} ({_NEEDS_HELP.get(what, what)})")
        return value


_NEEDS_HELP = {
    "miclip": "the aligned unit embeddings per seed: pipeline.aligned_units",
    "image_only": "unit embeddings of encoders aligned on images alone: pipeline.aligned_units with image_only=True",
    "mask_probe": "concept masks: a Broden-style folder (baselines.FolderMaskProbe) or a dataset with masks",
    "images": "a way to draw training images per seed",
}


@dataclass(frozen=True)
class Method:
    """A unit-selection method. ``scores(evidence, seed) -> (C, U)`` (higher = better unit for
    class c); a reference with ``draws`` instead makes its selectors itself."""

    key: str  # configuration name, e.g. "act_values"
    name: str  # table name, e.g. "Act-Values"
    units: frozenset[str]  # unit kinds it works on: {"neuron"}, {"neuron", "sae"}
    scores: Callable[["Evidence", int], torch.Tensor] | None = None
    draws: Callable[["Evidence"], list[UnitSelector]] | None = None
    reference: bool = False  # a reference row (random units, the ablation ceiling): never marked best
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if (self.scores is None) == (self.draws is None):
            raise ValueError(f"method {self.key!r} needs exactly one of scores= and draws=")

    def supports(self, kind: str) -> bool:
        """Whether the method works on units of ``kind`` ("neuron" or "sae")."""
        return kind in self.units

    def selectors(self, evidence: Evidence) -> list[UnitSelector]:
        """One selector per seed of ``evidence`` (or per draw). Raises ValueError when the method
        does not support the evidence's unit kind, or lacks an input it needs."""
        kind = evidence.space.kind
        if not self.supports(kind):
            raise ValueError(f"{self.name} does not work on {evidence.space.label}s; "
                             f"methods that do: {[m.key for m in _REGISTRY.values() if m.supports(kind)]}")
        if self.draws is not None:
            return self.draws(evidence)
        return [ScoreSelector(self.name, self.scores(evidence, seed)) for seed in evidence.seeds]


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add (or replace) a method in the registry; returns it."""
    _REGISTRY[method.key] = method
    return method


def keys(kind: str | None = None) -> list[str]:
    """The registered method keys, in registration order (``kind``: only those supporting it)."""
    return [k for k, m in _REGISTRY.items() if kind is None or m.supports(kind)]


def get(name: str) -> Method:
    """A method by key or table name (case-insensitive). Raises ValueError listing the valid ones."""
    lookup = {k.lower(): m for k, m in _REGISTRY.items()} | {m.name.lower(): m for m in _REGISTRY.values()}
    method = lookup.get(str(name).strip().lower())
    if method is None:
        raise ValueError(f"unknown method {name!r}; valid: {list(_REGISTRY)} "
                         f"(or their table names {[m.name for m in _REGISTRY.values()]})")
    return method


def resolve(names: Sequence[str] | str, kind: str | None = None) -> tuple[str, ...]:
    """Method keys for names (keys or table names), in the given order without duplicates; with
    ``kind``, each must support it. Raises ValueError for an unknown name, an empty list, or a
    method that does not work on ``kind``."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"give at least one method; valid: {keys()}")
    out = tuple(dict.fromkeys(get(n).key for n in names))
    if kind is not None:
        bad = [k for k in out if not _REGISTRY[k].supports(kind)]
        if bad:
            raise ValueError(f"method(s) {bad} do not work on {kind} units; choose from {keys(kind)}")
    return out


def table_name(key: str) -> str:
    """The table name of a method key."""
    return get(key).name


# --------------------------------------------------------------------------------------------
# The methods


def _aligned_scores(field: str, name: str, scoring: str):
    """Scores of an aligner's unit embeddings (Evidence.<field>) against the classes."""
    def scores(ev: Evidence, seed: int) -> torch.Tensor:
        from .interpret import concept_unit_scores

        unit_emb, temperature = ev.require(field, name)(seed)
        return concept_unit_scores(unit_emb, ev.class_emb_cd, scoring, temperature=temperature)

    return scores


def _random_draws(ev: Evidence) -> list[UnitSelector]:
    return [RandomSelector(ev.n_units, s) for s in range(ev.n_random)]


def _rows(ev: Evidence, seed: int):
    return bl.probe_rows(ev.store.n_rows, ev.n_probe, seed)


def class_field(store) -> str:
    """The store field that says each image's class: ``label``, or ``pred`` (the model's prediction,
    what MiClip's alignment reads too) where some labels are unknown (-1: unlabelled photos)."""
    known = all(int(shard["label"].min()) >= 0 for shard in store.iter_shards(["label"]))
    return "label" if known else "pred"


def _act_values(ev: Evidence, seed: int) -> torch.Tensor:
    return bl.act_values_from_store(ev.store, ev.space.layer, ev.n_classes, label_field=class_field(ev.store),
                                    rows=_rows(ev, seed))


def clip_dissect_store(ev: Evidence):
    """The store CLIP-Dissect reads: a ViT layer's class token where the units are the layer's
    neurons (as CLIP-Dissect's own code does for ViTs; a mean over the patch tokens changes most
    units' labels), else the evidence's store (CNN maps pooled by the run's pooling; SAE codes)."""
    if ev.space.kind == "neuron" and ev.pooled is not None and bl.clip_dissect_reads_class_token(ev.space.target.module):
        return ev.pooled("cls")
    return ev.store


def _clip_dissect(ev: Evidence, seed: int) -> torch.Tensor:
    return bl.clip_dissect_from_store(clip_dissect_store(ev), ev.class_emb_cd, ev.space.layer, rows=_rows(ev, seed))


def _netdissect(ev: Evidence, seed: int) -> torch.Tensor:
    probe = ev.require("mask_probe", "NetDissect")
    rows = bl.probe_rows(len(probe), ev.n_probe, seed)
    probe = probe if rows is None else bl.SubsetProbe(probe, rows)
    s = bl.netdissect_scores(ev.space.target.module, ev.space.layer, probe, device=ev.device, progress=ev.progress)
    return s[: ev.n_classes]  # the probe's first concepts are the classes


def _captum(method: str):
    def scores(ev: Evidence, seed: int) -> torch.Tensor:
        images, labels = ev.require("images", bl.CAPTUM_METHODS[method])(ev.n_captum, seed)
        return bl.captum_scores(ev.space.target.module, ev.space.layer, images, labels, method, n_classes=ev.n_classes,
                                n_steps=ev.captum_steps, batch_size=16, device=ev.device, progress=ev.progress)

    return scores


def _ablation(ev: Evidence, seed: int) -> torch.Tensor:
    images, labels = ev.require("images", bl.ABLATION)(ev.n_captum, seed)
    return bl.ablation_scores(ev.space.target.module, ev.space.layer, images, labels, ev.n_classes, n_units=ev.n_units,
                              edit_factory=ev.space.edit_factory, device=ev.device, progress=ev.progress)


_BOTH, _NEURONS = frozenset({"neuron", "sae"}), frozenset({"neuron"})
register(Method("miclip", "MiClip", _BOTH, scores=_aligned_scores("miclip", "MiClip", "posterior"),
                description="aligned units ranked by log p(class | unit) against the classes (interpret)"))
register(Method("miclip_cosine", "MiClip (cosine)", _BOTH, scores=_aligned_scores("miclip", "MiClip", "cosine"),
                description="the same aligned units ranked by cosine to the class (the paper's rule)"))
register(Method("image_only", "Image-only aligner", _BOTH,
                scores=_aligned_scores("image_only", "Image-only aligner", "posterior"),
                description="MiClip without the predicted-label term (as Text-to-Concept): is anchoring on the output worth it?"))
register(Method("random", "Random", _BOTH, draws=_random_draws, reference=True, description="random units, the floor"))
register(Method("act_values", bl.ACT_VALUES, _BOTH, scores=_act_values, description="mean activation per class"))
register(Method("netdissect", bl.NETDISSECT, _NEURONS, scores=_netdissect, description="IoU with concept masks"))
register(Method("clip_dissect", bl.CLIP_DISSECT, _BOTH, scores=_clip_dissect, description="soft-WPMI with CLIP"))
for _key, _method in (("captum_conductance", "conductance"), ("captum_ig", "integrated_gradients"),
                      ("captum_gxa", "grad_x_act")):
    register(Method(_key, bl.CAPTUM_METHODS[_method], _NEURONS, scores=_captum(_method),
                    description=f"captum {_method} attribution of the class logit"))
register(Method("ablation", bl.ABLATION, _BOTH, scores=_ablation, reference=True,
                description="what removing each unit alone costs each class: how much removal can cost"))
