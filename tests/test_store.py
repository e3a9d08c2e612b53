"""The activation store: keyed by content, resumable, corruption-proof, bounded memory."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torchvision import transforms as T

from miclip_nb import store as store_mod
from miclip_nb.datasets import as_dataset
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
    assert reference.fields == {"acts/stage": [12], "label": [], "pred": [], "clip_image": [16], "index": []}
    assert torch.equal(reference.load("index"), torch.arange(N))  # row i is dataset item i
    assert reference.meta["on_error"] == "raise" and reference.skipped == []
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
    with pytest.raises(ValueError, match=r"item 0 of the list of 3 int is an int, not an image"):
        store_spec(target, list(range(3)), ["stage"], "mean")  # names the user's object, not an internal class


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


# ---------------------------------------------------------------- a shard changed under an open reader


def copy_store(store: ActivationStore, tmp_path) -> ActivationStore:
    import shutil

    return ActivationStore(shutil.copytree(store.dir, tmp_path / store.dir.name))


def corrupt_shard(store: ActivationStore, index: int = 2):
    path = store.dir / store.meta["shards"][index]["file"]
    size = path.stat().st_size
    flip_last_bytes(path)
    assert path.stat().st_size == size  # in place, same size: only the content changed
    return path


def read_with(how: str, store: ActivationStore):
    from miclip_nb.align import AlignConfig, train_encoder
    from miclip_nb.sae import SAEConfig, train_sae

    if how == "iter_shards":
        return list(store.iter_shards())
    if how == "iter_batches":
        return list(store.iter_batches(["acts/stage", "label"], 4, shuffle=True))
    if how == "load":
        return store.load("acts/stage")
    if how == "read_shard":
        return [store.read_shard(i) for i in range(len(store.meta["shards"]))]
    if how == "train_encoder":
        text = torch.nn.functional.normalize(torch.randn(len(SHAPES), 16), dim=-1)
        return train_encoder(store, text, config=AlignConfig(epochs=1, batch_size=8), progress=False)
    return train_sae(store, "stage", SAEConfig(expansion=2, k=2, epochs=1, batch_size=8), progress=False)


READERS = ["iter_shards", "iter_batches", "load", "read_shard", "train_encoder", "train_sae"]


@pytest.mark.parametrize("how", READERS)
def test_shard_corrupted_under_an_open_reader_is_never_used(reference, tmp_path, how):
    store = copy_store(reference, tmp_path)
    read_with(how, store)  # reads (and verifies) every shard
    corrupt_shard(store)
    with pytest.raises(StoreError, match="shard_00002.*corrupt"):
        read_with(how, store)  # the same reader object


@pytest.mark.parametrize("how", ["train_encoder", "train_sae"])
def test_training_reads_every_shard_through_the_checksum(reference, tmp_path, monkeypatch, how):
    """The shard is corrupted after the statistics pass verified it, before the training passes."""
    store = copy_store(reference, tmp_path)
    real_iter = ActivationStore.iter_shards

    def then_corrupt(self, fields=None, **kwargs):
        try:
            yield from real_iter(self, fields, **kwargs)
        finally:  # the pass is over (or its loop was left)
            corrupt_shard(store)

    monkeypatch.setattr(ActivationStore, "iter_shards", then_corrupt)
    with pytest.raises(StoreError, match="shard_00002.*corrupt"):
        read_with(how, store)


def test_verified_shard_is_hashed_again_only_once_it_changed(reference, tmp_path, monkeypatch):
    import os

    store = copy_store(reference, tmp_path)
    hashed = []
    real_sha = store_mod.sha256_file
    monkeypatch.setattr(store_mod, "sha256_file", lambda p: hashed.append(p.name) or real_sha(p))
    n_shards = len(store.meta["shards"])

    # Files changed within the last seconds may change again without a new timestamp: re-hashed.
    monkeypatch.setattr(store_mod, "_RACY_WINDOW_NS", 10**18)
    store.load("label")
    store.load("label")
    assert len(hashed) == 2 * n_shards

    # Older files are trusted while their size, times and inode stay the same.
    monkeypatch.setattr(store_mod, "_RACY_WINDOW_NS", -1)
    hour_ago = os.stat(store.dir).st_mtime_ns - 3600 * 10**9
    for shard in store.meta["shards"]:
        os.utime(store.dir / shard["file"], ns=(hour_ago, hour_ago))
    fresh = ActivationStore(store.dir)
    hashed.clear()
    fresh.load("label")
    fresh.load("label")
    list(fresh.iter_batches(["label"], 4))
    assert len(hashed) == n_shards  # each file hashed once
    corrupt_shard(fresh)
    hashed.clear()
    with pytest.raises(StoreError, match="shard_00002.*corrupt"):
        fresh.load("label")
    assert hashed == ["shard_00002.safetensors"]  # the changed file only


def test_row_offsets_and_batches_with_rows(reference):
    assert reference.row_offsets == [0, 8, 16, 24, 32]
    acts = reference.acts()
    batches = list(reference.iter_batches(["acts/stage"], 3, shuffle=True, seed=1, with_rows=True))
    rows = torch.cat([b["_row"] for b in batches])
    assert sorted(rows.tolist()) == list(range(N))
    for b in batches:  # each row's index points at its own activations
        assert torch.equal(b["acts/stage"], acts[b["_row"]])
    assert torch.equal(reference.read_shard(3, ["label"])["label"], reference.load("label")[24:32])
    with pytest.raises(KeyError, match="nope"):
        reference.read_shard(0, ["nope"])


# ---------------------------------------------------------------- unreadable images


CLASSES = ["a", "b", "c"]
BAD = 4  # the 5th file of the folder is not an image


def png_folder(root):
    """9 small PNGs in 3 class folders; file 4 (b/img4.png) holds garbage bytes."""
    import numpy as np
    from PIL import Image

    files = []
    for i in range(9):
        path = root / CLASSES[i // 3] / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i == BAD:
            path.write_bytes(b"\x89PNG but not really" * 5)
        else:
            pixels = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
        files.append(path)
    return files


def tiny_target():
    """A small convnet wrapped as a TargetModel, with a forward counter."""
    from miclip_nb.zoo import load_target

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(4, 3))
    module.calls = 0
    module.register_forward_hook(lambda mod, inp, out: setattr(mod, "calls", mod.calls + 1))
    return load_target(module, preprocess=T.ToTensor(), class_names=CLASSES)


def capture(target, dataset, root, **kw):
    return build_store(target, dataset, "1", root=root, batch_size=2, shard_size=3, progress=False, **kw)


def test_unreadable_image_raises_or_is_skipped_and_deleting_it_reuses_the_store(tmp_path):
    from miclip_nb.datasets import UnreadableImageError, open_dataset

    files = png_folder(tmp_path / "photos")
    stores = tmp_path / "stores"
    dataset = open_dataset(tmp_path / "photos")
    assert len(dataset) == 9 and dataset.files[BAD] == files[BAD]

    # (a) by default the build stops at the unreadable file, naming it
    with pytest.raises(UnreadableImageError, match="img4.png"):
        capture(tiny_target(), dataset, stores)
    with pytest.raises(ValueError, match="on_error"):
        capture(tiny_target(), dataset, stores, on_error="ignore")

    # (b) on_error="skip": 8 rows, a warning and the metadata name the file, "index" skips it
    target = tiny_target()
    with pytest.warns(UserWarning, match="img4.png.*left out"):
        store = capture(target, dataset, stores, on_error="skip")
    assert store.complete and store.n_rows == 8
    meta = json.loads((store.dir / METADATA).read_text())
    assert meta["on_error"] == "skip"
    assert meta["skipped"] == [{"index": BAD, "file": str(files[BAD])}]
    kept = [i for i in range(9) if i != BAD]
    assert store.load("index").tolist() == kept and store.load("index").dtype == torch.int64
    assert store.load("label").tolist() == [dataset.labels[i] for i in kept]
    x = torch.stack([T.ToTensor()(dataset[i][0]) for i in kept])
    with torch.no_grad():
        expected = target.module[1](target.module[0](x)).mean((2, 3))
    assert torch.allclose(store.acts("1"), expected, atol=1e-6)
    # Reusing it where the unreadable image must raise names the file instead of hiding it.
    with pytest.raises(UnreadableImageError, match="img4.png.*on_error='skip'"):
        capture(tiny_target(), dataset, stores)

    # (c) the bad file deleted and the folder listed again: same rows, no forward pass
    files[BAD].unlink()
    fresh = open_dataset(tmp_path / "photos")
    for on_error in ("skip", "raise"):
        again_target = tiny_target()
        again = capture(again_target, fresh, stores, on_error=on_error)
        assert again_target.module.calls == 0
        assert again.dir != store.dir and again.complete and again.skipped == []
        for field in ("acts/1", "label", "pred"):
            assert torch.equal(again.load(field), store.load(field)), field
        assert again.load("index").tolist() == list(range(8))  # indices of the new listing
        assert shard_hashes(again) == shard_hashes(store)
    assert sorted(p.name for p in stores.iterdir()) == sorted([store.dir.name, again.dir.name])


def test_interrupted_skipping_build_resumes_with_the_same_rows(tmp_path):
    from miclip_nb.datasets import open_dataset

    png_folder(tmp_path / "photos")
    dataset = open_dataset(tmp_path / "photos")
    kw = {"batch_size": 1, "shard_size": 2, "progress": False, "on_error": "skip"}
    with pytest.warns(UserWarning, match="img4.png"):
        whole = build_store(tiny_target(), dataset, "1", root=tmp_path / "whole", **kw)

    failing = FailingDataset(dataset, fail_at=7)  # shards [0,1] [2,3] [5,6] written, image 4 skipped
    with pytest.warns(UserWarning, match="img4.png"), pytest.raises(KeyboardInterrupt):
        build_store(tiny_target(), failing, "1", root=tmp_path / "resumed", **kw)
    failing.armed = False
    target = tiny_target()
    resumed = build_store(target, failing, "1", root=tmp_path / "resumed", **kw)
    assert target.module.calls == 2  # images 7 and 8 only
    assert resumed.skipped == [{"index": BAD, "file": None}]  # this wrapper has no .files
    assert_same_contents(resumed, whole)

    # A corrupt shard after the skipped image: the resume starts before it and skips it again.
    flip_last_bytes(resumed.dir / "shard_00002.safetensors")
    target = tiny_target()
    with pytest.warns(UserWarning, match="img4.png"), pytest.warns(UserWarning, match="shard_00002.*rewriting"):
        repaired = build_store(target, failing, "1", root=tmp_path / "resumed", **kw)
    assert target.module.calls == 4  # images 5 to 8 (4 is unreadable again)
    assert_same_contents(repaired, whole)
    assert shard_hashes(repaired) == shard_hashes(whole)


def test_a_folder_of_only_unreadable_images_raises(tmp_path):
    from miclip_nb.datasets import UnreadableImageError, open_dataset

    for name in ("a/x.png", "b/y.png"):
        (tmp_path / name).parent.mkdir(parents=True)
        (tmp_path / name).write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(UnreadableImageError, match="none of the 2 images"):
        capture(tiny_target(), open_dataset(tmp_path), tmp_path / "stores", on_error="skip")


# ---------------------------------------------------------------- anything a user has, as a dataset


def shapes_pixels(n: int = 12):
    """(n, 64, 64, 3) uint8 Shapes images, as a user would hold them in memory."""
    import numpy as np

    ds = ShapesDataset("test", n)
    return np.stack([np.asarray(ds[i][0]) for i in range(n)])


def test_an_array_and_the_same_images_as_pil_give_the_same_activations(tmp_path):
    import numpy as np
    from PIL import Image


    pixels = shapes_pixels()
    target = make_target()
    from_array = build(target, pixels, tmp_path, clip=toy_clip())
    from_pil = build(make_target(), [Image.fromarray(p) for p in pixels], tmp_path, clip=toy_clip())
    from_chw = build(make_target(), torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), tmp_path, clip=toy_clip())
    for store in (from_pil, from_chw):
        for field in ("acts/stage", "pred", "clip_image", "label"):
            assert torch.equal(store.load(field), from_array.load(field)), field
    assert from_array.load("label").tolist() == [-1] * 12  # no labels given: unknown
    # What the model computes on those images, preprocessed by the target.
    x = torch.stack([to_tensor(Image.fromarray(p)) for p in pixels])
    with torch.no_grad():
        assert torch.allclose(from_array.acts(), target.module.stage(target.module.stem(x)).mean((2, 3)), atol=1e-6)
    with_labels = build(make_target(), as_dataset(pixels, labels=np.arange(12) % 6), tmp_path)
    assert with_labels.load("label").tolist() == (np.arange(12) % 6).tolist()
    assert with_labels.dir != from_array.dir


def test_different_arrays_never_share_a_store_key():
    import numpy as np

    pixels = shapes_pixels(6)
    target = make_target()
    key = lambda data: store_spec(target, data, ["stage"], "mean").key  # noqa: E731
    other = pixels.copy()
    other[3, 10, 10, 0] ^= 1  # one value of one pixel
    assert key(pixels) == key(pixels.copy())  # content, not identity
    assert len({key(pixels), key(other), key(pixels[:5]), key(pixels[::-1].copy()),
                key(as_dataset(pixels, labels=np.zeros(6, dtype=int)))}) == 5
    fingerprint = as_dataset(pixels).fingerprint
    assert " at 0x" not in fingerprint and "array" in fingerprint


class PlainImages(torch.utils.data.Dataset):
    """A torch Dataset without a fingerprint, yielding (PIL image, label), counting its reads."""

    def __init__(self, n: int = 8):
        self.inner, self.reads = ShapesDataset("test", n), 0

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.reads += 1
        return self.inner[i]


def test_a_torch_dataset_without_fingerprint_is_hashed_by_content(tmp_path):
    plain = PlainImages()
    store = build(make_target(), plain, tmp_path)
    assert plain.reads == 2 * len(plain)  # once for the fingerprint, once for the capture
    assert store.load("label").tolist() == [plain.inner[i][1] for i in range(len(plain))]
    assert store.spec.dataset.startswith("content:PlainImages:8:") and " at 0x" not in store.spec.dataset
    # the same content in a new object gets the same store; a given fingerprint skips the hashing pass
    again = build(make_target(), PlainImages(), tmp_path)
    assert again.dir == store.dir
    named = PlainImages()
    mine = build(make_target(), as_dataset(named, fingerprint="my-images-v1"), tmp_path)
    assert named.reads == len(named) and mine.spec.dataset == "my-images-v1"


def test_preprocessed_tensors_go_to_the_model_as_they_are(tmp_path):
    from PIL import Image

    pixels = shapes_pixels(8)
    x = torch.stack([to_tensor(Image.fromarray(p)) for p in pixels]) * 0.5 + 0.1  # not what target.preprocess gives
    target = make_target()
    store = build(target, x, tmp_path)
    with torch.no_grad():
        assert torch.allclose(store.acts(), target.module.stage(target.module.stem(x)).mean((2, 3)), atol=1e-6)
        assert torch.equal(store.load("pred"), target.module(x).argmax(1))
    with pytest.raises(ValueError, match=r"(?s)preprocessed.*CLIP.*Pass the images as PIL images.*or build the store with clip=None"):
        build(make_target(), x, tmp_path / "clip", clip=toy_clip())
    assert not (tmp_path / "clip").exists()  # refused before any work


@pytest.mark.parametrize("bad, match", [
    ({"a": 1}, r"cannot use the dict object as a dataset"),
    (torch.zeros(2, 3, 4, 4, 4), r"cannot use the tensor of shape \(2, 3, 4, 4, 4\)"),
    (torch.rand(4, 8, 8, 3), r"float image|channels last"),
    ([1.5, 2.5], r"item 0 of the list of 2 float is a float, not an image"),
])
def test_unusable_data_raise_naming_the_object_not_internal_classes(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match) as err:
        build(make_target(), bad, tmp_path)
    assert "PairedTransform" not in str(err.value) and "_Items" not in str(err.value)


def test_a_flat_folder_of_unlabelled_photos_gives_the_models_predictions(tmp_path):
    from PIL import Image

    pixels = shapes_pixels(10)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"photo_{i:02d}.png")
    target = make_target()
    store = build(target, tmp_path, tmp_path / "stores", clip=toy_clip())  # the folder's path, as is
    assert store.complete and store.load("label").tolist() == [-1] * 10
    x = torch.stack([to_tensor(Image.fromarray(p)) for p in pixels])
    with torch.no_grad():
        assert torch.equal(store.load("pred"), target.module(x).argmax(1))
    assert store.spec.dataset.startswith("unlabelled:")


# ---------------------------------------------------------------- the caller's module stays where it is


def test_build_store_never_moves_or_switches_the_callers_module(shapes_ds, tmp_path):
    target = make_target()
    target.module.train()  # whatever mode the caller left it in
    before = {name: (p.device, p.data_ptr()) for name, p in target.module.named_parameters()}
    store = build(target, shapes_ds, tmp_path, device="cpu")
    assert {name: (p.device, p.data_ptr()) for name, p in target.module.named_parameters()} == before
    assert target.module.training and all(m.training for m in target.module.modules())
    assert target.module.calls == N // BATCH  # the caller's own module ran (it was already on the CPU)
    ref = make_target()
    x = torch.stack([to_tensor(shapes_ds[i][0]) for i in range(N)])
    with torch.no_grad():
        assert torch.equal(store.load("pred"), ref.module(x).argmax(1))  # captured in eval mode


def test_module_on_another_device_is_a_copy():
    module = CountingCNN()
    ptrs = [p.data_ptr() for p in module.parameters()]
    same, copied = store_mod.module_on_device(module, "cpu")
    assert same is module and not copied
    other, copied = store_mod.module_on_device(module, "meta")
    assert copied and other is not module and all(p.device.type == "meta" for p in other.parameters())
    assert [p.data_ptr() for p in module.parameters()] == ptrs
    assert all(p.device.type == "cpu" for p in module.parameters())


def test_build_store_runs_a_copy_when_the_module_is_elsewhere(shapes_ds, reference, tmp_path, monkeypatch):
    """A module not on the requested device (simulated: every device counts as another) is
    copied there; the copy runs, the caller's module is neither run nor moved."""
    monkeypatch.setattr(store_mod, "_same_device", lambda a, b: False)
    target = make_target()
    before = [(p.device, p.data_ptr()) for p in target.module.parameters()]
    store = build(target, shapes_ds, tmp_path, device="cpu", clip=toy_clip())
    assert target.module.calls == 0 and [(p.device, p.data_ptr()) for p in target.module.parameters()] == before
    assert_same_contents(store, reference)


