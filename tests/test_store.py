"""The activation store: keyed by content, resumable, corruption-proof, bounded memory."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torchvision import transforms as T

from miclip_nb import store as store_mod
from miclip_nb.embed import FunctionBackend
from miclip_nb.shapes import SHAPES, ShapesDataset, to_tensor
from miclip_nb.store import METADATA, ActivationStore, StoreError, StoreWriter, build_store, store_spec
from miclip_nb.zoo import TargetModel

N = 40
BATCH = 4
SHARD = 8  # a multiple of BATCH, so a resumed pass sees the same batches as an uninterrupted one


class CountingCNN(nn.Module):
    """A tiny CNN that counts its forward calls (to prove a store is reused, not recomputed)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(12, len(SHAPES))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.head(self.stage(self.stem(x)).mean((2, 3)))


class FailingDataset(torch.utils.data.Dataset):
    """Wraps a dataset and raises on item ``fail_at`` while ``armed`` (an interrupted pass)."""

    def __init__(self, dataset, fail_at: int):
        self.dataset, self.fail_at, self.armed = dataset, fail_at, True
        self.fingerprint = dataset.fingerprint

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if self.armed and i == self.fail_at:
            raise KeyboardInterrupt("interrupted")
        return self.dataset[i]


def make_target(seed: int = 0) -> TargetModel:
    torch.manual_seed(seed)
    return TargetModel(CountingCNN(), to_tensor, list(SHAPES), "counting_cnn", "stage")


def toy_clip() -> FunctionBackend:
    proj = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    return FunctionBackend(
        image_fn=lambda x: x.mean((2, 3)) @ proj,
        text_fn=lambda texts: torch.randn(len(texts), 16),
        preprocess=to_tensor,
        embed_dim=16,
        fingerprint="toyproj-1",
    )


def build(target, dataset, root, **kw):
    kw = {"batch_size": BATCH, "shard_size": SHARD, "progress": False, **kw}
    return build_store(target, dataset, root=root, **kw)


def shard_hashes(store: ActivationStore) -> list[str]:
    return [s["sha256"] for s in store.meta["shards"]]


def contents(store: ActivationStore) -> dict[str, torch.Tensor]:
    return {f: store.load(f) for f in store.fields}


def assert_same_contents(a: ActivationStore, b: ActivationStore) -> None:
    ca, cb = contents(a), contents(b)
    assert ca.keys() == cb.keys()
    for k in ca:
        assert torch.equal(ca[k], cb[k]), k


@pytest.fixture(scope="module")
def shapes_ds():
    return ShapesDataset("test", N)


@pytest.fixture(scope="module")
def reference(shapes_ds, tmp_path_factory):
    """An uninterrupted build, to compare resumed and repaired builds against."""
    return build(make_target(), shapes_ds, tmp_path_factory.mktemp("reference"), clip=toy_clip())


# ---------------------------------------------------------------- content and reuse


