"""The pipeline composes the steps: configuration checks, and whole runs on what a user brings."""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest
import torch
from torch import nn

from miclip_nb import embed, pipeline, zoo
from miclip_nb.align import AlignConfig
from miclip_nb.sae import SAEConfig


def test_a_run_needs_a_model_and_data_and_checks_its_methods():
    with pytest.raises(ValueError, match="needs model="):
        pipeline.PipelineConfig(train_data="x")
    base = dict(model="m", train_data="x")
    with pytest.raises(ValueError, match="'lime'"):
        pipeline.PipelineConfig(methods=("miclip", "lime"), **base)
    with pytest.raises(ValueError, match="netdissect.*do not work on sae units"):
        pipeline.PipelineConfig(methods=("miclip", "netdissect"), units="sae", **base)
    with pytest.raises(ValueError, match="units must be one of"):
        pipeline.PipelineConfig(units="channels", **base)
    cfg = pipeline.PipelineConfig(methods=("MiClip", "Act-Values"), **base)
    assert cfg.methods == ("miclip", "act_values")  # table names accepted, keys kept
    assert cfg.replace(tau=3).tau == 3
    with pytest.raises(ValueError, match="tau"):
        cfg.replace(tau=0)


def test_from_dict_takes_what_a_yaml_file_holds():
    cfg = pipeline.PipelineConfig.from_dict({"model": "m", "train_data": "x", "methods": "miclip, act_values",
                                             "sae": {"k": 4}, "align": {"epochs": 3}, "seeds": [1, 2], "units": "sae"})
    assert cfg.methods == ("miclip", "act_values") and cfg.sae == SAEConfig(k=4) and cfg.align == AlignConfig(epochs=3)
    assert cfg.seeds == (1, 2)
    with pytest.raises(TypeError, match=r"unknown config keys: \['colour'\]; valid keys: \['model'"):
        pipeline.PipelineConfig.from_dict({"model": "m", "train_data": "x", "colour": 1})


def test_field_help_documents_every_field():
    documented = {name: comment for name, _, comment in pipeline.field_help()}
    assert set(documented) == {f.name for f in fields(pipeline.PipelineConfig)}
    assert all(len(c) > 10 for c in documented.values())


class Tiny(nn.Module):
    """A 4-class CNN whose class c reads channel c of its last conv (a chain: the harness splits it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 4)


    def forward(self, x):
        return self.head(self.pool(self.features(x)))


def _users_world(n=160):
    """Images as a uint8 array (N, 16, 16, 3), labels, a model with its preprocess, a CLIP-like backend."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, n)
    images = (rng.random((n, 16, 16, 3)) * 60).astype(np.uint8)
    for i, c in enumerate(labels):  # class c: a bright channel pattern
        images[i, :, :, c % 3] += np.uint8(120 + 30 * (c // 3))
    to_x = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 255  # noqa: E731
    target = zoo.load_target(Tiny().eval(), preprocess=to_x, class_names=["w", "x", "y", "z"], layer="features.3")
    proj = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    names = {n: torch.randn(8, generator=torch.Generator().manual_seed(i)) for i, n in enumerate("wxyz")}
    backend = embed.FunctionBackend(image_fn=lambda x: x.mean((2, 3)) @ proj,
                                    text_fn=lambda texts: torch.stack([sum(names[c] for c in t if c in names) + 0.01
                                                                       for t in texts]),
                                    preprocess=to_x, embed_dim=8, fingerprint="users-clip-v1")
    return images, labels, target, backend


def test_a_users_own_model_arrays_and_clip_run_end_to_end(tmp_path):
    """No name anywhere: a TargetModel, numpy arrays and a function backend, from capture to the
    written table (the Shapes world is never involved: tests/test_plugins.py checks that)."""
    images, labels, target, backend = _users_world()
    cfg = pipeline.PipelineConfig(model=target, clip=backend, train_data=images[:120], eval_data=(images[120:], labels[120:]),
                                  methods=("miclip", "image_only", "random", "act_values", "ablation"), seeds=(0,), n_random=3,
                                  n_probe=None, n_captum=40, n_other=8, tau=2, align=AlignConfig(epochs=3),
                                  out_dir=str(tmp_path / "out"))
    paths = pipeline.run(cfg, progress=False)
    long = __import__("pandas").read_csv(paths["delta_long"])
    assert set(long["method"]) == {"MiClip", "Image-only aligner", "Random", "Act-Values", "Ablation"}
    assert {"delta_acc", "delta_other", "specific", "flip_to_class"} <= set(long.columns)
    assert np.allclose(long["specific"], long["delta_acc"] - long["delta_other"])
    saved = json.loads(paths["run"].read_text())
    assert saved["config"]["model"] == target.fingerprint and saved["config"]["clip"] == "users-clip-v1"
    assert saved["units"] == "neuron" and (tmp_path / "out" / "localization.csv").is_file()


def test_sae_features_of_the_users_model(tmp_path):
    images, labels, target, backend = _users_world()
    cfg = pipeline.PipelineConfig(model=target, clip=backend, train_data=images[:120], eval_data=(images[120:], labels[120:]),
                                  units="sae", sae=SAEConfig(expansion=2, k=4, epochs=2, batch_size=512),
                                  methods=("miclip", "random", "ablation"), seeds=(0,), n_random=2, n_captum=40,
                                  n_other=0, tau=2, sae_min_freq=0.0, align=AlignConfig(epochs=2))
    res = pipeline.delta_accuracy(cfg, progress=False)
    assert res.space.kind == "sae" and res.space.layer == "features.3" and res.space.n_units == 16
    assert res.store.layers == ("features.3",)  # a real layer: the SAE's codes, not a pseudo-layer name
    assert set(res.table["method"]) == {"MiClip", "Random", "Ablation"}
    ablation = res.selectors["Ablation"][0].scores_cu
    assert ablation.shape == (4, 16)  # what removing each SAE feature alone costs each class
