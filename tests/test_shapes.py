"""The Shapes world: deterministic pixels, truthful masks, the spurious split, captions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from miclip_nb import shapes
from miclip_nb.shapes import (
    COLOR_RGB,
    COLORS,
    CONCEPTS,
    SHAPES,
    TEXTURES,
    TYPICAL_COLOR,
    TYPICAL_TEXTURE,
    ShapesDataset,
    WorldConfig,
    caption,
    caption_for,
    render,
    render_batch,
    to_tensor,
)

CFG = WorldConfig()


def test_same_index_same_pixels():
    a, b = render(CFG, "train", 17), render(CFG, "train", 17)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.object_mask, b.object_mask)
    assert (a.shape, a.color, a.texture, a.radius, a.center) == (b.shape, b.color, b.texture, b.radius, b.center)
    # Independent of what was rendered before (no shared generator state).
    ds = ShapesDataset("train", 30)
    _ = [ds[i] for i in range(30)]
    assert np.array_equal(np.asarray(ds[17][0]), a.image)


def test_different_indices_splits_and_seeds_differ():
    base = render(CFG, "train", 0).image
    assert not np.array_equal(render(CFG, "train", 1).image, base)
    assert not np.array_equal(render(CFG, "test", 0).image, base)
    assert not np.array_equal(render(WorldConfig(seed=1), "train", 0).image, base)


def test_images_and_dataset_items():
    ds = ShapesDataset("test", 5)
    img, label = ds[3]
    assert isinstance(img, Image.Image) and img.size == (64, 64) and img.mode == "RGB"
    assert label == ds.sample(3).shape and ds.classes == list(SHAPES)
    assert len(ds) == 5
    with pytest.raises(IndexError):
        ds.sample(5)
    x, attrs = render_batch(CFG, "test", [0, 3])
    assert x.shape == (2, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert attrs.tolist()[1] == [ds.sample(3).shape, ds.sample(3).color, ds.sample(3).texture]
    assert torch.equal(x[1], to_tensor(np.asarray(img)))
    assert ds.attributes().shape == (5, 3)


@pytest.mark.parametrize("index", range(12))
def test_masks_are_consistent_with_attributes(index):
    s = render(CFG, "balanced", index)
    masks = s.concept_masks()
    assert masks.shape == (len(CONCEPTS), 64, 64)
    present = {CONCEPTS[i] for i in range(len(CONCEPTS)) if masks[i].any()}
    assert present == set(s.concepts)
    assert np.array_equal(masks[CONCEPTS.index(SHAPES[s.shape])], s.object_mask)
    assert np.array_equal(masks[CONCEPTS.index(COLORS[s.color])], s.object_mask)
    assert np.array_equal(masks[CONCEPTS.index(TEXTURES[s.texture])], s.background_mask)
    assert not (s.object_mask & s.background_mask).any()
    # The object mask covers pixels of the shape's colour (up to jitter and noise) near its centre.
    assert s.object_mask.sum() >= 20
    mean_rgb = s.image[s.object_mask].astype(float).mean(0)
    assert np.abs(mean_rgb - np.array(COLOR_RGB[COLORS[s.color]])).max() < 40
    yy, xx = np.nonzero(s.object_mask)
    assert np.hypot(xx - s.center[0], yy - s.center[1]).max() <= 1.2 * s.radius + 1.5
    # ...and the background mask does not.
    assert np.abs(s.image[s.background_mask].astype(float).mean(0) - mean_rgb).max() > 20


def test_spurious_split_never_has_the_typical_texture():
    attrs = ShapesDataset("spurious", 400).attributes()
    typical = np.array([TEXTURES.index(TYPICAL_TEXTURE[SHAPES[s]]) for s in attrs[:, 0]])
    assert (attrs[:, 2] != typical).all()
    assert len(np.unique(attrs[:, 0])) == len(SHAPES)


def test_train_split_has_the_configured_biases():
    attrs = ShapesDataset("train", 600).attributes()
    typical_t = np.array([TEXTURES.index(TYPICAL_TEXTURE[SHAPES[s]]) for s in attrs[:, 0]])
    typical_c = np.array([COLORS.index(TYPICAL_COLOR[SHAPES[s]]) for s in attrs[:, 0]])
    assert abs((attrs[:, 2] == typical_t).mean() - CFG.texture_bias) < 0.06
    assert abs((attrs[:, 1] == typical_c).mean() - CFG.color_bias) < 0.07
    assert np.bincount(attrs[:, 0], minlength=6).min() > 600 / 6 * 0.6


def test_balanced_split_is_independent_of_shape():
    attrs = ShapesDataset("balanced", 600).attributes()
    typical_t = np.array([TEXTURES.index(TYPICAL_TEXTURE[SHAPES[s]]) for s in attrs[:, 0]])
    assert abs((attrs[:, 2] == typical_t).mean() - 1 / len(TEXTURES)) < 0.06
    assert len(np.unique(attrs[:, 1])) == len(COLORS)


def test_captions():
    s = render(CFG, "balanced", 0)
    shape, color, texture = s.concepts
    adjective = shapes.TEXTURE_ADJECTIVE[texture]
    assert caption(s) == f"a {color} {shape} on a {adjective} background"
    assert caption(s, ("color",)) == color
    assert caption(s, ("shape",)) == f"a {shape}"
    assert caption(s, ("texture",)) == texture
    assert caption(s, ("color", "shape")) == f"a {color} {shape}"
    assert caption(s, ("shape", "texture")) == f"a {shape} on a {adjective} background"
    assert caption_for(color="red", texture="dots") == "a red shape on a dotted background"
    assert caption_for(shape="star", color="red", texture="dots") == "a red star on a dotted background"
    with pytest.raises(ValueError, match="at least one"):
        caption_for()
    with pytest.raises(ValueError, match="at least one"):
        caption(s, ())


def test_world_has_enough_concepts():
    assert len(SHAPES) >= 6 and len(COLORS) >= 6 and len(TEXTURES) >= 4
    assert len(set(CONCEPTS)) == len(CONCEPTS)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"image_size": 16}, "image_size"), ({"texture_bias": 1.5}, "texture_bias"), ({"min_radius": 20, "max_radius": 10}, "radius")],
)
def test_bad_world_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorldConfig(**kwargs)


def test_bad_render_arguments_raise():
    with pytest.raises(ValueError, match="split"):
        render(CFG, "validation", 0)
    with pytest.raises(ValueError, match="index"):
        render(CFG, "train", -1)
    with pytest.raises(ValueError, match="RGB"):
        to_tensor(np.zeros((8, 8)))
