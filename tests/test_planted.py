"""The planted benchmark: known colour detectors inside the trained toy_cnn, some read by the head.

The ground truth must be right (removing a read channel lowers its class's accuracy, removing an
unread one changes nothing), the scoring must be right on a hand-made method, and a small
end-to-end run must show what the benchmark is for: every description method describes a read
channel and its unread twin alike, and the causal score separates them.
"""

import numpy as np
import pandas as pd
import pytest
import torch

from miclip_nb.capture import capture
from miclip_nb.metrics import auroc
from miclip_nb.shapes import planted, world
from miclip_nb.shapes.toy_models import load_toy_model
from miclip_nb.steer import tail_module


@pytest.fixture(scope="module")
def target():
    return planted.planted_toy_cnn()


@pytest.fixture(scope="module")
def test_images():
    x, attrs = world.render_batch(world.WorldConfig(), "test", range(240))
    return x, torch.as_tensor(attrs[:, 0])


def test_colour_maps_are_exact_colour_detectors():
    x, attrs = world.render_batch(world.WorldConfig(), "balanced", range(240))
    pooled = planted.colour_maps(x, size=(8, 8)).mean((2, 3))
    assert planted.colour_maps(x[:2], ["red", "blue"], size=(8, 8)).shape == (2, 2, 8, 8)
    for k, colour in enumerate(world.COLORS):
        assert auroc(pooled[:, k].numpy(), attrs[:, 1] == k) > 0.99, colour
    assert torch.allclose(pooled, planted.colour_maps(x).mean((2, 3)), atol=1e-6)  # cells keep the image's share
    with pytest.raises(ValueError, match="unknown colour"):
        planted.colour_maps(x[:1], ["teal"])
    with pytest.raises(ValueError, match="a colour of the world"):
        planted.Plant("star")


def test_the_wrapper_keeps_the_model_and_adds_the_planted_channels(target, test_images):
    x, _ = test_images
    model, base = target.module, load_toy_model("toy_cnn")
    assert target.default_layer == "stages.2" and model.planted_units == list(range(128, 137))
    ours, theirs = capture(model, x[:16], "stages.2", "none")["stages.2"], capture(base, x[:16], "stages.2", "none")["stages.2"]
    assert ours.shape == (16, 137, 8, 8) and torch.equal(ours[:, :128], theirs)
    truth = planted.ground_truth(model)
    twins = truth[truth["mirrored"]]
    pooled = ours.mean((2, 3))
    for row in twins.to_dict("records"):  # a twin has its plain channel's pooled value on every image
        assert torch.allclose(pooled[:, row["unit"]], pooled[:, row["twin_of"]], atol=1e-6)
    # The logits are the model's plus weight * (pooled - offset) for the read channels only.
    with torch.no_grad():
        extra = model(x[:16]) - base(x[:16])
    expected = torch.zeros_like(extra)
    for row in truth[truth["read"]].to_dict("records"):
        expected[:, row["class_index"]] += model.weight * (pooled[:, row["unit"]] - model.offset)
    assert torch.allclose(extra, expected, atol=1e-4)
    assert tail_module(model, "stages.2", x[:2]).names == ["stages.3", "pool", "head"]


def test_ground_truth_removal_lowers_the_read_class_and_nothing_else(target, test_images):
    x, labels = test_images
    verify = planted.verify_ground_truth(target.module, x, labels)
    read, unread = verify[verify["read"]], verify[~verify["read"]]
    assert list(read["class"]) == ["circle", "triangle", "star"] and len(unread) == 6
    assert (read["delta_class"] <= -5.0).all(), read[["concept", "delta_class"]]
    assert (unread["changed"] == 0).all() and (unread["max_abs_delta"] == 0).all()


def _hand_truth():
    return pd.DataFrame([
        {"unit": 4, "concept": "red", "mirrored": False, "read": True, "class": "circle", "class_index": 0, "twin_of": -1},
        {"unit": 5, "concept": "blue", "mirrored": False, "read": True, "class": "square", "class_index": 1, "twin_of": -1},
        {"unit": 6, "concept": "red", "mirrored": True, "read": False, "class": None, "class_index": -1, "twin_of": 4},
    ])


