"""A planted benchmark: units built to detect known concepts inside the trained toy_cnn, with the
classifier made to read some of them and not others; every method's localization and description
is scored against that ground truth.

The planted network (:class:`PlantedCNN`) wraps the trained toy_cnn without changing what it
computes: its layer ``stages.2`` gains K extra channels (after the model's 128), each an exact,
documented detector of one colour of the world, and its head reads some of them:

- a planted channel of colour k (:func:`colour_maps`) is, at each of the layer's 8 x 8 cells, the
  fraction of the cell's pixels whose RGB value lies nearest to the world's colour k
  (:data:`~miclip_nb.shapes.world.COLOR_RGB`) and within :data:`COLOUR_DISTANCE` of it (computed
  from the input image inside the wrapper). Mean-pooled, it is the share of the image in colour k:
  on the balanced split its AUROC for colour k's presence is above 0.999 for every colour;
- a *mirrored* planted channel is the same map flipped left-right: its mean-pooled value equals
  its original's on every image (the same activation statistics), its map differs;
- ``stages.3`` runs the model's own stage 3 on the first 128 channels and carries the planted
  channels through (average-pooled to its 4 x 4 cells, which keeps their means); the head is the
  model's, plus, for each channel a class reads, ``weight * (pooled channel - offset)`` added to
  that class's logit. Removing a read channel (scaling it by 0) lowers that class's logit by
  ``weight`` x its value; removing an unread channel changes nothing at all.

The default plants (:data:`DEFAULT_PLANTS`): red, blue and yellow read by circle, triangle and
star (the classes whose typical colour they are, :data:`~miclip_nb.shapes.world.TYPICAL_COLOR`);
green, purple and orange unread; and the mirrored twins of the three read channels, unread.

Scoring (:func:`planted_benchmark` runs it all):

- localization (:func:`localization_hits`): is the channel a class reads among a method's top-tau
  units for that class (and how many unread planted channels are picked instead);
- description (:func:`description_hits`): is a planted channel's top description its colour;
- the causal score (:func:`causal_hits`, :mod:`miclip_nb.causal`): the drop of the class's logit
  when the channel alone is removed separates read channels from unread ones (the twins included,
  which every description method describes alike).

Measured with :func:`planted_benchmark`'s defaults (alignment seed 0): the planted network is right
on 80.2% of 600 test images (toy_cnn: 91.8%); removing the red, blue and yellow channels costs
circle, triangle and star 20.4, 10.6 and 8.7 accuracy points, removing an unread one changes no
prediction. Causal scores: 6.73, 3.06, 3.28 for the read channels, exactly 0 for the six unread
ones. Localization (read channels in their class's top 5, of 3): Captum-GxA, Ablation and MiClip +
ablation 3; MiClip 2 (blue is 15th for triangle, and the unread twins of red and yellow enter
circle's and star's top 5); NetDissect 1; MiClip (cosine), CLIP-Dissect and Act-Values 0 (Act-Values
ranks the planted channels last: shares of the image are smaller than any model unit's mean).
Descriptions: every method names the twins as their plain channels; all name every planted
channel by its colour except MiClip, which calls purple "grid" (8 of 9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .cosy import argmax_descriptions
from .world import COLOR_RGB, COLORS, CONCEPTS, SHAPES

#: A pixel counts for colour k when its RGB value (0-255) lies nearest to colour k and within this
#: Euclidean distance of it (the world's shape colours are jittered by up to 25 per channel and
#: noised with std 14; at 50 every colour's pooled channel detects its presence with AUROC > 0.999).
COLOUR_DISTANCE = 50.0
#: The layer whose channels are planted, and its number of channels in toy_cnn.
LAYER = "stages.2"
N_BASE_UNITS = 128


@dataclass(frozen=True)
class Plant:
    """One planted channel: the colour it detects, the class whose logit reads it (None: unread),
    and whether its map is mirrored left-right (the same pooled values as the plain map)."""

    concept: str
    reads: str | None = None
    mirrored: bool = False

    def __post_init__(self) -> None:
        if self.concept not in COLORS:
            raise ValueError(f"a planted channel detects a colour of the world {COLORS}, got {self.concept!r}")
        if self.reads is not None and self.reads not in SHAPES:
            raise ValueError(f"reads must be a class of the world {SHAPES} or None, got {self.reads!r}")


DEFAULT_PLANTS: tuple[Plant, ...] = (
    Plant("red", "circle"), Plant("blue", "triangle"), Plant("yellow", "star"),
    Plant("green"), Plant("purple"), Plant("orange"),
    Plant("red", mirrored=True), Plant("blue", mirrored=True), Plant("yellow", mirrored=True),
)
#: The head's weight on a read channel and the offset subtracted from its pooled value (a read
#: channel adds weight * (value - offset) to its class's logit).
DEFAULT_WEIGHT, DEFAULT_OFFSET = 100.0, 0.03


def colour_maps(images: torch.Tensor, colours: Sequence[str] = COLORS, size: tuple[int, int] | None = None,
                distance: float = COLOUR_DISTANCE) -> torch.Tensor:
    """(N, K, h, w) the fraction of each cell's pixels in each colour (see the module docstring).

    images: (N, 3, H, W) in [-1, 1] (the toy models' preprocessing, world.to_tensor); colours: K
    colour names of the world; size: (h, w) cells (default: every pixel, (H, W)). Raises ValueError
    for an unknown colour or images that are not (N, 3, H, W).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"need (N, 3, H, W) images, got {tuple(images.shape)}")
    unknown = [c for c in colours if c not in COLOR_RGB]
    if unknown:
        raise ValueError(f"unknown colour(s) {unknown}; choose from {COLORS}")
    rgb = (images.float() + 1.0) * 127.5
    prototypes = torch.tensor([COLOR_RGB[c] for c in COLORS], dtype=torch.float32, device=images.device)  # (6, 3)
    # squared distances |x - p|^2 = |x|^2 - 2 x.p + |p|^2, (N, 6, H, W), without an (N, 6, 3, H, W) temporary
    dist2 = torch.einsum("nchw,kc->nkhw", rgb, -2.0 * prototypes)
    dist2 += (rgb * rgb).sum(1, keepdim=True)
    dist2 += (prototypes * prototypes).sum(1)[None, :, None, None]
    nearest, which = dist2.min(1)
    close = nearest < distance * distance
    maps = torch.stack([(which == COLORS.index(c)) & close for c in colours], 1).float()
    return maps if size is None else F.adaptive_avg_pool2d(maps, size)


