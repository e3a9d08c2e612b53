"""Localize and describe: top-k contracts, vocabularies and their errors."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from miclip_nb.align import EncoderConfig, NeuronEncoder
from miclip_nb.embed import validate_concepts
from miclip_nb.interpret import (DEFAULT_TEMPERATURE, SCORINGS, concept_set, concept_temperature, concept_unit_scores,
                                 describe, localize, top_k, unit_embeddings)
from miclip_nb.plugins import UnknownNameError


def _linear_encoder(n_units=8, dim=4, bias=True):
    enc = NeuronEncoder(EncoderConfig(n_units, dim))
    torch.manual_seed(0)
    with torch.no_grad():
        enc.net.weight.copy_(torch.randn(dim, n_units))
        enc.net.bias.copy_(torch.randn(dim) * 10 if bias else torch.zeros(dim))
    return enc


def test_unit_embedding_ignores_bias_and_matches_weight_columns():
    enc = _linear_encoder()
    emb = unit_embeddings(enc)
    expected = F.normalize(enc.net.weight.T, dim=-1)
    assert torch.allclose(emb, expected, atol=1e-6)
    # Typical-value embeddings of a linear encoder point the same way when the value is positive.
    enc.act_mean.fill_(1.0)
    assert torch.allclose(unit_embeddings(enc, value="typical"), expected, atol=1e-6)
    with pytest.raises(ValueError, match="value"):
        unit_embeddings(enc, value="max")


def test_localize_and_describe_rank_by_cosine():
    unit_emb = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    units, scores = localize(unit_emb, torch.tensor([2.0, 0.0]), tau=2)
    assert units.tolist() == [0, 1]
    assert scores[0] == pytest.approx(1.0)
    bank = F.normalize(torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]), dim=-1)
    top = describe(unit_emb, 3, bank, ["up", "right", "diagonal"], tau=3)
    assert [c for c, _ in top] == ["up", "diagonal", "right"]
    assert top[-1][1] == pytest.approx(-1.0)


def _shared_direction_world():
    """Three concepts that share most of their direction (axis 3), as related prompts do in CLIP
    space; unit 0 points at what they share, unit 1 mostly at concept 0's own axis."""
    concepts = F.normalize(torch.eye(4)[:3] * 0.5 + torch.eye(4)[3], dim=-1)
    units = F.normalize(torch.stack([torch.eye(4)[3], torch.eye(4)[0] + 0.1 * torch.eye(4)[3],
                                     torch.eye(4)[1] + 0.1 * torch.eye(4)[3], torch.zeros(4)]), dim=-1)
    return units, concepts


