"""Baseline unit-selection methods: Act-Values, Network Dissection, CLIP-Dissect and Captum.

Every method produces a ``(C, U)`` score matrix (concepts x units, higher = better unit for concept
c); :mod:`miclip_nb.methods` registers each one, so the delta-accuracy harness runs all methods
alike. A row of NaN means "no
evidence for this concept" (no probing image had it); do not select from such a row.

- **Act-Values** (:func:`act_values_scores`, :func:`act_values_from_store`): a unit's mean pooled
  activation over the concept's images (the activation-magnitude assumption the paper criticises).
- **Network Dissection** (:func:`netdissect_scores`, Bau et al. 2017): per unit, threshold the
  spatial activation map at its top-0.5% quantile over the probing set, upsample (bilinear) to the
  mask size, and score IoU = sum of intersections / sum of unions with the concept's masks over the
  probing set. Masks come from a :class:`MaskProbe`: a Broden-style folder (:class:`FolderMaskProbe`),
  or a plug-in's (the Shapes world's: ``miclip_nb.shapes.ShapesMaskProbe``).
- **CLIP-Dissect** (:func:`soft_wpmi`, :func:`clip_dissect_from_store`, Oikarinen & Weng 2023):
  soft-WPMI between the unit's top-activating probing images and CLIP's image-concept similarities.
- **Captum** (:func:`captum_unit_attributions`, :func:`captum_scores`): the attribution of the
  class logit to each unit by captum's LayerConductance, LayerIntegratedGradients or
  LayerGradientXActivation, summed over locations/tokens, averaged over the class's images.
- **Ablation** (:func:`ablation_scores`): a causal reference rather than a method: what zeroing
  each unit alone costs each class. Its top units show how much a removal *can* cost at a layer.

:func:`removal_vs_random` is the "removing the top units hurts more than removing random ones" check
used on real images (EfficientNet-Lite0 on imagenet-sample-500, see ``python -m
miclip_nb.baselines --help``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .capture import hooked_activations, num_prefix_tokens, resolve_layer, spatial_map
from .select import RandomSelector, ScoreSelector, selection
from .store import ActivationStore, acts_field
from ._progress import bars_off

#: Display names of the baselines, as they appear in the tables.
ACT_VALUES = "Act-Values"
NETDISSECT = "NetDissect"
CLIP_DISSECT = "CLIP-Dissect"
#: captum method key -> display name.
CAPTUM_METHODS: dict[str, str] = {
    "conductance": "Captum-Conductance",
    "integrated_gradients": "Captum-IG",
    "grad_x_act": "Captum-GxA",
}


def _device(device) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _membership(member, n_rows: int, n_concepts: int | None) -> torch.Tensor:
    """(N,) integer labels or (N, C) bool/0-1 membership -> (N, C) float membership."""
    member = member if isinstance(member, torch.Tensor) else torch.as_tensor(np.asarray(member))
    if member.shape[0] != n_rows:
        raise ValueError(f"{n_rows} activation rows but {member.shape[0]} labels")
    if member.ndim == 1:
        if member.is_floating_point():
            raise ValueError("1-D labels must be integers (class indices)")
        if n_rows and int(member.min()) < 0:
            raise ValueError("labels must be >= 0")
        n = n_concepts if n_concepts is not None else (int(member.max()) + 1 if n_rows else 0)
        if n_rows and int(member.max()) >= n:
            raise ValueError(f"label {int(member.max())} is out of range for {n} concepts")
        return F.one_hot(member.long(), n).float()
    if member.ndim != 2:
        raise ValueError(f"membership must be (N,) labels or (N, C), got {tuple(member.shape)}")
    if n_concepts is not None and member.shape[1] != n_concepts:
        raise ValueError(f"membership has {member.shape[1]} concepts, expected {n_concepts}")
    return member.float()


def _warn_empty(counts_c: torch.Tensor, what: str) -> None:
    empty = torch.nonzero(counts_c == 0).flatten().tolist()
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        warnings.warn(f"{what}: no probing image for concept(s) {shown}; their score rows are NaN", stacklevel=3)


# --------------------------------------------------------------------------------------------
# Act-Values


class MeanActivation:
    """Streaming accumulator of per-concept mean activations (Act-Values).

    ``update(acts_nu, member)`` with (N, U) pooled activations and (N,) class labels or (N, C)
    membership; ``scores()`` returns (C, U), NaN rows for concepts that no image had.
    """

    def __init__(self, n_concepts: int | None = None, name: str = ACT_VALUES):
        self.n_concepts, self.name = n_concepts, name
        self.sums_cu: torch.Tensor | None = None
        self.counts_c: torch.Tensor | None = None

    def update(self, acts_nu: torch.Tensor, member) -> None:
        acts_nu = torch.as_tensor(acts_nu).double()
        if acts_nu.ndim != 2:
            raise ValueError(f"expected pooled activations (N, U), got {tuple(acts_nu.shape)}")
        if not torch.isfinite(acts_nu).all():
            raise ValueError("activations contain NaN or inf")
        m = _membership(member, acts_nu.shape[0], self.n_concepts).double()
        if self.sums_cu is None:
            self.n_concepts = m.shape[1]
            self.sums_cu = torch.zeros(m.shape[1], acts_nu.shape[1], dtype=torch.float64)
            self.counts_c = torch.zeros(m.shape[1], dtype=torch.float64)
        elif acts_nu.shape[1] != self.sums_cu.shape[1]:
            raise ValueError(f"batch has {acts_nu.shape[1]} units, earlier batches {self.sums_cu.shape[1]}")
        self.sums_cu += m.T @ acts_nu
        self.counts_c += m.sum(0)

    def scores(self) -> torch.Tensor:
        if self.sums_cu is None:
            raise ValueError("no activations were given")
        _warn_empty(self.counts_c, self.name)
        out = self.sums_cu / self.counts_c[:, None]
        out[self.counts_c == 0] = float("nan")
        return out.float()


def act_values_scores(acts_nu: torch.Tensor, member, n_concepts: int | None = None) -> torch.Tensor:
    """Act-Values: (C, U) mean activation of each unit over each concept's images.

    acts_nu: (N, U) pooled activations; member: (N,) integer class labels or (N, C) bool
    membership (an image may have several concepts); n_concepts: C (default: max label + 1).
    Rows of concepts with no image are NaN (with a warning). Raises ValueError for mismatched
    lengths, non-finite activations or labels out of range.
    """
    acc = MeanActivation(n_concepts)
    acc.update(acts_nu, member)
    return acc.scores()


def _row_mask(rows: torch.Tensor | None, n_rows: int) -> torch.Tensor | None:
    """(n_rows,) bool mask of the store rows to use (None: all rows)."""
    if rows is None:
        return None
    rows = torch.as_tensor(rows).long().flatten()
    if rows.numel() == 0:
        raise ValueError("rows is empty")
    if int(rows.min()) < 0 or int(rows.max()) >= n_rows:
        raise ValueError(f"rows must lie in 0..{n_rows - 1}")
    mask = torch.zeros(n_rows, dtype=torch.bool)
    mask[rows] = True
    return mask


def _iter_rows(store: ActivationStore, fields: Sequence[str], rows: torch.Tensor | None) -> Iterable[dict[str, torch.Tensor]]:
    """The store's shards restricted to ``rows`` (global row indices; None: every row)."""
    mask, offset = _row_mask(rows, store.n_rows), 0
    for shard in store.iter_shards(list(fields)):
        n = shard[fields[0]].shape[0]
        if mask is None:
            yield shard
        else:
            keep = mask[offset : offset + n]
            if keep.any():
                yield {k: v[keep] for k, v in shard.items()}
        offset += n


