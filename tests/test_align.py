"""The neuron encoder: it recovers planted units, is reproducible, checkpoints, and refuses bad input."""

import pytest
import torch

from miclip_nb.align import AlignConfig, EncoderMismatchError, load_encoder, save_encoder, train_encoder
from miclip_nb.interpret import localize, unit_embeddings

from _synthetic import planted_store

FAST = AlignConfig(epochs=15, batch_size=128, patience=5)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_store(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def trained(planted):
    store, text, _ = planted
    return train_encoder(store, text, config=FAST, seed=0, progress=False)


def test_localize_recovers_planted_units(planted, trained):
    _, text, planted_units = planted
    encoder, history = trained
    emb = unit_embeddings(encoder)
    for c in range(text.shape[0]):
        units, _ = localize(emb, text[c], tau=1)
        assert int(units[0]) == int(planted_units[c])
    assert history["val_loss"][history["best_epoch"]] < history["val_loss"][0]


def test_mlp_encoder_also_recovers_planted_units(planted):
    store, text, planted_units = planted
    encoder, _ = train_encoder(store, text, config=AlignConfig(kind="mlp", hidden=64, epochs=15, batch_size=128), seed=0, progress=False)
    emb = unit_embeddings(encoder, value="typical")
    hits = sum(int(localize(emb, text[c], tau=1)[0][0]) == int(planted_units[c]) for c in range(text.shape[0]))
    assert hits >= text.shape[0] - 1


def test_same_seed_same_encoder(planted, trained):
    store, text, _ = planted
    again, _ = train_encoder(store, text, config=FAST, seed=0, progress=False)
    for (k, a), b in zip(trained[0].state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_round_trip_and_provenance(planted, trained, tmp_path):
    store, _, _ = planted
    encoder, _ = trained
    save_encoder(encoder, tmp_path / "enc")
    loaded = load_encoder(tmp_path / "enc")
    x = store.acts("layer")[:10]
    assert torch.equal(encoder(x), loaded(x))
    loaded.check_compatible(model=store.spec.model, layer="layer", pooling="mean")
    with pytest.raises(EncoderMismatchError, match="layer"):
        loaded.check_compatible(model=store.spec.model, layer="blocks.3")
    with pytest.raises(EncoderMismatchError, match="model"):
        loaded.check_compatible(model="another-model")
    with pytest.raises(EncoderMismatchError, match="32 units"):
        loaded(torch.zeros(2, 31))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no encoder checkpoint"):
        load_encoder(tmp_path / "nothing")


def test_nan_activations_rejected_naming_the_rows(tmp_path):
    store, text, _ = planted_store(tmp_path, n=600, nan=True)
    with pytest.raises(ValueError, match="NaN") as err:
        train_encoder(store, text, config=FAST, progress=False)
    message = str(err.value)
    assert "1 of 600 rows" in message and "rows [5]" in message
    assert str(store.dir) in message
    assert "images" in message and "preprocessing" in message


def test_nan_rows_reported_across_shards_with_dataset_indices(tmp_path):
    """Seven bad rows in three shards: the first five and the count, mapped past a skipped image."""
    from miclip_nb.store import ActivationStore, StoreSpec, StoreWriter, acts_field

    n, bad = 300, [3, 7, 150, 151, 152, 250, 299]
    acts = torch.randn(n, 8)
    acts[bad, 1] = float("inf")
    acts[bad[-1], 0] = float("nan")
    spec = StoreSpec(model="m", layers=("layer",), pooling="mean", dataset="d", n_items=n + 1, transform="t",
                     clip="c", clip_transform="t")
    with StoreWriter(tmp_path, spec, shard_size=100) as writer:
        writer.meta["skipped"] = []  # as build_store writes it: the store has dataset indices
        writer.skip(10, "photos/img10.png")
        writer.append({acts_field("layer"): acts, "clip_image": torch.randn(n, 4),
                       "pred": torch.zeros(n, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"7 of 300 rows, first rows \[3, 7, 150, 151, 152\] "
                                         r"\(dataset indices \[3, 7, 151, 152, 153\]\)"):
        train_encoder(ActivationStore(tmp_path), torch.randn(2, 4), config=FAST, progress=False)


def test_constant_unit_gets_zero_embedding_and_is_never_localized(tmp_path):
    store, text, planted_units = planted_store(tmp_path, n=1500, constant_unit=31)
    assert 31 not in planted_units.tolist()
    with pytest.warns(UserWarning, match="constant units"):
        encoder, _ = train_encoder(store, text, config=FAST, progress=False)
    emb = unit_embeddings(encoder)
    assert encoder.constant_units.tolist() == [31]
    assert torch.count_nonzero(emb[31]) == 0
    for c in range(text.shape[0]):
        assert 31 not in localize(emb, text[c], tau=5)[0].tolist()


def test_wrong_text_size_rejected(planted):
    store, text, _ = planted
    with pytest.raises(ValueError, match=r"\(C, 16\)"):
        train_encoder(store, text[:, :8], config=FAST, progress=False)
    with pytest.raises(ValueError, match="no layer"):
        train_encoder(store, text, layer="other", config=FAST, progress=False)


def test_config_checks():
    with pytest.raises(ValueError):
        AlignConfig(val_fraction=0.7)
    with pytest.raises(ValueError):
        AlignConfig(concept_weight=0, image_weight=0)


def test_unknown_labels_change_nothing_and_the_split_is_the_stores(planted, trained, tmp_path):
    """Alignment reads the predictions, never the labels: the same store with every label -1
    (photos without labels) gives the very same encoder. Its held-out rows are store.holdout's
    (salt 0)."""
    from miclip_nb.align import ALIGN_SPLIT_SALT
    from miclip_nb.store import ActivationStore, StoreWriter, holdout

    store, text, _ = planted
    spec = store.spec.__class__(**{**store.spec.__dict__, "dataset": "planted-unlabelled"})
    with StoreWriter(tmp_path / spec.key, spec, shard_size=1000) as writer:
        for shard in store.iter_shards(["acts/layer", "clip_image", "label", "pred"]):
            writer.append({**shard, "label": torch.full_like(shard["label"], -1)})
    unlabelled = ActivationStore(tmp_path / spec.key)
    assert unlabelled.load("label").unique().tolist() == [-1]
    again, history = train_encoder(unlabelled, text, config=FAST, seed=0, progress=False)
    for (k, a), b in zip(trained[0].state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    held = holdout(torch.arange(store.n_rows), FAST.val_fraction, 0, ALIGN_SPLIT_SALT)
    assert history["n_val"] == int(held.sum()) and history["n_train"] == int((~held).sum())