class ColourPlanter(nn.Module):
    """Computes the planted channels' pixel maps from the input image; the planted stage reads them.

    Holds the plants' colours and mirror flags as buffers (so the weights' fingerprint names them).
    ``forward(images)`` stores the (N, K, H, W) maps and returns the images unchanged.
    """

    def __init__(self, plants: Sequence[Plant]):
        super().__init__()
        self.colours = [p.concept for p in plants]
        self.register_buffer("colour_index", torch.tensor([COLORS.index(p.concept) for p in plants]))
        self.register_buffer("mirrored", torch.tensor([p.mirrored for p in plants]))
        self.maps: torch.Tensor | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Store the planted channels' (N, K, H, W) pixel maps of ``images``; return the images."""
        maps = colour_maps(images, self.colours)
        self.maps = torch.where(self.mirrored[None, :, None, None], maps.flip(-1), maps)
        return images

    def at(self, size: tuple[int, int]) -> torch.Tensor:
        """The stored maps averaged to ``size`` cells. Raises RuntimeError before a forward pass."""
        if self.maps is None:
            raise RuntimeError("the planted stage ran before the planter: call the whole PlantedCNN")
        return F.adaptive_avg_pool2d(self.maps, size)


class PlantedStage(nn.Module):
    """The model's stage 2, with the planted channels appended to its output: (N, 128 + K, 8, 8)."""

    def __init__(self, stage: nn.Module, planter: ColourPlanter):
        super().__init__()
        self.stage = stage
        self.__dict__["planter"] = planter  # shared with the wrapper, not a second child (one forward call)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, 64, 16, 16) stage-1 output -> (N, 128 + K, 8, 8): the stage's output, then the planted maps."""
        out = self.stage(h)
        return torch.cat([out, self.planter.at(tuple(out.shape[-2:])).to(out.dtype)], 1)


