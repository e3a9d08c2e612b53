"""Loading target classifiers: offline real weights, hub failures, weights files for every kind of model, custom
modules, CLIP zero-shot, HuggingFace transformers (skipped only without the optional hf extra)."""

from __future__ import annotations

import importlib.util
import socket
import time

import pytest
import timm
import torch
from PIL import Image
from torch import nn

from miclip_nb.capture import capture, resolve_layer
from miclip_nb.embed import WeightsMismatchError, WeightsUnavailableError, state_fingerprint
from miclip_nb.zoo import (
    HF_PAPER_MODELS,
    PAPER_LAYERS,
    HFImageClassifier,
    ZeroShotClassifier,
    hf_image_transform,
    imagenet_class_names,
    load_state_dict_file,
    load_target,
)


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


# ---------------------------------------------------------------- weights files for every kind of model


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def custom_target(module: nn.Module, **kwargs):
    return load_target(module, preprocess=lambda img: torch.zeros(3, 8, 8), class_names=["a", "b"], **kwargs)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors", "checkpoint"])
def test_custom_module_loads_weights_path(tmp_path, suffix):
    source = small_net()
    with torch.no_grad():
        source[1].running_mean += 0.5  # a buffer, not only parameters
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "net.safetensors"
        save_file(source.state_dict(), path)
    elif suffix == "checkpoint":  # a training checkpoint, saved from DataParallel
        path = tmp_path / "epoch3.pth"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    else:
        path = tmp_path / f"net{suffix}"
        torch.save(source.state_dict(), path)
    fresh = small_net()
    target = custom_target(fresh, weights_path=path)
    assert target.module is fresh
    assert target.fingerprint.split(":")[-1] == state_fingerprint(source)
    for (name, a), b in zip(source.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2), nn.Linear(2, 2))
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsMismatchError) as info:
        custom_target(small_net(), weights_path=path)
    message = str(info.value)
    assert "other.pth" in message and "Sequential" in message
    assert "missing keys" in message and "1.running_mean" in message and "3.weight" in message
    assert "unexpected keys" in message and "2.weight" in message
    wide = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 6 * 6, 2))
    torch.save(wide.state_dict(), path)
    with pytest.raises(WeightsMismatchError, match=r"shape mismatches \(0.weight: file \(5, 3, 3, 3\), model \(4, 3, 3, 3\)"):
        custom_target(small_net(), weights_path=path)


def test_a_pickled_module_is_refused(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(small_net(), path)
    with pytest.raises(ValueError, match="pickled.*state_dict"):
        custom_target(small_net(), weights_path=path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a weights file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_state_dict_file(junk)


@pytest.mark.parametrize("kind", ["module", "timm", "torchvision", "clip", "hf"])
def test_missing_weights_file_is_named(kind, tmp_path, tiny_clip_name):
    if kind == "hf" and not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed (the optional 'hf' extra)")
    missing = tmp_path / "no_such_weights.safetensors"
    model = {"module": small_net(), "timm": "timm:resnet18", "torchvision": "torchvision:resnet18",
             "clip": f"clip:{tiny_clip_name}", "hf": "hf:microsoft/resnet-50"}[kind]
    kwargs = {"preprocess": lambda img: img, "class_names": ["a", "b"]} if kind == "module" else {}
    with pytest.raises(FileNotFoundError, match="no_such_weights.safetensors"):
        load_target(model, weights_path=missing, **kwargs)


def test_timm_and_torchvision_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "resnet34.safetensors"
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet34", pretrained=False).state_dict(), path)
    with pytest.raises(WeightsMismatchError, match="resnet34.safetensors.*unexpected keys.*layer1.2"):  # not WeightsUnavailableError
        load_target("timm:resnet18", weights_path=path)
    import torchvision

    save_file(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    with pytest.raises(WeightsMismatchError, match=r"fc.weight: file \(10, 512\), model \(1000, 512\)"):
        load_target("torchvision:resnet18", weights_path=path)
    target = load_target("torchvision:resnet18", pretrained=False)
    save_file(target.module.state_dict(), path)
    assert load_target("torchvision:resnet18", weights_path=path).fingerprint == target.fingerprint


def test_timm_vit_weights_path_goes_through_timms_checkpoint_filter(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    path = tmp_path / "vit_tiny.pth"
    torch.save(source.state_dict(), path)
    target = load_target("timm:vit_tiny_patch16_224", weights_path=path)
    assert target.fingerprint.split(":")[-1] == state_fingerprint(source)


def test_config_is_only_for_hf_models():
    with pytest.raises(ValueError, match="hf:"):
        load_target("timm:resnet18", pretrained=False, config={"model_type": "resnet"})


# ---------------------------------------------------------------- HuggingFace transformers (the optional hf extra)



def _has_transformers() -> bool:
    try:
        return importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):  # hidden or half-installed
        return False


HAS_TRANSFORMERS = _has_transformers()
#: The hf tests are skipped only when transformers (the optional ``hf`` extra) is not installed.
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (pip install -e '.[hf]')")


def tiny_resnet_config(**kwargs):
    from transformers import ResNetConfig

    return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 2, 1, 2],
                        id2label={0: "cat", 1: "dog", 2: "bird"}, **kwargs)


def tiny_vit_config(**kwargs):
    from transformers import ViTConfig

    values = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8, num_labels=4)
    return ViTConfig(**{**values, **kwargs})


