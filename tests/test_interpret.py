"""Localize and describe: top-k contracts, vocabularies and their errors."""

import pytest
import torch
import torch.nn.functional as F

from miclip_nb.align import EncoderConfig, NeuronEncoder
from miclip_nb.embed import validate_concepts
from miclip_nb.interpret import concept_set, describe, localize, shapes_concept_prompts, top_k, unit_embeddings


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
    with pytest.raises(ValueError, match="unknown concept set"):
        concept_set("colours")
    prompts = shapes_concept_prompts()
    assert prompts["star"] == "a star" and prompts["red"] == "red" and prompts["dots"] == "dots"


def test_concept_list_errors():
    with pytest.raises(ValueError, match="empty"):
        validate_concepts([])
    with pytest.raises(ValueError, match="empty concept"):
        validate_concepts(["red", "  "])
    with pytest.raises(ValueError, match="duplicates"):
        validate_concepts(["Red", "red"])
    with pytest.raises(ValueError, match="not one string"):
        validate_concepts("red")
