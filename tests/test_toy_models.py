"""Tests of the shipped toy models (miclip_nb/toy_models.py) and their committed weights."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from miclip_nb import shapes
from miclip_nb.shapes import toy_models as tm

N_TEST_IMAGES = 300
N_BALANCED_IMAGES = 600
# The recorded band is 80-95% on 2000 test images; 300 images carry about +-2.3% of binomial noise.
ACCURACY_TOLERANCE = 0.05
# Best-unit AUROC floors per concept kind at the penultimate layer (primary pooling). Texture meets
# the 0.8 target there; shape and colour do not (about 0.67-0.72 for the weakest concept, see the
# JSON records), so these floors guard against regressions rather than state the target.
AUROC_FLOORS = {"texture": 0.8, "shape": 0.6, "color": 0.6}
# The target of the issue: every concept has a unit somewhere in the model (any layer, any
# pooling: toy_models.concept_detectors) that detects it at AUROC >= 0.8, on 2000 balanced images.
DETECTOR_FLOOR = 0.8
# A re-measure on N_BALANCED_IMAGES images picks the best of many units on fewer images: its
# AUROCs scatter by about +-0.03 around the recorded ones.
DETECTOR_TOLERANCE = 0.04
PRIMARY_POOLING = {"toy_cnn": "spatial_mean", "toy_vit": "cls"}


def _seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread_seeded():
    _seed_everything()
    yield


@pytest.fixture(scope="module")
def test_batch():
    return shapes.render_batch(shapes.WorldConfig(), "test", range(N_TEST_IMAGES))


@pytest.fixture(scope="module")
def balanced_batch():
    return shapes.render_batch(shapes.WorldConfig(), "balanced", range(N_BALANCED_IMAGES))


@pytest.mark.parametrize("name", tm.TOY_MODEL_NAMES)
def test_committed_weights_load_and_reach_recorded_accuracy(name, test_batch):
    model = tm.load_toy_model(name)
    record = tm.read_toy_model_record(name)
    assert not model.training
    images, attributes = test_batch
    acc = tm.accuracy(model, images, attributes[:, 0])
    recorded = record["metrics"]["test_accuracy"]
    assert 0.80 <= recorded <= 0.95
    assert 0.80 - ACCURACY_TOLERANCE <= acc <= 0.95 + ACCURACY_TOLERANCE
    assert abs(acc - recorded) <= ACCURACY_TOLERANCE
    # The shipped models lean on texture: the spurious split is clearly harder.
    assert record["metrics"]["spurious_accuracy"] < recorded - 0.15


@pytest.mark.parametrize("name", tm.TOY_MODEL_NAMES)
def test_penultimate_units_detect_every_concept(name, balanced_batch):
    record = tm.read_toy_model_record(name)
    assert record["metrics"]["penultimate_layer"] == tm.PENULTIMATE_LAYER[name]
    assert set(record["metrics"]["concept_auroc"]) == set(tm.PENULTIMATE_POOLINGS[name])
    pooling = PRIMARY_POOLING[name]
    for kind, floor in AUROC_FLOORS.items():
        assert record["metrics"]["min_auroc"][pooling][kind] >= floor
    # Re-measure on fewer balanced images: the loaded weights behave as recorded.
    images, attributes = balanced_batch
    features = tm.penultimate_features(tm.load_toy_model(name), name, images)[pooling]
    assert features.shape == (N_BALANCED_IMAGES, 128)
    measured = tm.concept_unit_aurocs(features, attributes)
    assert set(measured) == set(shapes.CONCEPTS)
    for concept, result in measured.items():
        assert result["auroc"] >= AUROC_FLOORS[shapes.CONCEPT_KIND[concept]] - 0.05, concept


@pytest.mark.parametrize("name", tm.TOY_MODEL_NAMES)
def test_every_concept_has_a_detector_unit(name, balanced_batch):
    """Shape, colour and texture alike: the model has a unit that detects each of the 16 concepts at
    AUROC >= 0.8 (recorded on 2000 balanced images), and the loaded weights still do (re-measured)."""
    record = tm.read_toy_model_record(name)
    recorded = record["metrics"]["detectors"]
    assert set(recorded) == set(shapes.CONCEPTS)
    for concept, detector in recorded.items():
        assert detector["auroc"] >= DETECTOR_FLOOR, (concept, detector)
    images, attributes = balanced_batch
    model = tm.load_toy_model(name)
    measured = tm.concept_detectors(model, images, attributes)
    modules = dict(model.named_modules())
    for concept, detector in measured.items():
        assert detector["layer"] in modules
        assert detector["auroc"] >= recorded[concept]["auroc"] - DETECTOR_TOLERANCE, (concept, detector)
    assert all(not m._forward_hooks for m in modules.values())


class _PlantedDetectors(torch.nn.Module):
    """A fake CNN whose ``maps`` channel 3 is the image's red fraction at every location, and whose
    ``head`` output 1 is minus it: concept_detectors must find the first, and not the second."""

    def __init__(self) -> None:
        super().__init__()
        self.maps = torch.nn.Identity()
        self.head = torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        red = ((x[:, 0] > 0.5) & (x[:, 1] < -0.5) & (x[:, 2] < -0.5)).float().mean((1, 2))
        maps = self.maps(torch.cat([torch.rand(n, 3, 4, 4), red[:, None, None, None].expand(n, 1, 4, 4)], 1))
        return self.head(torch.stack([maps.mean((1, 2, 3)), -red], 1))


def test_concept_detectors_finds_a_planted_unit_and_removes_its_hooks():
    images, attributes = shapes.render_batch(shapes.WorldConfig(), "balanced", range(240))
    model = _PlantedDetectors()
    detectors = tm.concept_detectors(model, images, attributes, batch_size=100)
    assert detectors["red"]["layer"] == "maps" and detectors["red"]["unit"] == 3
    assert detectors["red"]["auroc"] > 0.95
    assert detectors["red"]["pooling"] in ("mean", "max")
    assert set(detectors) == set(shapes.CONCEPTS)
    assert not model.maps._forward_hooks and not model.head._forward_hooks

    class Boom(RuntimeError):
        pass

    def explode(_module, _inputs, _output):
        raise Boom

    handle = model.head.register_forward_hook(explode)
    with pytest.raises(Boom):
        tm.concept_detectors(model, images[:10], attributes[:10])
    handle.remove()
    assert not model.maps._forward_hooks and not model.head._forward_hooks


@pytest.mark.parametrize("name", tm.TOY_MODEL_NAMES)
def test_output_shape_and_named_layers(name):
    model = tm.build_toy_model(name).eval()
    with torch.no_grad():
        logits = model(torch.zeros(3, 3, 64, 64))
    assert logits.shape == (3, len(tm.TOY_CLASS_NAMES))
    modules = dict(model.named_modules())
    assert tm.PENULTIMATE_LAYER[name] in modules
    if name == "toy_cnn":
        assert {"stem", "stages.0", "stages.3", "pool", "head"} <= set(modules)
    else:
        assert {f"blocks.{i}" for i in range(6)} <= set(modules)


def test_cnn_tail_runs_on_a_cached_stage_output():
    model = tm.build_toy_model("toy_cnn").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stage2 = model.stages[:3](model.stem(x))
        logits_from_cache = model.head(model.pool(model.stages[3:](stage2)))
        assert torch.allclose(logits_from_cache, model(x))


@pytest.mark.parametrize("name", tm.TOY_MODEL_NAMES)
def test_penultimate_features_pool_the_named_layer_output(name):
    model = tm.build_toy_model(name).eval()
    layer = dict(model.named_modules())[tm.PENULTIMATE_LAYER[name]]
    captured = []
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        features = tm.penultimate_features(model, name, torch.randn(2, 3, 64, 64))
    finally:
        handle.remove()
    (output,) = captured
    if name == "toy_cnn":
        assert output.shape == (2, 128, 8, 8)
        assert torch.allclose(features["spatial_mean"], output.mean(dim=(2, 3)))
    else:
        assert output.shape == (2, 65, 128)
        assert torch.allclose(features["cls"], output[:, 0])
        assert torch.allclose(features["patch_mean"], output[:, 1:].mean(1))


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="toy_cnn, toy_vit"):
        tm.build_toy_model("toy_mlp")
    with pytest.raises(ValueError, match="toy_cnn"):
        tm.load_toy_model("toy_mlp")


def test_missing_dir_names_the_train_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m miclip_nb.shapes.toy_models --models toy_cnn"):
        tm.load_toy_model("toy_cnn", weights_dir=tmp_path / "nowhere")


def test_tampered_weights_are_rejected(tmp_path):
    for suffix in (".safetensors", ".json"):
        shutil.copy(tm.data_dir() / "toy_models" / f"toy_cnn{suffix}", tmp_path)
    tm.load_toy_model("toy_cnn", weights_dir=tmp_path)  # an intact copy loads
    weights_path = tmp_path / "toy_cnn.safetensors"
    blob = bytearray(weights_path.read_bytes())
    blob[-1] ^= 0xFF
    weights_path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="stale or corrupt"):
        tm.load_toy_model("toy_cnn", weights_dir=tmp_path)


def test_save_then_load_round_trips(tmp_path):
    model = tm.build_toy_model("toy_cnn").eval()
    tm.save_toy_model(model, "toy_cnn", {"test_accuracy": 0.5, "training": {"seed": 0}}, out_dir=tmp_path)
    record = tm.read_toy_model_record("toy_cnn", tmp_path)
    assert record["schema_version"] == tm.SCHEMA_VERSION
    assert record["training"] == {"seed": 0} and record["metrics"] == {"test_accuracy": 0.5}
    loaded = tm.load_toy_model("toy_cnn", weights_dir=tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_wrong_schema_version_raises(tmp_path):
    tm.save_toy_model(tm.build_toy_model("toy_cnn"), "toy_cnn", {}, out_dir=tmp_path)
    record_path = tmp_path / "toy_cnn.json"
    record_path.write_text(record_path.read_text().replace('"schema_version": 1', '"schema_version": 99'))
    with pytest.raises(ValueError, match="schema_version"):
        tm.load_toy_model("toy_cnn", weights_dir=tmp_path)


def test_toy_preprocess_matches_to_tensor_and_resizes():
    sample = shapes.render(shapes.WorldConfig(), "test", 0)
    assert torch.equal(tm.toy_preprocess(sample.image), shapes.to_tensor(sample.image))
    assert torch.equal(tm.toy_preprocess(Image.fromarray(sample.image)), shapes.to_tensor(sample.image))
    big = Image.fromarray(sample.image).resize((128, 128))
    assert tm.toy_preprocess(big).shape == (3, 64, 64)
    assert tm.TOY_CLASS_NAMES == list(shapes.SHAPES)


@pytest.mark.slow
def test_retraining_with_the_same_seed_reproduces_quality():
    """Retrains toy_cnn with the shipped seed and full budget (about 80 s on one idle CPU thread,
    3 min on busy shared cores); toy_vit's 6-12 min are left to the command line."""
    _, metrics = tm.train_toy_model("toy_cnn", progress=False)
    record = tm.read_toy_model_record("toy_cnn")
    assert 0.80 <= metrics["test_accuracy"] <= 0.95
    # Same seed and one thread: the same weights up to kernel-level float differences across CPUs.
    assert abs(metrics["test_accuracy"] - record["metrics"]["test_accuracy"]) <= 0.02
    assert metrics["spurious_accuracy"] < metrics["test_accuracy"] - 0.15
    for kind, floor in AUROC_FLOORS.items():
        assert metrics["min_auroc"]["spatial_mean"][kind] >= floor
    assert min(metrics["min_detector_auroc"].values()) >= DETECTOR_FLOOR - DETECTOR_TOLERANCE
