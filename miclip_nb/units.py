"""What a unit is: a model, a layer, and whether its units are the layer's neurons or the features
of a sparse autoencoder (SAE) on that layer, with how to edit them.

A :class:`UnitSpace` is what every step that names units agrees on: the store of per-image unit
values the alignment reads, the edit the delta-accuracy tables apply, the provenance the unit
embeddings carry. The layer is always a real module of the model (``"stages.2"``,
``"blocks.10"``): SAE features live *at* that layer, in the SAE's code space.

- neurons: unit u is channel u of a CNN map (N, C, H, W) or dimension u of a ViT's tokens
  (N, T, D); editing it scales or shifts it at every location / token (steer.neuron_edit);
- SAE features: unit u is latent u of a top-k SAE trained on the layer's tokens / locations;
  editing it changes its code at every token and keeps the SAE's reconstruction error
  (sae.sae_edit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["UNIT_KINDS", "UnitSpace", "neurons", "sae_features"]

#: The kinds of unit a space can hold (what a method declares it supports).
UNIT_KINDS: tuple[str, ...] = ("neuron", "sae")


@dataclass(frozen=True)
class UnitSpace:
    """The units of one layer of one model (see the module docstring). Build with :func:`neurons`
    or :func:`sae_features`."""

    target: object  # zoo.TargetModel: module, preprocess, class names, fingerprint
    layer: str  # a module of target.module (capture.resolve_layer)
    sae: object = None  # sae.TopKSAE trained on that layer, or None for the layer's neurons
    n_units: int | None = None  # U; the SAE's latents, or the layer's width once measured

    @property
    def kind(self) -> str:
        """"neuron" or "sae" (:data:`UNIT_KINDS`)."""
        return "neuron" if self.sae is None else "sae"

    @property
    def label(self) -> str:
        """How a unit is named in titles: "neuron" or "SAE feature"."""
        return "neuron" if self.sae is None else "SAE feature"

    def edit(self, units, mode: str = "scale", beta: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
        """The edit ``acts -> acts`` of the layer's output that scales (``beta * u``) or shifts
        (``u + beta``) ``units`` everywhere. Raises ValueError / IndexError as steer.neuron_edit
        and sae.sae_edit do."""
        from .sae import sae_edit
        from .steer import neuron_edit

        return neuron_edit(units, mode, beta) if self.sae is None else sae_edit(self.sae, units, mode, beta)

    @property
    def edit_factory(self) -> Callable | None:
        """``edit_factory(units, mode, beta)`` for the delta-accuracy harness: None for neurons (the
        harness's default neuron edit), the SAE's feature edit otherwise."""
        if self.sae is None:
            return None
        from .sae import sae_edit_factory

        return sae_edit_factory(self.sae)

    def describe(self) -> str:
        """A one-line description: model, layer, kind and size."""
        size = f"{self.n_units} " if self.n_units is not None else ""
        return f"{getattr(self.target, 'name', type(self.target).__name__)} {self.layer}: {size}{self.label}s"


def neurons(target, layer: str | None = None, n_units: int | None = None) -> UnitSpace:
    """The neurons of ``layer`` (default: the model's ``default_layer``). Raises
    capture.LayerNotFoundError (with the closest names) for a layer the model lacks, ValueError
    when no layer is given and the model has no default."""
    from .capture import resolve_layer

    layer = layer or getattr(target, "default_layer", None)
    if layer is None:
        raise ValueError("name the layer (this model has no default layer)")
    resolve_layer(target.module, layer)
    return UnitSpace(target, layer, None, n_units)


def sae_features(target, layer: str, sae) -> UnitSpace:
    """The features of ``sae`` (a sae.TopKSAE) at ``layer``. Raises capture.LayerNotFoundError
    for an unknown layer, sae.SAEMismatchError when the SAE was trained on another model or layer."""
    from .capture import resolve_layer
    from .store import model_identity

    resolve_layer(target.module, layer)
    sae.check_compatible(model=model_identity(target), layer=layer)
    return UnitSpace(target, layer, sae, sae.n_latents)
