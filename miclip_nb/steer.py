"""Steer a model by editing units during the forward pass, and measure what it does to accuracy.

For concept c with units L_c, each unit's activation becomes ``beta * u`` (mode "scale") or
``u + beta`` (mode "shift"), at every spatial location of a CNN channel and every token of a ViT
dimension. Edits live only inside :func:`intervene` / :func:`edit_layer`, whose ``finally``
removes the hook.

The delta-accuracy protocol (the paper's Table 2): for each class, take its top-tau units, apply
enhancement (scale 2) or removal (scale 0), and compare the accuracy on that class's images with
the unedited model; average over classes. The harness that measures it lives in
:mod:`miclip_nb.intervention` (streaming, every selector and beta in one pass, the specific
effect); :func:`class_deltas` (full forwards with a hook) and :func:`cached_class_deltas` (the
layer's outputs once, then only the rest of the network, :func:`tail_module`) are its per-class
views of one selection and one beta.

No image gets a class from NaN: every forward pass screens its batch (pixels and logits, see
:mod:`miclip_nb._checks`). Images with non-finite pixels, or on which the model computes
non-finite logits, raise :class:`NonFiniteInputError` naming them, or, with ``on_bad="skip"``,
are left out with a warning that names them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from .capture import resolve_layer
from ._checks import NonFiniteInputError, check_on_bad, describe_indices, nonfinite_batch, nonfinite_rows, report_nonfinite

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
        idx = index.to(acts.device)
        sel = acts.index_select(dim, idx)
        sel = sel * beta if mode == "scale" else sel + beta
        return acts.index_copy(dim, idx, sel.to(acts.dtype))  # a new tensor: acts is left as it was

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
def _screened_forward(forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, batch_size: int,
                      device: torch.device,
                      after_batch: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``forward`` over ``inputs`` batch by batch, under autocast on CUDA. Returns (argmax of the
    outputs (M,) on CPU, (M,) bool non-finite inputs, (M,) bool finite inputs but non-finite
    outputs); ``after_batch()`` runs after each forward."""
    n = inputs.shape[0]
    bad_inputs, bad_outputs = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    preds = []
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        x = inputs[rows].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = forward(x)
        found = nonfinite_batch(x, logits)
        if found is not None:
            bad_inputs[rows], bad_outputs[rows] = found
        preds.append(logits.argmax(-1).cpu())
        if after_batch is not None:
            after_batch()
    return (torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)), bad_inputs, bad_outputs


def _screened_predictions(forward, inputs: torch.Tensor, batch_size: int, device: torch.device, on_bad: str,
                          after_batch: Callable[[], None] | None = None) -> torch.Tensor:
    """Predictions (N,) with -1 for the images :func:`report_nonfinite` leaves out (or raises on)."""
    preds, bad_inputs, bad_outputs = _screened_forward(forward, inputs, batch_size, device, after_batch=after_batch)
    keep = report_nonfinite(bad_inputs, bad_outputs, on_bad, stacklevel=4)
    return preds.masked_fill(~keep, -1)


def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256, device: str | torch.device | None = None,
            *, on_bad: str = "raise") -> torch.Tensor:
    """Predicted class for each image: images (N, 3, H, W) -> (N,) long (on CPU).

    An image whose pixels or logits hold NaN or inf gets no class: ``on_bad="raise"`` (default)
    raises NonFiniteInputError naming those images; ``"skip"`` warns naming them and predicts -1
    for them. Raises ValueError for another ``on_bad``.
    """
    check_on_bad(on_bad)
    device = torch.device(device) if device is not None else _model_device(model)
    return _screened_predictions(model, images, batch_size, device, on_bad)


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
    on_bad: str = "raise",
) -> pd.DataFrame:
    """Per-class effect of editing each class's selected units, with full forward passes (a hook
    on ``layer``; :mod:`miclip_nb.intervention` runs it).

    images: (N, 3, H, W) preprocessed; labels: (N,); selection: class index -> unit indices.
    For class c: accuracy on its images before/after, and the share of up to ``n_other`` other-class
    images predicted as c before/after. The other-class samples are drawn in the selection's
    order from one generator seeded ``seed``. ``edit_factory(units, mode, beta)``
    builds the edit (default :func:`neuron_edit`; SAE features pass their own); scale 1 is taken
    as the identity (no forward pass).
    on_bad: what to do with images whose pixels or unedited logits are NaN or inf: "raise"
    (default) or "skip" (left out of every row, with a warning naming them).
    Returns a DataFrame with columns class, n, acc_base, acc_edit, delta_acc, to_class_base,
    to_class_edit, flip_to_class (all in percent), one row per class with images.
    Raises NonFiniteInputError for such images (``on_bad="raise"``), and whenever an edit makes the
    logits of a kept image non-finite; ValueError for another ``on_bad``.
    """
    return _legacy_deltas(model, images, labels, layer, selection, [beta], split="hook", mode=mode,
                          edit_factory=edit_factory, n_other=n_other, seed=seed, batch_size=batch_size,
                          progress=progress, on_bad=on_bad)[0]


