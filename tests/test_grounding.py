"""Spatial grounding: heatmaps follow the layer's grid, sets of features add up, IoU and chance,
the Shapes-world table of localized features. (The colour-IoU floors on the toy ViT, which need a
trained SAE, are in tests/test_sae.py, "The Shapes world".)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from miclip_nb.capture import hooked_activations
from miclip_nb.grounding import (chance_iou, feature_heatmaps, heatmap_iou, heatmap_masks, localized_features,
                                 neuron_heatmaps, plot_heatmaps, sae_concept_grounding, mask_grounding)
from miclip_nb.sae import SAEConfig, SAEMismatchError, TopKSAE
from _synthetic import random_sae


def test_heatmaps_follow_the_layer_grid(tiny_vit, tiny_cnn):
    x = torch.randn(3, 3, 32, 32)
    with hooked_activations(tiny_vit, "blocks.1", "none") as acts:
        tiny_vit(x)
    tokens = acts["blocks.1"]  # (3, 1 + 16, 192)
    heat = neuron_heatmaps(tiny_vit, "blocks.1", x, unit=7)
    assert heat.shape == (3, 32, 32) and heat.dtype == np.float32
    grid = tokens[:, 1:, 7].reshape(3, 1, 4, 4)
    expected = F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)[:, 0].numpy()
    assert np.allclose(heat, expected, atol=1e-5)
    sae = random_sae(tokens.shape[-1])
    fheat = feature_heatmaps(tiny_vit, "blocks.1", sae, x, feature=4)
    with torch.no_grad():
        fgrid = sae.encode(tokens)[:, 1:, 4].reshape(3, 1, 4, 4)
    assert np.allclose(fheat, F.interpolate(fgrid, size=(32, 32), mode="bilinear", align_corners=False)[:, 0].numpy(), atol=1e-5)
    with pytest.raises(IndexError):
        feature_heatmaps(tiny_vit, "blocks.1", sae, x, feature=sae.n_latents)
    xc = torch.randn(2, 3, 64, 64)
    cheat = neuron_heatmaps(tiny_cnn, "layer3", xc, unit=3)
    assert cheat.shape == (2, 64, 64)
    with pytest.raises(SAEMismatchError):
        feature_heatmaps(tiny_cnn, "layer3", sae, xc, feature=0)


def test_a_set_of_features_is_the_weighted_sum_of_their_maps(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    sae = random_sae(192)
    feats, weights = [4, 9, 30], [0.5, 0.2, 0.3]
    maps = [feature_heatmaps(tiny_vit, "blocks.1", sae, x, f) for f in feats]
    combined = feature_heatmaps(tiny_vit, "blocks.1", sae, x, feats, weights=weights)
    assert np.allclose(combined, sum(w * m for w, m in zip(weights, maps)), atol=1e-5)
    assert np.allclose(feature_heatmaps(tiny_vit, "blocks.1", sae, x, feats), sum(maps), atol=1e-5)
    assert np.array_equal(feature_heatmaps(tiny_vit, "blocks.1", sae, x, [9]), maps[1])
    with pytest.raises(ValueError, match="weights"):
        feature_heatmaps(tiny_vit, "blocks.1", sae, x, feats, weights=[1.0])
    with pytest.raises(ValueError, match="no SAE features"):
        feature_heatmaps(tiny_vit, "blocks.1", sae, x, [])
    with pytest.raises(IndexError):
        feature_heatmaps(tiny_vit, "blocks.1", sae, x, [1, sae.n_latents])


def test_heatmap_iou_thresholds():
    heat = np.zeros((3, 10, 10), dtype=np.float32)
    heat[:, :4, :5] = 1.0  # top 20 pixels
    heat[:, 0, 0] = 2.0
    masks = np.zeros((3, 10, 10), dtype=bool)
    masks[0, :4, :5] = True  # identical
    masks[1, 5:, 5:] = True  # disjoint
    iou = heatmap_iou(heat, masks, quantile=0.7)
    assert iou[0] == pytest.approx(1.0) and iou[1] == 0.0 and math.isnan(iou[2])
    assert heatmap_masks(heat, quantile=0.9).sum((1, 2)).tolist() == [1, 1, 1]  # ties at the threshold excluded
    assert heatmap_masks(heat, None, max_fraction=0.5).sum((1, 2)).tolist() == [20, 20, 20]
    with pytest.raises(ValueError, match="exactly one"):
        heatmap_masks(heat, None, None)
    with pytest.raises(ValueError, match="shape"):
        heatmap_iou(heat, masks[:, :5])
    area = 0.2
    assert chance_iou(masks, 0.8)[0] == pytest.approx(area * 0.2 / (area + 0.2 - area * 0.2))


def test_chance_iou_is_what_random_selections_score():
    rng = np.random.default_rng(0)
    masks = np.zeros((400, 20, 20), dtype=bool)
    masks[:, 5:11, 3:13] = True  # area 0.15
    random_heat = rng.random(masks.shape)
    assert np.mean(heatmap_iou(random_heat, masks, 0.8)) == pytest.approx(chance_iou(masks, 0.8)[0], abs=0.005)


def test_plot_heatmaps_returns_a_figure():
    import matplotlib.pyplot as plt

    images = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    fig = plot_heatmaps(images, np.random.rand(3, 16, 16), ["a", "b", "c"], ncols=2)
    assert len([ax for ax in fig.axes if ax.images]) == 3
    plt.close(fig)
    with pytest.raises(ValueError):
        plot_heatmaps(images, np.random.rand(2, 16, 16))


def test_localized_features_best_first_with_clipped_weights():
    emb = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.0], [0.0, 1.0]]), dim=-1)
    picked = localized_features(emb, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), ["a", "b"], tau=3)
    assert picked["a"][0] == [0, 1, 3] and picked["a"][1] == pytest.approx([1.0, 0.8, 0.0])
    assert picked["b"][0][:2] == [3, 1]
    with pytest.raises(ValueError, match="concepts"):
        localized_features(emb, torch.zeros(3, 2), ["a", "b"])


class _ColourPixels(torch.nn.Module):
    """A 'model' whose layer ``features`` is the image itself as an 8 x 8 map of RGB channels
    (pooled 8 x 8 pixel blocks), so an SAE with red/green/blue detectors grounds colours exactly."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.AvgPool2d(8)
        self.head = torch.nn.Linear(3, 6)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_sae_concept_grounding_finds_colour_detectors():
    """Features 0-2 detect red, green, blue pixels; MiClip embeddings point feature i at colour i.
    The top feature and the top set must overlap the colour's object masks far above chance."""
    from types import SimpleNamespace

    from miclip_nb.shapes import COLOR_RGB, COLORS, ShapesDataset, to_tensor

    model = _ColourPixels().eval()
    target = SimpleNamespace(module=model, preprocess=to_tensor)
    sae = TopKSAE(3, SAEConfig(expansion=2, k=1))
    rgb = F.normalize(torch.tensor([COLOR_RGB[c] for c in ("red", "green", "blue")], dtype=torch.float32) / 127.5 - 1, dim=-1)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:3] = rgb * 4
        sae.b_enc.fill_(-2.0)  # a pixel block has to match the colour to fire
    emb = torch.zeros(6, 3)
    emb[:3] = torch.eye(3)
    table = sae_concept_grounding(target, "features", sae, emb, torch.eye(3), ["red", "green", "blue"],
                                  ShapesDataset("test", 120), tau=2, n_images=120)
    assert table["feature"].tolist() == [0, 1, 2]
    assert table["features"].tolist()[0].startswith("0,")
    assert (table["n_images"] > 5).all()
    assert (table["iou_feature"] > 2 * table["chance_iou"]).all() and (table["iou_set"] > 2 * table["chance_iou"]).all()
    assert list(table.columns) == ["concept", "feature", "iou_feature", "auroc_feature", "features", "iou_set",
                                   "auroc_set", "chance_iou", "area", "n_images"]
    assert set(table.concept) <= set(COLORS)
    # Whether, beside where: a colour-pixel detector fires on the images that show its colour.
    assert (table["auroc_feature"] > 0.8).all() and (table["auroc_set"] > 0.8).all()


