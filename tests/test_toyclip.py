"""ToyCLIP: the committed weights load through open_clip and know every concept of the world."""

from __future__ import annotations

import json
import shutil

import numpy as np
import open_clip
import pytest
import torch

from miclip_nb.shapes import toyclip
from miclip_nb.shapes import CONCEPTS, WorldConfig, render, to_tensor

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded():
    return toyclip.load_toyclip()


def test_config_registered_and_builds():
    toyclip.register_toyclip_config()
    toyclip.register_toyclip_config()  # idempotent
    assert "ToyCLIP" in open_clip.list_models()
    model = open_clip.create_model("ToyCLIP")
    assert model.visual.image_size in (64, (64, 64))
    assert model.visual.preprocess_cfg["size"] in (64, (64, 64))
    assert model.context_length == 16


def test_tokenizer_offline():
    tok = toyclip.get_toyclip_tokenizer()
    ids = tok(["a red star on a dotted background", "dots"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert ids[0, 0] == 49406 and (ids[0] == 49407).sum() == 1  # <start> ... <end>
    assert not torch.equal(ids[0], ids[1])


def test_caption_bank_covers_every_type():
    captions, ids = toyclip.caption_bank()
    assert len(captions) == len(set(captions)) == 244
    assert ids.shape == (len(toyclip.CAPTION_PARTS), 6, 6, 4)
    assert {"a star", "red", "dots", "a red star", "a star on a dotted background",
            "a red star on a dotted background"} <= set(captions)
    assert toyclip.concept_prompts()[:1] + toyclip.concept_prompts()[6:7] == ["a circle", "red"]


def test_preprocess_matches_world_tensor():
    sample = render(WorldConfig(), "balanced", 0)
    x = toyclip.toyclip_preprocess(sample.image)
    assert x.shape == (3, 64, 64)
    torch.testing.assert_close(x, to_tensor(sample.image), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        toyclip.toyclip_preprocess(np.zeros((64, 64), dtype=np.uint8))


def test_committed_weights_detect_every_concept(loaded):
    model, tokenizer, _ = loaded
    assert not model.training
    metrics = toyclip.evaluate_toyclip(model, tokenizer, "balanced", n=400, seed=0)
    assert set(metrics["auroc"]) == set(CONCEPTS)
    bad = {c: round(a, 3) for c, a in metrics["auroc"].items() if a < 0.9}
    assert not bad, f"concepts below AUROC 0.9: {bad}"
    assert min(metrics["zero_shot_accuracy"].values()) > 0.8


def test_local_dir_route_matches(loaded):
    """open_clip alone (no miclip code) loads the folder and gives the same embeddings."""
    model, tokenizer, _ = loaded
    folder = toyclip.data_dir() / "toyclip"
    oc_model, _, oc_preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    oc_model.eval()
    from PIL import Image
    image = Image.fromarray(render(WorldConfig(), "balanced", 1).image)
    with torch.no_grad():
        a = model.encode_image(toyclip.toyclip_preprocess(image)[None])
        b = oc_model.encode_image(oc_preprocess(image)[None])
        t = tokenizer(["a star"])
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(model.encode_text(t), oc_model.encode_text(t))


def test_tampered_weights_rejected(tmp_path):
    folder = tmp_path / "toyclip"
    shutil.copytree(toyclip.data_dir() / "toyclip", folder)
    path = folder / toyclip.WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        toyclip.load_toyclip(folder)


def test_wrong_schema_rejected(tmp_path):
    folder = tmp_path / "toyclip"
    shutil.copytree(toyclip.data_dir() / "toyclip", folder)
    meta = json.loads((folder / toyclip.META_FILE).read_text())
    meta["schema_version"] = 99
    (folder / toyclip.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="schema_version"):
        toyclip.load_toyclip(folder)


def test_missing_dir_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m miclip_nb.shapes.toyclip"):
        toyclip.load_toyclip(tmp_path / "nowhere")


def test_training_is_seeded_and_roundtrips(tmp_path):
    kw = dict(seed=3, steps=2, batch_size=16, pool_size=32, progress=False, eval_n=100)
    m1, metrics = toyclip.train_toyclip(**kw)
    m2, _ = toyclip.train_toyclip(**kw)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    out = toyclip.save_toyclip(m1, metrics, tmp_path / "tc")
    meta = json.loads((out / toyclip.META_FILE).read_text())
    assert meta["schema_version"] == 1 and meta["training"]["seed"] == 3
    m3, _, _ = toyclip.load_toyclip(out)
    s3 = m3.state_dict()
    assert all(torch.equal(s1[k], s3[k]) for k in s1)


@pytest.mark.slow
def test_retraining_reproduces_committed_quality():
    """Retrains with the committed recipe and seed (measured 13-16 min on one shared CPU thread)."""
    meta = json.loads((toyclip.data_dir() / "toyclip" / toyclip.META_FILE).read_text())
    tr = meta["training"]
    _, metrics = toyclip.train_toyclip(seed=tr["seed"], steps=tr["steps"], batch_size=tr["batch_size"],
                                       lr=tr["lr"], weight_decay=tr["weight_decay"], warmup=tr["warmup"],
                                       pool_size=tr["pool_size"], progress=False)
    assert metrics["min_auroc"] >= 0.9
    for concept, value in meta["metrics"]["auroc"].items():
        assert metrics["auroc"][concept] == pytest.approx(value, abs=0.02)