_LEGACY_COLUMNS = ["class", "n", "acc_base", "acc_edit", "delta_acc", "to_class_base", "to_class_edit", "flip_to_class"]


def _legacy_deltas(model: nn.Module, images: torch.Tensor, labels, layer: str, selection: Mapping[int, torch.Tensor],
                   betas: Sequence[float], *, split: str, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                   **kwargs) -> list[pd.DataFrame]:
    """The class_deltas frame for each beta, from one pass of :mod:`miclip_nb.intervention`."""
    from .intervention import _Images, _per_class, describe_classes

    check_on_bad(kwargs["on_bad"])
    data = _Images(images, labels, None)
    if selection and not set(map(int, selection)) & set(data.labels.tolist()):
        raise ValueError(f"none of the selected classes {describe_classes(sorted(map(int, selection)))} has an image "
                         "among these images")
    acts, base = cache if cache is not None else (None, None)
    if acts is not None and acts.shape[0] != data.n:
        raise ValueError(f"the cache holds {acts.shape[0]} images for {data.n} labels")
    names = {float(b): f"x{float(b)!r}" for b in betas}
    table = _per_class(model, data, layer, [("", 0, dict(selection))], {v: k for k, v in names.items()},
                       [int(c) for c in selection], memo={}, stream="shared", split=split, layer_outputs=acts,
                       base=base, chunk_size=2048, desc=f"{kwargs['mode']} x{','.join(f'{b:g}' for b in names)}", **kwargs)
    return [table.loc[table["intervention"] == names[float(b)], _LEGACY_COLUMNS].reset_index(drop=True) for b in betas]


def beta_sweep(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, layer: str, selection: Mapping[int, torch.Tensor],
    betas: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0), mode: str = "scale", **kwargs,
) -> pd.DataFrame:
    """Dose-response of one selection, as :func:`class_deltas` for each beta (all betas in one
    pass). Returns columns beta, delta_acc, flip_to_class (means over classes). For tables over
    selectors and the specific effect use :func:`miclip_nb.intervention.dose_response`."""
    options = dict(edit_factory=None, n_other=256, seed=0, batch_size=256, progress=False, on_bad="raise")
    unknown = set(kwargs) - set(options)
    if unknown:
        raise TypeError(f"beta_sweep got unexpected arguments {sorted(unknown)}")
    options.update(kwargs)
    frames = _legacy_deltas(model, images, labels, layer, selection, list(betas), split="hook", mode=mode, **options)
    return pd.DataFrame([{"beta": beta, "delta_acc": df["delta_acc"].mean(), "flip_to_class": df["flip_to_class"].mean()}
                         for beta, df in zip(betas, frames)])


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
    bad = nonfinite_rows(full)
    if bool(bad.any()):  # NaN never compares equal: the split could not be checked
        raise NonFiniteInputError(
            f"cannot check a split of {type(model).__name__} at {layer!r}: its logits are NaN or inf on "
            f"{describe_indices(torch.nonzero(bad).flatten().tolist())} of the example; pass an example on "
            "which they are finite", torch.nonzero(bad).flatten().tolist())
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


def cache_layer_outputs(model: nn.Module, images: torch.Tensor, layer: str, batch_size: int = 256,
                        device: str | torch.device | None = None, *, on_bad: str = "raise") -> tuple[torch.Tensor, torch.Tensor]:
    """One full forward pass over ``images`` (N, 3, H, W): (``layer``'s outputs (N, ...) on CPU,
    predicted classes (N,)). The outputs are kept whole (N x C x H x W values: mind the memory).

    Images with NaN or inf pixels or logits: ``on_bad="raise"`` (default) raises
    NonFiniteInputError naming them; ``"skip"`` warns naming them and predicts -1 for them (their
    cached outputs are left as computed and never used by :func:`cached_class_deltas`).
    """
    check_on_bad(on_bad)
    device = torch.device(device) if device is not None else _model_device(model)
    acts = []
    with _recorded_output(model, layer) as captured:
        # each layer output in its own dtype (bf16 under autocast), as the full pass hands it on
        preds = _screened_predictions(model, images, batch_size, device, on_bad,
                                      after_batch=lambda: acts.append(captured["out"].cpu()))
    return torch.cat(acts), preds


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
    on_bad: str = "raise",
) -> pd.DataFrame:
    """:func:`class_deltas` computed from the layer's outputs: one full forward pass records
    ``layer``'s outputs, then each edit runs only the part of the model after ``layer``
    (:func:`tail_module`). Same arguments, result and errors as :func:`class_deltas`.

    cache: ``(layer outputs, base predictions)`` from :func:`cache_layer_outputs`, to reuse them
    across calls; images it predicts -1 (left out when it was built with ``on_bad="skip"``) are
    left out here too. Raises SplitError when the model cannot be split at ``layer`` (then use
    :func:`class_deltas`), ValueError when the cache does not hold one row per label.
    """
    return _legacy_deltas(model, images, labels, layer, selection, [beta], split="tail", cache=cache, mode=mode,
                          edit_factory=edit_factory, n_other=n_other, seed=seed, batch_size=batch_size,
                          progress=progress, on_bad=on_bad)[0]
