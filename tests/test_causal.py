"""Causal scores: on a planted network, channels the head reads and twins it ignores get the same
descriptions from every description method, and only the causal score tells them apart."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miclip_nb import baselines as bl
from miclip_nb import causal
from miclip_nb.select import ScoreSelector

WEIGHT = 5.0  # the head's weight on each read channel
CLASSES = ["red", "blue"]


class PlantedColours(nn.Module):
    """The planted layer: channel 0 = redness map, 1 = the same map mirrored left-right, 2 =
    blueness map, 3 = blueness mirrored. A twin has exactly its channel's mean-pooled value on every
    image (the same activation statistics), but the head reads only channels 0 and 2."""

    def forward(self, x):
        red, blue = x[:, 0], x[:, 2]
        return torch.stack([red, red.flip(-1), blue, blue.flip(-1)], 1)


def planted_network(splittable: bool = True) -> nn.Module:
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[0, 0] = head.weight[1, 2] = WEIGHT  # class "red" reads channel 0, "blue" channel 2
    if splittable:
        return nn.Sequential(OrderedDict(features=PlantedColours(), pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                                         head=head)).eval()
    return Unsplittable(head).eval()


class Unsplittable(nn.Module):
    """The same network, but its forward pools by itself (not a chain of children): no tail."""

    def __init__(self, head):
        super().__init__()
        self.features, self.head = PlantedColours(), head

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def planted_images(n: int = 48, seed: int = 0):
    """(N, 3, 8, 8) images in [0, 1] with one red (label 0) or blue (label 1) patch of random size
    and place on black, placed off-centre so that a map and its mirror differ."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.zeros(n, 3, 8, 8)
    for i in range(n):
        h, w = (int(v) for v in torch.randint(2, 5, (2,), generator=gen))
        top, left = int(torch.randint(0, 8 - h + 1, (1,), generator=gen)), int(torch.randint(0, 4, (1,), generator=gen))
        images[i, 0 if labels[i] == 0 else 2, top : top + h, left : left + w] = 1.0
    return images, labels


@pytest.fixture(scope="module")
def planted():
    images, labels = planted_images()
    return planted_network(), images, labels


def test_twins_have_the_same_activation_statistics_and_descriptions(planted, tmp_path):
    model, images, labels = planted
    acts = bl.pooled_activations(model, "features", images)
    assert torch.equal(acts[:, 0], acts[:, 1]) and torch.equal(acts[:, 2], acts[:, 3])
    assert not torch.equal(model.features(images)[:, 0], model.features(images)[:, 1])  # the maps differ
    # Act-Values and CLIP-Dissect read the same numbers for a channel and its twin: same scores.
    text = F.normalize(torch.eye(3, 8), dim=-1)  # "red", "blue", "green"
    image_emb = F.normalize(text[labels] + 0.1 * torch.randn(len(labels), 8), dim=-1)
    for scores in (bl.act_values_scores(acts, labels, 2), bl.soft_wpmi(acts, image_emb, text, bl.SoftWPMIConfig(top_k=10))):
        assert torch.equal(scores[:, 0], scores[:, 1]) and torch.equal(scores[:, 2], scores[:, 3])
    # MiClip: an encoder trained on the network's pooled units describes a channel and its twin alike.
    from miclip_nb import align, interpret
    from miclip_nb.store import ActivationStore, StoreSpec, StoreWriter, acts_field

    many, many_labels = planted_images(600, seed=1)
    many_acts = bl.pooled_activations(model, "features", many)
    clip = F.normalize(text[many_labels] + 0.2 * torch.randn(len(many_labels), 8), dim=-1)
    spec = StoreSpec(model="planted-colours", layers=("features",), pooling="mean", dataset="planted:600", n_items=600,
                     transform="none", clip="one-hot", clip_transform="none")
    with StoreWriter(tmp_path / spec.key, spec, 600) as writer:
        writer.append({acts_field("features"): many_acts, "clip_image": clip, "label": many_labels, "pred": many_labels})
    encoder, _ = align.train_encoder(ActivationStore(tmp_path / spec.key), text[:2], config=align.AlignConfig(epochs=10),
                                     progress=False)
    emb = interpret.unit_embeddings(encoder)
    described = [interpret.describe(emb, u, text, ["red", "blue", "green"], tau=1)[0][0] for u in range(4)]
    assert described == ["red", "red", "blue", "blue"]


def test_the_causal_score_separates_read_channels_from_their_twins(planted):
    model, images, labels = planted
    effects = causal.unit_effects(model, "features", images, labels=labels)
    assert effects.shape == (4, 2)
    acts = bl.pooled_activations(model, "features", images)
    # Removing a read channel lowers its class's logit by weight x its mean over that class's images.
    assert effects[0, 0] == pytest.approx(WEIGHT * float(acts[labels == 0, 0].mean()), rel=1e-5)
    assert effects[2, 1] == pytest.approx(WEIGHT * float(acts[labels == 1, 2].mean()), rel=1e-5)
    assert effects[0, 0] > 0.5 and effects[2, 1] > 0.5
    assert torch.equal(effects[[1, 3]], torch.zeros(2, 2))  # the twins: exactly nothing
    assert effects[0, 1] == 0 and effects[2, 0] == 0  # a channel the other class does not read