@needs_transformers
def test_hf_tiny_resnet_from_a_config():
    """A transformers ResNet built from a config, random weights, no download (skipped only
    without transformers, the optional hf extra)."""
    target = load_target("hf:tiny-resnet", pretrained=False, config=tiny_resnet_config())
    module = target.module
    assert isinstance(module, HFImageClassifier) and not module.training and not module.hf_model.training
    assert target.name == "hf:tiny-resnet" and target.class_names == ["cat", "dog", "bird"]
    # The paper's ResNet layer, counted from the last stage; state dict keys are HF's own.
    assert target.default_layer == "resnet.encoder.stages.3.layers.1.shortcut"
    assert list(module.state_dict()) == list(module.hf_model.state_dict())
    assert module.num_prefix_tokens == 0
    x = torch.stack([target.preprocess(Image.new("RGB", (300, 250), c)) for c in [(200, 10, 10), (10, 10, 200)]])
    assert x.shape == (2, 3, 224, 224)
    with torch.no_grad():
        logits = module(x)
        assert torch.allclose(logits, module.hf_model(pixel_values=x).logits)
    assert logits.shape == (2, 3)
    acts = capture(module, x, [target.default_layer, "resnet.encoder.stages.3.layers.0"], "none")
    assert acts[target.default_layer].shape == (2, 32, 7, 7)  # the shortcut passes the block's input on
    assert torch.equal(acts[target.default_layer], acts["resnet.encoder.stages.3.layers.0"])


@needs_transformers
def test_hf_tiny_vit_layers_resolve_under_both_namings():
    """ViT blocks answer to the paper's (transformers 4) ``vit.encoder.layer.N`` and to the
    installed version's own name; token outputs pool with the class token as a prefix (skipped
    only without transformers, the optional hf extra)."""
    target = load_target("hf:tiny-vit", pretrained=False, config=tiny_vit_config())
    module = target.module
    assert target.default_layer == "vit.encoder.layer.1" and module.num_prefix_tokens == 1
    assert target.class_names == [f"LABEL_{i}" for i in range(4)]
    native = "vit.layers.1" if "vit.layers.1" in dict(nn.Module.named_modules(module)) else "vit.encoder.layer.1"
    assert resolve_layer(module, "vit.encoder.layer.1") is resolve_layer(module, native)
    assert len(list(module.parameters())) == len(list(module.hf_model.parameters()))  # the aliases add no parameters
    x = torch.stack([target.preprocess(Image.new("RGB", (50, 40), c)) for c in [(200, 10, 10), (10, 10, 200)]])
    assert x.shape == (2, 3, 32, 32)
    tokens = capture(module, x, "vit.encoder.layer.1", "none")["vit.encoder.layer.1"]
    assert tokens.shape == (2, 17, 32)
    assert torch.equal(capture(module, x, native, "none")[native], tokens)
    assert torch.equal(capture(module, x, "vit.encoder.layer.1", "cls")["vit.encoder.layer.1"], tokens[:, 0])
    assert torch.allclose(capture(module, x, "vit.encoder.layer.1", "mean")["vit.encoder.layer.1"], tokens[:, 1:].mean(1))
    with torch.no_grad():
        assert module(x).shape == (2, 4)