# ---------------------------------------------------------------- the held-out split


def test_holdout_is_the_readers_hash_and_splits_partition_the_rows(reference):
    rows = torch.arange(100000)
    for salt in (0, 12345):
        expected = (rows * 2654435761 + 3 * 97531 + salt) % 4294967296 < int(0.1 * 4294967296)
        assert torch.equal(store_mod.holdout(rows, 0.1, 3, salt), expected)
    assert abs(float(store_mod.holdout(rows, 0.1, 3).float().mean()) - 0.1) < 0.01
    kw = {"val_fraction": 0.25, "split_seed": 1, "salt": 7}
    all_rows = torch.cat([b["_row"] for b in reference.iter_batches(["label"], 5, shuffle=True, seed=2, with_rows=True)])
    val = torch.cat([b["_row"] for b in reference.iter_batches(["label"], 5, shuffle=True, seed=2, with_rows=True,
                                                               split="val", **kw)])
    train = torch.cat([b["_row"] for b in reference.iter_batches(["label"], 5, shuffle=True, seed=2, with_rows=True,
                                                                 split="train", **kw)])
    held = store_mod.holdout(all_rows, 0.25, 1, 7)
    assert torch.equal(val, all_rows[held]) and torch.equal(train, all_rows[~held])  # same order, each row once
    shards = list(reference.iter_shards(["label"], split="val", with_rows=True, **kw))
    assert torch.equal(torch.cat([s["_row"] for s in shards]), torch.arange(N)[store_mod.holdout(torch.arange(N), 0.25, 1, 7)])
    assert reference.split_sizes("val", 0.25, 1, 7) == [len(s["label"]) for s in shards]
    with pytest.raises(ValueError, match="split"):
        next(reference.iter_shards(["label"], split="test"))


