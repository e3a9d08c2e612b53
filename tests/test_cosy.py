"""Shapes-CoSy: the renderer stands in for CoSy's text-to-image model; a unit's description is
scored by how well the unit separates images of the described concept from controls."""

from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from miclip_nb.shapes import cosy, planted, world


def test_concept_images_show_the_concept_and_controls_do_not():
    x, attrs = cosy.concept_images("red", 24)
    assert x.shape == (24, 3, 64, 64) and (attrs[:, 1] == world.COLORS.index("red")).all()
    assert len(set(attrs[:, 0])) > 2 and len(set(attrs[:, 2])) > 1  # the other attributes vary
    _, controls = cosy.concept_images("red", 24, present=False)
    assert (controls[:, 1] != world.COLORS.index("red")).all()
    star = cosy.concept_indices("star", 10)
    assert min(star) >= cosy.COSY_START and star == cosy.concept_indices("star", 10)  # deterministic
    assert all(world.render(world.WorldConfig(), "balanced", i).shape == world.SHAPES.index("star") for i in star[:3])
    dots = cosy.concept_images("dots", 3, preprocess=lambda im: torch.zeros(3, 8, 8))[0]
    assert dots.shape == (3, 3, 8, 8)
    with pytest.raises(ValueError, match="not a concept of the Shapes world"):
        cosy.concept_indices("teal", 3)
    with pytest.raises(ValueError, match="positive"):
        cosy.concept_indices("red", 0)
    with pytest.raises(ValueError, match="only"):
        cosy.concept_indices("red", 50, max_scan=60)


class Colours(nn.Module):
    """A layer whose unit k is an exact detector of colour k (planted.colour_maps on 8 x 8 cells)."""

    def forward(self, x):
        return planted.colour_maps(x, size=(8, 8))


def colour_model():
    return nn.Sequential(OrderedDict(features=Colours(), pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                                     head=nn.Linear(6, 6))).eval()


def test_a_colour_detector_scores_high_for_its_colour_and_chance_for_a_wrong_concept():
    red, green = world.COLORS.index("red"), world.COLORS.index("green")
    descriptions = {"right": {red: "red", green: "green"}, "wrong kind": {red: "star", green: "dots"},
                    "wrong colour": {red: "blue"}}
    df = cosy.cosy_scores(colour_model(), "features", descriptions, n_images=40)
    assert list(df.columns) == ["method", "unit", "concept", "kind", "auc", "mad"] and len(df) == 5
    by = {(r.method, r.unit): r for r in df.itertuples()}
    assert by[("right", red)].auc > 0.98 and by[("right", green)].auc > 0.98 and by[("right", red)].mad > 2
    for unit in (red, green):
        assert 0.3 < by[("wrong kind", unit)].auc < 0.7 and abs(by[("wrong kind", unit)].mad) < 1
    assert by[("wrong colour", red)].auc < 0.5  # a red detector fires on controls of blue (some are red)
    summary = cosy.cosy_summary(df)
    assert list(summary.index) == ["right", "wrong kind", "wrong colour"] and summary.loc["right", "units"] == 2
    assert summary.loc["right", "auc"] > summary.loc["wrong kind", "auc"] > summary.loc["wrong colour", "auc"]
    assert summary.loc["right", "auc_high"] == 1.0
    with pytest.raises(ValueError, match="not a concept"):
        cosy.cosy_scores(colour_model(), "features", {"m": {0: "teal"}}, n_images=5)
    with pytest.raises(IndexError, match="out of range"):
        cosy.cosy_scores(colour_model(), "features", {"m": {9: "red"}}, n_images=5)


def test_descriptions_from_score_matrices_embeddings_and_chance():
    scores = torch.full((len(world.CONCEPTS), 3), float("nan"))
    scores[world.CONCEPTS.index("dots"), 0] = 1.0
    scores[:, 1] = torch.arange(len(world.CONCEPTS)).float()
    assert cosy.argmax_descriptions(scores) == {0: "dots", 1: world.CONCEPTS[-1]}  # unit 2: all NaN, left out
    with pytest.raises(ValueError, match="scores"):
        cosy.argmax_descriptions(scores[:4])
    emb = torch.zeros(3, len(world.CONCEPTS))
    emb[0, world.CONCEPTS.index("star")] = emb[2, world.CONCEPTS.index("red")] = 1.0  # unit 1: a zero row
    assert cosy.miclip_descriptions(emb, torch.eye(len(world.CONCEPTS))) == {0: "star", 2: "red"}
    rand = cosy.random_descriptions(range(200), seed=1)
    assert rand == cosy.random_descriptions(range(200), seed=1) and len(set(rand.values())) == len(world.CONCEPTS)


def test_small_run_on_toy_cnn_miclip_beats_a_random_description():
    from miclip_nb import align, interpret, pipeline

    config = pipeline.PipelineConfig(model="toy_cnn", clip="toyclip", train_data="shapes:train:1000", seeds=(0,))
    prep = pipeline.prepare(config, progress=False)
    encoder = align.fit_alignment(prep.store, prep.class_text_emb_cd, layer=prep.layer, seed=0, progress=False)
    unit_emb = interpret.unit_embeddings(encoder)
    with pytest.raises(ValueError, match="unknown description method"):
        cosy.method_descriptions(prep.target.module, prep.layer, backend=prep.backend, unit_emb_ud=unit_emb, methods=["Oracle"])
    df, summary, descriptions = cosy.cosy_benchmark(prep.target.module, prep.layer, backend=prep.backend, unit_emb_ud=unit_emb,
                                                    n_probe=120, n_images=30)
    assert list(summary.index) == ["MiClip", "CLIP-Dissect", "NetDissect", "Act-Values", "Random"]
    assert set(descriptions["MiClip"]) == set(range(128)) and (summary["units"] <= 128).all()
    assert df["auc"].between(0, 1).all() and df["concept"].isin(world.CONCEPTS).all()
    assert np.isfinite(df["mad"]).mean() > 0.9
    assert summary.loc["MiClip", "auc"] > summary.loc["Random", "auc"] + 0.05, summary
    assert isinstance(summary, pd.DataFrame)


def test_the_command_line_prints_the_summary_and_writes_the_scores(tmp_path, capsys):
    out = tmp_path / "cosy.csv"
    assert cosy.main(["--model", "toy_cnn", "--n-train", "600", "--n-probe", "120", "--n-images", "20",
                      "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Shapes-CoSy, toy_cnn" in printed and "MiClip" in printed and "Random" in printed
    scores = pd.read_csv(out)
    assert {"method", "unit", "concept", "auc", "mad"} <= set(scores.columns), scores.columns
    assert scores["auc"].between(0, 1).all()
