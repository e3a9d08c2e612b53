"""The method registry: one place that knows every method, its units and its inputs.

Selectors run on the planted store of tests/_synthetic.py (unit k fires for class k), so each
method's pick for each class is known.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _synthetic import planted_store
from miclip_nb import baselines as bl
from miclip_nb import methods
from miclip_nb.select import RandomSelector, ScoreSelector
from miclip_nb.units import UnitSpace


def _evidence(tmp_path, *, sae=False, **kwargs):
    store, text, planted = planted_store(tmp_path, n=1200, shard_size=500)
    target = SimpleNamespace(module=nn.Identity(), class_names=[f"c{i}" for i in range(text.shape[0])], name="planted")
    space = UnitSpace(target, "layer", SimpleNamespace(n_latents=32) if sae else None, 32)
    return methods.Evidence(space, store, text, **kwargs), planted


def test_every_method_declares_its_units_and_resolves_by_key_or_name():
    assert methods.keys()[:4] == ["miclip", "miclip_cosine", "image_only", "random"]
    assert set(methods.keys("sae")) == {"miclip", "miclip_cosine", "image_only", "random", "act_values", "clip_dissect",
                                        "ablation"}
    assert "netdissect" in methods.keys("neuron") and "netdissect" not in methods.keys("sae")
    assert methods.resolve(["Act-Values", "miclip", "RANDOM", "act_values"]) == ("act_values", "miclip", "random")
    assert methods.get("Captum-GxA").key == "captum_gxa" and methods.table_name("ablation") == "Ablation"
    assert methods.get("random").reference and methods.get("ablation").reference and not methods.get("miclip").reference


def test_unknown_methods_fail_listing_the_valid_ones():
    with pytest.raises(ValueError) as err:
        methods.resolve(["miclip", "lime"])
    assert "'lime'" in str(err.value) and all(k in str(err.value) for k in methods.keys())
    with pytest.raises(ValueError, match="at least one method"):
        methods.resolve([])
    with pytest.raises(ValueError, match=r"\['netdissect', 'captum_ig'\] do not work on sae units"):
        methods.resolve(["miclip", "netdissect", "captum_ig"], kind="sae")


def test_selectors_per_seed_and_draw_find_the_planted_units(tmp_path):
    ev, planted = _evidence(tmp_path, seeds=(0, 1), n_random=3, n_probe=600)
    unit_emb = torch.zeros(32, ev.class_emb_cd.shape[1])
    unit_emb[planted] = ev.class_emb_cd
    ev.miclip = lambda seed: (unit_emb, 0.07)
    sels = {k: methods.get(k).selectors(ev) for k in ("act_values", "random", "clip_dissect", "miclip")}
    assert [len(v) for v in sels.values()] == [2, 3, 2, 2]  # one per seed, n_random draws
    assert all(isinstance(s, ScoreSelector) for s in sels["act_values"] + sels["clip_dissect"] + sels["miclip"])
    assert all(isinstance(s, RandomSelector) for s in sels["random"])
    for c in range(6):
        assert int(sels["act_values"][0].select(c, 1)[0]) == int(planted[c])
        assert int(sels["miclip"][1].select(c, 1)[0]) == int(planted[c])
    # Baseline seeds differ by the probing-set draw: same planted units, different scores.
    assert not torch.equal(sels["act_values"][0].scores_cu, sels["act_values"][1].scores_cu)
    expected = bl.act_values_from_store(ev.store, "layer", 6, rows=bl.probe_rows(1200, 600, 1))
    torch.testing.assert_close(sels["act_values"][1].scores_cu, expected)


def test_miclip_ranks_by_posterior_and_miclip_cosine_by_cosine(tmp_path):
    """A unit pointing at what the class prompts share wins every class under cosine and none under
    the posterior, which picks each class's own unit."""
    ev, planted = _evidence(tmp_path)
    axes = torch.eye(8)
    ev.class_emb_cd = F.normalize(axes[7] + 0.6 * axes[:6], dim=-1)  # six class prompts sharing axis 7
    unit_emb = -axes[7].repeat(32, 1)
    unit_emb[planted] = axes[:6]
    generic = next(u for u in range(32) if u not in planted.tolist())
    unit_emb[generic] = axes[7]
    ev.miclip = lambda seed: (unit_emb, 0.05)
    posterior, cosine = methods.get("miclip").selectors(ev)[0], methods.get("miclip_cosine").selectors(ev)[0]
    for c in range(6):
        assert int(cosine.select(c, 1)[0]) == generic
        assert int(posterior.select(c, 1)[0]) == int(planted[c])


def test_a_method_says_what_it_lacks_and_which_units_it_refuses(tmp_path):
    ev, _ = _evidence(tmp_path)
    with pytest.raises(ValueError, match="MiClip needs Evidence.miclip"):
        methods.get("miclip").selectors(ev)
    with pytest.raises(ValueError, match="Image-only aligner needs Evidence.image_only"):
        methods.get("image_only").selectors(ev)
    with pytest.raises(ValueError, match="NetDissect needs Evidence.mask_probe"):
        methods.get("netdissect").selectors(ev)
    with pytest.raises(ValueError, match="Captum-IG needs Evidence.images"):
        methods.get("captum_ig").selectors(ev)
    sae_ev, _ = _evidence(tmp_path / "sae", sae=True)
    with pytest.raises(ValueError, match="NetDissect does not work on SAE features"):
        methods.get("netdissect").selectors(sae_ev)


def test_a_registered_method_joins_every_table(tmp_path):
    ev, planted = _evidence(tmp_path, seeds=(0,))
    oracle = methods.Method("oracle_test", "Oracle", frozenset({"neuron"}),
                            scores=lambda e, seed: F.one_hot(planted, 32).float())
    methods.register(oracle)
    try:
        assert methods.resolve(["Oracle"]) == ("oracle_test",)
        assert int(methods.get("oracle_test").selectors(ev)[0].select(2, 1)[0]) == int(planted[2])
    finally:
        methods._REGISTRY.pop("oracle_test")
    with pytest.raises(ValueError, match="exactly one of scores= and draws="):
        methods.Method("bad", "Bad", frozenset({"neuron"}))


def test_clip_dissect_reads_a_vit_layers_class_token():
    """CLIP-Dissect's own code reads a ViT layer's class token; on toy_vit neurons the registry's
    CLIP-Dissect must score exactly soft-WPMI over the class-token store, not the run's mean pooling."""
    from miclip_nb import pipeline

    cfg = pipeline.PipelineConfig(model="toy_vit", clip="toyclip", train_data="shapes:train:200", seeds=(0,),
                                  methods=("clip_dissect",), n_probe=None)
    prep = pipeline.prepare(cfg, progress=False)
    space, store = pipeline.unit_space(prep, progress=False)
    ev = pipeline.evidence(prep, space, store)
    cls_store = methods.clip_dissect_store(ev)
    assert cls_store.spec.pooling == "cls" and store.spec.pooling == "mean"
    scores = methods.get("clip_dissect").selectors(ev)[0].scores_cu
    torch.testing.assert_close(scores, bl.clip_dissect_from_store(cls_store, ev.class_emb_cd, "blocks.4"))
    assert not torch.allclose(scores, bl.clip_dissect_from_store(store, ev.class_emb_cd, "blocks.4"))
