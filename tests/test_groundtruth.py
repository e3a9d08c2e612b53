"""Ground-truth benchmark: AUROC of a method's top units for attribute presence."""

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F

from miclip_nb.shapes import groundtruth as gt
from miclip_nb.baselines import CAPTUM_METHODS
from miclip_nb.embed import FunctionBackend
from miclip_nb.shapes import CONCEPTS, SHAPES, ShapesMaskProbe


def test_concept_presence_marks_shape_colour_texture():
    p = gt.concept_presence(np.array([[3, 0, 1], [0, 5, 3]]))
    assert p.shape == (2, 16) and p.dtype == torch.bool
    assert [CONCEPTS[i] for i in torch.nonzero(p[0]).flatten()] == ["star", "red", "stripes"]
    assert [CONCEPTS[i] for i in torch.nonzero(p[1]).flatten()] == ["circle", "orange", "checkers"]
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        gt.concept_presence(np.zeros((4, 2)))


def _planted(n=400, n_units=40, seed=0):
    """Unit k (k < 16) follows concept k's presence; the rest is noise."""
    gen = torch.Generator().manual_seed(seed)
    attrs = np.stack([torch.randint(6, (n,), generator=gen).numpy(), torch.randint(6, (n,), generator=gen).numpy(),
                      torch.randint(4, (n,), generator=gen).numpy()], 1)
    presence = gt.concept_presence(attrs)
    acts = torch.randn(n, n_units, generator=gen)
    acts[:, :16] += 3.0 * presence.float()
    return acts, presence


def test_topunit_aurocs_planted_right_wrong_missing():
    acts, presence = _planted()
    right = torch.zeros(16, 40)
    right[torch.arange(16), torch.arange(16)] = 1.0
    wrong = torch.roll(right, 20, dims=1)  # noise units only
    missing = right.clone()
    missing[6:] = float("nan")
    df = gt.topunit_aurocs(acts, presence, {"Right": right, "Wrong": wrong, "ShapesOnly": missing}, tau=1, n_random=5)
    assert list(df.columns) == ["method", "concept", "kind", "auroc", "units"]
    by = df.groupby("method")["auroc"]
    assert by.min()["Right"] > 0.9
    assert abs(by.mean()["Wrong"] - 0.5) < 0.1
    assert abs(by.mean()["Random"] - 0.5) < 0.1
    assert by.min()[gt.BEST_UNIT] > 0.9
    assert df[(df.method == "ShapesOnly")]["auroc"].isna().sum() == 10
    assert set(df[df.method == "Right"]["kind"]) == {"shape", "color", "texture"}
    table = gt.groundtruth_table(df)
    assert list(table.columns) == ["shape", "color", "texture", "all"]
    assert np.isnan(table.loc["ShapesOnly", "color"]) and table.loc["ShapesOnly", "shape"] > 0.9
    md = gt.groundtruth_markdown(df)
    assert md.startswith("| method | shape | color | texture | all |") and "–" in md
    assert "| star |" not in md and "star" in gt.groundtruth_markdown(df, per_concept=True)


def test_topunit_aurocs_standardize_stops_a_loud_unit_dominating():
    acts, presence = _planted()
    acts[:, 30] = 100.0 * torch.randn(acts.shape[0])  # loud noise unit
    scores = torch.zeros(16, 40)
    scores[0, 0], scores[0, 30] = 2.0, 1.0  # top-2 for "circle": the right unit and the loud one
    scores[1:] = float("nan")
    z = gt.topunit_aurocs(acts, presence, {"M": scores}, tau=2, n_random=0, oracle=False)
    raw = gt.topunit_aurocs(acts, presence, {"M": scores}, tau=2, n_random=0, oracle=False, standardize=False)
    assert z.auroc.iloc[0] > 0.75 > raw.auroc.iloc[0]