def probe_rows(n_rows: int, n_probe: int | None, seed: int) -> torch.Tensor | None:
    """A seeded probing-set draw: ``n_probe`` of ``n_rows`` row indices without replacement,
    sorted (LongTensor (n_probe,)). None (every row) when ``n_probe`` is None or >= ``n_rows``.
    The baselines' only randomness: seeds of a table differ by this draw."""
    if n_probe is None or n_probe >= n_rows:
        return None
    if n_probe < 1:
        raise ValueError(f"n_probe must be positive, got {n_probe}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_rows, generator=gen)[:n_probe].sort().values


def act_values_from_store(store: ActivationStore, layer: str | None = None, n_classes: int | None = None,
                          label_field: str = "label", rows: torch.Tensor | None = None) -> torch.Tensor:
    """Act-Values by class from an activation store, one shard in memory at a time.

    ``label_field``: "label" (true class, default) or "pred" (predicted class); ``rows``: (R,)
    indices of the store rows to use (a probing-set draw, see :func:`probe_rows`; None: all).
    Returns (C, U).
    """
    field = acts_field(layer or store.layers[0])
    if n_classes is None:
        n_classes = max(int(s[label_field].max()) for s in _iter_rows(store, [label_field], rows)) + 1
    if len(store.fields[field]) != 1:
        raise ValueError(f"Act-Values needs pooled activations (N, U); {field} rows have shape {store.fields[field]}")
    acc = MeanActivation(n_classes)
    for shard in _iter_rows(store, [field, label_field], rows):
        acc.update(shard[field], shard[label_field])
    return acc.scores()


# --------------------------------------------------------------------------------------------
# Probing sets with masks (Network Dissection)


@runtime_checkable
class MaskProbe(Protocol):
    """A probing set with per-pixel concept masks.

    ``concepts``: C names; ``len(probe)``: number of images; ``batch(indices)`` returns
    ``(images (B, 3, H, W) preprocessed for the model, masks (B, C, H', W') bool)``.
    """

    concepts: list[str]

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]: ...