class CarryPlanted(nn.Module):
    """The model's stage 3 on the first ``n_base`` channels; the planted ones carried through,
    average-pooled to its output's cells (their means unchanged)."""

    def __init__(self, stage: nn.Module, n_base: int):
        super().__init__()
        self.stage, self.n_base = stage, n_base

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, n_base + K, 8, 8) -> (N, n_base + K, 4, 4): stage 3 on the model's channels, the planted ones pooled."""
        out = self.stage(h[:, : self.n_base])
        return torch.cat([out, F.adaptive_avg_pool2d(h[:, self.n_base :], tuple(out.shape[-2:]))], 1)


class PlantedCNN(nn.Module):
    """toy_cnn with planted channels at ``stages.2`` (see the module docstring).

    base: a trained toy_shapes ToyCNN (its modules are shared, not copied); plants: the planted
    channels, appended after the model's 128 in order; weight / offset: how the head reads a read
    channel. forward: (N, 3, 64, 64) in [-1, 1] -> (N, 6) logits. Layer names: ``planter``,
    ``stem``, ``stages.0`` .. ``stages.3``, ``pool``, ``head`` (steer.tail_module splits it at
    ``stages.2``). Raises ValueError for no plants or a base whose stage 2 is not 128 wide.
    """

    def __init__(self, base: nn.Module, plants: Sequence[Plant] = DEFAULT_PLANTS, weight: float = DEFAULT_WEIGHT,
                 offset: float = DEFAULT_OFFSET):
        super().__init__()
        plants = tuple(plants)
        if not plants:
            raise ValueError("plant at least one channel")
        n_base = int(base.head.in_features)
        if n_base != N_BASE_UNITS:
            raise ValueError(f"expected a toy_cnn whose last stages are {N_BASE_UNITS} wide, got {n_base}")
        self.plants, self.weight, self.offset = plants, float(weight), float(offset)
        self.planter = ColourPlanter(plants)
        self.stem = base.stem
        stages = list(base.stages)
        stages[2] = PlantedStage(stages[2], self.planter)
        stages[3] = CarryPlanted(stages[3], n_base)
        self.stages = nn.Sequential(*stages)
        self.pool = base.pool
        n_classes = base.head.out_features
        self.head = nn.Linear(n_base + len(plants), n_classes)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[:, :n_base] = base.head.weight
            self.head.bias.copy_(base.head.bias)
            for k, plant in enumerate(plants):
                if plant.reads is not None:
                    c = SHAPES.index(plant.reads)
                    self.head.weight[c, n_base + k] = self.weight
                    self.head.bias[c] -= self.weight * self.offset
        self.n_base = n_base
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 64, 64) images in [-1, 1] -> (N, 6) logits."""
        return self.head(self.pool(self.stages(self.stem(self.planter(x)))))

    @property
    def planted_units(self) -> list[int]:
        """The planted channels' unit indices at ``stages.2`` (128 .. 128 + K - 1)."""
        return list(range(self.n_base, self.n_base + len(self.plants)))


def planted_toy_cnn(plants: Sequence[Plant] = DEFAULT_PLANTS, weight: float = DEFAULT_WEIGHT,
                    offset: float = DEFAULT_OFFSET, weights_dir=None):
    """The committed toy_cnn with planted channels, as a zoo.TargetModel (layer ``stages.2``,
    preprocessing toy_preprocess, the six shape classes). Raises as toy_models.load_toy_model."""
    from ..zoo import load_target
    from .toy_models import TOY_CLASS_NAMES, load_toy_model, toy_preprocess

    module = PlantedCNN(load_toy_model("toy_cnn", weights_dir), plants, weight, offset)
    return load_target(module, preprocess=toy_preprocess, class_names=list(TOY_CLASS_NAMES), layer=LAYER)


