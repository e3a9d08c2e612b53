"""Loading target classifiers: offline real weights, hub failures, custom modules, CLIP zero-shot."""

from __future__ import annotations

import socket
import time

import pytest
import timm
import torch
from PIL import Image
from torch import nn

from miclip_nb.capture import resolve_layer
from miclip_nb.embed import WeightsUnavailableError
from miclip_nb.zoo import PAPER_LAYERS, ZeroShotClassifier, imagenet_class_names, load_target


@pytest.fixture
def no_network(monkeypatch):
    """Every name lookup fails at once, as on a machine without internet (and never hangs)."""

    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    socket.setdefaulttimeout(5)
    yield
    socket.setdefaulttimeout(None)


@pytest.fixture(scope="module")
def lite0():
    return load_target("efficientnet_lite0")


# ---------------------------------------------------------------- the offline real classifier


def test_efficientnet_lite0_loads_offline(lite0):
    assert lite0.name == "efficientnet_lite0" and not lite0.module.training
    assert len(lite0.class_names) == 1000 and lite0.class_names[0] == "tench"
    resolve_layer(lite0.module, lite0.default_layer)
    x = lite0.preprocess(Image.new("RGB", (300, 250), (120, 90, 60)))
    assert x.shape == (3, 224, 224)
    assert -1.0 <= x.min() and x.max() <= 1.0  # mean = std = 0.5 normalisation
    with torch.no_grad():
        logits = lite0.module(x[None])
    assert logits.shape == (1, 1000) and logits.isfinite().all()
    # Real weights, not a random init: batch-norm statistics were learned.
    bn = lite0.module.bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_efficientnet_lite0_classifies_real_photos(lite0, imagenet_sample_dir):
    from miclip_nb.datasets import open_dataset

    ds = open_dataset(imagenet_sample_dir)
    picks = range(0, len(ds), len(ds) // 12)[:12]  # spread over the classes
    x = torch.stack([lite0.preprocess(ds[i][0]) for i in picks])
    labels = torch.tensor([ds[i][1] for i in picks])
    with torch.no_grad():
        top5 = lite0.module(x).topk(5, dim=-1).indices
    top5_acc = (top5 == labels[:, None]).any(1).float().mean().item()
    assert top5_acc >= 0.75, f"top-5 {top5_acc:.2f} (chance 0.005)"


def test_fingerprint_identifies_weights(lite0):
    again = load_target("efficientnet_lite0")
    assert again.fingerprint == lite0.fingerprint
    random_lite0 = load_target("timm:tf_efficientnet_lite0", pretrained=False)
    assert random_lite0.fingerprint.split(":")[-1] != lite0.fingerprint.split(":")[-1]


# ---------------------------------------------------------------- timm and torchvision


def test_timm_random_weights_and_paper_layer():
    target = load_target("timm:resnet50", pretrained=False)
    assert target.name == "timm:resnet50" and target.default_layer == PAPER_LAYERS["resnet50"] == "layer4.0"
    assert len(target.class_names) == 1000
    x = target.preprocess(Image.new("RGB", (256, 256)))
    assert x.shape == (3, 224, 224)


def test_timm_pretrained_offline_raises_weights_unavailable(no_network):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="weights_path="):
        load_target("timm:resnet18", pretrained=True)
    assert time.monotonic() - start < 30  # fails fast, no retry loop


