"""Capture a model's hidden activations: layer lookup, pooling, and hooks that always go away.

A layer is named by its dotted module name (``"stages.2"``, ``"blocks.10"``,
``"visual.transformer.resblocks.10"``). Hooks exist only inside :func:`hooked_activations`, whose
``finally`` removes them, whether the forward pass succeeded or raised.

Pooling (see :data:`POOLINGS`) reduces a layer output to one vector per image:

- CNN maps ``(N, C, H, W)``: ``"mean"`` / ``"max"`` over space, ``"none"`` keeps the map.
- Token sequences ``(N, T, D)``: ``"mean"`` / ``"max"`` over the patch tokens (prefix tokens such as
  CLS excluded), ``"cls"`` the first token, ``"none"`` keeps every token.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

POOLINGS = ("mean", "max", "cls", "none")

#: The paper names ResNet-50's layer in HuggingFace's naming; these are the timm/torchvision
#: equivalents. HF ``stages.3.layers.1.shortcut`` is the identity shortcut of the second block of
#: the last stage, so its output is the input of that block = the output of ``layer4.0``
#: (N, 2048, 7, 7 at 224 px).
LAYER_ALIASES: dict[str, str] = {
    "stages.3.layers.1.shortcut": "layer4.0",
    "encoder.stages.3.layers.1.shortcut": "layer4.0",
    "resnet.encoder.stages.3.layers.1.shortcut": "layer4.0",
}


class LayerNotFoundError(KeyError):
    """A layer name that is not a module of the model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def layer_names(model: nn.Module) -> list[str]:
    """All dotted module names of ``model`` (the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted), after :data:`LAYER_ALIASES`.

    Raises LayerNotFoundError listing the closest valid names when there is no such module.
    """
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    alias = LAYER_ALIASES.get(name)
    if alias is not None and alias in modules:
        return modules[alias]
    valid = [n for n in modules if n]
    close = difflib.get_close_matches(name, valid, n=6, cutoff=0.4)
    hint = f" Closest: {', '.join(close)}." if close else ""
    raise LayerNotFoundError(
        f"{type(model).__name__} has no layer {name!r}.{hint} "
        f"(miclip_nb.capture.layer_names(model) lists all {len(valid)} names.)"
    )


def num_prefix_tokens(model: nn.Module) -> int:
    """How many leading tokens (CLS, registers, distillation) a ViT-like model prepends; 0 for CNNs."""
    if hasattr(model, "num_prefix_tokens"):  # timm VisionTransformer
        return int(model.num_prefix_tokens)
    for sub in (model, getattr(model, "visual", None)):
        if sub is not None and getattr(sub, "class_embedding", None) is not None:  # open_clip
            return 1
    return 0


def unwrap_output(output) -> torch.Tensor:
    """The activation tensor of a module output: tuples/lists give their first element."""
    while isinstance(output, (tuple, list)):
        if not output:
            raise TypeError("layer returned an empty tuple")
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"layer output is a {type(output).__name__}, not a tensor; pick another layer")
    return output


def pool(acts: torch.Tensor, pooling: str, n_prefix: int = 0) -> torch.Tensor:
    """Reduce a layer output to one vector per image.

    acts: (N, C, H, W) map or (N, T, D) tokens (or (N, D) already pooled, returned as is).
    Returns (N, C) / (N, D), or the input for ``pooling="none"``.
    Raises ValueError for an unknown pooling or one that does not fit the shape.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
    if pooling == "none" or acts.ndim == 2:
        return acts
    if acts.ndim == 4:
        if pooling == "cls":
            raise ValueError("pooling 'cls' needs token outputs (N, T, D), got a CNN map (N, C, H, W)")
        flat = acts.flatten(2)
        return flat.mean(2) if pooling == "mean" else flat.amax(2)
    if acts.ndim == 3:
        if pooling == "cls":
            if n_prefix < 1:
                raise ValueError("pooling 'cls' needs a model with a class token")
            return acts[:, 0]
        patches = acts[:, n_prefix:]
        return patches.mean(1) if pooling == "mean" else patches.amax(1)
    raise ValueError(f"cannot pool activations of shape {tuple(acts.shape)}")


def spatial_map(acts: torch.Tensor, n_prefix: int = 0) -> torch.Tensor:
    """Per-location activations as a map: (N, C, H, W) stays, (N, T, D) -> (N, D, h, w) over patches.

    Raises ValueError when the patch count is not a square.
    """
    if acts.ndim == 4:
        return acts
    if acts.ndim != 3:
        raise ValueError(f"expected (N, C, H, W) or (N, T, D), got {tuple(acts.shape)}")
    patches = acts[:, n_prefix:]
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid")
    return patches.transpose(1, 2).reshape(acts.shape[0], acts.shape[2], side, side)


@contextmanager
def hooked_activations(
    model: nn.Module, layers: list[str] | str, pooling: str = "mean", detach: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the (pooled) outputs of ``layers`` during forward passes inside the block.

    Yields a dict ``{layer name: tensor}`` refreshed by every forward pass. The hooks are removed
    when the block exits, also when it raises. Raises LayerNotFoundError for an unknown layer and
    ValueError for an unknown pooling, before any hook is added.
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
    modules = [resolve_layer(model, n) for n in names]
    n_prefix = num_prefix_tokens(model)
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            acts = unwrap_output(output)
            if detach:
                acts = acts.detach()
            captured[name] = pool(acts, pooling, n_prefix)

        return hook

    try:
        for name, module in zip(names, modules):
            handles.append(module.register_forward_hook(make_hook(name)))
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture(model: nn.Module, x: torch.Tensor, layers: list[str] | str, pooling: str = "mean") -> dict[str, torch.Tensor]:
    """One forward pass of ``x`` (N, ...) returning ``{layer: pooled activations}`` and nothing else.

    The model is left exactly as it was (no hooks, same outputs).
    """
    with hooked_activations(model, layers, pooling) as acts:
        forward_checked(model, x)
    return dict(acts)


class InputShapeError(ValueError):
    """Input the model cannot take (wrong tensor shape, channel count or size)."""


def forward_checked(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, turning torch's shape errors from deep inside the model into an
    InputShapeError that names the input shape and the likely cause."""
    if not isinstance(x, torch.Tensor):
        raise InputShapeError(f"expected a tensor batch (N, 3, H, W), got {type(x).__name__}")
    try:
        return model(x)
    except RuntimeError as err:
        text = str(err)
        if any(k in text for k in ("size", "shape", "dimension", "channels", "Expected")):
            raise InputShapeError(
                f"{type(model).__name__} cannot take input of shape {tuple(x.shape)}: {text.splitlines()[0][:200]}. "
                "Check the preprocessing (image size, 3 channels, batch dimension first)."
            ) from err
        raise