def ground_truth(model: PlantedCNN) -> pd.DataFrame:
    """One row per planted channel: unit (its index at stages.2), concept (its colour), mirrored,
    read (bool), class (the class whose logit reads it, or None), class_index (or -1), twin_of (for
    a mirrored channel, the unit of the plain channel of the same colour if there is one, else -1)."""
    rows = []
    plain = {p.concept: u for p, u in zip(model.plants, model.planted_units) if not p.mirrored}
    for plant, unit in zip(model.plants, model.planted_units):
        rows.append({"unit": unit, "concept": plant.concept, "mirrored": plant.mirrored, "read": plant.reads is not None,
                     "class": plant.reads, "class_index": SHAPES.index(plant.reads) if plant.reads else -1,
                     "twin_of": plain.get(plant.concept, -1) if plant.mirrored else -1})
    return pd.DataFrame(rows)


@torch.no_grad()
def verify_ground_truth(model: PlantedCNN, images: torch.Tensor, labels, batch_size: int = 256) -> pd.DataFrame:
    """What removing each planted channel alone does to accuracy: one row per planted channel with
    its ground truth (:func:`ground_truth`), acc_class / acc_class_removed (accuracy, in percent, on
    the images of the class that reads it; NaN for unread channels), delta_class, and
    max_abs_delta (the largest accuracy change over all classes) and changed (images whose
    prediction changed). images: (N, 3, 64, 64) in [-1, 1]; labels: (N,)."""
    from ..steer import cache_layer_outputs, neuron_edit, tail_module

    labels = torch.as_tensor(labels).long()
    tail = tail_module(model, LAYER, images[:2])
    acts, base = cache_layer_outputs(model, images, LAYER, batch_size)
    n_classes = len(SHAPES)

    def accuracy(pred: torch.Tensor) -> np.ndarray:
        return np.array([100.0 * float((pred[labels == c] == c).float().mean()) if bool((labels == c).any()) else np.nan
                         for c in range(n_classes)])

    base_acc = accuracy(base)
    rows = []
    for row in ground_truth(model).to_dict("records"):
        edit = neuron_edit([row["unit"]], "scale", 0.0)
        pred = torch.cat([tail(edit(acts[s : s + batch_size])).argmax(1) for s in range(0, len(acts), batch_size)])
        acc = accuracy(pred)
        c = row["class_index"]
        rows.append({**row, "acc_class": base_acc[c] if c >= 0 else np.nan, "acc_class_removed": acc[c] if c >= 0 else np.nan,
                     "delta_class": acc[c] - base_acc[c] if c >= 0 else np.nan,
                     "max_abs_delta": float(np.nanmax(np.abs(acc - base_acc))), "changed": int((pred != base).sum())})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Scoring methods against the ground truth


def _ranking(entry, c: int) -> list[int]:
    """A method's units for class c, best first: from a (C, U) score matrix (NaN never picked) or a
    {class: units} selection."""
    if isinstance(entry, torch.Tensor):
        row = torch.nan_to_num(entry[c].float(), nan=-float("inf"))
        return torch.argsort(row, descending=True, stable=True).tolist()
    return [int(u) for u in torch.as_tensor(entry[c]).flatten().tolist()]


def localization_hits(class_scores: Mapping[str, object], truth: pd.DataFrame, tau: int = 5) -> pd.DataFrame:
    """Localization against the ground truth: for each method and each read planted channel, the
    rank (1-based, NaN beyond the method's list) of the channel among the method's units for the
    class that reads it, hit (rank <= tau), and unread_picked (unread planted channels among the
    class's top tau: units that do nothing for it).

    class_scores: ``{method: (C, U) class scores}`` or ``{method: {class index: units best first}}``
    (e.g. causal.confirm's); truth: :func:`ground_truth`. Returns a DataFrame: method, unit,
    concept, class, rank, hit, unread_picked. Raises ValueError for tau < 1.
    """
    if tau < 1:
        raise ValueError(f"tau must be >= 1, got {tau}")
    unread = set(truth.loc[~truth["read"], "unit"].tolist())
    rows = []
    for method, entry in class_scores.items():
        for row in truth[truth["read"]].to_dict("records"):
            ranking = _ranking(entry, row["class_index"])
            rank = ranking.index(row["unit"]) + 1 if row["unit"] in ranking else float("nan")
            rows.append({"method": method, "unit": row["unit"], "concept": row["concept"], "class": row["class"],
                         "rank": rank, "hit": bool(rank <= tau), "unread_picked": len(unread & set(ranking[:tau]))})
    return pd.DataFrame(rows, columns=["method", "unit", "concept", "class", "rank", "hit", "unread_picked"])


