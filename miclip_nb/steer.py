"""Steer a model by editing units during the forward pass, and measure what it does to accuracy.

For concept c with units L_c, each unit's activation becomes ``beta * u`` (mode "scale") or
``u + beta`` (mode "shift"), at every spatial location of a CNN channel and every token of a ViT
dimension. Edits live only inside :func:`intervene` / :func:`edit_layer`, whose ``finally``
removes the hook.

The delta-accuracy protocol (the paper's Table 2): for each class, take its top-tau units, apply
enhancement (scale 2) or removal (scale 0), and compare the accuracy on that class's images with
the unedited model; average over classes. Where the model is a chain of modules after the layer
(timm ViT blocks, ResNet stages, the toy models), :func:`cached_class_deltas` gives the same table
from one full pass that caches the layer's outputs, then runs only the rest of the network
(:func:`tail_module`) per intervention.
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

    def predict_edited(idx: torch.Tensor, units) -> torch.Tensor:
        with edit_layer(model, layer, make_edit(units, mode, beta)):
            return predict(model, images[idx], batch_size)

    return _per_class_deltas(base_pred, labels, selection, predict_edited, n_other, seed, f"{mode} x{beta}", progress)


def _per_class_deltas(base_pred: torch.Tensor, labels: torch.Tensor, selection: Mapping[int, torch.Tensor],
                      predict_edited: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n_other: int, seed: int,
                      desc: str, progress: bool) -> pd.DataFrame:
    """The rows of :func:`class_deltas`, given the unedited predictions and a function
    ``(image indices, units) -> predictions under the edit of those units``."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for c, units in tqdm(selection.items(), desc=desc, disable=bars_off(progress)):
        own = torch.nonzero(labels == c).flatten()
        if own.numel() == 0:
            continue
        others = torch.nonzero(labels != c).flatten()
        others = others[torch.randperm(others.numel(), generator=gen)[:n_other]]
        idx = torch.cat([own, others])
        pred = predict_edited(idx, units)
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


# --------------------------------------------------------------------------------------------
# Delta-accuracy from cached layer outputs: run only the part of the network after the layer


class SplitError(ValueError):
    """A model that cannot be cut at a layer into "up to the layer" and "the rest"."""


class ModelTail(nn.Module):
    """The part of a model after one layer: that layer's output -> logits.

    ``steps`` are the model's own modules (shared, not copied), applied in order; ``head`` (e.g. a
    timm model's ``forward_head``) is applied last when given. Build it with :func:`tail_module`.
    """

    def __init__(self, steps: Sequence[nn.Module], head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 names: Sequence[str] = ()):
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.head = head
        self.names = list(names)

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            acts = step(acts)
        return self.head(acts) if self.head is not None else acts


def _canonical_name(model: nn.Module, layer: str) -> str:
    target = resolve_layer(model, layer)
    for name, module in model.named_modules():
        if module is target and name:
            return name
    raise SplitError(f"{layer!r} is the model itself; name a layer inside it")


def _top_level_order(model: nn.Module, run: Callable[[], object]) -> list[str]:
    """Names of the model's direct children in the order ``run()`` calls them (one entry per call)."""
    order: list[str] = []
    handles = [child.register_forward_pre_hook(lambda _m, _i, name=name: order.append(name))
               for name, child in model.named_children()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return order


def tail_module(model: nn.Module, layer: str, example: torch.Tensor, atol: float = 1e-4) -> ModelTail:
    """The part of ``model`` after ``layer``, as a module: ``tail(layer output) == model(x)``.

    Works where every container between the model and the layer is an ``nn.Sequential`` (timm ViT
    ``blocks.i``, ResNet ``layer4`` / ``layer4.0``, the toy models' ``stages.i`` / ``blocks.i``) and
    the model's forward calls its top-level children in a chain, optionally followed by a
    ``forward_head`` (timm models). The order is traced on ``example`` (a small input batch, e.g.
    2 images) and the tail is checked against the full forward on it.
    Raises LayerNotFoundError for an unknown layer, SplitError (saying why) when the model
    cannot be split there.
    """
    name = _canonical_name(model, layer)
    parts = name.split(".")
    steps: list[nn.Module] = []
    step_names: list[str] = []
    for depth in range(len(parts) - 1, 0, -1):  # from the layer up to the model's direct child
        parent_name = ".".join(parts[:depth])
        parent = model.get_submodule(parent_name)
        if not isinstance(parent, nn.Sequential):
            raise SplitError(
                f"cannot split {type(model).__name__} at {layer!r}: its parent {parent_name!r} is a "
                f"{type(parent).__name__}, whose forward is not a plain sequence of its children; "
                f"split at {parent_name!r} or at a layer whose parents are nn.Sequential"
            )
        children = list(parent.named_children())
        index = [n for n, _ in children].index(parts[depth])
        steps += [m for _, m in children[index + 1:]]
        step_names += [f"{parent_name}.{n}" for n, _ in children[index + 1:]]
    head = None
    if isinstance(model, nn.Sequential):
        children = list(model.named_children())
        index = [n for n, _ in children].index(parts[0])
        steps += [m for _, m in children[index + 1:]]
        step_names += [n for n, _ in children[index + 1:]]
    else:
        timm_like = callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))
        order = _top_level_order(model, (lambda: model.forward_features(example)) if timm_like else (lambda: model(example)))
        if order.count(parts[0]) != 1:
            raise SplitError(f"cannot split {type(model).__name__} at {layer!r}: {parts[0]!r} runs "
                             f"{order.count(parts[0])} times in one forward pass")
        after = order[order.index(parts[0]) + 1:]
        if len(set(after)) != len(after):
            raise SplitError(f"cannot split {type(model).__name__} at {layer!r}: a module after it runs twice ({after})")
        steps += [model.get_submodule(n) for n in after]
        step_names += after
        if timm_like:
            head = model.forward_head
            step_names.append("forward_head")
    tail = ModelTail(steps, head, step_names)
    _check_tail(model, name, tail, example, atol)
    return tail


