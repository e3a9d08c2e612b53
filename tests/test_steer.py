"""Interventions: they edit exactly the chosen units everywhere, leave no trace, and move accuracy."""

import pytest
import timm
import torch
from torch import nn

from miclip_nb.capture import LayerNotFoundError, hooked_activations
from miclip_nb.select import RandomSelector, ScoreSelector, selection
from miclip_nb.steer import beta_sweep, class_deltas, intervene, neuron_edit


class UnitPerClass(nn.Module):
    """features = x (N, C); logits = features: unit k is the evidence for class k."""

    def __init__(self):
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Identity()

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def tiny_cnn():
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8, depth=2).eval()


def test_scale_one_and_shift_zero_are_identity(tiny_cnn):
    x = torch.randn(2, 3, 64, 64)
    ref = tiny_cnn(x)
    for mode, beta in (("scale", 1.0), ("shift", 0.0)):
        with intervene(tiny_cnn, "layer3", [0, 5, 7], mode, beta):
            assert torch.equal(tiny_cnn(x), ref)


def test_cnn_edit_reaches_every_location(tiny_cnn):
    x = torch.randn(2, 3, 64, 64)
    with intervene(tiny_cnn, "layer3", [3, 4], "scale", 0.0), hooked_activations(tiny_cnn, "layer3", "none") as acts:
        tiny_cnn(x)
    edited = acts["layer3"]
    assert torch.count_nonzero(edited[:, [3, 4]]) == 0
    assert torch.count_nonzero(edited[:, 5:]) > 0


def test_vit_edit_reaches_every_token(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    with hooked_activations(tiny_vit, "blocks.0", "none") as before:
        tiny_vit(x)
    with intervene(tiny_vit, "blocks.0", [1, 2], "shift", 5.0), hooked_activations(tiny_vit, "blocks.0", "none") as after:
        out = tiny_vit(x)
    diff = after["blocks.0"] - before["blocks.0"]
    assert torch.allclose(diff[..., [1, 2]], torch.full_like(diff[..., [1, 2]], 5.0))
    assert torch.count_nonzero(diff[..., 3:]) == 0
    assert out.shape == (2, 5)


def test_hooks_removed_after_error(tiny_cnn):
    x = torch.randn(1, 3, 64, 64)
    ref = tiny_cnn(x)
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(tiny_cnn, "layer2", [0], "scale", 0.0):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in tiny_cnn.modules())
    assert torch.equal(tiny_cnn(x), ref)


def test_bad_arguments(tiny_cnn):
    with pytest.raises(ValueError, match="mode"):
        neuron_edit([0], "multiply", 2.0)
    with pytest.raises(ValueError, match="no units"):
        neuron_edit([], "scale", 2.0)
    with pytest.raises(LayerNotFoundError, match="layer3"):
        with intervene(tiny_cnn, "layer33", [0]):
            pass
    with pytest.raises(IndexError, match="out of range"):
        with intervene(tiny_cnn, "layer1", [999]):
            tiny_cnn(torch.randn(1, 3, 64, 64))


def test_class_deltas_follow_the_planted_units():
    model = UnitPerClass()
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(50)
    x = torch.rand(200, 4, generator=gen) * 0.8
    x[torch.arange(200), labels] += 0.5  # the own unit usually, not always, wins
    right = selection(ScoreSelector("oracle", torch.eye(4)), range(4), tau=1)
    removal = class_deltas(model, x, labels, "features", right, beta=0.0)
    enhance = class_deltas(model, x, labels, "features", right, beta=2.0)
    base = removal["acc_base"].mean()
    assert 50 < base < 100
    assert removal["acc_edit"].max() == 0.0  # nothing is left of the class evidence
    assert enhance["delta_acc"].mean() > 0 and enhance["acc_edit"].min() == 100.0
    assert (enhance["flip_to_class"] > 0).all()
    wrong = selection(ScoreSelector("anti", 1 - torch.eye(4)), range(4), tau=1)
    assert class_deltas(model, x, labels, "features", wrong, beta=0.0)["delta_acc"].mean() > removal["delta_acc"].mean()
    sweep = beta_sweep(model, x, labels, "features", right, betas=(0.0, 1.0, 2.0))
    assert sweep["delta_acc"].is_monotonic_increasing
    assert sweep.loc[sweep["beta"] == 1.0, "delta_acc"].item() == 0.0


def test_random_selector_is_seeded_and_distinct():
    a, b = RandomSelector(100, seed=1), RandomSelector(100, seed=1)
    assert torch.equal(a.select(3, 5), b.select(3, 5))
    assert not torch.equal(a.select(3, 5), RandomSelector(100, seed=2).select(3, 5))
    assert len(set(a.select(0, 50).tolist())) == 50
    with pytest.raises(ValueError, match="tau"):
        a.select(0, 101)


def test_wrong_input_shape_is_a_clear_error(tiny_cnn):
    from miclip_nb.capture import InputShapeError, capture

    with pytest.raises(InputShapeError, match=r"\(2, 1, 64, 64\)"):
        capture(tiny_cnn, torch.randn(2, 1, 64, 64), "layer2")
    assert all(not m._forward_hooks for m in tiny_cnn.modules())
