"""The streaming intervention harness: the same figures as the per-class protocol, whatever the
chunking or the model's shape; one pass over the data; the specific effect; matched-norm controls."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miclip_nb.intervention import (FixedSelector, dose_response, intervention_table, matched_norm_selectors,
                                    mean_abs_activation)
from miclip_nb.select import RandomSelector, ScoreSelector
from miclip_nb.steer import NonFiniteInputError, PAPER_BETAS, class_deltas, intervene


def _pct(hits: torch.Tensor) -> float:
    return float(hits.float().mean()) * 100 if hits.numel() else float("nan")


@torch.no_grad()
def reference_table(model, images, labels, layer, selectors, *, tau, betas, n_other, seed=0):
    """The in-memory protocol written out: for each selector, beta and class, full forward passes
    with the class's units edited, on its own images and on its other-class sample (drawn with a
    generator seeded ``seed`` for each class)."""
    base = model(images).argmax(1)
    rows = []
    for name, sels in selectors.items():
        for i, sel in enumerate(sels):
            for interv, beta in betas.items():
                per_class = []
                for c in sorted(set(labels.tolist())):
                    own = torch.nonzero(labels == c).flatten()
                    others = torch.nonzero(labels != c).flatten()
                    others = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:n_other]]
                    with intervene(model, layer, sel.select(c, tau), "scale", beta):
                        own_pred, other_pred = model(images[own]).argmax(1), model(images[others]).argmax(1)
                    per_class.append((_pct(own_pred == c) - _pct(base[own] == c),
                                      _pct(other_pred == labels[others]) - _pct(base[others] == labels[others]),
                                      _pct(other_pred == c) - _pct(base[others] == c)))
                d_acc, d_other, flip = (float(np.mean(v)) for v in zip(*per_class))
                rows.append((name, interv, beta, i, d_acc, d_other, d_acc - d_other, flip))
    return rows


def _as_rows(long):
    return list(long[["method", "intervention", "beta", "seed", "delta_acc", "delta_other", "specific",
                      "flip_to_class"]].itertuples(index=False, name=None))


def _same(rows, ref):
    assert len(rows) == len(ref)
    for got, want in zip(rows, ref):
        assert got[:4] == want[:4]
        assert got[4:] == pytest.approx(want[4:], abs=1e-9, nan_ok=True), got[:4]


@pytest.fixture(scope="module")
def toy():
    """The committed toy_cnn and 300 Shapes test images (as a dataset and preprocessed)."""
    from miclip_nb import datasets, zoo

    target = zoo.load_target("toy_cnn")
    ds = datasets.open_dataset("shapes:test:300")
    items = [ds[i] for i in range(len(ds))]
    images = torch.stack([target.preprocess(img) for img, _ in items])
    labels = torch.tensor([label for _, label in items])
    return target, ds, images, labels


def test_streaming_table_equals_the_per_class_protocol(toy):
    target, _ds, images, labels = toy
    selectors = {"A": [RandomSelector(128, 1), RandomSelector(128, 2)], "B": [RandomSelector(128, 1)]}
    cache: dict = {}
    long, per_class = intervention_table(target, images, "stages.2", selectors, labels=labels, n_other=40,
                                         cache=cache, per_class=True, progress=False)
    ref = reference_table(target.module.eval(), images, labels, "stages.2", selectors, tau=5, betas=PAPER_BETAS,
                          n_other=40)
    _same(_as_rows(long), ref)
    assert (long["delta_acc"] != 0).any() and (long["flip_to_class"] != 0).any()  # the edits do something
    # B's selector picks A's first units: evaluated once, shared (2 unit sets x 2 betas x 6 classes)
    assert len([k for k in cache if k[0] == "edit"]) == 2 * 2 * 6
    assert _as_rows(long[long.method == "B"])[0][4:] == _as_rows(long[long.method == "A"])[0][4:]
    # the per-class rows are steer.class_deltas' rows (class by class, as the old pipeline called it)
    for c in range(6):
        units = selectors["A"][0].select(c, 5)
        old = class_deltas(target.module, images, labels, "stages.2", {c: units}, beta=0.0, n_other=40)
        row = per_class[(per_class.method == "A") & (per_class.seed == 0) & (per_class.intervention == "remove")
                        & (per_class["class"] == c)]
        for col in ("n", "acc_base", "acc_edit", "delta_acc", "to_class_base", "to_class_edit", "flip_to_class"):
            assert row[col].item() == old[col].item(), col
    assert long["n_classes"].eq(6).all()


class CountingDataset(torch.utils.data.Dataset):
    """A dataset that records which items are read; ``with_labels`` exposes a ``labels`` list."""

    def __init__(self, base, with_labels: bool):
        self.base, self.reads = base, []
        if with_labels:
            self.labels = [base[i][1] for i in range(len(base))]
            self.reads.clear()

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads.append(i)
        return self.base[i]


def test_a_dataset_read_in_chunks_gives_the_tensor_figures_in_one_pass(toy):
    target, ds, images, labels = toy
    selectors = {"A": [RandomSelector(128, 3)], "B": [RandomSelector(128, 4)]}
    kwargs = dict(n_other=30, betas={"remove": 0.0, "half": 0.5, "enhance": 2.0}, per_class=True, progress=False)
    want_long, want = intervention_table(target, images, "stages.2", selectors, labels=labels, **kwargs)
    data = CountingDataset(ds, with_labels=True)
    got_long, got = intervention_table(target, data, "stages.2", selectors, chunk_size=64, batch_size=50, **kwargs)
    assert got.equals(want) and got_long.equals(want_long)
    # one pass: each image read once, plus the two that trace the split
    assert sorted(data.reads) == sorted([0, 1] + list(range(300)))
    subset = torch.utils.data.Subset(CountingDataset(ds, with_labels=True), range(100, 300))
    assert intervention_table(target, subset, "stages.2", selectors, chunk_size=64, **kwargs)[1].equals(
        intervention_table(target, images[100:], "stages.2", selectors, labels=labels[100:], **kwargs)[1])
    assert len(subset.dataset.reads) == 200 + 2  # the Subset's labels come from its dataset's list
    no_labels = CountingDataset(ds, with_labels=False)  # labels need a pass of their own first
    assert intervention_table(target, no_labels, "stages.2", selectors, chunk_size=128, **kwargs)[1].equals(want)
    assert len(no_labels.reads) == 2 * 300 + 2
    with pytest.raises(TypeError, match="preprocess"):  # PIL images and a bare module: no preprocessing
        intervention_table(target.module, ds, "stages.2", selectors, labels=labels, progress=False)
    with pytest.raises(ValueError, match="labels"):
        intervention_table(target, images, "stages.2", selectors, progress=False)


class FunctionalNet(nn.Module):
    """stem -> F.relu -> body -> F.relu, torch.flatten -> head: its forward calls functions between
    its children, so it does not split at ``body`` (steer.tail_module)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16 * 8 * 8, 5)

    def forward(self, x):
        h = self.body(F.relu(self.stem(x)))
        return self.head(torch.flatten(F.relu(h), 1))


