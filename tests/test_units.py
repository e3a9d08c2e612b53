"""A unit space names what a unit is (a layer's neuron, or an SAE feature at a real layer) and how to edit it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _synthetic import random_sae
from miclip_nb import units, zoo
from miclip_nb.capture import LayerNotFoundError
from miclip_nb.sae import SAEMismatchError
from miclip_nb.store import model_identity


@pytest.fixture
def target():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2)).eval()
    return zoo.load_target(module, preprocess=lambda im: im, class_names=["a", "b"], layer="1")


def test_neurons_resolve_the_layer_and_edit_channels(target):
    space = units.neurons(target)
    assert (space.kind, space.label, space.layer, space.edit_factory) == ("neuron", "neuron", "1", None)
    x = torch.ones(2, 6, 4, 4)
    out = space.edit([1, 4], "scale", 0.0)(x)
    assert out[:, [1, 4]].abs().sum() == 0 and torch.equal(out[:, [0, 2, 3, 5]], x[:, [0, 2, 3, 5]])
    with pytest.raises(LayerNotFoundError, match="Closest: 1"):
        units.neurons(target, "11")


def test_sae_features_live_at_a_real_layer_and_edit_in_code_space(target):
    sae = random_sae(6)
    sae.meta.update(model=model_identity(target), layer="1")
    space = units.sae_features(target, "1", sae)
    assert (space.kind, space.label, space.n_units) == ("sae", "SAE feature", sae.n_latents)
    x = torch.randn(2, 6, 4, 4)
    assert torch.allclose(space.edit([0, 3], "scale", 1.0)(x), x, atol=1e-5)  # scale 1 changes nothing
    assert not torch.allclose(space.edit_factory([0, 3], "scale", 0.0)(x), x)
    assert "SAE features" in space.describe()
    sae.meta["layer"] = "0"
    with pytest.raises(SAEMismatchError, match="layer"):
        units.sae_features(target, "1", sae)