def test_posterior_picks_the_unit_that_singles_out_the_concept():
    units, concepts = _shared_direction_world()
    cos_units, cos_scores = localize(units, concepts[0], tau=2)
    assert cos_units.tolist()[0] == 0 and cos_scores[0] > 0.85  # plain cosine prefers the shared direction
    post_units, post_scores = localize(units, concepts[0], tau=2, reference_kd=concepts)
    assert post_units.tolist()[0] == 1
    scores = concept_unit_scores(units, concepts, temperature=0.1)  # the reference defaults to the concepts themselves
    assert scores.shape == (3, 4)
    # A log-probability over the 3 concepts: unit 0 is equally close to all of them (uniform), unit 1 favours concept 0.
    assert torch.allclose(scores[:, :3].exp().sum(0), torch.ones(3), atol=1e-5)
    assert torch.allclose(scores[:, 0], torch.full((3,), -math.log(3)), atol=1e-5)
    assert torch.isneginf(scores[:, 3]).all()  # a zero (constant or dropped) unit is never localized
    assert scores[0].argmax() == 1 and scores[1].argmax() == 2
    # A sharper temperature separates more, and the ranking of units follows the formula.
    expected = (concepts @ units.T) / 0.1 - torch.logsumexp((concepts @ units.T) / 0.1, 0)
    assert torch.allclose(scores[:, :3], expected[:, :3], atol=1e-5)
    # The shift is per unit: descriptions rank as under cosine.
    torch.manual_seed(0)
    u, c = F.normalize(torch.randn(20, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    assert torch.equal(concept_unit_scores(u, c).argsort(0), concept_unit_scores(u, c, "cosine").argsort(0))


def test_concept_temperature_reads_the_training_history():
    enc = _linear_encoder()
    assert concept_temperature(enc) == DEFAULT_TEMPERATURE
    enc.meta["history"] = {"temperature": {"concept": 0.05, "image": 0.02}}
    assert concept_temperature(enc) == 0.05


def test_scoring_errors():
    units, concepts = _shared_direction_world()
    assert SCORINGS == ("posterior", "cosine")
    with pytest.raises(ValueError, match="scoring must be"):
        concept_unit_scores(units, concepts, "dot")
    with pytest.raises(ValueError, match="at least 2"):
        concept_unit_scores(units, concepts[:1])
    with pytest.raises(ValueError, match="at least 2"):
        localize(units, concepts[0], tau=1, reference_kd=concepts[:1])
    with pytest.raises(ValueError, match="temperature"):
        concept_unit_scores(units, concepts, temperature=0.0)
    with pytest.raises(ValueError, match=r"\(U, D\)"):
        concept_unit_scores(units, torch.ones(3, 5))


def test_tau_and_index_errors():
    emb = torch.eye(3)
    with pytest.raises(ValueError, match="larger than the number of units"):
        localize(emb, torch.ones(3), tau=4)
    with pytest.raises(ValueError, match="positive"):
        top_k(torch.ones(3), 0, "units")
    with pytest.raises(IndexError):
        describe(emb, 3, emb, ["a", "b", "c"])
    with pytest.raises(ValueError, match="concept names"):
        describe(emb, 0, emb, ["a", "b"])


def test_concept_vocabularies():
    assert len(concept_set("shapes")) == 16
    imagenet = concept_set("imagenet")
    assert len(imagenet) > 990 and len({c.lower() for c in imagenet}) == len(imagenet)
    words = concept_set("words")
    assert len(words) == 20000 and "red" in words
    assert concept_set(["red", " star "]) == ["red", "star"]
    with pytest.raises(UnknownNameError, match="no concept set named 'colours'.*registered: .*shapes"):
        concept_set("colours")


def test_concept_list_errors():
    with pytest.raises(ValueError, match="empty"):
        validate_concepts([])
    with pytest.raises(ValueError, match="empty concept"):
        validate_concepts(["red", "  "])
    with pytest.raises(ValueError, match="duplicates"):
        validate_concepts(["Red", "red"])
    with pytest.raises(ValueError, match="not one string"):
        validate_concepts("red")


# --------------------------------------------------------------------------------------------
# Unit embeddings carry what they were made for


def test_unit_embeddings_carry_their_provenance_and_behave_as_tensors(tmp_path):
    from miclip_nb.interpret import UnitEmbeddings, UnitProvenance

    enc = _linear_encoder()
    enc.meta.update({"model": "toy_cnn:abc|weights=123", "layer": "stages.2", "pooling": "mean"})
    emb = unit_embeddings(enc)
    assert isinstance(emb, UnitEmbeddings)
    assert emb.provenance == UnitProvenance("toy_cnn:abc|weights=123", "stages.2", "mean", "neuron", None)
    # A subset or a product is no longer "the embeddings of this layer's units": plain tensors.
    for derived in (emb[[0, 2]], emb @ torch.ones(4), F.normalize(emb, dim=-1), emb * 2, emb.T):
        assert type(derived) is torch.Tensor
    assert torch.equal(emb[[0, 2]], emb.as_subclass(torch.Tensor)[[0, 2]])
    # Same units, maybe elsewhere: provenance kept, also through an in-place edit (sae.drop_rare_units).
    for same in (emb.clone(), emb.detach(), emb.to(torch.float64), emb.cpu(), emb.float(), emb.double(), copy.deepcopy(emb)):
        assert isinstance(same, UnitEmbeddings) and same.provenance == emb.provenance
    edited = emb.clone()
    edited[torch.tensor([True] + [False] * 7)] = 0.0
    assert isinstance(edited, UnitEmbeddings) and edited[0].abs().sum() == 0 and edited.provenance == emb.provenance
    # The library's functions take them as they are.
    units, _ = localize(emb, emb[3], tau=1)
    assert units.tolist() == [3]
    # torch.save / torch.load (default weights_only=True) keep values and provenance.
    torch.save({"emb": emb}, tmp_path / "emb.pt")
    loaded = torch.load(tmp_path / "emb.pt")["emb"]
    assert isinstance(loaded, UnitEmbeddings) and loaded.provenance == emb.provenance and torch.equal(loaded, emb)
    with pytest.raises(ValueError, match="unit_kind"):
        UnitProvenance(unit_kind="channel")


def test_sae_feature_embeddings_name_the_model_layer_and_sae():
    """An encoder of SAE codes holds the code store's composite model string (sae.sae_store_spec)."""
    from miclip_nb.interpret import UnitProvenance
    from miclip_nb.sae import sae_store_spec
    from miclip_nb.store import StoreSpec
    from _synthetic import random_sae

    sae = random_sae(8)
    source = StoreSpec(model="toy_vit:abc|weights=123", layers=("blocks.4",), pooling="none", dataset="shapes:train:10",
                       n_items=10, transform="t", clip="c", clip_transform="ct")
    spec = sae_store_spec(source, sae, "blocks.4", "max", "blocks.4:sae", 1)
    provenance = UnitProvenance.from_encoder_meta({"model": spec.model, "layer": "blocks.4:sae", "pooling": "max"})
    assert provenance == UnitProvenance("toy_vit:abc|weights=123", "blocks.4", "max", "SAE feature", sae.fingerprint)
    assert UnitProvenance.from_encoder_meta({}) == UnitProvenance()  # a hand-made encoder: nothing known


def test_check_unit_embeddings_names_both_sides():
    from miclip_nb.interpret import UnitEmbeddings, UnitProvenance, check_unit_embeddings

    plain = torch.eye(4)
    check_unit_embeddings(plain, n_units=4, model="m", layer="stages.1")  # a plain tensor: only its width is known
    with pytest.raises(ValueError, match=r"4 rows, but there are 6 neurons at layer 'stages.1'"):
        check_unit_embeddings(plain, n_units=6, layer="stages.1", unit_kind="neuron")
    with pytest.raises(ValueError, match=r"\(U, D\)"):
        check_unit_embeddings(torch.ones(4), n_units=4)
    emb = UnitEmbeddings(plain, UnitProvenance("m", "stages.2", "mean"))
    check_unit_embeddings(emb, n_units=4, model="m", layer="stages.2", unit_kind="neuron", sae=None)
    with pytest.raises(ValueError, match=r"made for layer='stages.2', but are used for layer='stages.1'"):
        check_unit_embeddings(emb, n_units=4, model="m", layer="stages.1")
    with pytest.raises(ValueError, match=r"made for model='m', unit_kind='neuron', but are used for model='other', "
                                         r"unit_kind='SAE feature'"):
        check_unit_embeddings(emb, model="other", layer="stages.2", unit_kind="SAE feature")
    unknown = UnitEmbeddings(plain, UnitProvenance())  # fields the encoder did not record are not checked
    check_unit_embeddings(unknown, model="other", layer="stages.1")


def test_localization_table_puts_both_rankings_side_by_side():
    from miclip_nb.interpret import localization_table

    units = F.normalize(torch.randn(20, 6, generator=torch.Generator().manual_seed(0)), dim=-1)
    concepts = F.normalize(torch.randn(3, 6, generator=torch.Generator().manual_seed(1)), dim=-1)
    table = localization_table(units, concepts, ["a", "b", "c"], temperature=0.1, tau=4)
    assert table.shape == (4, 6) and list(table.index) == [1, 2, 3, 4]
    for i, name in enumerate("abc"):
        assert table[(name, "cosine")].tolist() == localize(units, concepts[i], tau=4)[0].tolist()
        assert table[(name, "posterior")].tolist() == localize(units, concepts[i], tau=4, reference_kd=concepts,
                                                               temperature=0.1)[0].tolist()
    with pytest.raises(ValueError, match="3 concept embeddings for 2"):
        localization_table(units, concepts, ["a", "b"])