def test_topunit_aurocs_bad_input():
    acts, presence = _planted()
    with pytest.raises(ValueError, match="expected"):
        gt.topunit_aurocs(acts, presence, {"M": torch.zeros(15, 40)})
    with pytest.raises(ValueError, match="tau"):
        gt.topunit_aurocs(acts, presence, {}, tau=41)
    with pytest.raises(ValueError, match="presence"):
        gt.topunit_aurocs(acts, presence[:, :5], {})
    bad = acts.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gt.topunit_aurocs(bad, presence, {})


def _random_backend(dim=16):
    proj = torch.randn(3 * 8 * 8, dim, generator=torch.Generator().manual_seed(0))

    def image_fn(x):
        return F.adaptive_avg_pool2d(x, 8).flatten(1) @ proj

    def text_fn(texts):
        return torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(sum(map(ord, t)))) for t in texts])

    import torchvision.transforms.functional as TF

    return FunctionBackend(image_fn, text_fn, lambda img: TF.to_tensor(img), dim, "random-test")


@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_benchmark_contract_on_random_models(arch):
    torch.manual_seed(0)
    if arch == "cnn":
        model, layer = timm.create_model("resnet10t", pretrained=False, num_classes=6).eval(), "layer3"
    else:
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=6, img_size=64, patch_size=8, depth=2).eval()
        layer = "blocks.1"
    n_units = 256 if arch == "cnn" else 192
    unit_emb = F.normalize(torch.randn(n_units, 16), dim=-1)
    df = gt.groundtruth_benchmark(model, layer, backend=_random_backend(), unit_emb_ud=unit_emb, n_probe=48, n_eval=60,
                                  n_captum_per_class=2, captum_steps=2, n_random=3, device="cpu")
    assert isinstance(df, pd.DataFrame)
    methods = set(df.method)
    assert methods == {*gt.METHODS, gt.RANDOM, gt.BEST_UNIT}
    assert (df.groupby("method").size() == 16).all()
    for name in CAPTUM_METHODS.values():
        rows = df[df.method == name]
        assert rows[rows.kind == "shape"].auroc.notna().all() and rows[rows.kind != "shape"].auroc.isna().all()
    rest = df[~df.method.isin(CAPTUM_METHODS.values())]
    assert rest.auroc.between(0, 1).all()
    with pytest.raises(ValueError, match="need a CLIP backend"):
        gt.concept_scores(model, layer, ShapesMaskProbe("balanced", 8), methods=[gt.MICLIP])
    with pytest.raises(ValueError, match="unknown method"):
        gt.concept_scores(model, layer, ShapesMaskProbe("balanced", 8), methods=["V-Interp"])


def test_benchmark_default_methods_follow_inputs():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=6).eval()
    df = gt.groundtruth_benchmark(model, "layer2", n_probe=24, n_eval=40, methods=None, n_captum_per_class=1, captum_steps=2,
                                  n_random=2, device="cpu")
    assert gt.MICLIP not in set(df.method) and "CLIP-Dissect" not in set(df.method) and "Act-Values" in set(df.method)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["toy_cnn", "toy_vit"])
def test_shipped_toy_models_have_concept_units(name):
    """On the trained toy models, Act-Values' and NetDissect's units beat random ones on average and
    textures have near-perfect detector units (a floor for the benchmark, not a ranking)."""
    from miclip_nb.zoo import load_target

    target = load_target(name)  # the weights are committed: missing ones are a failure, not a skip
    df = gt.groundtruth_benchmark(target.module, target.default_layer, methods=["Act-Values", "NetDissect"], n_probe=600,
                                  n_eval=600, n_random=10, device="cpu")
    by = df.groupby("method")["auroc"].mean()
    assert by["Act-Values"] > by[gt.RANDOM] + 0.05 and by["NetDissect"] > by[gt.RANDOM] + 0.05, by.to_dict()
    assert df[(df.method == gt.BEST_UNIT) & (df.kind == "texture")].auroc.min() > 0.9
    assert df[(df.method == gt.BEST_UNIT) & (df.concept.isin(SHAPES))].auroc.mean() > 0.6
