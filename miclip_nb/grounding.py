"""Spatial grounding: where in an image a unit or SAE feature fires, and how well that matches a mask.

A heatmap is a unit's activation over a layer's locations (ViT patch tokens, CLS and other prefix
tokens excluded; CNN positions), upsampled bilinearly to the image size; for a set of SAE features,
the weighted sum of their codes. :func:`heatmap_iou` thresholds it per image and compares it with a
boolean mask (on the Shapes world, the object mask of a colour or shape concept from
``Sample.concept_masks()``); :func:`chance_iou` is what a random selection of as many pixels scores.

:func:`sae_concept_grounding` reads a concept two ways: its top MiClip feature alone, and its
top-tau features with their cosines as weights, and asks both *where* (IoU with the masks) and
*whether* (AUROC of the feature's strongest location for the concept being in the image). On the
toy ViT the set is the reliable reading: which of several features of similar cosine comes first
varies between SAE seeds, and some top features know that the image holds the concept but fire
elsewhere (figures in tests/test_sae.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .capture import hooked_activations, num_prefix_tokens, spatial_map
from .metrics import auroc


def _module(target) -> torch.nn.Module:
    return getattr(target, "module", target)


@torch.no_grad()
def _heatmaps(target, layer: str, images: torch.Tensor, value_fn: Callable[[torch.Tensor], torch.Tensor],
              batch_size: int, device, upsample: bool = True) -> np.ndarray:
    """value_fn: per-location vectors (..., D) -> (..., 1) values; returns (N, H, W) float32 at the
    images' size, or at the layer's grid (h, w) with ``upsample=False``."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    model = _module(target)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    n_prefix = num_prefix_tokens(model)
    out = []
    with hooked_activations(model, layer, "none") as captured:
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device)
            model(x)
            acts = captured[layer].float()
            if acts.ndim == 3:  # (N, T, D) tokens -> values per token -> (N, 1, h, w) over patches
                grid = spatial_map(value_fn(acts), n_prefix)
            elif acts.ndim == 4:  # (N, C, H, W) -> channels last -> (N, 1, H, W)
                grid = value_fn(acts.movedim(1, -1)).movedim(-1, 1)
            else:
                raise ValueError(f"layer {layer!r} has no spatial extent (output shape {tuple(acts.shape)})")
            if upsample:
                grid = F.interpolate(grid.float(), size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
            out.append(grid[:, 0].float().cpu())
    return torch.cat(out).numpy().astype(np.float32)


def feature_heatmaps(target, layer: str, sae, images: torch.Tensor, feature: int | Sequence[int], *,
                     weights: Sequence[float] | None = None, batch_size: int = 64,
                     device: str | torch.device | None = None, upsample: bool = True) -> np.ndarray:
    """Activation map of SAE feature ``feature`` (or of a set of features) at ``layer``.

    target: a zoo.TargetModel or nn.Module; sae: a sae.TopKSAE trained on that layer; images:
    (N, 3, H, W) preprocessed; feature: one index, or several, whose codes are summed with
    ``weights`` (default equal; e.g. a concept's top features weighted by their cosine).
    Returns (N, H, W) float32: the code(s) at every patch token (prefix tokens excluded) or CNN
    location, upsampled bilinearly to H x W (``upsample=False``: the layer's (h, w) grid, e.g. to
    read a feature's strongest location). Raises IndexError for a feature out of range,
    ValueError for weights of another length or no feature, SAEMismatchError for a layer of
    another width.
    """
    feats = [int(f) for f in np.atleast_1d(np.asarray(feature, dtype=np.int64))]
    if not feats:
        raise ValueError("no SAE features given")
    for f in feats:
        if not 0 <= f < sae.n_latents:
            raise IndexError(f"feature {f} out of range for an SAE with {sae.n_latents} latents")
    w = torch.ones(len(feats)) if weights is None else torch.as_tensor(weights, dtype=torch.float32).flatten()
    if w.numel() != len(feats):
        raise ValueError(f"{w.numel()} weights for {len(feats)} features")
    model_device = device
    if model_device is None:
        first = next(_module(target).parameters(), None)
        model_device = first.device if first is not None else torch.device("cpu")
    sae = sae.to(model_device)

    def value(v: torch.Tensor) -> torch.Tensor:
        codes = sae.encode_features(v, feats)
        return codes if len(feats) == 1 else (codes * w.to(codes.device)).sum(-1, keepdim=True)

    return _heatmaps(target, layer, images, value, batch_size, device, upsample)


def neuron_heatmaps(target, layer: str, images: torch.Tensor, unit: int, *,
                    batch_size: int = 64, device: str | torch.device | None = None) -> np.ndarray:
    """Activation map of unit (channel / ViT dimension) ``unit`` at ``layer``: (N, H, W) float32,
    as :func:`feature_heatmaps`. Raises IndexError for a unit out of range."""

    def value(v: torch.Tensor) -> torch.Tensor:
        if not 0 <= int(unit) < v.shape[-1]:
            raise IndexError(f"unit {unit} out of range for a layer with {v.shape[-1]} units")
        return v[..., int(unit) : int(unit) + 1]

    return _heatmaps(target, layer, images, value, batch_size, device)


def heatmap_masks(heatmaps_nhw: np.ndarray, quantile: float | None = 0.8, max_fraction: float | None = None) -> np.ndarray:
    """Binarise heatmaps per image: pixels strictly above the image's ``quantile`` (top 1 -
    quantile of pixels, fewer when values tie at the threshold, e.g. a feature silent on most of
    the image), or with ``max_fraction`` instead, pixels >= max_fraction * the image's maximum
    (none when the maximum is <= 0). Returns (N, H, W) bool. Raises ValueError unless exactly one
    of the two is given, within (0, 1)."""
    h = np.asarray(heatmaps_nhw, dtype=np.float64)
    if h.ndim != 3:
        raise ValueError(f"heatmaps must be (N, H, W), got {h.shape}")
    if (quantile is None) == (max_fraction is None):
        raise ValueError("give exactly one of quantile and max_fraction")
    if quantile is not None:
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        thr = np.quantile(h.reshape(h.shape[0], -1), quantile, axis=1)
        return h > thr[:, None, None]
    if not 0.0 < max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
    peak = h.reshape(h.shape[0], -1).max(1)
    return (h >= max_fraction * peak[:, None, None]) & (peak[:, None, None] > 0)


def heatmap_iou(heatmaps_nhw: np.ndarray, masks_nhw: np.ndarray, quantile: float | None = 0.8,
                max_fraction: float | None = None) -> np.ndarray:
    """Per-image IoU between thresholded heatmaps (see :func:`heatmap_masks`) and boolean masks.

    heatmaps_nhw: (N, H, W) floats; masks_nhw: (N, H, W) bool. Returns (N,) float; NaN where the
    mask is empty (the concept is absent: average with np.nanmean). Raises ValueError for shapes
    that differ.
    """
    masks = np.asarray(masks_nhw, dtype=bool)
    if masks.shape != np.shape(heatmaps_nhw):
        raise ValueError(f"heatmaps {np.shape(heatmaps_nhw)} and masks {masks.shape} differ in shape")
    sel = heatmap_masks(heatmaps_nhw, quantile, max_fraction)
    inter = (sel & masks).sum((1, 2))
    union = (sel | masks).sum((1, 2))
    iou = inter / np.maximum(union, 1)
    return np.where(masks.any((1, 2)), iou, np.nan)


def chance_iou(masks_nhw: np.ndarray, quantile: float = 0.8) -> np.ndarray:
    """Expected IoU of a random selection of the top (1 - quantile) share of pixels with each mask
    (area a, selected share s: a s / (a + s - a s)). Returns (N,), NaN for empty masks."""
    masks = np.asarray(masks_nhw, dtype=bool)
    a = masks.reshape(masks.shape[0], -1).mean(1)
    s = 1.0 - quantile
    return np.where(a > 0, a * s / np.maximum(a + s - a * s, 1e-12), np.nan)


def mask_grounding(target, layer: str, dataset, heatmap_fn: Callable[[torch.Tensor, object], np.ndarray],
                   concept_units: dict[str, object], *, n_images: int = 300, quantile: float = 0.8,
                   preprocess: Callable | None = None) -> pd.DataFrame:
    """IoU of each concept's unit heatmap with that concept's pixel masks.

    dataset: a *masked dataset*: ``dataset[i]`` gives (PIL image, label), ``dataset.mask_concepts``
    names the concepts that ``dataset.masks(i)`` gives (K, H, W) bool masks of (the Shapes world's
    ShapesDataset is one);
    heatmap_fn(images (N, 3, H, W), unit) -> (N, H, W), e.g.
    ``lambda x, f: feature_heatmaps(target, layer, sae, x, f)``; concept_units: {concept: unit},
    where a unit is whatever heatmap_fn takes (an index, or a list of indices for a set).
    Only images where the concept is present count. Returns one row per concept: concept, unit,
    n_images, iou (mean), chance_iou (random selection of the same size), area (mask share).
    """
    images, masks = masked_images(dataset, n_images, preprocess or target.preprocess)
    return _grounding_rows(images, masks, list(_masked(dataset).mask_concepts), heatmap_fn, concept_units, quantile)


def _masked(dataset):
    """The object that holds a dataset's masks: itself, or the user's object datasets.as_dataset wraps."""
    return dataset if hasattr(dataset, "mask_concepts") else getattr(dataset, "source", dataset)


def has_masks(dataset) -> bool:
    """Whether a dataset offers pixel masks (``mask_concepts`` and ``masks(i)``; see :func:`mask_grounding`)."""
    source = _masked(dataset)
    return hasattr(source, "mask_concepts") and callable(getattr(source, "masks", None))


def images_showing(dataset, concept: str, n_with: int = 6, n_without: int = 2, n_max: int = 300) -> list[int]:
    """Indices of up to ``n_with`` images among the first ``n_max`` whose masks show ``concept``,
    then ``n_without`` that do not (for heatmaps with controls); without masks, the first
    ``n_with + n_without`` images. Raises ValueError for a concept the masks do not know."""
    if not has_masks(dataset):
        return list(range(min(n_with + n_without, len(dataset))))
    source = _masked(dataset)
    names = list(source.mask_concepts)
    if concept not in names:
        raise ValueError(f"no masks of {concept!r}; the dataset has masks of {names}")
    shown = [bool(np.asarray(source.masks(i))[names.index(concept)].any()) for i in range(min(n_max, len(dataset)))]
    return ([i for i, s in enumerate(shown) if s][:n_with] + [i for i, s in enumerate(shown) if not s][:n_without])


def masked_images(dataset, n_images: int, preprocess: Callable) -> tuple[torch.Tensor, np.ndarray]:
    """The first ``n_images`` of a masked dataset (see :func:`mask_grounding`): ((N, 3, H, W)
    preprocessed images, (N, K, h, w) bool masks of ``dataset.mask_concepts``). Raises TypeError
    for a dataset without masks."""
    dataset = _masked(dataset)
    if not has_masks(dataset):
        raise TypeError(f"{type(dataset).__name__} has no pixel masks (needs .mask_concepts and .masks(i))")
    n = min(n_images, len(dataset))
    images = torch.stack([preprocess(dataset[i][0]) for i in range(n)])
    return images, np.stack([np.asarray(dataset.masks(i), dtype=bool) for i in range(n)])


def _grounding_rows(images: torch.Tensor, masks: np.ndarray, mask_concepts: list[str], heatmap_fn, concept_units: dict,
                    quantile: float) -> pd.DataFrame:
    rows = []
    for concept, unit in concept_units.items():
        if concept not in mask_concepts:
            raise ValueError(f"no masks of {concept!r}; the dataset has masks of {mask_concepts}")
        c = mask_concepts.index(concept)
        present = masks[:, c].any((1, 2))
        if not present.any():
            rows.append({"concept": concept, "unit": _unit_label(unit), "n_images": 0, "iou": float("nan"),
                         "chance_iou": float("nan"), "area": float("nan")})
            continue
        heat = heatmap_fn(images[torch.as_tensor(present)], unit)
        m = masks[present, c]
        if heat.shape != m.shape:  # the model's input size differs from the world's: resize maps
            heat = F.interpolate(torch.as_tensor(heat)[:, None], size=m.shape[-2:], mode="bilinear",
                                 align_corners=False)[:, 0].numpy()
        rows.append({"concept": concept, "unit": _unit_label(unit), "n_images": int(present.sum()),
                     "iou": float(np.nanmean(heatmap_iou(heat, m, quantile))),
                     "chance_iou": float(np.nanmean(chance_iou(m, quantile))), "area": float(m.mean())})
    return pd.DataFrame(rows)


def localized_features(feature_emb_fd: torch.Tensor, concept_emb_cd: torch.Tensor, concepts: Sequence[str],
                       tau: int = 5) -> dict[str, tuple[list[int], list[float]]]:
    """{concept: (its top-tau features, their cosines clipped at 0)}, best first, by
    interpret.localize. feature_emb_fd: (F, D); concept_emb_cd: (C, D) for the C ``concepts``.
    Raises ValueError for mismatched counts or tau out of range."""
    from .interpret import localize

    if concept_emb_cd.shape[0] != len(concepts):
        raise ValueError(f"{concept_emb_cd.shape[0]} concept embeddings for {len(concepts)} concepts")
    out = {}
    for concept, emb in zip(concepts, concept_emb_cd):
        units, scores = localize(feature_emb_fd, emb, tau)
        out[concept] = (units.tolist(), scores.clamp_min(0).tolist())
    return out


def sae_concept_grounding(target, layer: str, sae, feature_emb_fd: torch.Tensor, concept_emb_cd: torch.Tensor,
                          concepts: Sequence[str], dataset, *, tau: int = 5, n_images: int = 300,
                          quantile: float = 0.8) -> pd.DataFrame:
    """How well the SAE features MiClip localizes for each concept overlap its masks.

    Two readings per concept: the heatmap of its top feature alone, and the heatmap of its
    top-``tau`` set (codes summed, weighted by cosine; :func:`feature_heatmaps`). On the toy ViT
    the top-1 choice among features of similar cosine is noisy, and some top features fire away
    from the object, while the set covers it (see tests/test_sae.py for the measured figures).
    dataset: a masked dataset (:func:`mask_grounding`); concepts: names among its
    ``mask_concepts`` (with ``concept_emb_cd`` (C, D)). Returns one row per concept:
    concept, feature, iou_feature, auroc_feature, features, iou_set, auroc_set, chance_iou, area,
    n_images. ``auroc_*`` asks *whether* rather than *where*: the AUROC, over all ``n_images``, of
    the strongest location's code (max over tokens / positions) for the concept being in the image.
    A feature with a high AUROC and a low IoU knows the image holds the concept but fires elsewhere
    (a late ViT block spreads image-level facts over its tokens).
    """
    picked = localized_features(feature_emb_fd, concept_emb_cd, concepts, tau)
    images, masks = masked_images(dataset, n_images, target.preprocess)
    mask_concepts = list(_masked(dataset).mask_concepts)
    present = {c: masks[:, mask_concepts.index(c)].any((1, 2)) for c in picked}
    # One pass over all images per concept and reading, at the layer's grid: its maximum gives the
    # AUROC, its upsampled rows for the images that show the concept give the IoU.
    grids = {c: (feature_heatmaps(target, layer, sae, images, units[0], upsample=False),
                 feature_heatmaps(target, layer, sae, images, units, weights=cosines, upsample=False))
             for c, (units, cosines) in picked.items()}

    def presence_auroc(concept: str, reading: int) -> float:
        if present[concept].all() or not present[concept].any():
            return float("nan")
        grid = grids[concept][reading]
        return float(auroc(grid.reshape(grid.shape[0], -1).max(1), present[concept]))

    names = list(picked)  # _grounding_rows hands each concept's index to the heatmap functions

    def upsampled(reading: int):
        def heatmap(x: torch.Tensor, i: int) -> np.ndarray:  # x: the images that show concept i
            grid = torch.as_tensor(grids[names[i]][reading][present[names[i]]])
            up = F.interpolate(grid[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
            return up[:, 0].numpy()

        return heatmap

    by_concept = {c: i for i, c in enumerate(names)}
    single = _grounding_rows(images, masks, mask_concepts, upsampled(0), by_concept, quantile)
    sets = _grounding_rows(images, masks, mask_concepts, upsampled(1), by_concept, quantile)
    return pd.DataFrame({"concept": single["concept"], "feature": [picked[c][0][0] for c in single["concept"]],
                         "iou_feature": single["iou"], "auroc_feature": [presence_auroc(c, 0) for c in single["concept"]],
                         "features": [_unit_label(picked[c][0]) for c in sets["concept"]],
                         "iou_set": sets["iou"], "auroc_set": [presence_auroc(c, 1) for c in sets["concept"]],
                         "chance_iou": single["chance_iou"], "area": single["area"], "n_images": single["n_images"]})


def _unit_label(unit):
    """An int for one unit, a comma-separated string for a set (a readable table cell)."""
    if np.ndim(unit) == 0:
        return int(unit)
    return ",".join(str(int(u)) for u in np.asarray(unit).flatten())



def plot_heatmaps(images_uint8: np.ndarray, heatmaps_nhw: np.ndarray, titles: Sequence[str] | None = None, *,
                  ncols: int = 6, alpha: float = 0.5, cmap: str = "jet", size: float = 1.6,
                  suptitle: str | None = None):
    """Heatmaps overlaid on their images (the paper's Figure 3), each map scaled to its own max.

    images_uint8: (N, H, W, 3); heatmaps_nhw: (N, H, W) at the images' size. Returns a matplotlib
    Figure (never shown). Raises ValueError when the counts or sizes differ.
    """
    from .viz import image_grid

    images = np.asarray(images_uint8)
    heat = np.asarray(heatmaps_nhw, dtype=np.float64)
    if images.ndim != 4 or heat.ndim != 3 or images.shape[:3] != heat.shape:
        raise ValueError(f"images (N, H, W, 3) {images.shape} and heatmaps (N, H, W) {heat.shape} do not match")
    return image_grid(images, titles, ncols=ncols, size=size, suptitle=suptitle, overlays=heat, cmap=cmap, alpha=alpha)