def test_timm_weights_path_loads_a_local_file(tmp_path):
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18_local.pth"
    torch.save(source.state_dict(), path)
    target = load_target("timm:resnet18", weights_path=path)
    for (name, a), b in zip(source.state_dict().items(), target.module.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_target("timm:resnet18", weights_path=tmp_path / "missing.pth")


def test_torchvision_pretrained_offline_raises_weights_unavailable(no_network, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no previously downloaded file to find
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="torchvision 'resnet18'.*weights_path="):
        load_target("torchvision:resnet18")
    assert time.monotonic() - start < 30


def test_torchvision_random_and_local_weights(tmp_path):
    target = load_target("torchvision:resnet18", pretrained=False)
    assert target.class_names[0] == "tench" and len(target.class_names) == 1000
    path = tmp_path / "r18.pth"
    torch.save(target.module.state_dict(), path)
    local = load_target("torchvision:resnet18", weights_path=path)
    assert local.fingerprint == target.fingerprint
    assert target.preprocess(Image.new("RGB", (300, 300))).shape == (3, 224, 224)


@pytest.mark.parametrize("name", ["no_such_model_xyz", "timm:no_such_model_xyz", "torchvision:no_such_model_xyz"])
def test_unknown_name_raises_value_error(name):
    with pytest.raises(ValueError, match="no_such_model_xyz"):
        load_target(name, pretrained=False)


@pytest.mark.parametrize("bad", ["", None, 3])
def test_not_a_name_or_module_raises(bad):
    with pytest.raises(ValueError):
        load_target(bad)


# ---------------------------------------------------------------- your own nn.Module


def test_custom_module_needs_preprocess_and_class_names():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(ValueError, match="preprocess=.*class_names="):
        load_target(model)
    with pytest.raises(ValueError, match="class_names="):
        load_target(model, preprocess=lambda img: torch.zeros(3, 2, 2))
    model.train()
    target = load_target(model, preprocess=lambda img: torch.zeros(3, 2, 2), class_names=("a", "b", "c"), layer="1")
    assert target.class_names == ["a", "b", "c"] and target.default_layer == "1" and target.name == "Sequential"
    assert not model.training  # put in eval mode
    other = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    assert load_target(other, preprocess=target.preprocess, class_names="abc").fingerprint != target.fingerprint


# ---------------------------------------------------------------- CLIP as a zero-shot classifier


def test_clip_zero_shot_classifier_with_random_weights(tiny_clip_name):
    classes = ["tench", "goldfish", "great white shark", "tiger shark"]
    target = load_target(f"clip:{tiny_clip_name}", pretrained=False, class_names=classes)
    assert isinstance(target.module, ZeroShotClassifier)
    assert target.class_names == classes and target.name == f"clip:{tiny_clip_name}"
    images = [Image.new("RGB", (48, 40), c) for c in [(200, 0, 0), (0, 200, 0), (0, 0, 200)]]
    x = torch.stack([target.preprocess(img) for img in images])
    assert x.shape == (3, 3, 32, 32)
    with torch.no_grad():
        logits = target.module(x)
    assert logits.shape == (3, len(classes)) and logits.isfinite().all()
    assert torch.allclose(target.module.class_emb_cd.norm(dim=1), torch.ones(len(classes)), atol=1e-5)
    # The paper's CLIP layer kind: visual tokens with the class token recognised as a prefix.
    from miclip_nb.capture import capture

    tokens = capture(target.module, x, "visual.transformer.resblocks.1", "none")["visual.transformer.resblocks.1"]
    cls = capture(target.module, x, "visual.transformer.resblocks.1", "cls")["visual.transformer.resblocks.1"]
    mean = capture(target.module, x, "visual.transformer.resblocks.1", "mean")["visual.transformer.resblocks.1"]
    assert tokens.shape == (3, 17, 64)
    assert torch.equal(cls, tokens[:, 0]) and torch.allclose(mean, tokens[:, 1:].mean(1), atol=1e-6)


def test_clip_zero_shot_logits_are_clip_similarities(tiny_clip_name, tmp_path):
    """From a local checkpoint, the classifier's logits are 100 x cosine(image, class prompt)
    computed with open_clip directly."""
    import open_clip
    import torch.nn.functional as F

    model = open_clip.create_model(tiny_clip_name, pretrained=None).eval()
    path = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    classes = ["red", "green", "blue"]
    target = load_target(f"clip:{tiny_clip_name}", weights_path=path, class_names=classes, clip_templates=["a {} thing"])
    x = torch.stack([target.preprocess(Image.new("RGB", (32, 32), c)) for c in [(200, 0, 0), (0, 0, 200)]])
    tokenizer = open_clip.get_tokenizer(tiny_clip_name)
    with torch.no_grad():
        image = F.normalize(model.encode_image(x), dim=-1)
        text = F.normalize(model.encode_text(tokenizer([f"a {c} thing" for c in classes])), dim=-1)
        logits = target.module(x)
    assert torch.allclose(logits, 100.0 * image @ text.T, atol=1e-3)
    assert target.fingerprint != load_target(f"clip:{tiny_clip_name}", pretrained=False, class_names=classes).fingerprint


def test_clip_pretrained_offline_raises_weights_unavailable(no_network):
    with pytest.raises(WeightsUnavailableError, match="checkpoint_path="):
        load_target("clip:ViT-B-16", class_names=["a", "b"])


def test_imagenet_class_names_offline():
    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
