"""Layer lookup, pooling, and hooks that never outlive their block."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from miclip_nb.capture import (
    LAYER_ALIASES,
    LayerNotFoundError,
    capture,
    hooked_activations,
    layer_names,
    num_prefix_tokens,
    pool,
    resolve_layer,
    spatial_map,
)


class TupleNet(nn.Module):
    """A CNN whose middle block returns a tuple, as attention blocks and RNN cells do."""

    class TupleBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y, {"aux": y.detach()}

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = self.TupleBlock()
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        y, _ = self.block(torch.relu(self.stem(x)))
        return self.head(y.mean((2, 3)))


@pytest.fixture(scope="module")
def resnet50():
    return timm.create_model("resnet50", pretrained=False).eval()


@pytest.fixture(scope="module")
def tiny_vit():
    return timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                         num_classes=5, reg_tokens=2).eval()


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------- layer lookup


def test_unknown_layer_lists_close_names(resnet50):
    with pytest.raises(LayerNotFoundError) as info:
        resolve_layer(resnet50, "layer4.O")  # letter O instead of zero
    message = str(info.value)
    assert "'layer4.O'" in message
    assert "layer4.0" in message.split("Closest:")[1]
    # Raised before any hook is installed.
    with pytest.raises(LayerNotFoundError):
        with hooked_activations(resnet50, ["layer1", "no.such.layer"]):
            pass
    assert all_hooks(resnet50) == 0


def test_unknown_layer_is_a_keyerror_with_readable_text():
    err = LayerNotFoundError("no layer 'x'")
    assert isinstance(err, KeyError)
    assert str(err) == "no layer 'x'"  # not the quoted repr KeyError would print


def test_hf_shortcut_alias_is_the_output_of_layer4_0(resnet50):
    """The paper's ResNet-50 layer (HF ``stages.3.layers.1.shortcut``) is timm ``layer4.0``: the
    identity shortcut of the second block of stage 4 passes on that block's input."""
    assert resolve_layer(resnet50, "stages.3.layers.1.shortcut") is resnet50.layer4[0]
    assert LAYER_ALIASES["stages.3.layers.1.shortcut"] == "layer4.0"
    assert resnet50.layer4[1].downsample is None  # the shortcut really is an identity

    x = torch.randn(1, 3, 224, 224)
    seen = {}
    handle = resnet50.layer4[1].register_forward_pre_hook(lambda m, args: seen.setdefault("input", args[0]))
    try:
        acts = capture(resnet50, x, "stages.3.layers.1.shortcut", pooling="none")["stages.3.layers.1.shortcut"]
    finally:
        handle.remove()
    assert acts.shape == (1, 2048, 7, 7)
    assert torch.equal(acts, seen["input"])


def test_layer_names_are_the_dotted_module_names(resnet50):
    names = layer_names(resnet50)
    assert "" not in names
    assert "layer4.0" in names and "layer4.0.conv1" in names and "fc" in names
    with pytest.raises(LayerNotFoundError):
        resolve_layer(resnet50, "")  # the root is not a layer


# ---------------------------------------------------------------- outputs and pooling


def test_tuple_outputs_are_unwrapped():
    model = TupleNet().eval()
    x = torch.randn(2, 3, 8, 8)
    acts = capture(model, x, "block", pooling="none")["block"]
    assert torch.equal(acts, model.block.conv(torch.relu(model.stem(x))).detach())
    pooled = capture(model, x, "block", pooling="mean")["block"]
    assert pooled.shape == (2, 4)


def test_cnn_pooling_mean_max_none():
    acts = torch.randn(3, 5, 4, 6)
    assert torch.allclose(pool(acts, "mean"), acts.mean((2, 3)))
    assert torch.equal(pool(acts, "max"), acts.amax((2, 3)))
    assert pool(acts, "none") is acts
    with pytest.raises(ValueError, match="cls"):
        pool(acts, "cls")
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(acts, "avg")


def test_pooling_rejects_shapes_it_cannot_pool():
    with pytest.raises(ValueError, match="shape"):
        pool(torch.randn(2, 3, 4, 5, 6), "mean")
    with pytest.raises(ValueError, match="class token"):
        pool(torch.randn(2, 5, 8), "cls", n_prefix=0)
    with pytest.raises(ValueError, match="square"):
        spatial_map(torch.randn(2, 1 + 7, 4), n_prefix=1)