def description_hits(concept_scores: Mapping[str, torch.Tensor], truth: pd.DataFrame,
                     concepts: Sequence[str] = CONCEPTS) -> pd.DataFrame:
    """Description against the ground truth: for each method and each planted channel, its top
    description (the argmax of the method's (len(concepts), U) scores over the concepts; all-NaN:
    None) and hit (it is the channel's colour).

    Returns a DataFrame: method, unit, concept, read, mirrored, described_as, hit. Raises
    ValueError for a score matrix whose rows are not the concepts.
    """
    rows = []
    for method, scores in concept_scores.items():
        if scores.shape[0] != len(concepts):
            raise ValueError(f"{method}: scores have {scores.shape[0]} rows for {len(concepts)} concepts")
        top = argmax_descriptions(scores, truth["unit"].tolist(), concepts)
        for row in truth.to_dict("records"):
            described = top.get(row["unit"])
            rows.append({"method": method, "unit": row["unit"], "concept": row["concept"], "read": row["read"],
                         "mirrored": row["mirrored"], "described_as": described, "hit": described == row["concept"]})
    return pd.DataFrame(rows, columns=["method", "unit", "concept", "read", "mirrored", "described_as", "hit"])


def causal_hits(effects_uc: torch.Tensor, truth: pd.DataFrame) -> pd.DataFrame:
    """The causal score of each planted channel: effect (the drop of the logit of the class that
    reads it; for an unread channel, its largest class effect), from causal.unit_effects rows of the
    planted units in the order of ``truth`` (effects_uc: (K, C)). Returns a DataFrame: unit, concept,
    read, mirrored, class, effect."""
    from ..causal import causal_score

    if effects_uc.shape[0] != len(truth):
        raise ValueError(f"{effects_uc.shape[0]} effect rows for {len(truth)} planted channels")
    rows = []
    for e, row in zip(effects_uc, truth.to_dict("records")):
        value, _ = causal_score(e, row["class_index"] if row["read"] else None)
        rows.append({"unit": row["unit"], "concept": row["concept"], "read": row["read"], "mirrored": row["mirrored"],
                     "class": row["class"], "effect": value})
    return pd.DataFrame(rows)


def planted_summary(localization: pd.DataFrame, description: pd.DataFrame) -> pd.DataFrame:
    """One row per method: loc_hits (share of read channels among the top tau of the class that reads
    them), loc_unread_picked (mean unread planted channels picked per class), desc_hits (share of
    planted channels described by their colour), desc_hits_read / desc_hits_unread."""
    methods = list(dict.fromkeys([*localization["method"], *description["method"]]))
    rows = []
    for m in methods:
        loc, desc = localization[localization["method"] == m], description[description["method"] == m]
        rows.append({"method": m,
                     "loc_hits": float(loc["hit"].mean()) if len(loc) else float("nan"),
                     "loc_unread_picked": float(loc["unread_picked"].mean()) if len(loc) else float("nan"),
                     "desc_hits": float(desc["hit"].mean()) if len(desc) else float("nan"),
                     "desc_hits_read": float(desc.loc[desc["read"], "hit"].mean()) if len(desc) else float("nan"),
                     "desc_hits_unread": float(desc.loc[~desc["read"], "hit"].mean()) if len(desc) else float("nan")})
    return pd.DataFrame(rows).set_index("method")