def test_presence_auroc_separates_whether_from_where():
    """A feature that fires at a fixed corner token whenever the image is red knows *whether* (AUROC
    near 1) but not *where* (IoU near 0): the two columns tell such a feature apart."""
    from types import SimpleNamespace

    from miclip_nb.shapes import COLORS, ShapesDataset, to_tensor

    class RedAnywhereCorner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Identity()

        def forward(self, x):
            red = ((x[:, 0] > 0.4) & (x[:, 1] < -0.4) & (x[:, 2] < -0.4)).float().mean((1, 2))
            maps = torch.zeros(x.shape[0], 1, 8, 8)
            maps[:, 0, 0, 0] = (red > 0.01).float() * 5.0
            return self.features(maps)

    target = SimpleNamespace(module=RedAnywhereCorner().eval(), preprocess=to_tensor)
    sae = TopKSAE(1, SAEConfig(expansion=2, k=1))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0, 0] = 1.0
        sae.b_enc.zero_()
    table = sae_concept_grounding(target, "features", sae, torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0]]), ["red"],
                                  ShapesDataset("test", 150), tau=1, n_images=150)
    row = table.iloc[0]
    assert row["feature"] == 0
    assert row["auroc_feature"] > 0.8
    assert row["iou_feature"] < row["chance_iou"]
    assert set(table.concept) <= set(COLORS)


def test_mask_grounding_accepts_sets_and_reports_absent_concepts():
    from types import SimpleNamespace

    from miclip_nb.shapes import ShapesDataset, to_tensor

    target = SimpleNamespace(module=_ColourPixels().eval(), preprocess=to_tensor)
    seen = []

    def heat(x, unit):
        seen.append(unit)
        return np.ones((x.shape[0], 64, 64), dtype=np.float32)

    dataset = ShapesDataset("test", 60)
    table = mask_grounding(target, "features", dataset, heat, {"red": [1, 2], "star": 3}, n_images=60)
    assert [1, 2] in seen and 3 in seen and table["unit"].tolist() == ["1,2", 3]
    assert (table["n_images"] > 0).all() and table["iou"].between(0, 1).all()
    absent = next(c for c in ("red", "green", "blue") if c != dataset.sample(0).concepts[1])
    one = mask_grounding(target, "features", dataset, heat, {absent: 0}, n_images=1)
    assert one["n_images"].tolist() == [0] and math.isnan(one["iou"][0])