def test_scoring_is_right_on_a_hand_made_method():
    truth = _hand_truth()
    scores = torch.zeros(2, 7)
    scores[0, [6, 4, 1]] = torch.tensor([3.0, 2.0, 1.0])  # class 0: the twin first, the read channel second
    scores[1, 5] = float("nan")  # class 1: the read channel is never picked
    selection = {0: [4, 0], 1: [5]}
    loc = planted.localization_hits({"hand": scores, "picked": selection}, truth, tau=2)
    assert loc["rank"].tolist()[:2] == [2, 7] and loc["hit"].tolist() == [True, False, True, True]
    assert loc["unread_picked"].tolist() == [1, 0, 0, 0]
    concept_scores = torch.zeros(len(world.CONCEPTS), 7)
    concept_scores[world.CONCEPTS.index("red"), [4, 6]] = 1.0
    concept_scores[world.CONCEPTS.index("star"), 5] = 1.0
    desc = planted.description_hits({"hand": concept_scores}, truth)
    assert desc["described_as"].tolist() == ["red", "star", "red"] and desc["hit"].tolist() == [True, False, True]
    summary = planted.planted_summary(loc, desc)
    assert summary.loc["hand", "loc_hits"] == 0.5 and summary.loc["picked", "loc_hits"] == 1.0
    assert summary.loc["hand", "desc_hits"] == pytest.approx(2 / 3) and summary.loc["hand", "desc_hits_unread"] == 1.0
    effects = torch.tensor([[2.0, 0.1], [0.3, 1.5], [0.0, 0.0]])
    causal = planted.causal_hits(effects, truth)
    assert causal["effect"].tolist() == pytest.approx([2.0, 1.5, 0.0])
    with pytest.raises(ValueError, match="tau"):
        planted.localization_hits({"hand": scores}, truth, tau=0)
    with pytest.raises(ValueError, match="rows"):
        planted.description_hits({"hand": scores}, truth)
    with pytest.raises(ValueError, match="effect rows"):
        planted.causal_hits(effects[:2], truth)


def test_small_end_to_end_run(target):
    with pytest.raises(ValueError, match="unknown localization"):
        planted.planted_benchmark(target, methods=["Magic"])
    res = planted.planted_benchmark(target, n_train=600, n_probe=120, n_eval=120, n_captum=60,
                                    methods=["MiClip", "Ablation", "MiClip + ablation"],
                                    describe_methods=["MiClip", "Act-Values", "CLIP-Dissect"])
    summary, causal, desc = res["summary"], res["causal"], res["description"]
    assert list(summary.index) == ["MiClip", "Ablation", "MiClip + ablation", "Act-Values", "CLIP-Dissect"]
    assert summary.loc["Ablation", "loc_hits"] == 1.0  # the causal ranking finds every read channel
    assert res["class_scores"]["Ablation"].shape == (6, 137)
    # The causal score separates read from unread channels, the twins included.
    assert (causal.loc[causal["read"], "effect"] > 0.5).all() and (causal.loc[~causal["read"], "effect"] == 0).all()
    # The descriptions do not: every method describes a twin as it describes its plain channel.
    truth = res["truth"]
    for method, rows in desc.groupby("method"):
        said = dict(zip(rows["unit"], rows["described_as"]))
        for row in truth[truth["mirrored"]].to_dict("records"):
            assert said[row["unit"]] == said[row["twin_of"]], method
    assert np.isfinite(res["verify"].loc[res["verify"]["read"], "delta_class"]).all()


def test_the_command_line_prints_the_ground_truth_the_causal_scores_and_the_summary(capsys):
    assert planted.main(["--n-train", "600", "--n-probe", "120", "--n-eval", "120", "--n-captum", "40"]) == 0
    printed = capsys.readouterr().out
    for part in ("ground truth, checked on the test split", "causal score of each planted channel",
                 "localization and description, per method", "MiClip", "CLIP-Dissect"):
        assert part in printed