# ---------------------------------------------------------------- unit transforms and derived stores


class Squared:
    """A toy unit transform: the square of every activation, in the layer's layout."""

    fingerprint = "squared-v1"

    def __init__(self):
        self.calls = 0

    def __call__(self, acts):
        self.calls += 1
        return acts * acts


@pytest.fixture(scope="module")
def raw_store(shapes_ds, tmp_path_factory):
    """The stage's raw maps (pooling="none") of the Shapes images, with CLIP."""
    return build(make_target(), shapes_ds, tmp_path_factory.mktemp("raw"), layers=["stage"], pooling="none",
                 clip=toy_clip())


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_a_transformed_store_is_the_same_from_the_model_and_from_the_raw_store(raw_store, shapes_ds, tmp_path, pooling):
    target = make_target()
    direct = build(target, shapes_ds, tmp_path, layers=["stage"], pooling=pooling, clip=toy_clip(), transform=Squared())
    derived = store_mod.derive_store(raw_store, Squared(), pooling=pooling, root=tmp_path, progress=False)
    assert derived.dir == direct.dir and derived.spec == direct.spec  # one folder: the second call reuses it
    assert direct.spec.unit_transform == "squared-v1|n_prefix=0" and direct.layers == ("stage",)
    assert direct.fields["acts/stage"] == [12]
    maps = raw_store.acts("stage")
    expected = (maps * maps).flatten(2).mean(2) if pooling == "mean" else (maps * maps).flatten(2).amax(2)
    assert torch.allclose(direct.acts("stage"), expected, atol=1e-6)
    fresh = store_mod.derive_store(raw_store, Squared(), pooling=pooling, root=tmp_path / "fresh", progress=False)
    assert torch.allclose(fresh.acts("stage"), expected, atol=1e-6)
    for field in ("label", "pred", "clip_image", "index"):
        assert torch.equal(fresh.load(field), raw_store.load(field)), field
    plain = build(make_target(), shapes_ds, tmp_path, layers=["stage"], pooling=pooling, clip=toy_clip())
    assert plain.dir != direct.dir and plain.spec.unit_transform is None


