"""The plug-in registry, and the rule that the generic core never imports the Shapes world."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from miclip_nb import plugins
from miclip_nb.plugins import UnknownNameError

PACKAGE = Path(__file__).resolve().parents[1] / "miclip_nb"
WORLD = "miclip_nb.shapes"


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of every module a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def test_the_generic_core_never_imports_the_shapes_world():
    core = [p for p in PACKAGE.glob("*.py")]
    assert len(core) > 20
    offenders = {p.name: sorted(m for m in _imported_modules(p) if m == WORLD or m.startswith(WORLD + "."))
                 for p in core}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_the_rule_checker_sees_relative_imports(tmp_path):
    """The checker above must catch every spelling (else the rule test could never fail)."""
    for src in ("from . import shapes", "from .shapes import world", "from .shapes.toy_models import x",
                "import miclip_nb.shapes.toyclip", "from miclip_nb.shapes import ShapesDataset"):
        path = PACKAGE / "_rule_probe.py"
        mods = _imported_modules_of_source(src, path)
        assert any(m == WORLD or m.startswith(WORLD + ".") for m in mods), src


def _imported_modules_of_source(src: str, path: Path) -> set[str]:
    path.write_text(src)
    try:
        return _imported_modules(path)
    finally:
        path.unlink()


GENERIC_RUN = textwrap.dedent('''
    import sys, torch
    from torch import nn
    from PIL import Image
    import numpy as np
    from miclip_nb import align, datasets, embed, interpret, steer, store, zoo

    root = sys.argv[1]
    import pathlib
    for c in ("a", "b"):
        (pathlib.Path(root) / c).mkdir()
        for i in range(12):
            rgb = (np.random.default_rng(i).random((16, 16, 3)) * 255).astype("uint8")
            Image.fromarray(rgb).save(f"{root}/{c}/{i}.png")
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    to_x = lambda im: torch.from_numpy(np.asarray(im.convert("RGB"), dtype="float32")).permute(2, 0, 1) / 255
    target = zoo.load_target(module, preprocess=to_x, class_names=["a", "b"], layer="1")
    proj = torch.randn(3, 4)
    backend = embed.FunctionBackend(image_fn=lambda x: x.mean((2, 3)) @ proj,
                                    text_fn=lambda t: torch.randn(len(t), 4, generator=torch.Generator().manual_seed(len(t[0]))),
                                    preprocess=to_x, embed_dim=4, fingerprint="fn-clip")
    ds = datasets.open_dataset(root)
    st = store.build_store(target, ds, ["1"], clip=backend, root=root + "/stores", progress=False)
    class_emb = embed.build_concept_bank(backend, ["a", "b"])
    enc, _ = align.train_encoder(st, class_emb, progress=False)
    units, _ = interpret.localize(interpret.unit_embeddings(enc), class_emb[0], tau=2)
    x = torch.stack([to_x(ds[i][0]) for i in range(len(ds))])
    steer.class_deltas(module, x, torch.tensor([ds[i][1] for i in range(len(ds))]), "1", {0: units})
    from miclip_nb import plugins
    print("LOADED", sorted(m for m in sys.modules if m.startswith("miclip_nb.shapes")), plugins._loaded)
''')


def test_a_generic_run_never_loads_the_world(tmp_path):
    """Your own model, photos and CLIP, from capture to delta-accuracy: no Shapes-world module is
    imported, and no plug-in is loaded."""
    out = subprocess.run([sys.executable, "-c", GENERIC_RUN, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED [] []" in out.stdout, out.stdout


def test_register_get_names_and_errors():
    made = []
    plugins.register("target", "My_Model", lambda layer=None, weights_path=None: made.append(layer) or "model")
    assert plugins.get("target", "my_model")(layer="x") == "model" and made == ["x"]
    assert "my_model" in plugins.names("target") and plugins.has("target", "MY_MODEL")
    with pytest.raises(UnknownNameError, match=r"no model named 'nope' \(registered: .*my_model"):
        plugins.get("target", "nope")
    with pytest.raises(ValueError, match="unknown plug-in kind"):
        plugins.register("widget", "x", lambda: 0)
    with pytest.raises(TypeError, match="callable"):
        plugins.register("target", "x", 3)
    with pytest.raises(ValueError, match="non-empty name"):
        plugins.register("target", " ", lambda: 0)


def test_a_registered_model_loads_through_load_target():
    from miclip_nb import zoo

    module = torch.nn.Linear(2, 2)
    plugins.register("target", "linear_test", lambda layer=None, weights_path=None: zoo.load_target(
        module, preprocess=lambda im: im, class_names=["x", "y"], layer=layer))
    target = zoo.load_target("linear_test", layer="")
    assert target.module is module


def test_the_shapes_world_is_found_through_its_entry_point():
    """Installed (pip install -e .), the world registers through the entry-point group, and every
    name it offers resolves through the core's own functions."""
    from miclip_nb import datasets, embed, interpret, zoo

    assert "shapes" in plugins.load_plugins()
    assert {"toy_cnn", "toy_vit"} <= set(plugins.names("target"))
    assert len(datasets.open_dataset("shapes:test:3")) == 3
    assert zoo.load_target("toy_cnn").default_layer == "stages.2"
    backend = embed.load_clip("toyclip")
    assert embed.concept_texts(backend, "star") == ["a star"]  # ToyCLIP's own captions
    assert len(interpret.concept_set("shapes")) == 16
    with pytest.raises(UnknownNameError, match="dataset scheme named 'shape'"):
        datasets.open_dataset("shape:test:3")