@needs_transformers
def test_hf_local_folder_and_config_forms(tmp_path):
    """A folder written by save_pretrained (model + image processor) loads offline with its
    weights and preprocessing; config= takes a config, a dict or a config.json (skipped only
    without transformers, the optional hf extra)."""
    from transformers import ViTImageProcessor

    built = load_target("hf:tiny-vit", pretrained=False, config=tiny_vit_config())
    with torch.no_grad():  # weights of its own, not the loader's (deterministic) random init
        next(built.module.parameters()).add_(0.5)
    built.fingerprint = ""
    built.__post_init__()
    folder = tmp_path / "tiny-vit"
    built.module.hf_model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]).save_pretrained(folder)
    local = load_target(f"hf:{folder}")
    assert local.name == f"hf:{folder}"
    assert local.fingerprint.split(":")[-1] == built.fingerprint.split(":")[-1]
    image = Image.new("RGB", (48, 40), (100, 150, 200))
    x = local.preprocess(image)
    assert torch.allclose(x[:, 0, 0], (torch.tensor([100, 150, 200]) / 255 - torch.tensor([0.4, 0.5, 0.6])) / torch.tensor([0.2, 0.3, 0.4]), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(local.module(x[None]), built.module(x[None]), atol=1e-6)
    # Random weights of the folder's architecture, and the config forms.
    assert load_target(f"hf:{folder}", pretrained=False).fingerprint != local.fingerprint
    for config in ({"model_type": "vit", **{k: v for k, v in tiny_vit_config().to_dict().items() if k != "model_type"}},
                   folder / "config.json", folder):
        again = load_target("hf:tiny-vit", pretrained=False, config=config)
        assert list(again.module.state_dict()) == list(built.module.state_dict())
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        load_target(f"hf:{tmp_path / 'no_such_folder'}")
    empty = tmp_path / "config_only"
    tiny_vit_config().save_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        load_target(f"hf:{empty}")


@needs_transformers
def test_hf_weights_path(tmp_path):
    """weights_path= loads a state dict into the config's architecture strictly (skipped only
    without transformers, the optional hf extra)."""
    from safetensors.torch import save_file

    built = load_target("hf:tiny-resnet", pretrained=False, config=tiny_resnet_config())
    path = tmp_path / "model.safetensors"
    save_file(built.module.state_dict(), path)
    loaded = load_target("hf:tiny-resnet", config=tiny_resnet_config(), weights_path=path)
    assert loaded.fingerprint == built.fingerprint
    pth = tmp_path / "weights.pth"
    torch.save({"state_dict": built.module.state_dict()}, pth)  # a training checkpoint
    assert load_target("hf:tiny-resnet", config=tiny_resnet_config(), weights_path=pth).fingerprint == built.fingerprint
    four_classes = tiny_resnet_config()
    four_classes.id2label = {i: str(i) for i in range(4)}
    four_classes.label2id = {str(i): i for i in range(4)}
    with pytest.raises(WeightsMismatchError, match=r"shape mismatches \(classifier.1.bias: file \(3,\), model \(4,\)"):
        load_target("hf:tiny-resnet", config=four_classes, weights_path=path)
    state = built.module.state_dict()
    state["extra.weight"] = state.pop("classifier.1.bias")
    save_file(state, path)
    with pytest.raises(WeightsMismatchError, match=r"1 missing keys \(classifier.1.bias\); 1 unexpected keys \(extra.weight\)"):
        load_target("hf:tiny-resnet", config=tiny_resnet_config(), weights_path=path)
    torch.save(built.module.hf_model, tmp_path / "whole.pt")
    with pytest.raises(ValueError, match="pickled"):
        load_target("hf:tiny-resnet", config=tiny_resnet_config(), weights_path=tmp_path / "whole.pt")
    with pytest.raises(ValueError, match="2 class_names for a model with 3 outputs"):
        load_target("hf:tiny-resnet", pretrained=False, config=tiny_resnet_config(), class_names=["a", "b"])


@needs_transformers
def test_hf_pretrained_offline_raises_weights_unavailable(no_network):
    """Offline, hub weights cannot come: the message says how to bring a local folder (skipped
    only without transformers, the optional hf extra)."""
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        load_target("hf:microsoft/resnet-50")
    message = str(info.value)
    assert "'microsoft/resnet-50'" in message and "save_pretrained('resnet-50')" in message
    assert "load_target('hf:/path/to/resnet-50')" in message and "weights_path=" in message
    with pytest.raises(WeightsUnavailableError, match="config="):
        load_target("hf:someone/unknown-classifier", pretrained=False)
    assert time.monotonic() - start < 30


@needs_transformers
@pytest.mark.parametrize("spec", list(HF_PAPER_MODELS))
def test_hf_image_transform_matches_the_processors(spec):
    """The torchvision transform built from a processor config gives HF's own pixel values
    (skipped only without transformers, the optional hf extra)."""
    import numpy as np
    import transformers

    settings = dict(HF_PAPER_MODELS[spec][1])
    processor = getattr(transformers, settings.pop("image_processor_type"))(**settings)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    expected = processor(image, return_tensors="pt")["pixel_values"][0]
    for transform in (hf_image_transform(HF_PAPER_MODELS[spec][1]), hf_image_transform(processor)):
        x = transform(image)
        assert x.shape == expected.shape == (3, 224, 224)
        assert (x - expected).abs().max() < 0.05 and (x - expected).abs().mean() < 1e-3  # at most a rounding step
    assert hf_image_transform({"size": {"height": 20, "width": 30}})(Image.new("L", (50, 50))).shape == (3, 20, 30)
    with pytest.raises(ValueError, match="size"):
        hf_image_transform({"size": {"longest_edge": 20}})


@needs_transformers
def test_hf_paper_resnet50_architecture():
    """hf:microsoft/resnet-50 with random weights: the default ResNetConfig with an ImageNet head;
    the paper's layer gives (N, 2048, 7, 7) at 224 px (skipped only without transformers, the
    optional hf extra)."""
    from transformers import ResNetConfig

    target = load_target("hf:microsoft/resnet-50", pretrained=False)
    config, default = target.module.config, ResNetConfig()
    assert (config.hidden_sizes, list(config.depths), config.layer_type, config.embedding_size) == \
        (default.hidden_sizes, list(default.depths), default.layer_type, default.embedding_size)
    assert len(target.class_names) == 1000 and target.class_names[0] == "tench"
    assert target.default_layer == PAPER_LAYERS["hf:microsoft/resnet-50"] == "resnet.encoder.stages.3.layers.1.shortcut"
    x = target.preprocess(Image.new("RGB", (320, 240), (90, 120, 30)))[None]
    assert x.shape == (1, 3, 224, 224)
    acts = capture(target.module, x, [target.default_layer, "resnet.encoder.stages.3.layers.0"], "none")
    assert acts[target.default_layer].shape == (1, 2048, 7, 7)
    assert torch.equal(acts[target.default_layer], acts["resnet.encoder.stages.3.layers.0"])
    with torch.no_grad():
        assert target.module(x).shape == (1, 1000)


@needs_transformers
def test_hf_paper_vit_b16_architecture():
    """hf:google/vit-base-patch16-224 with random weights: the default ViTConfig with an ImageNet
    head; the paper's "10th layer" gives (N, 197, 768) (skipped only without transformers, the
    optional hf extra)."""
    from transformers import ViTConfig

    target = load_target("hf:google/vit-base-patch16-224", pretrained=False)
    config, default = target.module.config, ViTConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size, config.image_size) == \
        (default.hidden_size, default.num_hidden_layers, default.patch_size, default.image_size) == (768, 12, 16, 224)
    assert len(target.class_names) == 1000
    assert target.default_layer == PAPER_LAYERS["hf:google/vit-base-patch16-224"] == "vit.encoder.layer.10"
    x = target.preprocess(Image.new("RGB", (320, 240), (90, 120, 30)))[None]
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        logits = target.module(x)
    acts = capture(target.module, x, target.default_layer, "none")
    assert acts[target.default_layer].shape == (1, 197, 768) and logits.shape == (1, 1000)


def test_random_weights_are_the_same_on_every_load_and_leave_the_callers_rng_alone():
    """A model with random weights (smoke tests) is built the same every time, so its fingerprint,
    and with it every cache keyed on it, stays the same; the caller's random stream is untouched."""
    from miclip_nb import embed, zoo

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = zoo.load_target("timm:resnet10t", pretrained=False)
    assert torch.equal(torch.rand(3), expected)
    b = zoo.load_target("timm:resnet10t", pretrained=False)
    assert a.fingerprint == b.fingerprint
    assert embed.load_clip("ViT-B-16", None).fingerprint == embed.load_clip("ViT-B-16", None).fingerprint