@torch.no_grad()
def _functional_world(n_per_class=40):
    """FunctionalNet and 5 x n_per_class images labelled with its own predictions, 30% relabelled at
    random, so that accuracies are neither 0 nor 100."""
    from miclip_nb.steer import SplitError, tail_module

    model = FunctionalNet().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 3, 8, 8, generator=gen)
    pred = model(x).argmax(1)
    idx = torch.cat([torch.nonzero(pred == c).flatten()[:n_per_class] for c in range(5)])
    assert idx.numel() == 5 * n_per_class
    x, labels = x[idx], pred[idx].clone()
    flip = torch.rand(len(labels), generator=gen) < 0.3
    labels[flip] = torch.randint(0, 5, (int(flip.sum()),), generator=gen)
    with pytest.raises(SplitError):
        tail_module(model, "body", x[:2])
    return model, x, labels


def test_a_model_that_does_not_split_runs_all_classes_in_one_forward():
    model, x, labels = _functional_world()
    selectors = {"A": [RandomSelector(16, 0)], "B": [RandomSelector(16, 1)]}
    sizes = []
    handle = model.register_forward_pre_hook(lambda _m, inputs: sizes.append(inputs[0].shape[0]))
    try:
        for n_other in (0, 12):
            sizes.clear()
            long = intervention_table(model, x, "body", selectors, labels=labels, n_other=n_other, chunk_size=100,
                                      batch_size=10_000, progress=False)
            passes = [s for s in sizes if s > 2]  # leave out the two forwards on 2 images that try the split
            # per chunk: one unedited forward and one forward for every (class, selector, beta) edit
            assert len(passes) == 2 * 2 and passes[0] == passes[2] == 100
            ref = reference_table(model, x, labels, "body", selectors, tau=5, betas=PAPER_BETAS,
                                  n_other=n_other)
            _same(_as_rows(long), ref)
        assert (long["delta_acc"] != 0).any()
        sizes.clear()  # batches: 2 x 2 x 5 edits of 20 own images per chunk, packed 64 at a time
        again = intervention_table(model, x, "body", selectors, labels=labels, n_other=0, chunk_size=100,
                                   batch_size=64, progress=False)
        assert len([s for s in sizes if s > 2]) == 2 * (math.ceil(100 / 64) + math.ceil(400 / 64))
        _same(_as_rows(again), _as_rows(intervention_table(model, x, "body", selectors, labels=labels, n_other=0,
                                                           progress=False)))
    finally:
        handle.remove()
    assert not model.body._forward_hooks  # the row-wise edit hook is gone


