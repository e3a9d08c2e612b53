"""Steer a model by editing units during the forward pass, and measure what it does to accuracy.

For concept c with units L_c, each unit's activation becomes ``beta * u`` (mode "scale") or
``u + beta`` (mode "shift"), at every spatial location of a CNN channel and every token of a ViT
dimension. Edits live only inside :func:`intervene` / :func:`edit_layer`, whose ``finally``
removes the hook.

The delta-accuracy protocol (the paper's Table 2): for each class, take its top-tau units, apply
enhancement (scale 2) or removal (scale 0), and compare the accuracy on that class's images with
the unedited model; average over classes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import resolve_layer
from ._progress import bars_off

MODES = ("scale", "shift")
#: The paper's two interventions.
PAPER_BETAS: dict[str, float] = {"enhance": 2.0, "remove": 0.0}


def unit_dim(acts: torch.Tensor) -> int:
    """The unit (channel/feature) dimension: 1 for (N, C, H, W) maps, -1 for (N, T, D) or (N, D)."""
    return 1 if acts.ndim == 4 else -1


def neuron_edit(units: Sequence[int] | torch.Tensor, mode: str = "scale", beta: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """An edit function acts -> acts that scales or shifts ``units`` everywhere.

    Raises ValueError for an unknown mode or an empty unit list.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    index = torch.as_tensor(units, dtype=torch.long).flatten()
    if index.numel() == 0:
        raise ValueError("no units to edit")

    def edit(acts: torch.Tensor) -> torch.Tensor:
        dim = unit_dim(acts)
        if int(index.max()) >= acts.shape[dim]:
            raise IndexError(f"unit {int(index.max())} out of range for a layer with {acts.shape[dim]} units")
        out = acts.clone()
        sel = out.index_select(dim, index.to(acts.device))
        sel = sel * beta if mode == "scale" else sel + beta
        return out.index_copy(dim, index.to(acts.device), sel.to(out.dtype))

    return edit


@contextmanager
def edit_layer(model: nn.Module, layer: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[nn.Module]:
    """Replace ``layer``'s output by ``edit(output)`` for forward passes inside the block.

    Tuple outputs are edited in their first element. The hook is removed on exit, also on error.
    Raises LayerNotFoundError for an unknown layer.
    """
    module = resolve_layer(model, layer)

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (edit(output[0]),) + output[1:]
        return edit(output)

    handle = module.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


@contextmanager
def intervene(model: nn.Module, layer: str, units, mode: str = "scale", beta: float = 0.0) -> Iterator[nn.Module]:
    """Scale (``u <- beta * u``) or shift (``u <- u + beta``) ``units`` of ``layer`` inside the block."""
    with edit_layer(model, layer, neuron_edit(units, mode, beta)) as m:
        yield m


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256, device: str | torch.device | None = None) -> torch.Tensor:
    """Predicted class for each image: images (N, 3, H, W) -> (N,) long (on CPU)."""
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    preds = []
    for start in range(0, images.shape[0], batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            preds.append(model(images[start : start + batch_size].to(device)).argmax(-1).cpu())
    return torch.cat(preds)


def class_deltas(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    layer: str,
    selection: Mapping[int, torch.Tensor],
    *,
    mode: str = "scale",
    beta: float = 0.0,
    edit_factory: Callable | None = None,
    n_other: int = 256,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> pd.DataFrame:
    """Per-class effect of editing each class's selected units.

    images: (N, 3, H, W) preprocessed; labels: (N,); selection: class index -> unit indices.
    For class c: accuracy on its images before/after, and the share of up to ``n_other`` other-class
    images (a seeded sample) predicted as c before/after. ``edit_factory(units, mode, beta)``
    builds the edit (default :func:`neuron_edit`; SAE features pass their own).
    Returns a DataFrame with columns class, n, acc_base, acc_edit, delta_acc, to_class_base,
    to_class_edit, flip_to_class (all in percent).
    """
    labels = torch.as_tensor(labels)
    base_pred = predict(model, images, batch_size)
    make_edit = edit_factory or neuron_edit
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for c, units in tqdm(selection.items(), desc=f"{mode} x{beta}", disable=bars_off(progress)):
        own = torch.nonzero(labels == c).flatten()
        if own.numel() == 0:
            continue
        others = torch.nonzero(labels != c).flatten()
        others = others[torch.randperm(others.numel(), generator=gen)[:n_other]]
        idx = torch.cat([own, others])
        with edit_layer(model, layer, make_edit(units, mode, beta)):
            pred = predict(model, images[idx], batch_size)
        own_pred, other_pred = pred[: own.numel()], pred[own.numel():]
        acc_base = float((base_pred[own] == c).float().mean()) * 100
        acc_edit = float((own_pred == c).float().mean()) * 100
        to_base = float((base_pred[others] == c).float().mean()) * 100 if others.numel() else float("nan")
        to_edit = float((other_pred == c).float().mean()) * 100 if others.numel() else float("nan")
        rows.append({"class": int(c), "n": int(own.numel()), "acc_base": acc_base, "acc_edit": acc_edit,
                     "delta_acc": acc_edit - acc_base, "to_class_base": to_base, "to_class_edit": to_edit,
                     "flip_to_class": to_edit - to_base})
    return pd.DataFrame(rows)


def beta_sweep(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, layer: str, selection: Mapping[int, torch.Tensor],
    betas: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0), mode: str = "scale", **kwargs,
) -> pd.DataFrame:
    """Dose-response: mean delta-accuracy over classes for each beta. Returns columns beta,
    delta_acc, flip_to_class."""
    rows = []
    for beta in betas:
        df = class_deltas(model, images, labels, layer, selection, mode=mode, beta=beta, **kwargs)
        rows.append({"beta": beta, "delta_acc": df["delta_acc"].mean(), "flip_to_class": df["flip_to_class"].mean()})
    return pd.DataFrame(rows)


def summarize(values: Sequence[float]) -> tuple[float, float]:
    """(mean, std) of per-seed results (std 0 for a single seed)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=0)) if arr.size > 1 else 0.0