#: The methods whose descriptions :func:`planted_benchmark` scores (groundtruth.concept_scores names).
DESCRIBE_METHODS: tuple[str, ...] = ("MiClip", "Act-Values", "NetDissect", "CLIP-Dissect")
#: The class-localization methods :func:`planted_benchmark` scores.
LOCALIZE_METHODS: tuple[str, ...] = ("MiClip", "MiClip (cosine)", "Act-Values", "CLIP-Dissect", "NetDissect", "Captum-GxA",
                                     "Ablation", "MiClip + ablation")


def _split_images(split: str, n: int, start: int = 0):
    from .world import WorldConfig, render_batch

    return render_batch(WorldConfig(), split, range(start, start + n))


def planted_benchmark(target=None, *, n_train: int = 4000, n_probe: int = 1000, n_eval: int = 600, n_captum: int = 300,
                      tau: int = 5, confirm_top_k: int = 20, seed: int = 0, methods: Sequence[str] | None = None,
                      describe_methods: Sequence[str] = DESCRIBE_METHODS, batch_size: int = 128,
                      progress: bool = False) -> dict:
    """Every method's localization and description on the planted toy_cnn, scored against the
    ground truth, with the causal score of each planted channel.

    target: planted_toy_cnn() by default. MiClip: an encoder aligned (align.fit_alignment, seed
    ``seed``) on ``n_train`` train-split images through the planted model and ToyCLIP
    (pipeline.prepare). Class localization (C = 6 classes): MiClip / MiClip (cosine) (unit
    embeddings against the class prompts), Act-Values and CLIP-Dissect (on the alignment store,
    as the delta-accuracy tables read them), NetDissect (IoU with the shapes' masks on the first
    ``n_probe`` train images), Captum-GxA (``n_captum`` train images), Ablation (causal.unit_effects
    of every unit on those images: the causal ranking) and "MiClip + ablation" (MiClip's top
    ``confirm_top_k`` per class confirmed by ablation, causal.confirm). Descriptions (16 concepts):
    groundtruth.concept_scores on ``n_probe`` balanced images. The causal score of each planted
    channel is measured on ``n_eval`` test images, beside :func:`verify_ground_truth`.
    ``methods``: restrict the class-localization methods (names as above); ``describe_methods``:
    the description methods (groundtruth.METHODS names; default :data:`DESCRIBE_METHODS`).

    Returns {"truth", "verify", "localization", "description", "causal", "summary"} (DataFrames;
    summary: :func:`planted_summary`) and "class_scores", "concept_scores" (the methods' matrices).
    Raises ValueError for an unknown localization method, and the errors of the steps.
    """
    from .. import baselines as bl
    from ..align import fit_alignment
    from ..causal import UnitEffects, confirm
    from ..interpret import concept_temperature, concept_unit_scores, unit_embeddings
    from ..pipeline import PipelineConfig, prepare
    from .groundtruth import concept_scores as gt_concept_scores
    from .probes import ShapesMaskProbe

    wanted = set(methods) if methods is not None else None
    unknown = sorted((wanted or set()) - set(LOCALIZE_METHODS))
    if unknown:
        raise ValueError(f"unknown localization method(s) {unknown}; choose from {list(LOCALIZE_METHODS)}")
    target = target if target is not None else planted_toy_cnn()
    model = target.module
    truth = ground_truth(model)
    config = PipelineConfig(model=target, clip="toyclip", train_data=f"shapes:train:{n_train}", seeds=(seed,),
                            layer=LAYER, batch_size=batch_size)
    prep = prepare(config, progress=progress)
    encoder = fit_alignment(prep.store, prep.class_text_emb_cd, layer=prep.layer, seed=seed, progress=progress)
    unit_emb, temperature = unit_embeddings(encoder), concept_temperature(encoder)

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    class_scores: dict[str, object] = {}
    if want("MiClip") or want("MiClip + ablation"):
        class_scores["MiClip"] = concept_unit_scores(unit_emb, prep.class_text_emb_cd, "posterior", temperature=temperature)
    if want("MiClip (cosine)"):
        class_scores["MiClip (cosine)"] = concept_unit_scores(unit_emb, prep.class_text_emb_cd, "cosine")
    if want(bl.ACT_VALUES):
        class_scores[bl.ACT_VALUES] = bl.act_values_from_store(prep.store, LAYER, len(SHAPES))
    if want(bl.CLIP_DISSECT):
        class_scores[bl.CLIP_DISSECT] = bl.clip_dissect_from_store(prep.store, prep.class_text_emb_cd, LAYER)
    if want(bl.NETDISSECT):
        probe = ShapesMaskProbe("train", n_probe)
        class_scores[bl.NETDISSECT] = bl.netdissect_scores(model, LAYER, probe, batch_size=64, progress=progress)[: len(SHAPES)]
    images, attrs = _split_images("train", n_captum)
    labels = torch.as_tensor(attrs[:, 0])
    if want("Captum-GxA"):
        class_scores["Captum-GxA"] = bl.captum_scores(model, LAYER, images, labels, "grad_x_act", n_classes=len(SHAPES),
                                                      batch_size=64)
    effects = UnitEffects(model, LAYER, images, labels=labels, batch_size=batch_size)
    if want(bl.ABLATION):
        class_scores[bl.ABLATION] = effects().T
    if want("MiClip + ablation"):
        class_scores["MiClip + ablation"] = confirm(class_scores["MiClip"], effects, top_k=confirm_top_k, tau=tau)
        if not want("MiClip"):
            del class_scores["MiClip"]
    localization = localization_hits(class_scores, truth, tau)

    desc_probe = ShapesMaskProbe("balanced", n_probe)
    described = gt_concept_scores(model, LAYER, desc_probe, methods=list(describe_methods),
                                  backend=prep.backend, unit_emb_ud=unit_emb, temperature=temperature, progress=progress)
    description = description_hits(described, truth)

    eval_images, eval_attrs = _split_images("test", n_eval)
    eval_labels = torch.as_tensor(eval_attrs[:, 0])
    eval_effects = UnitEffects(model, LAYER, eval_images, labels=eval_labels, batch_size=batch_size)
    causal = causal_hits(eval_effects(truth["unit"].tolist()), truth)
    verify = verify_ground_truth(model, eval_images, eval_labels, batch_size)
    return {"truth": truth, "verify": verify, "localization": localization, "description": description, "causal": causal,
            "summary": planted_summary(localization, description), "class_scores": class_scores,
            "concept_scores": described}