def test_store_holds_activations_labels_predictions_and_clip(reference, shapes_ds):
    assert reference.complete and reference.n_rows == N
    assert reference.fields == {"acts/stage": [12], "label": [], "pred": [], "clip_image": [16]}
    assert [s["n"] for s in reference.meta["shards"]] == [SHARD] * (N // SHARD)
    labels = reference.load("label")
    assert labels.tolist() == [shapes_ds.sample(i).shape for i in range(N)]
    # The stored rows are what the model computes on the same images.
    target = make_target()
    x = torch.stack([to_tensor(shapes_ds[i][0]) for i in range(N)])
    with torch.no_grad():
        acts = target.module.stage(target.module.stem(x)).mean((2, 3))
        preds = target.module(x).argmax(1)
    assert torch.allclose(reference.acts("stage"), acts, atol=1e-5)
    assert torch.equal(reference.load("pred"), preds)
    assert torch.allclose(reference.load("clip_image").norm(dim=1), torch.ones(N), atol=1e-5)
    assert reference.dir.name == reference.spec.key


def test_same_arguments_reuse_the_folder_without_recomputing(shapes_ds, tmp_path):
    target = make_target()
    first = build(target, shapes_ds, tmp_path)
    calls = target.module.calls
    assert calls == N // BATCH
    again = build(make_target(), shapes_ds, tmp_path)  # a fresh but identical model
    assert again.dir == first.dir
    second_target = make_target()
    build(second_target, shapes_ds, tmp_path)
    assert second_target.module.calls == 0
    assert [p.name for p in tmp_path.iterdir()] == [first.dir.name]


def test_everything_that_changes_content_changes_the_key(shapes_ds):
    target, clip = make_target(), toy_clip()
    base = store_spec(target, shapes_ds, ["stage"], "mean", clip).key
    variants = {
        "layer": store_spec(target, shapes_ds, ["stem"], "mean", clip),
        "pooling": store_spec(target, shapes_ds, ["stage"], "max", clip),
        "dataset split": store_spec(target, ShapesDataset("train", N), ["stage"], "mean", clip),
        "dataset size": store_spec(target, ShapesDataset("test", N + 1), ["stage"], "mean", clip),
        "n_items": store_spec(target, shapes_ds, ["stage"], "mean", clip, n_items=N - 1),
        "weights": store_spec(make_target(seed=1), shapes_ds, ["stage"], "mean", clip),
        "transform": store_spec(
            TargetModel(target.module, T.Compose([T.Resize(32), T.ToTensor()]), target.class_names, target.name),
            shapes_ds, ["stage"], "mean", clip),
        "clip": store_spec(target, shapes_ds, ["stage"], "mean", None),
        "dtype": store_spec(target, shapes_ds, ["stage"], "mean", clip, dtype=torch.float16),
    }
    keys = {what: spec.key for what, spec in variants.items()}
    for what, key in keys.items():
        assert key != base, f"changing the {what} kept the same store key"
    assert len(set(keys.values())) == len(keys)
    assert store_spec(make_target(), ShapesDataset("test", N), ["stage"], "mean", toy_clip()).key == base


def test_weights_edited_in_place_change_the_key(shapes_ds):
    """A model fine-tuned or edited after loading must not reuse the store of its old weights."""
    target = make_target()
    before = store_spec(target, shapes_ds, ["stage"], "mean").key
    with torch.no_grad():
        target.module.stage[0].weight[0, 0, 0, 0] += 1.0
    assert store_spec(target, shapes_ds, ["stage"], "mean").key != before


def test_transform_functions_with_different_code_get_different_keys(shapes_ds):
    def make(scale):
        if scale == 1:
            def preprocess(img):
                return to_tensor(img)
        else:
            def preprocess(img):
                return to_tensor(img) * 2
        return preprocess

    module = CountingCNN()
    one = TargetModel(module, make(1), list(SHAPES), "m")
    two = TargetModel(module, make(2), list(SHAPES), "m")
    assert store_mod.describe_transform(one.preprocess) != store_mod.describe_transform(two.preprocess)
    assert store_spec(one, shapes_ds, ["stage"], "mean").key != store_spec(two, shapes_ds, ["stage"], "mean").key
    assert " at 0x" not in store_mod.describe_transform(T.Lambda(lambda x: x))


def test_spec_rejects_bad_arguments(shapes_ds):
    target = make_target()
    with pytest.raises(ValueError, match="pooling"):
        store_spec(target, shapes_ds, ["stage"], "average")
    with pytest.raises(ValueError, match="n_items"):
        store_spec(target, shapes_ds, ["stage"], "mean", n_items=N + 1)
    with pytest.raises(ValueError, match="fingerprint"):
        store_spec(target, list(range(3)), ["stage"], "mean")


def test_unknown_layer_fails_before_any_work(shapes_ds, tmp_path):
    from miclip_nb.capture import LayerNotFoundError

    target = make_target()
    with pytest.raises(LayerNotFoundError, match="stage"):
        build(target, shapes_ds, tmp_path, layers=["stages"])
    assert target.module.calls == 0 and not any(tmp_path.iterdir())


# ---------------------------------------------------------------- interruption and resume


def test_interrupted_build_resumes_from_last_complete_shard(shapes_ds, reference, tmp_path):
    dataset = FailingDataset(shapes_ds, fail_at=21)  # shards 0-1 done, shard 2 half-filled
    target = make_target()
    with pytest.raises(KeyboardInterrupt):
        build(target, dataset, tmp_path, clip=toy_clip())
    (store_dir,) = tmp_path.iterdir()
    partial = ActivationStore(store_dir)
    assert not partial.complete and partial.n_rows == 2 * SHARD
    with pytest.raises(StoreError, match="incomplete.*16/40"):
        partial.load("label")
    with pytest.raises(StoreError, match="resume"):
        next(partial.iter_batches(["label"], 4))

    dataset.armed = False
    target = make_target()
    resumed = build(target, dataset, tmp_path, clip=toy_clip())
    assert target.module.calls == (N - 2 * SHARD) // BATCH  # only the missing rows were computed
    assert resumed.dir == store_dir and resumed.complete
    assert_same_contents(resumed, reference)
    assert shard_hashes(resumed) == shard_hashes(reference)  # bitwise identical shard files


def test_interruption_before_the_first_shard_starts_over(shapes_ds, reference, tmp_path):
    dataset = FailingDataset(shapes_ds, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        build(make_target(), dataset, tmp_path, clip=toy_clip())
    dataset.armed = False
    resumed = build(make_target(), dataset, tmp_path, clip=toy_clip())
    assert_same_contents(resumed, reference)


# ---------------------------------------------------------------- corruption and staleness


def flip_last_bytes(path, n: int = 4) -> None:
    data = bytearray(path.read_bytes())
    for i in range(1, n + 1):
        data[-i] ^= 0xFF  # the end of a shard is tensor data: it still parses, with wrong numbers
    path.write_bytes(bytes(data))


def test_corrupt_shard_is_detected_and_rewritten(shapes_ds, reference, tmp_path):
    store = build(make_target(), shapes_ds, tmp_path, clip=toy_clip())
    bad = store.dir / store.meta["shards"][2]["file"]
    flip_last_bytes(bad)

    with pytest.raises(StoreError, match="shard_00002.*corrupt"):
        ActivationStore(store.dir).verify()
    with pytest.raises(StoreError, match="corrupt"):  # never silently read
        ActivationStore(store.dir).load("clip_image")
    with pytest.raises(StoreError, match="corrupt"):
        list(ActivationStore(store.dir).iter_batches(["clip_image"], 4))

    target = make_target()
    with pytest.warns(UserWarning, match="shard_00002.*corrupt.*rewriting"):
        repaired = build(target, shapes_ds, tmp_path, clip=toy_clip())
    assert target.module.calls == (N - 2 * SHARD) // BATCH  # from the bad shard on
    repaired.verify()
    assert_same_contents(repaired, reference)
    assert shard_hashes(repaired) == shard_hashes(reference)


def test_missing_shard_is_detected_and_rewritten(shapes_ds, reference, tmp_path):
    store = build(make_target(), shapes_ds, tmp_path, clip=toy_clip())
    (store.dir / store.meta["shards"][4]["file"]).unlink()
    with pytest.raises(StoreError, match="missing"):
        store.verify()
    with pytest.warns(UserWarning, match="missing"):
        repaired = build(make_target(), shapes_ds, tmp_path, clip=toy_clip())
    assert_same_contents(repaired, reference)


def test_edited_metadata_raises_and_is_rebuilt(shapes_ds, reference, tmp_path):
    store = build(make_target(), shapes_ds, tmp_path, clip=toy_clip())
    meta_path = store.dir / METADATA
    meta = json.loads(meta_path.read_text())
    meta["spec"]["pooling"] = "max"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="edited"):
        ActivationStore(store.dir)

    target = make_target()
    with pytest.warns(UserWarning, match="rebuild"):
        rebuilt = build(target, shapes_ds, tmp_path, clip=toy_clip())
    assert target.module.calls == N // BATCH
    assert_same_contents(rebuilt, reference)


def test_garbled_metadata_raises_store_error(tmp_path):
    (tmp_path / METADATA).write_text("{not json")
    with pytest.raises(StoreError, match="metadata"):
        ActivationStore(tmp_path)
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore(tmp_path / "nowhere")


def test_other_schema_version_raises(reference, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reference.dir, copy)
    meta = json.loads((copy / METADATA).read_text())
    meta["schema"] = 999
    (copy / METADATA).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema"):
        ActivationStore(copy)


# ---------------------------------------------------------------- reading


def test_iter_batches_in_order_and_shuffled(reference):
    fields = ["acts/stage", "label"]
    plain = list(reference.iter_batches(fields, batch_size=3))
    assert torch.equal(torch.cat([b["acts/stage"] for b in plain]), reference.acts())
    assert all(len(b["label"]) <= 3 for b in plain)

    def rows(seed):
        batches = list(reference.iter_batches(fields, batch_size=3, shuffle=True, seed=seed))
        return torch.cat([b["acts/stage"] for b in batches]), torch.cat([b["label"] for b in batches])

    acts_a, labels_a = rows(7)
    acts_b, labels_b = rows(7)
    assert torch.equal(acts_a, acts_b) and torch.equal(labels_a, labels_b)  # seeded: deterministic
    acts_c, _ = rows(8)
    assert not torch.equal(acts_a, acts_c)
    assert not torch.equal(acts_a, reference.acts())  # really shuffled
    # Every row exactly once, with its label still attached.
    full = reference.acts()
    assert len({tuple(r.tolist()) for r in full}) == N  # rows are distinct, so matching is exact
    index = {tuple(r.tolist()): i for i, r in enumerate(full)}
    order = [index[tuple(r.tolist())] for r in acts_a]
    assert sorted(order) == list(range(N))
    assert torch.equal(labels_a, reference.load("label")[order])


def test_unknown_field_raises(reference):
    with pytest.raises(KeyError, match="acts/stem"):
        reference.load("acts/stem")


# ---------------------------------------------------------------- bounded memory


def test_writer_never_holds_more_than_one_shard(shapes_ds, tmp_path, monkeypatch):
    held = []
    original_append = StoreWriter.append

    def spy(self, rows):
        original_append(self, rows)
        held.append(sum(t.shape[0] for t in self._buffer.get("label", [])))

    monkeypatch.setattr(StoreWriter, "append", spy)
    store = build(make_target(), shapes_ds, tmp_path, batch_size=3, shard_size=SHARD)
    assert len(held) == -(-N // 3)
    assert max(held) < SHARD, f"writer held {max(held)} rows after an append (shard size {SHARD})"
    assert store.complete and [s["n"] for s in store.meta["shards"]] == [8, 8, 8, 8, 8]


def test_writer_with_batches_larger_than_a_shard(tmp_path):
    spec = store_mod.StoreSpec(model="m", layers=("l",), pooling="mean", dataset="d", n_items=25,
                               transform="t", clip=None, clip_transform=None)
    with StoreWriter(tmp_path, spec, shard_size=4) as writer:
        writer.append({"x": torch.arange(25.0)[:, None]})
        assert writer._buffered < 4
    store = ActivationStore(tmp_path)
    assert [s["n"] for s in store.meta["shards"]] == [4] * 6 + [1]
    assert torch.equal(store.load("x")[:, 0], torch.arange(25.0))
    with pytest.raises(ValueError, match="row counts"):
        StoreWriter(tmp_path / "other", spec, 4).append({"a": torch.zeros(2), "b": torch.zeros(3)})
