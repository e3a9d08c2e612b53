"""Profiles carry a notebook's whole setting: every name in them must resolve."""

from __future__ import annotations

import pytest

from miclip_nb import methods, profiles
from miclip_nb.plugins import UnknownNameError


@pytest.mark.parametrize("name", ["toy", "real"])
def test_every_profile_names_methods_that_exist_for_their_units(name):
    p = profiles.get(name)
    assert methods.resolve(p.neuron_methods, "neuron") and methods.resolve(p.sae_methods, "sae")
    assert p.queries and p.steer_class and p.table_models and p.diagnosis_layers
    cfg = p.table_config(*next(iter(p.table_models.items())), units="sae")
    assert cfg.units == "sae" and cfg.methods == methods.resolve(p.sae_methods)


def test_the_toy_profile_resolves_its_models_data_and_classes():
    from miclip_nb import datasets, zoo

    p = profiles.get("toy")
    target = zoo.load_target(p.model)
    assert p.steer_class in target.class_names
    assert len(datasets.open_dataset(p.train_data)) == 6000 and p.grounding_concept in p.grounding_concepts
    cfg = p.pipeline_config(seeds=(1,))
    assert cfg.model == "toy_cnn" and cfg.clip == "toyclip" and cfg.seeds == (1,)
    assert p.replace(model="toy_vit").model == "toy_vit" and p.model == "toy_cnn"  # replace copies


def test_real_smoke_needs_a_folder_and_downloads_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv("MICLIP_IMAGENET_SAMPLE", raising=False)
    with pytest.raises(ValueError, match="needs a folder"):
        profiles.get("real-smoke")
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"photo_{i}.png")
    p = profiles.real_smoke(str(tmp_path), n=8)
    assert len(p.grounding_data) == 2  # the first n photos, or all there are
    assert p.pretrained is False and p.clip_pretrained is None and p.train_data == str(tmp_path)
    assert "netdissect" not in p.neuron_methods  # no mask folder in a smoke test
    assert p.pipeline_config().pretrained is False


def test_unknown_profiles_list_the_known_ones():
    with pytest.raises(UnknownNameError, match="no profile named 'tiny'.*toy"):
        profiles.get("tiny")
    assert {"real", "real-smoke", "toy"} <= set(profiles.names())