def main(argv: list[str] | None = None) -> int:
    """``python -m miclip_nb.shapes.planted [--seed 0] [--n-train 4000] [--n-probe 1000] [--n-eval 600]
    [--n-captum 300]``: runs
    :func:`planted_benchmark` with its defaults on the planted toy_cnn and prints the ground truth
    check (accuracy cost of removing each planted channel), the causal scores and the summary of
    every method's localization and description."""
    import argparse

    p = argparse.ArgumentParser(description="Planted benchmark: methods against channels of known meaning (Shapes world)")
    p.add_argument("--seed", type=int, default=0, help="alignment seed")
    p.add_argument("--n-train", type=int, default=4000, help="train-split images for the alignment")
    p.add_argument("--n-probe", type=int, default=1000, help="balanced images the baselines' scores are made on")
    p.add_argument("--n-eval", type=int, default=600, help="test-split images the ground truth is checked on")
    p.add_argument("--n-captum", type=int, default=300, help="images the Captum attributions are averaged over")
    args = p.parse_args(argv)
    res = planted_benchmark(seed=args.seed, n_train=args.n_train, n_probe=args.n_probe, n_eval=args.n_eval,
                            n_captum=args.n_captum, progress=True)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print("ground truth, checked on the test split:\n", res["verify"].round(2).to_string(), sep="")
        print("\ncausal score of each planted channel (class logit drop when removed):\n",
              res["causal"].round(3).to_string(), sep="")
        print("\nlocalization and description, per method:\n", res["summary"].round(3).to_string(), sep="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
