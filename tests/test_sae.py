"""Top-k SAEs: the architecture's invariants, streaming training, checkpoints, SAE features as
units (code stores, steering); and the checks on the Shapes world (reconstruction, colour
grounding, removal). Heatmaps and IoU alone are tested in tests/test_grounding.py."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from miclip_nb import sae as sae_mod
from miclip_nb.capture import hooked_activations
from miclip_nb.sae import (SAECodes, SAEConfig, SAEMismatchError, TopKSAE, build_sae_code_store,
                           build_sae_code_store_from_model, drop_rare_units,
                           feature_frequency, fit_sae, infer_n_prefix, load_sae,
                           pool_codes, sae_edit, sae_edit_factory, save_sae, train_sae, vectors)
from miclip_nb.steer import class_deltas, edit_layer
from miclip_nb.store import ActivationStore, StoreSpec, StoreWriter, acts_field, build_store, derive_store, holdout
from _synthetic import random_sae

D = 16


def token_store(root: Path, *, n: int = 400, n_tokens: int = 17, dim: int = D, n_atoms: int = 48, active: int = 3,
                seed: int = 0, shard_size: int = 100, layout: str = "tokens", model: str = "synthetic",
                clip_dim: int = 8) -> ActivationStore:
    """A store of (n, n_tokens, dim) token activations (or (n, dim, 4, 4) maps with layout="maps"),
    each vector a sparse non-negative combination of ``active`` of ``n_atoms`` unit atoms plus an
    offset, with labels, predictions and fake CLIP embeddings."""
    gen = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(n_atoms, dim, generator=gen), dim=-1)
    n_vec = n * (16 if layout == "maps" else n_tokens)
    idx = torch.stack([torch.randperm(n_atoms, generator=gen)[:active] for _ in range(n_vec)])
    coef = torch.rand(n_vec, active, generator=gen) * 2 + 0.5
    x = (coef.unsqueeze(-1) * atoms[idx]).sum(1) + 0.01 * torch.randn(n_vec, dim, generator=gen) + 3.0
    acts = x.reshape(n, 4, 4, dim).permute(0, 3, 1, 2).contiguous() if layout == "maps" else x.reshape(n, n_tokens, dim)
    labels = torch.randint(3, (n,), generator=gen)
    clip = F.normalize(torch.randn(n, clip_dim, generator=gen), dim=-1)
    spec = StoreSpec(model=model, layers=("blk",), pooling="none", dataset=f"synthetic:{seed}:{layout}:{n}", n_items=n,
                     transform="none", clip="fake-clip", clip_transform="none")
    store_dir = root / spec.key
    with StoreWriter(store_dir, spec, shard_size) as writer:
        for start in range(0, n, 50):
            sl = slice(start, start + 50)
            writer.append({acts_field("blk"): acts[sl], "label": labels[sl], "pred": labels[sl], "clip_image": clip[sl]})
    return ActivationStore(store_dir)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    return token_store(tmp_path_factory.mktemp("sae_store"))


FAST = SAEConfig(expansion=4, k=4, epochs=3, batch_size=128, lr=3e-3, dead_steps=50)


@pytest.fixture(scope="module")
def trained(store):
    return train_sae(store, "blk", FAST, seed=0, progress=False)


# --------------------------------------------------------------------------------------------
# Architecture


def test_config_and_size_errors():
    for bad in ({"k": 0}, {"expansion": 0}, {"val_fraction": 0.0}, {"batch_size": 1}, {"aux_coef": -1.0}, {"aux_k": 0}):
        with pytest.raises(ValueError):
            SAEConfig(**bad)
    with pytest.raises(ValueError, match="larger than the number of latents"):
        TopKSAE(4, SAEConfig(expansion=2, k=9))
    sae = TopKSAE(4, SAEConfig(expansion=2, k=8))  # k == n_latents is allowed
    assert sae.n_latents == 8 and sae.aux_k == 2
    with pytest.raises(SAEMismatchError, match="size 4"):
        sae.encode(torch.randn(3, 5))
    with pytest.raises(SAEMismatchError, match="8 latents"):
        sae.decode(torch.randn(3, 7))


def test_exactly_k_latents_selected():
    sae = TopKSAE(D, SAEConfig(expansion=4, k=5))
    x = torch.randn(7, 9, D)
    codes = sae.encode(x)
    assert codes.shape == (7, 9, 4 * D)
    assert ((codes != 0).sum(-1) <= 5).all() and (codes >= 0).all()
    with torch.no_grad():  # all pre-activations positive: exactly k non-zeros, the k largest
        sae.b_enc.fill_(100.0)
    codes = sae.encode(x)
    assert ((codes != 0).sum(-1) == 5).all()
    pre = sae.pre_activations(x)
    assert torch.equal(codes != 0, torch.zeros_like(pre, dtype=torch.bool).scatter(-1, pre.topk(5).indices, True))
    feats = [0, 3, 17, 63]
    assert torch.allclose(sae.encode_features(x, feats, chunk=10), codes[..., feats])
    recon, codes2 = sae(x)
    assert torch.equal(codes2, codes) and recon.shape == x.shape


def test_decoder_grad_projection_and_renorm():
    sae = TopKSAE(D, SAEConfig(expansion=2, k=3))
    x = torch.randn(32, D)
    recon, _ = sae(x)
    (recon - x).pow(2).sum().backward()
    sae.remove_parallel_grad_()
    assert (sae.W_dec.grad * sae.W_dec).sum(0).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder_()
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(sae.n_latents), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Training


def test_training_reconstructs_and_keeps_invariants(trained, store):
    sae, metrics = trained
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(sae.n_latents), atol=1e-5)
    assert metrics["explained_variance"] > 0.65 and metrics["nmse"] < 0.35
    assert 0 < metrics["l0"] <= FAST.k
    assert 0.0 <= metrics["dead_fraction"] < 0.5
    for key in ("nmse", "explained_variance", "l0", "dead_fraction"):
        assert key in sae.meta["metrics"]
    assert sae.meta["model"] == store.spec.model and sae.meta["layer"] == "blk" and sae.meta["store"] == store.spec.key
    assert sae.meta["n_prefix"] == 1  # 17 tokens = CLS + 4 x 4
    assert metrics["history"]["train_nmse"][-1] < metrics["history"]["train_nmse"][0]


def test_same_seed_same_sae(store, trained):
    again, _ = train_sae(store, "blk", FAST, seed=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(trained[0].state_dict().values(), again.state_dict().values()))


def test_streaming_reads_one_shard_at_a_time(store, monkeypatch):
    """Training never loads the whole store: every read is one shard (100 images), and every
    encoder call sees at most one batch."""
    reads, calls = [], []

    def forbidden(*args, **kwargs):
        raise AssertionError("train_sae loaded a whole field")

    monkeypatch.setattr(ActivationStore, "load", forbidden)
    monkeypatch.setattr(ActivationStore, "acts", forbidden)
    real_read = ActivationStore.read_shard

    def spy_read(self, index, fields=None):  # every reader of the store goes through read_shard
        out = real_read(self, index, fields)
        reads.append(next(iter(out.values())).shape[0])
        return out

    real_pre = TopKSAE.pre_activations

    def spy_pre(self, x):
        calls.append(x.reshape(-1, x.shape[-1]).shape[0])
        return real_pre(self, x)

    monkeypatch.setattr(ActivationStore, "read_shard", spy_read)
    monkeypatch.setattr(TopKSAE, "pre_activations", spy_pre)
    cfg = SAEConfig(expansion=2, k=4, epochs=1, batch_size=64)
    train_sae(store, "blk", cfg, progress=False)
    assert len(reads) == 3 * 4 and max(reads) <= 100  # statistics, one epoch, evaluation: 4 shards each
    assert calls and max(calls[:-5]) <= 64


def test_held_out_images_are_the_stores_split_with_the_sae_salt(store, trained):
    """The SAE evaluates on the images store.holdout(salt 12345) holds out, and nothing else."""
    sae, metrics = trained
    rows = torch.arange(store.n_rows)
    held = holdout(rows, FAST.val_fraction, 0, sae_mod.SAE_SPLIT_SALT)
    assert metrics["n_vectors"] == int(held.sum()) * 17 and metrics["n_train_vectors"] == int((~held).sum()) * 17
    tokens = store.acts("blk")[held].reshape(-1, D)
    assert sae_mod.evaluate_sae(sae, [tokens])["nmse"] == pytest.approx(metrics["nmse"], rel=1e-6)


def test_dead_latents_are_revived_by_auxk(tmp_path):
    """An SAE whose latents are mostly dead (tiny encoder rows): without AuxK they stay dead;
    with it the dead share drops and the reconstruction improves."""
    store = token_store(tmp_path, n=300)
    x = store.acts("blk").reshape(-1, D)
    cfg = SAEConfig(expansion=8, k=4, epochs=1, batch_size=128, lr=3e-3, dead_steps=20)
    init = TopKSAE(D, cfg)
    dead = torch.arange(12, init.n_latents)
    with torch.no_grad():
        init.b_pre.copy_(x.mean(0))
        init.input_scale.fill_(float((x - x.mean(0)).pow(2).sum(-1).mean().div(D).sqrt()))
        init.W_enc[dead] *= 0.01
        init.b_enc[dead] = 0.01
    results = {}
    for coef in (0.0, 1 / 32):
        _, m = train_sae(store, "blk", SAEConfig(**{**cfg.__dict__, "aux_coef": coef}), progress=False, init=init)
        results[coef] = m
    assert results[0.0]["dead_fraction_train"] > 0.75
    assert results[1 / 32]["dead_fraction_train"] < results[0.0]["dead_fraction_train"] - 0.15
    assert results[1 / 32]["explained_variance"] > results[0.0]["explained_variance"]


def test_cnn_maps_train_channels_last(tmp_path):
    store = token_store(tmp_path, n=200, layout="maps")
    sae, metrics = train_sae(store, "blk", SAEConfig(expansion=2, k=4, epochs=2, batch_size=128, lr=3e-3), progress=False)
    assert sae.d_in == D and sae.meta["n_prefix"] == 0
    assert metrics["explained_variance"] > 0.5
    maps = store.acts("blk")[:2]
    assert torch.equal(vectors(maps)[1, 5], maps[1, :, 1, 1])  # location (1, 1) of a 4 x 4 map


def test_training_input_errors(tmp_path, store):
    with pytest.raises(ValueError, match="no layer"):
        train_sae(store, "nope", FAST, progress=False)
    with pytest.raises(ValueError, match="larger than the number of latents"):
        train_sae(store, "blk", SAEConfig(expansion=1, k=D + 1), progress=False)
    spec = StoreSpec(model="nan", layers=("blk",), pooling="none", dataset="nan", n_items=10, transform="none",
                     clip=None, clip_transform=None)
    with StoreWriter(tmp_path / spec.key, spec, 10) as writer:
        acts = torch.randn(10, 5, D)
        acts[3, 2, 1] = float("nan")
        writer.append({acts_field("blk"): acts})
    with pytest.raises(ValueError, match="NaN"):
        train_sae(ActivationStore(tmp_path / spec.key), "blk", FAST, progress=False)


def test_infer_n_prefix():
    assert [infer_n_prefix(t) for t in (65, 197, 201, 64, 50)] == [1, 1, 5, 0, 1]


# --------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip_and_provenance(trained, tmp_path, store):
    sae, _ = trained
    path = tmp_path / "ckpt" / "sae"
    save_sae(sae, path)
    loaded = load_sae(path, model=store.spec.model, layer="blk")
    x = torch.randn(5, D) + 3
    assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded.decode(sae.encode(x)), sae.decode(sae.encode(x)))
    assert loaded.config == sae.config and loaded.meta["store"] == store.spec.key and loaded.fingerprint == sae.fingerprint
    with pytest.raises(SAEMismatchError, match="model"):
        load_sae(path, model="another model")
    with pytest.raises(SAEMismatchError, match="layer"):
        load_sae(path, layer="blocks.3")
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["schema_version"] = 99
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="schema"):
        load_sae(path)
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "missing")


def test_fit_sae_caches_by_inputs(store, monkeypatch):
    cfg = SAEConfig(expansion=2, k=4, epochs=1, batch_size=128)
    first, metrics = fit_sae(store, "blk", cfg, progress=False)
    monkeypatch.setattr(sae_mod, "train_sae", lambda *a, **k: pytest.fail("retrained despite the cache"))
    again, cached_metrics = fit_sae(store, "blk", cfg, progress=False)
    assert again.fingerprint == first.fingerprint
    assert cached_metrics["explained_variance"] == pytest.approx(metrics["explained_variance"])
    with pytest.raises(pytest.fail.Exception):
        fit_sae(store, "blk", cfg, seed=1, progress=False)


# --------------------------------------------------------------------------------------------
# SAE features as units


def test_code_store_pools_codes_and_feeds_alignment(trained, store, tmp_path):
    from miclip_nb.align import AlignConfig, train_encoder
    from miclip_nb.interpret import unit_embeddings

    from miclip_nb.interpret import UnitProvenance

    sae, _ = trained
    codes_store = build_sae_code_store(store, sae, "blk", root=tmp_path, progress=False)
    name = acts_field("blk")  # the real layer; the spec's unit transform tells codes from neurons
    assert codes_store.fields[name] == [sae.n_latents] and codes_store.layers == ("blk",)
    assert set(codes_store.fields) == {name, "label", "pred", "clip_image"}
    assert codes_store.spec.unit_transform == f"sae={sae.fingerprint}|n_prefix=1"
    assert codes_store.spec.model == store.spec.model and codes_store.spec.pooling == "mean"
    acts = store.acts("blk")[:7]
    expected = sae.encode(acts)[:, 1:].mean(1)  # CLS excluded
    assert torch.allclose(codes_store.load(name)[:7], expected, atol=1e-5)
    assert torch.equal(codes_store.load("clip_image"), store.load("clip_image"))
    again = build_sae_code_store(store, sae, "blk", root=tmp_path, progress=False)
    assert again.dir == codes_store.dir and again.meta["shards"] == codes_store.meta["shards"]
    maxed = build_sae_code_store(store, sae, "blk", pooling="max", root=tmp_path, progress=False)
    assert maxed.dir != codes_store.dir
    assert torch.allclose(maxed.load(name)[:7], sae.encode(acts)[:, 1:].amax(1), atol=1e-5)
    other = TopKSAE(D, FAST, meta=dict(sae.meta))
    other.load_state_dict(sae.state_dict())
    with torch.no_grad():
        other.b_enc.add_(0.1)
    assert build_sae_code_store(store, other, "blk", root=tmp_path, progress=False).dir != codes_store.dir
    text = F.normalize(torch.randn(3, 8), dim=-1)
    with warnings.catch_warnings():  # latents that never fire are constant units: align warns
        warnings.simplefilter("ignore", UserWarning)
        encoder, _ = train_encoder(codes_store, text, config=AlignConfig(epochs=2, batch_size=64), progress=False)
    assert unit_embeddings(encoder).shape == (sae.n_latents, 8)
    assert encoder.meta["layer"] == "blk" and sae.fingerprint in encoder.meta["model"]
    assert UnitProvenance.from_encoder_meta(encoder.meta) == UnitProvenance(store.spec.model, "blk", "mean", "SAE feature",
                                                                           sae.fingerprint)


@pytest.fixture(scope="module")
def vit_tokens(tmp_path_factory):
    """A random ViT (64 px, patch 16: CLS + 16 tokens), its token store of 24 Shapes images, an SAE on it."""
    from miclip_nb.embed import FunctionBackend
    from miclip_nb.shapes import SHAPES, ShapesDataset
    from miclip_nb.shapes.toy_models import toy_preprocess
    from miclip_nb.zoo import load_target

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=6, img_size=64, patch_size=16, depth=2)
    target = load_target(vit, preprocess=toy_preprocess, class_names=list(SHAPES))
    proj = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    clip = FunctionBackend(image_fn=lambda x: x.mean((2, 3)) @ proj, text_fn=lambda t: torch.randn(len(t), 8),
                           preprocess=toy_preprocess, embed_dim=8, fingerprint="toyproj")
    dataset = ShapesDataset("train", 24)
    root = tmp_path_factory.mktemp("vit_tokens")
    tokens = build_store(target, dataset, ["blocks.1"], pooling="none", clip=clip, root=root, shard_size=10,
                         progress=False)
    sae = random_sae(192)
    sae.meta.update(model=tokens.spec.model, layer="blocks.1")
    return target, clip, dataset, tokens, sae


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_code_store_from_model_matches_the_token_route(vit_tokens, tmp_path, pooling):
    """Encoding straight from the model gives the same store (key and values) as capturing tokens
    first, without writing the tokens; the old entry points are these calls."""
    target, clip, dataset, tokens, sae = vit_tokens
    via_tokens = derive_store(tokens, SAECodes(sae), pooling=pooling, root=tmp_path / "codes", progress=False)
    direct = build_store(target, dataset, ["blocks.1"], pooling=pooling, clip=clip, transform=SAECodes(sae),
                         root=tmp_path / "codes2", batch_size=7, progress=False)
    assert direct.spec == via_tokens.spec and direct.dir.name == via_tokens.dir.name
    name = acts_field("blocks.1")
    codes = sae.encode(tokens.acts("blocks.1"))[:, 1:]  # CLS excluded
    expected = codes.mean(1) if pooling == "mean" else codes.amax(1)
    assert torch.allclose(via_tokens.load(name), expected, atol=1e-6)
    assert torch.allclose(direct.load(name), via_tokens.load(name), atol=1e-6)
    for field in ("pred", "label", "clip_image", "index"):
        assert torch.equal(direct.load(field), via_tokens.load(field)), field
        assert torch.equal(via_tokens.load(field), tokens.load(field)), field
    # the wrappers with the old signatures give the very same stores
    old_tokens = build_sae_code_store(tokens, sae, "blocks.1", pooling=pooling, root=tmp_path / "codes", progress=False)
    old_direct = build_sae_code_store_from_model(target, dataset, "blocks.1", sae, clip=clip, pooling=pooling,
                                                 root=tmp_path / "codes2", batch_size=7, progress=False)
    assert old_tokens.dir == via_tokens.dir and old_direct.dir == direct.dir
    assert old_tokens.meta["shards"] == via_tokens.meta["shards"]  # reused, not rewritten
    with pytest.raises(SAEMismatchError, match="layer"):
        build_sae_code_store_from_model(target, dataset, "blocks.0", sae, root=tmp_path, progress=False)
    with pytest.raises(SAEMismatchError, match="layer"):
        build_store(target, dataset, ["blocks.0"], transform=SAECodes(sae), root=tmp_path, progress=False)


def test_sae_codes_keep_the_callers_sae_and_the_layout():
    sae = random_sae(D)
    before = [(p.device, p.data_ptr()) for p in sae.parameters()]
    codes = SAECodes(sae)
    tokens, maps = torch.randn(2, 5, D), torch.randn(2, D, 3, 3)
    assert torch.equal(codes(tokens), sae.encode(tokens))
    assert torch.equal(codes(maps), sae.encode(vectors(maps)).reshape(2, 3, 3, -1).permute(0, 3, 1, 2))
    assert codes(torch.randn(4, D)).shape == (4, sae.n_latents)
    assert codes(tokens.to("meta")).device.type == "meta"  # another device: a copy of the SAE runs there
    assert [(p.device, p.data_ptr()) for p in sae.parameters()] == before
    assert codes.fingerprint == f"sae={sae.fingerprint}"
    with pytest.raises(SAEMismatchError, match="size"):
        codes(torch.randn(2, 5, D + 1))


def test_the_old_name_argument_is_ignored_with_a_warning(trained, store, tmp_path):
    with pytest.warns(DeprecationWarning, match="acts/blk"):
        codes = build_sae_code_store(store, trained[0], "blk", name="blk:sae", root=tmp_path, progress=False)
    assert codes.layers == ("blk",)


def test_feature_frequency_and_rare_units(trained, store, tmp_path):
    sae, _ = trained
    codes_store = build_sae_code_store(store, sae, "blk", root=tmp_path, progress=False)
    freq = feature_frequency(codes_store)
    codes = codes_store.acts()
    assert torch.allclose(freq, (codes > 0).float().mean(0))
    emb = F.normalize(torch.randn(sae.n_latents, 8), dim=-1)
    kept = drop_rare_units(emb, freq, min_freq=0.2)
    assert torch.equal(kept[freq >= 0.2], emb[freq >= 0.2]) and (kept[freq < 0.2] == 0).all()
    with pytest.raises(ValueError):
        drop_rare_units(emb, freq[:-1])


def test_code_store_refuses_a_foreign_sae(trained, tmp_path):
    other_store = token_store(tmp_path, n=100, model="another model")
    with pytest.raises(SAEMismatchError, match="model"):
        build_sae_code_store(other_store, trained[0], "blk", root=tmp_path, progress=False)
    with pytest.raises(ValueError, match="pooling"):
        build_sae_code_store(other_store, trained[0], "blk", pooling="cls", root=tmp_path, progress=False)
    wide = token_store(tmp_path, n=100, dim=D + 2, model=trained[0].meta["model"])
    with pytest.raises(SAEMismatchError, match="size"):
        build_sae_code_store(wide, trained[0], "blk", root=tmp_path, progress=False)
    assert torch.equal(pool_codes(torch.ones(2, 5, 3), "max", 1), torch.ones(2, 3))


# --------------------------------------------------------------------------------------------
# Steering


@pytest.mark.parametrize("model_name, layer, shape", [("tiny_vit", "blocks.0", (2, 3, 32, 32)),
                                                       ("tiny_cnn", "layer3", (2, 3, 64, 64))])
def test_beta_one_leaves_the_model_unchanged(model_name, layer, shape, request):
    model = request.getfixturevalue(model_name)
    x = torch.randn(*shape)
    with hooked_activations(model, layer, "none") as acts:
        ref = model(x)
    width = acts[layer].shape[-1] if acts[layer].ndim == 3 else acts[layer].shape[1]
    sae = random_sae(width)
    factory = sae_edit_factory(sae)
    for mode, beta in (("scale", 1.0), ("shift", 0.0)):
        with edit_layer(model, layer, factory([0, 3, 5], mode, beta)):
            assert torch.allclose(model(x), ref, atol=1e-6)
    with torch.no_grad():
        busiest = sae.encode(vectors(acts[layer])).sum((0, 1)).topk(10).indices
    with edit_layer(model, layer, factory(busiest, "scale", 0.0)):
        assert (model(x) - ref).abs().max() > 1e-5
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("layout", ["tokens", "maps"])
def test_scale_and_shift_semantics(layout):
    sae = random_sae(D)
    acts = torch.randn(3, 17, D) if layout == "tokens" else torch.randn(3, D, 4, 4)
    x = vectors(acts) if layout == "maps" else acts  # channels last
    units = [2, 7]
    codes = sae.encode(x)
    col = sae.W_dec[:, units] * sae.input_scale  # (D, 2)
    for mode, beta in (("scale", 0.0), ("scale", 2.5), ("shift", 1.5)):
        out = sae_edit(sae, units, mode, beta)(acts)
        assert out.shape == acts.shape
        out_x = vectors(out) if layout == "maps" else out
        if mode == "scale":
            expected_delta = (codes[..., units] * (beta - 1)) @ col.T
        else:
            expected_delta = torch.full_like(codes[..., units], beta) @ col.T
        assert torch.allclose(out_x - x, expected_delta, atol=1e-5)
        # the same as decode(edited codes) + reconstruction error
        edited = codes.clone()
        edited[..., units] = codes[..., units] * beta if mode == "scale" else codes[..., units] + beta
        assert torch.allclose(out_x, sae.decode(edited) + (x - sae.decode(codes)), atol=1e-4)
    with pytest.raises(ValueError, match="mode"):
        sae_edit(sae, units, "add", 1.0)
    with pytest.raises(ValueError, match="no SAE features"):
        sae_edit(sae, [], "scale", 0.0)
    with pytest.raises(IndexError):
        sae_edit(sae, [sae.n_latents], "scale", 0.0)
    with pytest.raises(SAEMismatchError):
        sae_edit(sae, units, "scale", 0.0)(torch.randn(2, 5, D + 1))


def test_class_deltas_accepts_sae_features():
    """A model whose logits read SAE feature c for class c: removing feature c kills class c."""

    class Net(torch.nn.Module):
        def __init__(self, sae):
            super().__init__()
            self.features = torch.nn.Identity()
            self.sae = sae

        def forward(self, x):  # classes 0-2 read features 0-2; class 3 wins when they are silent
            codes = self.sae.encode(self.features(x))[..., :3]
            return torch.cat([codes, torch.full_like(codes[..., :1], 0.01)], -1)

    sae = random_sae(D)
    net = Net(sae).eval()
    with torch.no_grad():
        sae.b_enc.zero_()
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    x = (sae.W_dec[:, labels].T * 4 * sae.input_scale + sae.b_pre + 0.05 * torch.randn(60, D, generator=gen)).detach()
    df = class_deltas(net, x, labels, "features", {c: torch.tensor([c]) for c in range(3)}, beta=0.0,
                      edit_factory=sae_edit_factory(sae))
    assert (df["acc_base"] > 90).all() and (df["delta_acc"] < -80).all()


# --------------------------------------------------------------------------------------------
# The Shapes world: SAE features of the toy models, aligned with ToyCLIP
#
# Measured (CPU, `pytest -m slow -s tests/test_sae.py -k notebook`), toy_vit blocks.4, SAE trained on
# 1500 shapes:train images (expansion 8, k 16, 5 epochs), codes max-pooled, aligned on the same
# images with the default AlignConfig (unit_dropout 0.95), 200-300 shapes:test images:
# - held-out explained variance 0.926-0.928, L0 16.0, dead latents 15-17% (SAE seeds 0-3);
# - colour IoU (heatmap above its 80th percentile vs the object mask; chance 0.053): the top
#   feature alone 0.13-0.15 on average over seeds but from 0.04 to 0.24 for one seed (single
#   features fire on one or two tokens of an object, and the top-1 choice among features of
#   similar cosine is unstable); the cosine-weighted top-5 set 0.22-0.27 (4.2-5.1x chance), every
#   seed and dropout setting above 3.9x;
# - removing each class's top-5 features: -4.5 to -6.6 points with unit_dropout 0.95, against
#   -0.4 to -0.9 for 5 random features that fire (10%+ of images); unit_dropout 0.5: -0.7 to -2.3,
#   0.0: -1.1 to -3.5. Dropout 0.95 changes grounding little (top-5 set 0.248 vs 0.249 at 0.0).


def shapes_sae_world(model: str, n_train: int, config: SAEConfig, *, n_align: int | None = None, pooling: str = "max",
                     min_freq: float = 0.1, seed: int = 0):
    """Capture token/map activations of a toy model on ``n_train`` training images, train an SAE,
    align its pooled codes (on ``n_align`` images, encoded straight from the model when more than
    ``n_train``) with ToyCLIP, and embed the features; returns everything the checks need."""
    from types import SimpleNamespace

    from miclip_nb.align import train_encoder
    from miclip_nb.embed import load_clip
    from miclip_nb.interpret import unit_embeddings
    from miclip_nb.pipeline import class_prompts_embedding
    from miclip_nb.shapes import ShapesDataset
    from miclip_nb.shapes.plugin import TOY_LAYERS
    from miclip_nb.zoo import load_target

    target, backend = load_target(model), load_clip("toyclip")
    layer = TOY_LAYERS[model]
    store = build_store(target, ShapesDataset("train", n_train), [layer], pooling="none", clip=backend, progress=False)
    sae, metrics = train_sae(store, layer, config, seed=seed, progress=False)
    if n_align is None or n_align == n_train:
        codes_store = derive_store(store, SAECodes(sae), pooling=pooling, progress=False)
    else:
        codes_store = build_store(target, ShapesDataset("train", n_align), [layer], pooling=pooling, clip=backend,
                                  transform=SAECodes(sae), progress=False)
    class_emb = class_prompts_embedding(backend, target.class_names)
    with warnings.catch_warnings():  # never-firing features are constant units
        warnings.simplefilter("ignore", UserWarning)
        encoder, history = train_encoder(codes_store, class_emb, progress=False)
    freq = feature_frequency(codes_store)
    unit_emb = drop_rare_units(unit_embeddings(encoder), freq, min_freq)
    return SimpleNamespace(target=target, backend=backend, layer=layer, sae=sae, metrics=metrics, unit_emb=unit_emb,
                           class_emb=class_emb, firing=freq >= min_freq, temperature=history["temperature"]["concept"])


def colour_grounding(world, n_images: int):
    """IoU with each colour's object masks of the top feature localized for the colour, and of its
    cosine-weighted top-5 set (grounding.sae_concept_grounding)."""
    from miclip_nb.grounding import sae_concept_grounding
    from miclip_nb.interpret import encode_concepts
    from miclip_nb.shapes import COLORS, ShapesDataset

    return sae_concept_grounding(world.target, world.layer, world.sae, world.unit_emb,
                                 encode_concepts(world.backend, list(COLORS)), list(COLORS),
                                 ShapesDataset("test", n_images), tau=5, n_images=n_images)


def removal_vs_random(world, n_images: int, n_random: int, beta: float = 0.0):
    """Class-averaged delta-accuracy of editing each class's top-5 MiClip features, and of 5
    random features among those that fire on 10%+ of the images (one value per draw; a dead
    latent would change nothing), on shapes:test images."""
    from miclip_nb.datasets import load_images
    from miclip_nb.select import MiClipSelector, ScoreSelector, selection
    from miclip_nb.shapes import ShapesDataset

    images, labels = load_images(ShapesDataset("test", n_images), world.target.preprocess)
    classes = sorted(set(labels.tolist()))
    factory = sae_edit_factory(world.sae)

    def delta(selector):
        df = class_deltas(world.target.module, images, labels, world.layer, selection(selector, classes, 5), beta=beta,
                          edit_factory=factory, n_other=0)
        return float(df["delta_acc"].mean())

    def random_firing(seed):
        scores = torch.rand(len(world.class_emb), world.sae.n_latents, generator=torch.Generator().manual_seed(seed))
        return ScoreSelector("random", scores.masked_fill(~world.firing, -1.0))

    return (delta(MiClipSelector(world.unit_emb, world.class_emb, temperature=world.temperature)),
            [delta(random_firing(seed)) for seed in range(n_random)])


def _report(world, grounding):
    m = world.metrics
    print(f"SAE: nmse {m['nmse']:.3f} ev {m['explained_variance']:.3f} l0 {m['l0']:.1f} dead {m['dead_fraction']:.3f}")
    print(grounding.round(3).to_string())
    print(f"mean colour IoU: top feature {grounding.iou_feature.mean():.3f}, top-5 set {grounding.iou_set.mean():.3f}, "
          f"chance {grounding.chance_iou.mean():.3f}")


@pytest.fixture(scope="module")
def vit_world_small():
    return shapes_sae_world("toy_vit", 800, SAEConfig(expansion=4, k=16, epochs=3), min_freq=0.1)


def test_shapes_vit_sae_fast(vit_world_small):
    """The fast version of the Shapes-world checks (800 images, 512 features): reconstruction,
    colour grounding of the top-5 sets above chance, removal below random. The notebook's
    configuration is checked by the slow tests."""
    world = vit_world_small
    assert world.metrics["explained_variance"] > 0.8
    grounding = colour_grounding(world, n_images=150)
    _report(world, grounding)
    assert grounding["iou_set"].mean() > 2.0 * grounding["chance_iou"].mean()
    miclip, random = removal_vs_random(world, n_images=150, n_random=2)
    print(f"removal: MiClip {miclip:.2f}, random {np.mean(random):.2f}")
    assert miclip < np.mean(random)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_shapes_vit_sae_notebook_config(seed):
    """The issue's checks at notebook 02's configuration (toy_vit blocks.4, 1500 training images,
    expansion 8, k = 16, 5 epochs): explained variance >= 0.9; the features localized for each
    colour overlap its masks (top-5 set, mean over colours, >= 2.5x chance; measured 4.2-5.1x; the
    top feature alone is reported, not asserted: 0.8x-4.4x chance across SAE seeds);
    removing each class's top-5 features (MiClip's posterior ranking) costs more than 5 random firing
    ones (3 draws) by 2 points (measured: 4.6 and 8.6 points more for SAE seeds 0 and 1; ranked by
    plain cosine, 3.0 and 7.6). About 40 s of CPU per seed."""
    world = shapes_sae_world("toy_vit", 1500, SAEConfig(expansion=8, k=16, epochs=5), seed=seed)
    grounding = colour_grounding(world, n_images=300)
    _report(world, grounding)
    assert world.metrics["explained_variance"] >= 0.9
    assert grounding["iou_set"].mean() >= 2.5 * grounding["chance_iou"].mean()
    assert (grounding["iou_set"] >= 2.0 * grounding["chance_iou"]).all()  # every colour (measured >= 3.3x)
    miclip, random = removal_vs_random(world, n_images=300, n_random=3)
    print(f"removal: MiClip {miclip:.2f}, random {np.mean(random):.2f} +- {np.std(random):.2f}")
    assert miclip < np.mean(random) - 2.0


@pytest.mark.slow
def test_shapes_cnn_sae_full():
    """The toy CNN (stages.2, 8 x 8 maps, channels last): reconstruction and removal as for the
    ViT. Colour grounding is reported, not asserted. Measured (seed 0): explained variance 0.911,
    L0 24; colour IoU of the top feature 0.032 (chance 0.053: not grounded), of the top-5 set
    0.156 (2.9x chance); removal -1.6 points against 0.0 for random firing features. (With 1500
    images for both SAE and alignment: EV 0.870, top feature 0.120, top-5 set 0.207.) About 7 min
    on a busy 2-core CPU."""
    world = shapes_sae_world("toy_cnn", 3000, SAEConfig(expansion=8, k=24, epochs=5), n_align=12000, min_freq=0.1)
    _report(world, colour_grounding(world, n_images=300))
    assert world.metrics["explained_variance"] >= 0.9
    miclip, random = removal_vs_random(world, n_images=600, n_random=5)
    print(f"removal: MiClip {miclip:.2f}, random {np.mean(random):.2f} +- {np.std(random):.2f}")
    assert miclip < np.mean(random) - 1.0