class GatedUnits(nn.Module):
    """features (N, 5) -> logits: class k (0..3) scores x_k * x_4, a fifth "none" class scores 0.1.
    Unit k matters only for class k; unit 4 (the gain) matters for every class."""

    def __init__(self):
        super().__init__()
        self.features = nn.Identity()
        self.head = GatedHead()

    def forward(self, x):
        return self.head(self.features(x))


class GatedHead(nn.Module):
    def forward(self, f):
        return torch.cat([f[:, :4] * f[:, 4:5], torch.full_like(f[:, :1], 0.1)], 1)


def test_specific_effect_separates_a_class_unit_from_a_unit_every_class_needs():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(50)
    x = torch.rand(200, 5, generator=gen) * 0.8
    x[torch.arange(200), labels] += 0.5  # the own unit usually, not always, wins
    x[:, 4] = 1.0
    selectors = {"own unit": [ScoreSelector("own", torch.eye(4, 5))], "gain": [FixedSelector("gain", {c: [4] for c in range(4)})]}
    long, per_class = intervention_table(GatedUnits(), x, "features", selectors, labels=labels, tau=1,
                                         betas={"remove": 0.0}, n_other=10_000, per_class=True, progress=False)
    own, gain = long.set_index("method").loc["own unit"], long.set_index("method").loc["gain"]
    base_acc = per_class["acc_base"].mean()
    assert 50 < base_acc < 100
    # removing class c's unit: c's images all go elsewhere, the other classes lose nothing
    assert own["delta_acc"] == pytest.approx(-base_acc)
    assert 0 <= own["delta_other"] < 5 and own["specific"] == pytest.approx(own["delta_acc"], abs=5)
    # removing the gain: every image goes to the "none" class, the target class is not singled out
    assert gain["delta_acc"] == pytest.approx(-base_acc)
    assert gain["delta_other"] < -50 and abs(gain["specific"]) < 5
    # against the figures computed by hand (the sample is every other-class image)
    base = GatedUnits()(x).argmax(1)
    for c in range(4):
        row = per_class[(per_class.method == "gain") & (per_class["class"] == c)].iloc[0]
        others = labels != c
        assert row["n_other"] == 150
        assert row["delta_other"] == pytest.approx(-_pct(base[others] == labels[others]))
        assert row["flip_to_class"] == pytest.approx(-_pct(base[others] == c))
    none = intervention_table(GatedUnits(), x, "features", selectors, labels=labels, tau=1, betas={"remove": 0.0},
                              n_other=0, progress=False)
    assert none["delta_other"].isna().all() and none["specific"].isna().all() and none["flip_to_class"].isna().all()
    assert none["delta_acc"].tolist() == long["delta_acc"].tolist()


def test_dose_response_reuses_the_table_and_runs_nothing_it_knows():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(25)
    x = torch.rand(100, 5, generator=gen) * 0.8
    x[torch.arange(100), labels] += 0.3
    x[:, 4] = 1.0
    model = GatedUnits()
    selectors = {"own unit": ScoreSelector("own", torch.eye(4, 5))}
    cache: dict = {}
    table = intervention_table(model, x, "features", selectors, labels=labels, tau=1, n_other=20, cache=cache,
                               progress=False)
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        sweep = dose_response(model, x, "features", selectors, betas=(0.0, 1.0, 2.0), labels=labels, tau=1,
                              n_other=20, cache=cache, progress=False)
    finally:
        handle.remove()
    assert calls == []  # beta 0 and 2 come from the table's cache, 1 is the identity
    assert list(sweep["intervention"]) == ["x0", "x1", "x2"]
    assert sweep["delta_acc"].tolist() == [table["delta_acc"].iloc[1], 0.0, table["delta_acc"].iloc[0]]
    full = dose_response(model, x, "features", selectors, labels=labels, tau=1, n_other=20, progress=False)
    assert full["delta_acc"].is_monotonic_increasing and full["beta"].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
    assert (full.loc[full.beta == 1.0, ["delta_acc", "delta_other", "specific", "flip_to_class"]] == 0).all(axis=None)


