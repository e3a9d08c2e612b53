"""The real setting, end to end, with random weights: the paper's architectures (timm ResNet-50 and
ViT-B/16, CLIP ViT-B/16 as a zero-shot classifier and as the embedding model, no pretrained tag, so
nothing downloads) on real photos (imagenet-sample, $MICLIP_IMAGENET_SAMPLE) with small counts, on
the CPU. Every notebook runs with ``MICLIP_PROFILE=real-smoke`` and ``miclip-nb run`` runs on the
same setting. Random weights make every figure meaningless: these tests check that the run
completes and that what it depends on is right (layer names, 1000 classes and their prompts, the
shapes of the outputs, the tables and plots drawn). Marked ``real``: .ci/run runs them as a step
of their own (``bash run.sh test -m real``), about 15 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smoke_env(imagenet_sample_dir, tmp_path_factory):
    """The environment of a real-smoke run: the profile, the photos, a private cache shared by the
    module's tests (the 1000-class prompt bank is embedded once), no network."""
    return {**os.environ, "MICLIP_PROFILE": "real-smoke", "MICLIP_IMAGENET_SAMPLE": str(imagenet_sample_dir),
            "MICLIP_CACHE_DIR": str(tmp_path_factory.mktemp("real_smoke_cache")), "HF_HUB_OFFLINE": "1",
            "TQDM_DISABLE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


@pytest.mark.parametrize("name, layer, shape", [
    ("timm:resnet50", "layer4.0", (1, 2048, 7, 7)),
    ("timm:resnet50", "stages.3.layers.1.shortcut", (1, 2048, 7, 7)),  # the paper's HuggingFace name
    ("timm:vit_base_patch16_224", "blocks.10", (1, 197, 768)),
    ("clip:ViT-B-16", "visual.transformer.resblocks.10", (1, 197, 768)),
    ("hf:microsoft/resnet-50", "resnet.encoder.stages.3.layers.1.shortcut", (1, 2048, 7, 7)),
    ("hf:google/vit-base-patch16-224", "vit.encoder.layer.10", (1, 197, 768)),
])
def test_the_papers_layers_resolve_on_the_real_architectures(name, layer, shape, imagenet_sample_dir):
    from miclip_nb import capture, datasets, zoo

    pytest.importorskip("transformers") if name.startswith("hf:") else None
    target = zoo.load_target(name, pretrained=False)
    assert len(target.class_names) == 1000
    x, _ = datasets.load_images(imagenet_sample_dir, target.preprocess, n=1)
    acts = capture.capture(target.module, x, layer, "none")[layer]
    assert tuple(acts.shape) == shape
    assert target.module(x).shape == (1, 1000)


def test_1000_imagenet_classes_and_their_prompts():
    from miclip_nb import embed, pipeline, zoo

    backend = embed.load_clip("ViT-B-16", None)
    names = zoo.imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench"
    assert embed.concept_texts(backend, "kit fox")[0] == "itap of a kit fox."  # the word as typed, open_clip's templates
    bank = pipeline.class_prompts_embedding(backend, names)
    assert bank.shape == (1000, 512) and torch.allclose(bank.norm(dim=1), torch.ones(1000), atol=1e-4)


NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_runs_on_the_real_profile(notebook, smoke_env, tmp_path):
    out = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                          "--ExecutePreprocessor.timeout=1500", "--ExecutePreprocessor.kernel_name=python3",
                          "--output-dir", str(tmp_path), str(notebook)], capture_output=True, text=True, env=smoke_env,
                         timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    nb = json.loads((tmp_path / notebook.name).read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    text = "".join("".join(o.get("text", "")) for o in outputs)
    assert "profile real-smoke" in text
    assert not [o for o in outputs if o.get("output_type") == "error"]
    if "04" not in notebook.stem:  # 04's one figure is in the panel
        assert any("image/png" in o.get("data", {}) for o in outputs), "no plot drawn"
    assert "✓" not in text  # the toy world's claims are not checked on random weights: they say so
    if "claim(" in notebook.with_suffix(".py").read_text():
        assert "not checked in this setting" in text


def test_the_command_line_runs_on_the_real_architectures(smoke_env, tmp_path):
    out_dir = tmp_path / "run"
    args = [sys.executable, "-m", "miclip_nb.cli", "run", "--quiet", "--profile", "real-smoke", "--set", "seeds=[0]",
            "--set", "n_random=2", "--set", "methods=[miclip,image_only,random,act_values,clip_dissect]", "--set", "n_other=0",
            "--set", "align.epochs=2", "--set", "batch_size=8", "--set", f"out_dir={out_dir}"]
    out = subprocess.run(args, capture_output=True, text=True, env=smoke_env, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    table = (out_dir / "delta_accuracy.md").read_text()
    for row in ("MiClip", "Image-only aligner", "Random", "Act-Values", "CLIP-Dissect"):
        assert f"| {row} |" in table
    run = json.loads((out_dir / "run.json").read_text())
    assert run["config"]["model"] == "timm:resnet50" and run["config"]["pretrained"] is False
    loc = (out_dir / "localization.csv").read_text().splitlines()
    assert loc[0].startswith("class,seed,rank,unit") and len(loc) > 1