@contextmanager
def _recorded_output(model: nn.Module, layer: str) -> Iterator[dict[str, torch.Tensor]]:
    """Yield a dict whose ``"out"`` is a copy of ``layer``'s latest output (a copy, so that an
    in-place operation later in the forward pass cannot change it)."""
    from .capture import unwrap_output

    record: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        record["out"] = unwrap_output(output).detach().clone()

    handle = resolve_layer(model, layer).register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


def _check_tail(model: nn.Module, layer: str, tail: ModelTail, example: torch.Tensor, atol: float) -> None:
    with torch.no_grad(), _recorded_output(model, layer) as captured:
        full = model(example)
    try:
        with torch.no_grad():
            rest = tail(captured["out"])
        same = rest.shape == full.shape and torch.allclose(rest, full, rtol=1e-4, atol=atol)
    except (RuntimeError, TypeError, ValueError) as err:
        raise SplitError(
            f"cannot split {type(model).__name__} at {layer!r}: running {tail.names} on the layer's output "
            f"fails ({type(err).__name__}: {str(err).splitlines()[0][:160]}); its forward does more than "
            "chain its children"
        ) from err
    if not same:
        raise SplitError(
            f"cannot split {type(model).__name__} at {layer!r}: running {tail.names} on the layer's output "
            "does not reproduce the model's logits; its forward does more than chain its children"
        )


@torch.no_grad()
def cache_layer_outputs(model: nn.Module, images: torch.Tensor, layer: str, batch_size: int = 256,
                        device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One full forward pass over ``images`` (N, 3, H, W): (``layer``'s outputs (N, ...) on CPU,
    predicted classes (N,)). The outputs are kept whole (N x C x H x W values: mind the memory)."""
    device = torch.device(device) if device is not None else _model_device(model)
    acts, preds = [], []
    with _recorded_output(model, layer) as captured:
        for start in range(0, images.shape[0], batch_size):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(images[start : start + batch_size].to(device))
            preds.append(logits.argmax(-1).cpu())
            acts.append(captured["out"].cpu())  # in its own dtype (bf16 under autocast), as the full pass hands it on
    return torch.cat(acts), torch.cat(preds)


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def cached_class_deltas(
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
    cache: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """:func:`class_deltas` computed from cached layer outputs: one full forward pass records
    ``layer``'s outputs, then each edit runs only the part of the model after ``layer``
    (:func:`tail_module`). Same arguments and result as :func:`class_deltas`.

    cache: ``(layer outputs, base predictions)`` from :func:`cache_layer_outputs`, to reuse them
    across calls (several betas, selectors or seeds). Raises SplitError when the model cannot be
    split at ``layer`` (then use :func:`class_deltas`).
    """
    labels = torch.as_tensor(labels)
    device = _model_device(model)
    tail = tail_module(model, layer, images[:2].to(device))
    acts, base_pred = cache if cache is not None else cache_layer_outputs(model, images, layer, batch_size, device)
    if acts.shape[0] != labels.shape[0]:
        raise ValueError(f"the cache holds {acts.shape[0]} images for {labels.shape[0]} labels")
    make_edit = edit_factory or neuron_edit

    @torch.no_grad()
    def predict_edited(idx: torch.Tensor, units) -> torch.Tensor:
        edit = make_edit(units, mode, beta)
        preds = []
        for start in range(0, idx.numel(), batch_size):
            x = acts[idx[start : start + batch_size]].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                preds.append(tail(edit(x)).argmax(-1).cpu())
        return torch.cat(preds)

    return _per_class_deltas(base_pred, labels, selection, predict_edited, n_other, seed, f"{mode} x{beta} (cached)", progress)
