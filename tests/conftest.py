"""Shared test setup: one CPU thread, no network downloads, a private cache, seeded randomness."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

# Before anything imports huggingface_hub (it reads this once): hub look-ups fail at once instead
# of retrying over a dead network, and no test can download weights.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Two threads fighting over a busy core make tiny forwards 10-50x slower (PLATFORM.md).
torch.set_num_threads(1)

from miclip_nb.datasets import IMAGENET_SAMPLE_ENV  # noqa: E402

#: A tiny open_clip CLIP (ViT image tower), registered with open_clip by the `tiny_clip_name`
#: fixture: random weights build in well under a second.
TINY_CLIP_NAME = "MiclipTestTinyViT"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (as captum's set_all_random_seeds)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture
def seed_everything():
    """The seeding helper, for tests that reseed mid-way: ``seed_everything(3)``."""
    return _seed_everything


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from seed 0."""
    _seed_everything(0)


@pytest.fixture(autouse=True, scope="session")
def _private_dirs(tmp_path_factory):
    """Point the activation-store cache and torch's download cache at fresh session folders, so
    tests neither read a user's caches nor find previously downloaded weights."""
    saved = {k: os.environ.get(k) for k in ("MICLIP_CACHE_DIR", "TORCH_HOME")}
    os.environ["MICLIP_CACHE_DIR"] = str(tmp_path_factory.mktemp("miclip_cache"))
    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch_home"))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_clip_name(tmp_path_factory) -> str:
    """Register :data:`TINY_CLIP_CONFIG` with open_clip and return its model name."""
    import open_clip

    cfg_dir = tmp_path_factory.mktemp("open_clip_configs")
    (cfg_dir / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(cfg_dir)
    return TINY_CLIP_NAME


@pytest.fixture(scope="session")
def imagenet_sample_dir() -> Path:
    """The imagenet-sample folder named by $MICLIP_IMAGENET_SAMPLE; skips when the variable is unset.

    A variable that is set but points nowhere is a broken setup (CI), so that fails instead.
    """
    value = os.environ.get(IMAGENET_SAMPLE_ENV)
    if not value:
        pytest.skip(f"${IMAGENET_SAMPLE_ENV} is not set (point it at ../shared/imagenet-sample-500)")
    path = Path(value).expanduser()
    if not path.is_dir():
        pytest.fail(f"${IMAGENET_SAMPLE_ENV}={value} is not a folder")
    return path


@pytest.fixture(scope="module")
def tiny_vit():
    """A random-weight timm ViT on 32 px images (patch 8, 2 blocks, 5 classes), in eval mode."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8, depth=2).eval()


@pytest.fixture(scope="module")
def tiny_cnn():
    """A random-weight timm ResNet-10t (5 classes), in eval mode."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
