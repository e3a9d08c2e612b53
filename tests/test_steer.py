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


def test_cached_class_deltas_match_full_forward(tiny_cnn, tiny_vit):
    """The tail run on cached layer outputs predicts exactly what the full edited forward does."""
    from miclip_nb.steer import cache_layer_outputs, cached_class_deltas, tail_module

    labels = torch.arange(5).repeat(4)
    cases = ((tiny_cnn, "layer3", 64), (tiny_cnn, "stages.3.layers.1.shortcut", 64), (tiny_vit, "blocks.0", 32))
    for model, layer, size in cases:  # the second is an alias of layer4.0
        x = torch.randn(20, 3, size, size)
        units = torch.tensor([0, 3, 5])
        with hooked_activations(model, layer, "none") as acts:
            model(x[:4])
        tail = tail_module(model, layer, x[:2])
        with intervene(model, layer, units, "scale", 0.0):
            full = model(x[:4])
        assert torch.allclose(tail(neuron_edit(units, "scale", 0.0)(acts[layer])), full, atol=1e-5)
        sel = {c: torch.tensor([c, c + 5, 2 * c + 1]) for c in range(5)}
        for beta in (0.0, 2.0):
            ref = class_deltas(model, x, labels, layer, sel, beta=beta, n_other=6, batch_size=7)
            got = cached_class_deltas(model, x, labels, layer, sel, beta=beta, n_other=6, batch_size=7,
                                      cache=cache_layer_outputs(model, x, layer))
            assert ref.equals(got)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_cnn.modules())


def test_unsplittable_models_are_a_clear_error(tiny_cnn):
    from miclip_nb.steer import SplitError, tail_module

    with pytest.raises(SplitError, match="layer3.0.*not a plain sequence"):
        tail_module(tiny_cnn, "layer3.0.conv1", torch.randn(2, 3, 64, 64))
    with pytest.raises(SplitError, match="does more than"):  # the flatten before fc is not a module
        tail_module(UnitPerClassFlatten(), "features", torch.randn(2, 4, 1, 1))
    with pytest.raises(LayerNotFoundError):
        tail_module(tiny_cnn, "layer9", torch.randn(2, 3, 64, 64))


class UnitPerClassFlatten(nn.Module):
    """features -> flatten (a function, not a module) -> head: not a chain of its children."""

    def __init__(self):
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_cache_is_not_changed_by_inplace_ops_after_the_layer():
    """A ReLU(inplace=True) right after the layer rewrites its output; the cache keeps the original."""
    from miclip_nb.steer import cached_class_deltas

    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    x, labels = torch.randn(30, 3, 8, 8), torch.arange(3).repeat(10)
    sel = {c: torch.tensor([c, c + 3]) for c in range(3)}
    with torch.no_grad():
        ref = class_deltas(model, x, labels, "0", sel, mode="shift", beta=0.3, n_other=5)
        got = cached_class_deltas(model, x, labels, "0", sel, mode="shift", beta=0.3, n_other=5)
    assert ref.equals(got)


# --------------------------------------------------------------------------------------------
# Non-finite images never become predictions or accuracies


class SqrtLogits(nn.Module):
    """logits = sqrt(x) (N, C): NaN for a negative input, so finite images can give NaN logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Identity()

    def forward(self, x):
        return self.features(x).sqrt()


def _planted(n=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat(n // 4)
    x = torch.rand(n, 4, generator=gen) * 0.8
    x[torch.arange(n), labels] += 0.5
    return x, labels


def test_predict_names_images_with_non_finite_pixels_or_logits():
    from miclip_nb.steer import NonFiniteInputError, predict

    x, _ = _planted(12)
    x[2, 1], x[5] = float("nan"), float("inf")
    with pytest.raises(NonFiniteInputError, match=r"NaN or inf pixels in 2 images \(indices 2, 5\), among 12") as err:
        predict(UnitPerClass(), x, batch_size=4)  # index 5 sits in the second batch: indices are global
    assert err.value.indices == [2, 5]
    finite = x.abs()
    finite[7, 0] = -1.0  # finite pixels, NaN logits
    with pytest.raises(NonFiniteInputError, match=r"logits are NaN or inf for 1 image \(index 7\) with finite pixels"):
        predict(SqrtLogits(), finite, batch_size=4)
    many = torch.full((12, 4), float("nan"))
    with pytest.raises(NonFiniteInputError, match=r"12 images \(indices 0, 1, 2, 3, 4, \.\.\.\)"):
        predict(UnitPerClass(), many)
    with pytest.warns(UserWarning, match=r"2 images \(indices 2, 5\).*left out"):
        pred = predict(UnitPerClass(), x, batch_size=4, on_bad="skip")
    keep = torch.ones(12, dtype=torch.bool)
    keep[[2, 5]] = False
    assert pred[~keep].tolist() == [-1, -1] and torch.equal(pred[keep], x[keep].argmax(1))
    with pytest.raises(ValueError, match="on_bad must be one of"):
        predict(UnitPerClass(), x, on_bad="ignore")


@pytest.mark.parametrize("cached", [False, True])
def test_class_deltas_refuse_or_skip_non_finite_images(cached):
    """Before: inf images of class 1 were "predicted" as class 0, so class 1's acc_base fell to a
    plausible-looking number; the cached variant even blamed the model (SplitError) when one of them
    came first. Now they are named, or left out exactly as if they were not there."""
    from miclip_nb.steer import NonFiniteInputError, cached_class_deltas

    deltas = cached_class_deltas if cached else class_deltas
    x, labels = _planted()
    bad = torch.tensor([1, 5, 9])  # class 1 images; index 1 is in the example cached_class_deltas traces
    x[bad] = float("inf")
    sel = selection(ScoreSelector("oracle", torch.eye(4)), range(4), tau=1)
    with pytest.raises(NonFiniteInputError, match=r"3 images \(indices 1, 5, 9\)"):
        deltas(UnitPerClass(), x, labels, "features", sel, beta=2.0, n_other=20)
    with pytest.warns(UserWarning, match=r"3 images \(indices 1, 5, 9\)"):
        skipped = deltas(UnitPerClass(), x, labels, "features", sel, beta=2.0, n_other=20, on_bad="skip")
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[bad] = False
    clean = deltas(UnitPerClass(), x[keep], labels[keep], "features", sel, beta=2.0, n_other=20)
    assert skipped.equals(clean)
    assert skipped.loc[skipped["class"] == 1, "n"].item() == 47 and skipped["acc_base"].min() > 50


@pytest.mark.parametrize("cached", [False, True])
def test_an_edit_that_makes_logits_nan_is_an_error(cached):
    from miclip_nb.steer import NonFiniteInputError, cached_class_deltas

    deltas = cached_class_deltas if cached else class_deltas
    x, labels = _planted(40)
    sel = {2: torch.tensor([2])}
    for on_bad in ("raise", "skip"):  # skipping them would bias the table towards images the edit spares
        with pytest.raises(NonFiniteInputError, match=r"editing the units of class 2 .*NaN or inf for 20 images"):
            deltas(UnitPerClass(), x, labels, "features", sel, mode="shift", beta=float("nan"), n_other=10, on_bad=on_bad)


def test_tail_module_says_when_the_example_gives_nan_logits():
    from miclip_nb.steer import NonFiniteInputError, tail_module

    model = nn.Sequential(nn.Identity(), nn.Identity())
    assert tail_module(model, "0", torch.rand(2, 2)).names == ["1"]
    with pytest.raises(NonFiniteInputError, match=r"cannot check a split .* NaN or inf on 1 image \(index 1\) of the example"):
        tail_module(model, "0", torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]))  # before: SplitError