def test_derive_store_reads_one_shard_at_a_time_and_resumes(raw_store, tmp_path, monkeypatch):
    reads = []
    real = ActivationStore.read_shard

    def spy(self, index, fields=None):
        out = real(self, index, fields)
        reads.append(next(iter(out.values())).shape[0])
        return out

    monkeypatch.setattr(ActivationStore, "read_shard", spy)
    whole = store_mod.derive_store(raw_store, Squared(), pooling="max", root=tmp_path / "whole", batch_size=3,
                                   progress=False)
    assert max(reads[: len(raw_store.meta["shards"])]) <= SHARD

    class Interrupting(Squared):
        def __call__(self, acts):
            if self.calls == 8:  # one probe, then shards 0-1 (3 batches each), then 1 of shard 2
                raise KeyboardInterrupt("interrupted")
            return super().__call__(acts)

    with pytest.raises(KeyboardInterrupt):
        store_mod.derive_store(raw_store, Interrupting(), pooling="max", root=tmp_path / "resumed", batch_size=3,
                               progress=False)
    (partial_dir,) = (tmp_path / "resumed").iterdir()
    assert ActivationStore(partial_dir).n_rows == 2 * SHARD
    again = Squared()
    resumed = store_mod.derive_store(raw_store, again, pooling="max", root=tmp_path / "resumed", batch_size=3,
                                     progress=False)
    assert again.calls == 1 + 3 * 3  # the probe and the three missing shards
    assert_same_contents(resumed, whole)
    reused = Squared()
    store_mod.derive_store(raw_store, reused, pooling="max", root=tmp_path / "resumed", progress=False)
    assert reused.calls == 1  # the probe only