def test_non_finite_images_are_named_across_chunks_or_left_out():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(25)
    x = torch.rand(100, 5, generator=gen) * 0.8
    x[torch.arange(100), labels] += 0.3
    x[:, 4] = 1.0
    bad = [5, 61, 62]  # in the first and the third chunk
    xb = x.clone()
    xb[bad, 0] = float("nan")
    selectors = {"own unit": ScoreSelector("own", torch.eye(4, 5))}
    kwargs = dict(labels=labels, tau=1, n_other=30, chunk_size=30, progress=False, per_class=True)
    with pytest.raises(NonFiniteInputError, match=r"3 images \(indices 5, 61, 62\), among 100") as err:
        intervention_table(GatedUnits(), xb, "features", selectors, **kwargs)
    assert err.value.indices == bad
    with pytest.warns(UserWarning, match=r"3 images \(indices 5, 61, 62\).*left out"):
        skipped = intervention_table(GatedUnits(), xb, "features", selectors, on_bad="skip", **kwargs)[1]
    keep = torch.ones(100, dtype=torch.bool)
    keep[bad] = False
    kwargs["labels"] = labels[keep]
    clean = intervention_table(GatedUnits(), x[keep], "features", selectors, **kwargs)[1]
    assert skipped.equals(clean) and skipped.groupby("intervention")["n"].sum().tolist() == [97, 97]


def test_matched_norm_sets_have_the_size_and_strength_of_the_method():
    gen = torch.Generator().manual_seed(0)
    norms = torch.rand(64, generator=gen) * 2
    scores = torch.rand(6, 64, generator=gen) + 0.5 * norms  # a method that favours strong units
    method = ScoreSelector("M", scores)
    draws = matched_norm_selectors(method, 64, norms, range(6), tau=5, n_draws=4, seed=3, tol=0.05)
    assert len(draws) == 4 and draws[0].name == "M matched-norm random"
    for c in range(6):
        chosen = method.select(c, 5)
        for d in draws:
            units = d.select(c, 5)
            assert units.numel() == 5 and len(set(units.tolist())) == 5
            assert not set(units.tolist()) & set(chosen.tolist())
            assert abs(float(norms[units].sum() - norms[chosen].sum())) <= 0.05 * float(norms[chosen].sum())
        assert len({tuple(d.select(c, 5).tolist()) for d in draws}) > 1  # random, not one fixed set
    again = matched_norm_selectors(method, 64, norms, range(6), tau=5, n_draws=4, seed=3, tol=0.05)
    assert all(torch.equal(a.select(c, 5), b.select(c, 5)) for a, b in zip(draws, again) for c in range(6))
    with pytest.raises(ValueError, match="tau=3"):
        draws[0].select(0, 3)
    lone = torch.ones(64)
    lone[:5] = 100.0  # the method's units are far stronger than any other: no match exists
    with pytest.raises(ValueError, match="class 0: no random set within 5%"):
        matched_norm_selectors(FixedSelector("top", {0: torch.arange(5)}), 64, lone, [0], tau=5, n_draws=1, max_swaps=50)
    with pytest.raises(ValueError, match="63 entries for 64 units"):
        matched_norm_selectors(method, 64, norms[:63], range(6))


def test_mean_abs_activation_streams_a_store():
    class Store:  # the two things mean_abs_activation reads of an ActivationStore
        layers = ("layer",)

        def iter_shards(self, fields):
            assert fields == ["acts/layer"]
            yield {"acts/layer": torch.tensor([[1.0, -2.0], [3.0, 0.0]])}
            yield {"acts/layer": torch.tensor([[-5.0, 4.0]])}

    assert mean_abs_activation(Store()).tolist() == [3.0, 2.0]


def test_classes_without_images_are_named_not_silently_dropped():
    from miclip_nb.intervention import intervention_table
    from miclip_nb.select import RandomSelector
    from miclip_nb.steer import class_deltas

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    images, labels = torch.randn(6, 3, 2, 2), torch.tensor([0, 0, 1, 1, 0, 1])
    with pytest.warns(UserWarning, match=r"classes \[2\] have no evaluation image"):
        long = intervention_table(model, images, "1", {"r": [RandomSelector(3, 0)]}, labels=labels, classes=[0, 1, 2],
                                  tau=1, n_other=0, progress=False)
    assert set(long["n_classes"]) == {2}
    with pytest.raises(ValueError, match=r"none of the classes \[2\] has an evaluation image"):
        intervention_table(model, images, "1", {"r": [RandomSelector(3, 0)]}, labels=labels, classes=[2], tau=1)
    with pytest.raises(ValueError, match="none of the selected classes"):
        class_deltas(model, images, labels, "1", {2: torch.tensor([0])})