def test_vit_pooling_excludes_prefix_tokens(tiny_vit):
    assert num_prefix_tokens(tiny_vit) == 3  # CLS + 2 registers
    x = torch.randn(2, 3, 32, 32)
    with hooked_activations(tiny_vit, "blocks.1", pooling="none") as captured:
        tiny_vit(x)
    tokens = captured["blocks.1"]
    assert tokens.shape == (2, 3 + 16, 32)
    patches = tokens[:, 3:]
    mean = capture(tiny_vit, x, "blocks.1", "mean")["blocks.1"]
    assert torch.allclose(mean, patches.mean(1), atol=1e-6)
    assert not torch.allclose(mean, tokens.mean(1), atol=1e-3)  # prefix tokens would shift it
    assert torch.equal(capture(tiny_vit, x, "blocks.1", "max")["blocks.1"], patches.amax(1))
    assert torch.equal(capture(tiny_vit, x, "blocks.1", "cls")["blocks.1"], tokens[:, 0])
    grid = spatial_map(tokens, n_prefix=3)
    assert grid.shape == (2, 32, 4, 4)
    assert torch.equal(grid[:, :, 1, 2], patches[:, 1 * 4 + 2])  # row-major patch order


def test_open_clip_visual_tokens_are_batch_first(tiny_clip_name):
    """CLIP ViT-B/16's paper layer is ``visual.transformer.resblocks.10``: its tokens must arrive
    as (N, T, D) with one class token, or every pooling would mix images."""
    import open_clip

    model = open_clip.create_model(tiny_clip_name, pretrained=None).eval()
    assert num_prefix_tokens(model) == 1
    x = torch.randn(3, 3, 32, 32)
    tokens = capture(model.visual, x, "transformer.resblocks.1", "none")["transformer.resblocks.1"]
    assert tokens.shape == (3, 1 + 16, 64)
    # Image 0 alone gives the same tokens as in the batch: the batch axis is the first one.
    alone = capture(model.visual, x[:1], "transformer.resblocks.1", "none")["transformer.resblocks.1"]
    assert torch.allclose(alone[0], tokens[0], atol=1e-5)


def test_cls_pooling_on_a_cnn_raises_and_leaves_no_hook():
    model = TupleNet().eval()
    with pytest.raises(ValueError, match="cls"):
        capture(model, torch.randn(1, 3, 8, 8), "stem", pooling="cls")
    assert all_hooks(model) == 0


def test_unknown_pooling_raises_before_hooks():
    model = TupleNet().eval()
    with pytest.raises(ValueError, match="unknown pooling"):
        with hooked_activations(model, "stem", pooling="average"):
            pytest.fail("the block must not run")
    assert all_hooks(model) == 0


# ---------------------------------------------------------------- hook removal (captum style)


@pytest.mark.parametrize("raise_inside", [False, True])
def test_hooks_are_removed_and_outputs_unchanged(tiny_vit, raise_inside):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = tiny_vit(x).clone()
    assert all_hooks(tiny_vit) == 0

    class Boom(Exception):
        pass

    try:
        with hooked_activations(tiny_vit, ["blocks.0", "blocks.1.attn", "norm"], pooling="mean") as captured:
            assert all_hooks(tiny_vit) == 3
            with torch.no_grad():
                tiny_vit(x)
            assert set(captured) == {"blocks.0", "blocks.1.attn", "norm"}
            if raise_inside:
                raise Boom()
    except Boom:
        pass

    for name, module in tiny_vit.named_modules():
        assert not module._forward_hooks, f"{name or 'root'} still has a forward hook"
        assert not module._forward_pre_hooks, f"{name or 'root'} still has a pre-hook"
    with torch.no_grad():
        after = tiny_vit(x)
    assert torch.equal(before, after)


def test_hooks_removed_when_the_forward_pass_itself_raises(tiny_vit):
    with pytest.raises(RuntimeError):
        with hooked_activations(tiny_vit, "blocks.0"):
            tiny_vit(torch.randn(2, 5, 32, 32))  # wrong channel count fails inside torch
    assert all_hooks(tiny_vit) == 0


def test_captured_activations_are_detached():
    model = TupleNet().eval()
    x = torch.randn(1, 3, 8, 8)
    with hooked_activations(model, "stem", pooling="none") as captured:
        model(x)  # with grad enabled
    assert not captured["stem"].requires_grad