class FolderMaskProbe:
    """A Broden-style folder of images and per-concept masks::

        <root>/images/<name>.jpg              (or .png, .jpeg, ...: any image PIL reads)
        <root>/masks/<concept>/<name>.png     (nonzero pixels = concept present; same size as the image)

    An image without a mask file for a concept does not contain it. ``concepts``: which concept
    folders to use (default: all, sorted). ``preprocess``: PIL -> (3, H, W) model input.
    ``mask_transform``: PIL mask ("L") -> (H', W') bool tensor, aligned with the *preprocessed*
    image; the default resizes (nearest) to the preprocessed image's size, which is right for
    plain resizing but not for crops: with a crop, pass the same geometric transform here.

    Raises :class:`~miclip_nb.datasets.DatasetError` when the folder, ``images/`` or ``masks/`` is
    missing or empty, a concept has no folder, or a mask names no image.
    """

    def __init__(self, root: str | Path, preprocess: Callable, concepts: Sequence[str] | None = None,
                 mask_transform: Callable | None = None):
        from .datasets import IMAGE_EXTENSIONS, DatasetError

        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"mask probe folder does not exist: {root}")
        image_dir, mask_dir = root / "images", root / "masks"
        layout = "expected <root>/images/<name>.jpg and <root>/masks/<concept>/<name>.png"
        if not image_dir.is_dir():
            raise DatasetError(f"{root} has no images/ folder ({layout})")
        if not mask_dir.is_dir():
            raise DatasetError(f"{root} has no masks/ folder ({layout})")
        self.image_files = sorted(f for f in image_dir.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.image_files:
            raise DatasetError(f"no images in {image_dir} ({layout})")
        available = sorted(d.name for d in mask_dir.iterdir() if d.is_dir())
        if not available:
            raise DatasetError(f"no concept folders in {mask_dir} ({layout})")
        if concepts is None:
            concepts = available
        missing = [c for c in concepts if c not in available]
        if missing:
            raise DatasetError(f"no mask folder for concept(s) {missing} in {mask_dir}; available: {available}")
        stems = {f.stem for f in self.image_files}
        self.concepts = list(concepts)
        self.mask_files: list[dict[int, Path]] = [{} for _ in self.image_files]
        index = {f.stem: i for i, f in enumerate(self.image_files)}
        for ci, concept in enumerate(self.concepts):
            for m in sorted((mask_dir / concept).iterdir()):
                if m.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                if m.stem not in stems:
                    raise DatasetError(f"mask {m} names no image in {image_dir}")
                self.mask_files[index[m.stem]][ci] = m
        self.preprocess, self.mask_transform = preprocess, mask_transform

    def __len__(self) -> int:
        return len(self.image_files)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        from .datasets import DatasetError, load_image

        xs, ms = [], []
        for i in indices:
            img = load_image(self.image_files[int(i)])
            x = self.preprocess(img)
            size = tuple(x.shape[-2:])
            masks = torch.zeros(len(self.concepts), *size, dtype=torch.bool)
            for ci, path in self.mask_files[int(i)].items():
                with Image.open(path) as m:
                    mask = m.convert("L")
                if mask.size != img.size:
                    raise DatasetError(f"mask {path} is {mask.size[0]}x{mask.size[1]}, its image {img.size[0]}x{img.size[1]}")
                if self.mask_transform is not None:
                    masks[ci] = torch.as_tensor(np.asarray(self.mask_transform(mask))).bool()
                else:
                    masks[ci] = torch.from_numpy(np.asarray(mask.resize(size[::-1], Image.NEAREST)) > 0)
            xs.append(x)
            ms.append(masks)
        return torch.stack(xs), torch.stack(ms)


class SubsetProbe:
    """The images ``indices`` of another :class:`MaskProbe` (a seeded probing-set draw).

    probe: any MaskProbe; indices: (R,) positions in it. Raises IndexError for an index out of range.
    """

    def __init__(self, probe: MaskProbe, indices: Sequence[int] | torch.Tensor):
        self.probe = probe
        self.indices = [int(i) for i in torch.as_tensor(indices).flatten().tolist()]
        bad = [i for i in self.indices if not 0 <= i < len(probe)]
        if bad:
            raise IndexError(f"probe index {bad[0]} out of range for a probe of {len(probe)} images")
        self.concepts = list(probe.concepts)

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.probe.batch([self.indices[int(i)] for i in indices])


# --------------------------------------------------------------------------------------------
# Network Dissection


def _batches(n: int, batch_size: int) -> Iterable[range]:
    for start in range(0, n, batch_size):
        yield range(start, min(start + batch_size, n))


@torch.no_grad()
def _spatial_maps(model: nn.Module, layer: str, x: torch.Tensor, n_prefix: int) -> torch.Tensor:
    with hooked_activations(model, layer, "none") as acts:
        model(x)
    return spatial_map(acts[layer].float(), n_prefix)


@torch.no_grad()
def netdissect_thresholds(model: nn.Module, layer: str, probe: MaskProbe, *, quantile: float = 0.995,
                          max_samples: int = 100_000, batch_size: int = 64, seed: int = 0,
                          device=None, progress: bool = False) -> torch.Tensor:
    """Per-unit activation thresholds T_u: the ``quantile`` of the unit's activations over all
    locations (CNN positions / ViT patch tokens, prefix tokens excluded) of all probe images.

    Exact when the probe has at most ``max_samples`` locations per unit; otherwise estimated from
    a seeded uniform subsample of ``max_samples`` locations (the same locations for every unit), so
    memory stays at U x max_samples floats whatever the probe size. Returns (U,) float.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    device = _device(device)
    model = model.to(device).eval()
    n_prefix = num_prefix_tokens(model)
    gen = torch.Generator().manual_seed(seed)
    kept: list[torch.Tensor] = []
    fraction = None
    for idx in tqdm(list(_batches(len(probe), batch_size)), desc="netdissect thresholds", disable=bars_off(progress)):
        x, _ = probe.batch(idx)
        maps = _spatial_maps(model, layer, x.to(device), n_prefix).cpu()
        flat = maps.permute(1, 0, 2, 3).reshape(maps.shape[1], -1)  # (U, B*h*w)
        if fraction is None:
            total = len(probe) * maps.shape[2] * maps.shape[3]
            fraction = min(1.0, max_samples / total)
        if fraction < 1.0:
            k = max(1, round(fraction * flat.shape[1]))
            flat = flat[:, torch.randperm(flat.shape[1], generator=gen)[:k]]
        kept.append(flat)
    values = torch.cat(kept, dim=1).sort(dim=1).values
    pos = quantile * (values.shape[1] - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[:, lo] + (pos - lo) * (values[:, hi] - values[:, lo])


@torch.no_grad()
def netdissect_scores(model: nn.Module, layer: str, probe: MaskProbe, *, quantile: float = 0.995,
                      thresholds: torch.Tensor | None = None, max_samples: int = 100_000, batch_size: int = 64,
                      chunk_elements: int = 1 << 23, seed: int = 0, device=None, progress: bool = False) -> torch.Tensor:
    """Network Dissection: (C, U) IoU between each unit's thresholded, upsampled activation map and
    each concept's masks, accumulated over the probe (sum of intersections / sum of unions).

    Two passes over ``probe``: thresholds (:func:`netdissect_thresholds`, skipped when given), then
    IoU. Activation maps (CNN (N, C, H, W), or ViT patch tokens reshaped by capture.spatial_map)
    are upsampled bilinearly to the mask size and compared with ``> T_u``. Memory is bounded by
    ``batch_size`` images and ``chunk_elements`` booleans per step. Concepts absent from every
    probe image get an IoU of 0 (with a warning).
    """
    device = _device(device)
    model = model.to(device).eval()
    if thresholds is None:
        thresholds = netdissect_thresholds(model, layer, probe, quantile=quantile, max_samples=max_samples,
                                           batch_size=batch_size, seed=seed, device=device, progress=progress)
    thr = thresholds.to(device).float()
    n_prefix = num_prefix_tokens(model)
    inter_cu = act_u = mask_c = None
    for idx in tqdm(list(_batches(len(probe), batch_size)), desc="netdissect IoU", disable=bars_off(progress)):
        x, masks = probe.batch(idx)
        maps = _spatial_maps(model, layer, x.to(device), n_prefix)
        if maps.shape[1] != thr.numel():
            raise ValueError(f"layer has {maps.shape[1]} units but {thr.numel()} thresholds were given")
        masks = masks.to(device)
        if inter_cu is None:
            inter_cu = torch.zeros(masks.shape[1], maps.shape[1], dtype=torch.float64, device=device)
            act_u = torch.zeros(maps.shape[1], dtype=torch.float64, device=device)
            mask_c = torch.zeros(masks.shape[1], dtype=torch.float64, device=device)
        size = tuple(masks.shape[-2:])
        per_image = maps.shape[1] * size[0] * size[1]
        step = max(1, chunk_elements // per_image)
        for s in range(0, maps.shape[0], step):
            up = F.interpolate(maps[s : s + step], size=size, mode="bilinear", align_corners=False)
            on = (up > thr[None, :, None, None]).permute(1, 0, 2, 3).reshape(maps.shape[1], -1).float()  # (U, P)
            m = masks[s : s + step].permute(1, 0, 2, 3).reshape(masks.shape[1], -1).float()  # (C, P)
            inter_cu += (m @ on.T).double()
            act_u += on.sum(1).double()
            mask_c += m.sum(1).double()
    if inter_cu is None:
        raise ValueError("the probe is empty")
    _warn_empty(mask_c.cpu(), NETDISSECT)
    union = act_u[None, :] + mask_c[:, None] - inter_cu
    return torch.where(union > 0, inter_cu / union.clamp_min(1e-12), torch.zeros_like(union)).float().cpu()


# --------------------------------------------------------------------------------------------
# CLIP-Dissect


@dataclass(frozen=True)
class SoftWPMIConfig:
    """Hyper-parameters of CLIP-Dissect's soft-WPMI; defaults are the paper's/its code's."""

    top_k: int = 100  # images per unit (its top-activating ones); capped at the probe size
    temperature: float = 0.1  # P(c|x) = softmax_c(cos(I_x, T_c) / temperature) ("a = 10")
    lam: float = 1.0  # weight lambda of the concept prior log P(c)
    p_start: float = 0.998  # probability that the most activating image is "in" the unit's set
    p_end: float = 0.97  # ... decreasing linearly to this for the top_k-th image
    min_prob: float = 1e-7  # floor inside the logarithm

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.temperature <= 0:
            raise ValueError("top_k must be >= 1 and temperature > 0")
        if not 0.0 <= self.p_end <= self.p_start <= 1.0:
            raise ValueError("need 0 <= p_end <= p_start <= 1")


def _concept_probs(image_emb_nd: torch.Tensor, concept_emb_cd: torch.Tensor, temperature: float) -> torch.Tensor:
    if image_emb_nd.shape[1] != concept_emb_cd.shape[1]:
        raise ValueError(f"image embeddings have size {image_emb_nd.shape[1]}, concept embeddings {concept_emb_cd.shape[1]}")
    sim = F.normalize(image_emb_nd.float(), dim=-1) @ F.normalize(concept_emb_cd.float(), dim=-1).T
    return torch.softmax(sim.div_(temperature), dim=1)  # in place: one (N, C) temporary fewer


#: Most elements of the (top_k, units, concepts) block soft-WPMI gathers at a time (16 MB of float32).
WPMI_CHUNK_ELEMENTS = 1 << 22


def wpmi_chunk_sizes(top_k: int, n_units: int, n_concepts: int, max_elements: int = WPMI_CHUNK_ELEMENTS) -> tuple[int, int]:
    """(units, concepts) per block of soft-WPMI's gathered probabilities: the largest blocks with
    ``top_k * units * concepts <= max_elements`` (at least one unit and one concept), units first
    (up to 256). Raises ValueError for sizes that are not positive."""
    if min(top_k, n_units, n_concepts, max_elements) < 1:
        raise ValueError(f"sizes must be positive, got top_k={top_k}, n_units={n_units}, n_concepts={n_concepts}, "
                         f"max_elements={max_elements}")
    units = max(1, min(n_units, 256, max_elements // top_k))
    concepts = max(1, min(n_concepts, max_elements // (top_k * units)))
    return units, concepts


#: Column sums run on blocks padded to a multiple of this many columns: torch's CPU sum over the
#: rows of a block gives a column the same bits whatever its position only when the block's
#: width is such a multiple, so padding makes the scores independent of the block sizes.
_SUM_COLUMNS = 64


def _padded(n: int) -> int:
    return -(-n // _SUM_COLUMNS) * _SUM_COLUMNS


def _wpmi_from_topk(top_idx_ku: torch.Tensor, probs_nc: torch.Tensor, cfg: SoftWPMIConfig, unit_chunk: int | None = None,
                    concept_chunk: int | None = None, max_elements: int = WPMI_CHUNK_ELEMENTS) -> torch.Tensor:
    """(C, U) soft-WPMI from each unit's top-k image indices (k, U) and the images' concept
    probabilities (N, C), one block of ``unit_chunk`` units x ``concept_chunk`` concepts at a time
    (default :func:`wpmi_chunk_sizes`), written into the (C, U) result: beyond the inputs and the
    result, memory holds one (k, units x concepts) block and one (U, concepts) column of
    log P(c | B_u). The sums run on blocks padded to :data:`_SUM_COLUMNS` columns, so the scores
    are the same bit for bit whatever the block sizes (and those of one unpadded pass wherever its
    widths were such multiples, e.g. 256 units x 20,000 concepts)."""
    k, n_units = top_idx_ku.shape
    n_concepts = probs_nc.shape[1]
    auto_u, auto_c = wpmi_chunk_sizes(k, n_units, n_concepts, max_elements)
    unit_chunk, concept_chunk = unit_chunk or auto_u, concept_chunk or auto_c
    p_in = (cfg.p_start - torch.arange(k, dtype=torch.float32) / k * (cfg.p_start - cfg.p_end))[:, None]
    out_cu = torch.empty(n_concepts, n_units, dtype=torch.float32)
    for c0 in range(0, n_concepts, concept_chunk):
        probs = probs_nc[:, c0 : c0 + concept_chunk].contiguous()  # (N, c)
        n_c = probs.shape[1]
        log_cond_uc = torch.zeros(n_units, _padded(n_c), dtype=torch.float32)  # pad columns: 0
        for s in range(0, n_units, unit_chunk):
            units = top_idx_ku[:, s : s + unit_chunk]  # (k, u)
            width = units.shape[1] * n_c
            block = torch.ones(k, _padded(width), dtype=torch.float32)  # (k, u x c), pad columns: 1
            for j in range(k):  # the j-th image of every unit's set: (u, c) probabilities, in place
                torch.index_select(probs, 0, units[j], out=block[j, :width].view(units.shape[1], n_c))
            # P(c | image in B_u) softened by how surely the image belongs to the unit's set:
            # log(1 + p_in * (p - 1) + min_prob), summed over the k images.
            block.sub_(1.0).mul_(p_in).add_(1.0).add_(cfg.min_prob).log_()
            log_cond_uc[s : s + unit_chunk, :n_c] = block.sum(0)[:width].view(units.shape[1], n_c)
            del block
        log_prior_c = torch.logsumexp(log_cond_uc, dim=0)[:n_c] - math.log(n_units)
        out_cu[c0 : c0 + n_c] = (log_cond_uc[:, :n_c] - cfg.lam * log_prior_c[None, :]).T
    return out_cu


def soft_wpmi(acts_nu: torch.Tensor, image_emb_nd: torch.Tensor, concept_emb_cd: torch.Tensor,
              config: SoftWPMIConfig = SoftWPMIConfig()) -> torch.Tensor:
    """CLIP-Dissect's soft-WPMI: (C, U) scores from pooled activations and CLIP embeddings.

    acts_nu: (N, U) unit activations over the probing set; image_emb_nd: (N, D) CLIP image
    embeddings of the same images; concept_emb_cd: (C, D) concept text embeddings. With
    P(c|x) = softmax_c(cos / temperature) and B_u the top_k images of unit u, whose j-th image
    belongs to B_u with probability p_j (linear from p_start to p_end):

        log P(c | B_u) = sum_j log(1 - p_j + p_j P(c | x_j))
        log P(c)       = log mean_u P(c | B_u)
        wpmi(u, c)     = log P(c | B_u) - lam * log P(c)

    Memory beyond the inputs: the (N, C) probabilities, the (C, U) result and one block of at most
    :data:`WPMI_CHUNK_ELEMENTS` gathered probabilities (:func:`wpmi_chunk_sizes`): 2048 units x
    20,000 concepts x 1000 images at top_k=100 peak at +0.29 GB over the inputs (6.1 GB before the
    blocks covered concepts as well as units), with the same scores bit for bit.
    """
    acts_nu = torch.as_tensor(acts_nu).float()
    if acts_nu.ndim != 2 or acts_nu.shape[0] != image_emb_nd.shape[0]:
        raise ValueError(f"need (N, U) activations and (N, D) image embeddings, got {tuple(acts_nu.shape)} and {tuple(image_emb_nd.shape)}")
    if not torch.isfinite(acts_nu).all():
        raise ValueError("activations contain NaN or inf")
    probs = _concept_probs(image_emb_nd, concept_emb_cd, config.temperature)
    k = min(config.top_k, acts_nu.shape[0])
    top_idx = torch.topk(acts_nu, k, dim=0).indices  # (k, U)
    return _wpmi_from_topk(top_idx, probs, config)


def clip_dissect_reads_class_token(model: nn.Module) -> bool:
    """Whether CLIP-Dissect reads ``model``'s layers at the class token: for a ViT (a model with
    prefix tokens), as CLIP-Dissect's own code does (a mean over the patch tokens changes most
    units' labels); a CNN's maps are pooled as the run pools them."""
    return num_prefix_tokens(model) > 0


def clip_dissect_from_store(store: ActivationStore, concept_emb_cd: torch.Tensor, layer: str | None = None,
                            config: SoftWPMIConfig = SoftWPMIConfig(), image_field: str = "clip_image",
                            rows: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`soft_wpmi` over a store (built with a CLIP backend), streaming over shards.

    Keeps a running top_k per unit and the (N, C) concept probabilities of the probing images
    (N x C floats; the activations themselves are never all in memory), then scores blocks of
    units x concepts (:func:`_wpmi_from_topk`). ``rows``: (R,) store rows to use as the probing
    set (None: all). Returns (C, U).
    """
    field = acts_field(layer or store.layers[0])
    if image_field not in store.fields:
        raise ValueError(f"store has no {image_field!r} field: build it with a CLIP backend (clip=...)")
    top_v = top_i = None
    n_used = store.n_rows if rows is None else int(_row_mask(rows, store.n_rows).sum())
    probs, offset = None, 0  # (N, C), filled shard by shard (no second copy from concatenating)
    for shard in _iter_rows(store, [field, image_field], rows):
        acts = shard[field].float()
        if not torch.isfinite(acts).all():
            raise ValueError("activations contain NaN or inf")
        shard_probs = _concept_probs(shard[image_field], concept_emb_cd, config.temperature)
        if probs is None:
            probs = torch.empty(n_used, shard_probs.shape[1], dtype=shard_probs.dtype)
        probs[offset : offset + acts.shape[0]] = shard_probs
        del shard_probs
        idx = torch.arange(offset, offset + acts.shape[0])[:, None].expand_as(acts)
        if top_v is not None:
            acts, idx = torch.cat([top_v, acts]), torch.cat([top_i, idx])
        k = min(config.top_k, acts.shape[0])
        top_v, pos = torch.topk(acts, k, dim=0)
        top_i = idx.gather(0, pos)
        offset += shard[field].shape[0]
    return _wpmi_from_topk(top_i, probs, config)


# --------------------------------------------------------------------------------------------
# Captum


def _captum_method(method: str, model: nn.Module, layer_module: nn.Module):
    from captum.attr import LayerConductance, LayerGradientXActivation, LayerIntegratedGradients

    if method == "conductance":
        return LayerConductance(model, layer_module)
    if method == "integrated_gradients":
        return LayerIntegratedGradients(model, layer_module)
    if method == "grad_x_act":
        return LayerGradientXActivation(model, layer_module)
    raise ValueError(f"unknown captum method {method!r}; choose one of {list(CAPTUM_METHODS)}")


def captum_unit_attributions(model: nn.Module, layer: str, images: torch.Tensor, targets, method: str = "integrated_gradients", *,
                             n_steps: int = 16, batch_size: int = 32, internal_batch_size: int | None = None,
                             device=None, progress: bool = False) -> torch.Tensor:
    """Per-image unit importance for a class logit, by one of captum's layer methods.

    images: (N, 3, H, W) preprocessed; targets: (N,) class index whose logit is attributed (an
    int for all). ``method``: "conductance" (LayerConductance), "integrated_gradients"
    (LayerIntegratedGradients) or "grad_x_act" (LayerGradientXActivation). The path methods start
    from an all-zero *preprocessed* image (mid-grey for the toy models' [-1, 1] scaling and for
    mean=std=0.5 models such as EfficientNet-Lite0; the dataset mean for ImageNet-normalised
    models), with ``n_steps`` Gauss-Legendre steps. Attributions at the layer output are summed over
    spatial positions (CNN) or over all tokens (ViT, class token included, as steering edits every
    token). ``internal_batch_size``: images x steps per forward/backward of the path methods
    (default min(batch_size * n_steps, 64), at least 2 * batch_size; it bounds memory).
    Returns (N, U) float, signed (positive = the unit supports the class).
    """
    device = _device(device)
    model = model.to(device).eval()
    layer_module = resolve_layer(model, layer)
    attributor = _captum_method(method, model, layer_module)
    images = torch.as_tensor(images)
    targets = torch.full((images.shape[0],), int(targets)) if isinstance(targets, int) else torch.as_tensor(targets).long()
    if targets.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {targets.shape[0]} targets")
    out = []
    for idx in tqdm(list(_batches(images.shape[0], batch_size)), desc=f"captum {method}", disable=bars_off(progress)):
        x = images[idx.start : idx.stop].to(device).float()
        t = targets[idx.start : idx.stop].to(device)
        if method == "grad_x_act":
            attr = attributor.attribute(x, target=t)
        else:
            # Conductance differences consecutive steps, so captum needs >= 2 images' steps per chunk.
            internal = max(2 * x.shape[0], internal_batch_size or min(x.shape[0] * n_steps, 64))
            attr = attributor.attribute(x, baselines=torch.zeros_like(x), target=t, n_steps=n_steps,
                                        internal_batch_size=internal)
        if isinstance(attr, (tuple, list)):
            attr = attr[0]
        attr = attr.detach().float()
        if attr.ndim == 4:
            attr = attr.sum(dim=(2, 3))
        elif attr.ndim == 3:
            attr = attr.sum(dim=1)
        elif attr.ndim != 2:
            raise ValueError(f"cannot reduce attributions of shape {tuple(attr.shape)} to units")
        out.append(attr.cpu())
    return torch.cat(out)


def captum_scores(model: nn.Module, layer: str, images: torch.Tensor, labels, method: str = "integrated_gradients", *,
                  n_classes: int | None = None, **kwargs) -> torch.Tensor:
    """Captum baseline: (C, U) mean attribution of class c's logit to each unit over class c's
    images (target = the image's label). Classes without images get NaN rows. ``kwargs`` go to
    :func:`captum_unit_attributions`.
    """
    labels = torch.as_tensor(labels).long()
    attr = captum_unit_attributions(model, layer, images, labels, method, **kwargs)
    acc = MeanActivation(n_classes, CAPTUM_METHODS[method])
    acc.update(attr, labels)
    return acc.scores()


# --------------------------------------------------------------------------------------------
# Harness helpers


@torch.no_grad()
def pooled_activations(model: nn.Module, layer: str, images: torch.Tensor, pooling: str = "mean",
                       batch_size: int = 256, device=None) -> torch.Tensor:
    """(N, U) pooled activations of ``layer`` for (N, 3, H, W) preprocessed images (CPU float)."""
    device = _device(device)
    model = model.to(device).eval()
    out = []
    with hooked_activations(model, layer, pooling) as acts:
        for s in range(0, images.shape[0], batch_size):
            model(images[s : s + batch_size].to(device))
            out.append(acts[layer].float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Ablation: a causal reference, not an interpretation method


#: Display name of the single-unit ablation reference (:func:`ablation_scores`).
ABLATION = "Ablation"


@torch.no_grad()
def ablation_scores(model: nn.Module, layer: str, images: torch.Tensor, labels, n_classes: int | None = None, *,
                    n_units: int | None = None, edit_factory: Callable | None = None, batch_size: int = 256, device=None,
                    progress: bool = False) -> torch.Tensor:
    """(C, U) what removing each unit alone costs each class: the drop in the mean log-probability of
    class c over the class-c images among ``images`` when unit u of ``layer`` is scaled by 0 at every
    location / token (higher = that unit matters more for c).

    Units are the layer's neurons, or with ``edit_factory`` (``units.UnitSpace.edit_factory``, e.g.
    an SAE's feature edit) and ``n_units`` whatever that edit addresses. This reads the model's
    behaviour directly, which is what a removal experiment measures, so its top units are a
    reference for how much removing a few units *can* cost (a greedy one: the units are ranked one
    at a time), not an explanation. It costs U passes of the model after ``layer`` over the images
    (steer.tail_module: one full pass records the layer's outputs).
    images: (N, 3, H, W) preprocessed; labels: (N,) ints. Rows of classes without images are NaN.
    Raises steer.SplitError for a model that cannot be cut at ``layer``.
    """
    from .steer import cache_layer_outputs, neuron_edit, tail_module, unit_dim

    dev = _device(device)
    model = model.to(dev).eval()
    labels = torch.as_tensor(labels).long()
    n_classes = int(n_classes or int(labels.max()) + 1)
    make_edit = edit_factory or neuron_edit
    tail = tail_module(model, layer, images[:2].to(dev))
    acts, _ = cache_layer_outputs(model, images, layer, batch_size, dev)
    n_units = int(n_units or acts.shape[unit_dim(acts)])

    def class_logprob(edited_unit: int | None) -> torch.Tensor:  # (C,) mean log p(label) per class
        total = torch.zeros(n_classes, dtype=torch.float64)
        edit = None if edited_unit is None else make_edit([edited_unit], "scale", 0.0)  # the tables' removal edit
        for start in range(0, acts.shape[0], batch_size):
            x = acts[start : start + batch_size].to(dev)
            if edit is not None:
                x = edit(x)
            y = labels[start : start + batch_size]
            # as steer.cached_class_deltas: the cache holds bf16 outputs on CUDA, so the tail runs under autocast
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                logits = tail(x)
            logp = logits.float().log_softmax(-1).cpu().gather(1, y[:, None])[:, 0]
            total.index_add_(0, y, logp.double())
        return total

    counts = torch.bincount(labels, minlength=n_classes).double()
    base = class_logprob(None)
    scores = torch.stack([base - class_logprob(u) for u in tqdm(range(n_units), desc="ablation", disable=bars_off(progress))], 1)
    scores = (scores / counts[:, None]).float()
    scores[counts == 0] = float("nan")
    return scores


def removal_vs_random(model: nn.Module, images: torch.Tensor, labels, layer: str, scores: dict[str, torch.Tensor], *,
                      tau: int = 5, beta: float = 0.0, n_random: int = 20, n_other: int = 0,
                      progress: bool = False) -> pd.DataFrame:
    """Delta-accuracy of editing each class's top-``tau`` units per method, beside random units.

    scores: ``{method: (C, U)}``; classes are those present in ``labels`` (their rows must not be
    NaN). ``n_other`` other-class images per class are also run (0: own images only, the cheap
    setting for one image per class). Returns one row per (method, draw): method, draw, delta_acc
    (mean over classes, percent), acc_base, acc_edit.
    """
    from .steer import class_deltas

    labels = torch.as_tensor(labels).long()
    classes = sorted(set(labels.tolist()))
    n_units = next(iter(scores.values())).shape[1]
    sels: list[tuple[str, int, object]] = []
    for name, s in scores.items():
        if torch.isnan(s[classes]).any():
            raise ValueError(f"{name}: NaN scores for classes present in labels")
        sels.append((name, 0, ScoreSelector(name, s)))
    sels += [("Random", i, RandomSelector(n_units, i)) for i in range(n_random)]
    rows = []
    for name, draw, sel in tqdm(sels, desc="removal", disable=bars_off(progress)):
        df = class_deltas(model, images, labels, layer, selection(sel, classes, tau), mode="scale", beta=beta, n_other=n_other)
        rows.append({"method": name, "draw": draw, "delta_acc": float(df["delta_acc"].mean()),
                     "acc_base": float(df["acc_base"].mean()), "acc_edit": float(df["acc_edit"].mean())})
    return pd.DataFrame(rows)


def imagenet_sample_check(root: str | Path, *, n_classes: int | None = None, layer: str = "blocks.5", tau: int = 5,
                          n_random: int = 20, captum: Sequence[str] = tuple(CAPTUM_METHODS), n_steps: int = 16,
                          progress: bool = False) -> pd.DataFrame:
    """Real-image check on an imagenet-sample folder (one photo per class) with EfficientNet-Lite0.

    With one image per class, each class's scores come from that same image: Act-Values = its
    pooled activations, Captum = its attributions for its own label. Removing (beta=0) each class's
    top-``tau`` units is compared with ``n_random`` random draws. ``n_classes``: the first n files
    only. Returns the rows of :func:`removal_vs_random` (one per method and random draw);
    ``acc_base`` is the class accuracy before the edit.
    """
    from .datasets import open_dataset
    from .zoo import load_target

    target = load_target("efficientnet_lite0")
    ds = open_dataset(root)
    n = len(ds) if n_classes is None else min(n_classes, len(ds))
    xs, ys = zip(*[(target.preprocess(ds[i][0]), ds[i][1]) for i in range(n)])
    images, labels = torch.stack(xs), torch.as_tensor(ys)
    n_all = len(target.class_names)
    with warnings.catch_warnings():  # classes absent from the folder get NaN rows: expected here
        warnings.filterwarnings("ignore", message=".*no probing image")
        scores = {ACT_VALUES: act_values_scores(pooled_activations(target.module, layer, images, batch_size=32), labels, n_all)}
        for m in captum:
            scores[CAPTUM_METHODS[m]] = captum_scores(target.module, layer, images, labels, m, n_classes=n_all,
                                                      n_steps=n_steps, batch_size=4, internal_batch_size=16,
                                                      progress=progress)
    return removal_vs_random(target.module, images, labels, layer, scores, tau=tau, n_random=n_random, progress=progress)


def main(argv: list[str] | None = None) -> int:
    """``python -m miclip_nb.baselines [--n-classes N] [FOLDER]``: the EfficientNet-Lite0 check."""
    import argparse
    import os

    from .datasets import IMAGENET_SAMPLE_ENV

    p = argparse.ArgumentParser(description=imagenet_sample_check.__doc__.split("\n")[0])
    p.add_argument("folder", nargs="?", default=os.environ.get(IMAGENET_SAMPLE_ENV))
    p.add_argument("--n-classes", type=int, default=None)
    p.add_argument("--n-random", type=int, default=20)
    p.add_argument("--n-steps", type=int, default=16)
    p.add_argument("--out", type=Path, default=None, help="CSV of the per-draw rows")
    args = p.parse_args(argv)
    if not args.folder:
        p.error(f"give the folder or set ${IMAGENET_SAMPLE_ENV}")
    df = imagenet_sample_check(args.folder, n_classes=args.n_classes, n_random=args.n_random, n_steps=args.n_steps, progress=True)
    if args.out:
        df.to_csv(args.out, index=False)
    summary = df.groupby("method", sort=False).agg(delta_acc=("delta_acc", "mean"), delta_std=("delta_acc", "std"),
                                                   acc_base=("acc_base", "mean"), n=("draw", "size"))
    print(summary.to_string(float_format=lambda v: f"{v:.2f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