def test_derive_store_keeps_the_skipped_list(tmp_path):
    from miclip_nb.datasets import open_dataset

    png_folder(tmp_path / "photos")
    with pytest.warns(UserWarning, match="img4.png"):
        tokens = build_store(tiny_target(), open_dataset(tmp_path / "photos"), "1", pooling="none", root=tmp_path / "s",
                             batch_size=2, shard_size=3, progress=False, on_error="skip")
    derived = store_mod.derive_store(tokens, Squared(), root=tmp_path / "d", progress=False)
    assert derived.skipped == tokens.skipped and derived.meta["on_error"] == "skip" and derived.complete
    assert derived.load("index").tolist() == tokens.load("index").tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    assert torch.equal(derived.load("label"), tokens.load("label"))


def test_derive_store_and_transforms_refuse_what_they_cannot_use(reference, raw_store, tmp_path):
    with pytest.raises(ValueError, match="pooling='none'"):
        store_mod.derive_store(reference, Squared(), root=tmp_path)  # a pooled store
    with pytest.raises(ValueError, match="no layer 'stem'"):
        store_mod.derive_store(raw_store, Squared(), layers=["stem"], root=tmp_path)
    with pytest.raises(TypeError, match="unit transform.*fingerprint"):
        store_mod.derive_store(raw_store, lambda acts: acts, root=tmp_path)
    with pytest.raises(TypeError, match="unit transform"):
        build(make_target(), ShapesDataset("test", 4), tmp_path, transform=torch.relu)

    class Refusing(Squared):
        def check_source(self, model, layer):
            raise ValueError(f"not trained on {layer}")

    with pytest.raises(ValueError, match="not trained on stage"):
        store_mod.derive_store(raw_store, Refusing(), root=tmp_path)
    with pytest.raises(ValueError, match="not trained on stage"):
        build(make_target(), ShapesDataset("test", 4), tmp_path, transform=Refusing())
    assert not any(tmp_path.iterdir())