def test_split_and_hook_paths_agree_and_effects_are_cached(planted, monkeypatch):
    model, images, labels = planted
    tail = causal.UnitEffects(model, "features", images, labels=labels, batch_size=10)
    hook = causal.UnitEffects(planted_network(splittable=False), "features", images, labels=labels, batch_size=10)
    assert (tail.split, hook.split) == ("tail", "hook") and tail.n_units == hook.n_units == 4
    assert torch.allclose(tail(), hook(), atol=1e-5)
    calls = []
    real = tail._logits
    monkeypatch.setattr(tail, "_logits", lambda unit: calls.append(unit) or real(unit))
    tail.of(0), tail([0, 2, 0])
    assert calls == [] and tail.computed == [0, 1, 2, 3]  # all cached already
    lazy = causal.UnitEffects(model, "features", images, labels=labels)
    lazy.of(2)
    assert lazy.computed == [2]


def test_effects_over_all_images_class_columns_and_missing_classes(planted):
    model, images, labels = planted
    everyone = causal.unit_effects(model, "features", images, [0, 2])
    acts = bl.pooled_activations(model, "features", images)
    assert everyone[0, 0] == pytest.approx(WEIGHT * float(acts[:, 0].mean()), rel=1e-5)
    assert causal.unit_effects(model, "features", images, [0, 2], labels=labels, classes=[1]).shape == (2, 1)
    only_red = causal.unit_effects(model, "features", images[labels == 0], [0], labels=labels[labels == 0])
    assert torch.isnan(only_red[0, 1]) and only_red[0, 0] > 0  # no "blue" image: NaN
    with pytest.raises(IndexError, match="class 5"):
        causal.unit_effects(model, "features", images, [0], classes=[5])
    with pytest.raises(ValueError, match="labels for"):
        causal.UnitEffects(model, "features", images, labels=labels[:3])
    with pytest.raises(ValueError, match="out of range"):
        causal.UnitEffects(model, "features", images).of(4)


def test_any_unit_edit_through_an_edit_factory(planted):
    """A 'feature' f that edits the pair of channels (2f, 2f + 1): feature 0 = red and its twin."""
    model, images, labels = planted

    def pair_edit(units, mode="scale", beta=0.0):
        channels = [c for f in units for c in (2 * f, 2 * f + 1)]
        return bl_neuron_edit(channels, mode, beta)

    from miclip_nb.steer import neuron_edit as bl_neuron_edit

    features = causal.unit_effects(model, "features", images, labels=labels, edit_factory=pair_edit, n_units=2)
    neurons = causal.unit_effects(model, "features", images, [0, 2], labels=labels)
    assert torch.allclose(features, neurons)  # the twin adds nothing
    with pytest.raises(ValueError, match="n_units"):
        causal.UnitEffects(model, "features", images, edit_factory=pair_edit)()


def test_descriptions_and_localized_units_carry_the_causal_score(planted):
    model, images, labels = planted
    effects = causal.UnitEffects(model, "features", images, labels=labels)
    table = causal.describe_with_effects([("red", 0.9), ("square", 0.4)], effects.of(1), CLASSES)
    assert list(table.columns) == ["rank", "concept", "score", "causal", "causal_class"]
    assert table["causal"].tolist() == [0.0, 0.0]  # the twin is described "red" and does nothing
    read = causal.describe_with_effects([("red", 0.9), ("square", 0.4)], effects.of(0), CLASSES)
    assert read.loc[0, "causal_class"] == "red" and read.loc[0, "causal"] > 0.5
    assert read.loc[1, "causal_class"] == "red"  # not a class: the largest class effect
    loc = causal.localize_with_effects(torch.tensor([1, 0]), torch.tensor([0.8, 0.7]), effects, "red", CLASSES)
    assert loc["unit"].tolist() == [1, 0] and loc["causal"].tolist()[0] == 0.0 and loc["causal"].tolist()[1] > 0.5
    assert effects.computed == [0, 1]  # only what was asked for
    assert causal.causal_score(torch.tensor([0.1, 2.0]), "star", CLASSES) == (2.0, 1)
    assert causal.causal_score(torch.tensor([0.1, 2.0]), 0) == (pytest.approx(0.1), 0)
    assert causal.causal_score(torch.tensor([float("nan"), float("nan")]))[1] is None
    assert causal.top_effects(torch.tensor([0.1, float("nan"), 2.0]), ["a", "b", "c"], k=3) == [("c", 2.0), ("a", pytest.approx(0.1))]


def test_confirm_reranks_a_methods_candidates_by_their_effect(planted):
    model, images, labels = planted
    effects = causal.UnitEffects(model, "features", images, labels=labels)
    # A description method that prefers the twins (e.g. by a tie broken the wrong way).
    scores = torch.tensor([[0.9, 1.0, 0.0, 0.1], [0.0, 0.1, 0.9, 1.0]])
    assert ScoreSelector("m", scores).select(0, 1).tolist() == [1]
    picked = causal.confirm(scores, effects, top_k=2, tau=1)
    assert {c: u.tolist() for c, u in picked.items()} == {0: [0], 1: [2]}
    assert effects.computed == [0, 1, 2, 3]
    sel = causal.ConfirmedSelector(ScoreSelector("m", scores), effects, top_k=2)
    assert sel.name == "m + ablation" and sel.select(1, 2).tolist() == [2, 3]
    assert causal.ConfirmedSelector(scores, effects.__call__(range(4)), top_k=2).select(0, 1).tolist() == [0]
    with pytest.raises(ValueError, match="tau"):
        causal.confirm(scores, effects, top_k=2, tau=3)
    with pytest.raises(ValueError, match="top_k"):
        sel.select(0, 3)
