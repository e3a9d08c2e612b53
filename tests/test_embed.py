"""The CLIP side: backends, offline errors, local checkpoints, concept banks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from miclip_nb.embed import (
    EmbeddingBackend,
    FunctionBackend,
    WeightsUnavailableError,
    build_concept_bank,
    load_clip,
    state_fingerprint,
    validate_concepts,
)


@pytest.fixture(scope="module")
def backend(tiny_clip_name):
    return load_clip(tiny_clip_name, pretrained=None)


def word_backend(dim: int = 8) -> FunctionBackend:
    """Texts embed to a fixed random vector per word; images to their mean colour."""
    table: dict[str, torch.Tensor] = {}

    def text_fn(texts):
        out = []
        for t in texts:
            if t not in table:
                table[t] = torch.randn(dim, generator=torch.Generator().manual_seed(len(table) + 1))
            out.append(table[t])
        return torch.stack(out)

    def image_fn(x):
        return torch.cat([x.mean((2, 3)), torch.ones(x.shape[0], dim - 3)], dim=1)

    return FunctionBackend(image_fn, text_fn, preprocess=lambda img: torch.zeros(3, 4, 4), embed_dim=dim, fingerprint="words-1")


# ---------------------------------------------------------------- concept banks


def test_concept_bank_rows_unit_norm_in_order(backend):
    concepts = ["red", "a star", "dots", "zebra", "blue"]
    bank = build_concept_bank(backend, concepts)
    assert bank.shape == (5, backend.embed_dim)
    assert torch.allclose(bank.norm(dim=1), torch.ones(5), atol=1e-5)
    # Row i is concept i: each equals the bank of that concept alone, also across batch splits.
    for i, c in enumerate(concepts):
        assert torch.allclose(bank[i], build_concept_bank(backend, [c])[0], atol=1e-5)
    assert torch.allclose(build_concept_bank(backend, concepts, batch_size=2), bank, atol=1e-5)


def test_concept_bank_averages_the_templates(backend):
    templates = ["a photo of a {}.", "{}"]
    bank = build_concept_bank(backend, ["star"], templates)
    prompts = backend.encode_texts(["a photo of a star.", "star"])
    assert torch.allclose(bank[0], F.normalize(prompts.mean(0), dim=0), atol=1e-5)


@pytest.mark.parametrize(
    "concepts,match",
    [([], "empty"), (["red", " "], "empty concept"), (["red", "blue", "Red"], "duplicates.*red"), ("red", "not one string")],
)
def test_bad_concept_lists_raise(backend, concepts, match):
    with pytest.raises(ValueError, match=match):
        build_concept_bank(backend, concepts)


def test_templates_must_have_a_slot(backend):
    with pytest.raises(ValueError, match="{}"):
        build_concept_bank(backend, ["red"], ["a photo"])
    with pytest.raises(ValueError, match="{}"):
        build_concept_bank(backend, ["red"], [])


def test_validate_concepts_strips():
    assert validate_concepts([" red ", "blue"]) == ["red", "blue"]


# ---------------------------------------------------------------- open_clip backend


def test_open_clip_backend_embeddings(backend, tiny_clip_name):
    assert isinstance(backend, EmbeddingBackend)
    assert backend.embed_dim == 32 and backend.fingerprint.startswith(f"open_clip:{tiny_clip_name}:None:")
    x = torch.stack([backend.preprocess(Image.new("RGB", (40, 50), c)) for c in [(255, 0, 0), (0, 0, 255)]])
    assert x.shape == (2, 3, 32, 32)
    images = backend.encode_images(x)
    texts = backend.encode_texts(["red", "blue", "a star"])
    assert images.shape == (2, 32) and texts.shape == (3, 32)
    assert images.dtype == torch.float32
    assert torch.allclose(images.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(texts.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        backend.encode_images(x[0])  # a single image without the batch axis
    with pytest.raises(ValueError, match="non-empty"):
        backend.encode_texts([])
    with pytest.raises(ValueError, match="non-empty"):
        backend.encode_texts(["ok", ""])


def test_pretrained_offline_raises_with_advice(tiny_clip_name):
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip("ViT-B-16", "openai")
    message = str(info.value)
    assert "'ViT-B-16'/'openai'" in message
    assert "checkpoint_path=" in message and "toyclip" in message


def test_unknown_architecture_and_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="ViT-Q-99"):
        load_clip("ViT-Q-99", None)
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        load_clip("ViT-B-16", checkpoint_path=tmp_path / "nothing.bin")


def test_local_checkpoint_gives_the_models_embeddings(tiny_clip_name, tmp_path):
    import open_clip

    torch.manual_seed(123)
    model = open_clip.create_model(tiny_clip_name, pretrained=None).eval()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)

    loaded = load_clip(tiny_clip_name, checkpoint_path=path)
    assert loaded.fingerprint == f"open_clip:{tiny_clip_name}:{path.name}:{state_fingerprint(model)}"
    x = torch.randn(3, 3, 32, 32)
    tokens = open_clip.get_tokenizer(tiny_clip_name)(["red", "a star"])
    with torch.no_grad():
        assert torch.allclose(loaded.encode_images(x), F.normalize(model.encode_image(x), dim=-1), atol=1e-5)
        assert torch.allclose(loaded.encode_texts(["red", "a star"]), F.normalize(model.encode_text(tokens), dim=-1), atol=1e-5)
    # A different random init is a different backend.
    assert load_clip(tiny_clip_name, None).fingerprint.split(":")[-1] != loaded.fingerprint.split(":")[-1]


def test_state_fingerprint_tracks_values():
    a = torch.nn.Linear(3, 2)
    before = state_fingerprint(a)
    assert state_fingerprint(a) == before
    with torch.no_grad():
        a.bias[0] += 1e-6
    assert state_fingerprint(a) != before
    assert state_fingerprint(a.to(torch.bfloat16)) != state_fingerprint(a.float())


# ---------------------------------------------------------------- bring your own model


def test_function_backend():
    backend = word_backend()
    assert isinstance(backend, EmbeddingBackend)
    x = torch.rand(2, 3, 4, 4) + 0.1
    emb = backend.encode_images(x)
    assert emb.shape == (2, 8) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-6)
    assert torch.allclose(emb[:, 0], x[0:, 0].mean((1, 2)) / (x.mean((2, 3)).pow(2).sum(1) + 5).sqrt(), atol=1e-6)
    texts = backend.encode_texts(["a", "b", "a"])
    assert torch.allclose(texts[0], texts[2]) and not torch.allclose(texts[0], texts[1])
    bank = build_concept_bank(backend, ["a", "b"], ["{}"])
    assert torch.allclose(bank, texts[:2], atol=1e-6)
    with pytest.raises(ValueError):
        backend.encode_texts([])
