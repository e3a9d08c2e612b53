"""The CLIP side: backends (checked and adapted by as_backend), offline errors, local checkpoints, concept banks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from miclip_nb.embed import (
    EmbeddingBackend,
    FunctionBackend,
    OpenClipBackend,
    WeightsMismatchError,
    WeightsUnavailableError,
    as_backend,
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


# ---------------------------------------------------------------- as_backend: checked and adapted


class StringClip(torch.nn.Module):
    """A CLIP-style model whose encode_text takes strings: a linear image tower, texts by length."""

    def __init__(self, dim: int = 6):
        super().__init__()
        self.image_proj = torch.nn.Linear(3, dim)
        self.text_table = torch.nn.Embedding(32, dim)

    def preprocess(self, image):
        return torch.zeros(3, 4, 4)

    def encode_image(self, x):
        return self.image_proj(x.mean((2, 3)))

    def encode_text(self, texts):
        return self.text_table(torch.tensor([len(t) % 32 for t in texts]))


def test_as_backend_returns_a_backend_unchanged(backend):
    words = word_backend()
    assert as_backend(words) is words
    assert as_backend(backend) is backend
    with pytest.raises(ValueError, match="already an embedding backend"):
        as_backend(words, preprocess=lambda img: img)


def test_as_backend_adapts_a_raw_open_clip_model(tiny_clip_name, seed_everything):
    """The raw open_clip model + tokenizer + preprocess embeds exactly as load_clip's backend."""
    import open_clip

    seed_everything(0)  # load_clip builds random weights from seed 0 (embed.deterministic_init)
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_clip_name, pretrained=None)
    reference = load_clip(tiny_clip_name, pretrained=None)
    adapted = as_backend(model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(tiny_clip_name),
                         name=f"{tiny_clip_name}:None")
    assert isinstance(adapted, OpenClipBackend) and isinstance(adapted, EmbeddingBackend)
    assert adapted.fingerprint == reference.fingerprint  # same label, same weights
    assert adapted.embed_dim == reference.embed_dim == 32
    image = Image.new("RGB", (40, 30), (200, 30, 90))
    assert torch.equal(adapted.preprocess(image), reference.preprocess(image))
    x = torch.randn(3, 3, 32, 32)
    texts = ["red", "a star", "dots"]
    assert torch.allclose(adapted.encode_images(x), reference.encode_images(x), atol=1e-6)
    assert torch.allclose(adapted.encode_texts(texts), reference.encode_texts(texts), atol=1e-6)
    assert torch.allclose(build_concept_bank(adapted, ["red", "blue"]), build_concept_bank(reference, ["red", "blue"]), atol=1e-6)
    # Without a name, the fingerprint still comes from the weights.
    unnamed = as_backend(model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(tiny_clip_name))
    assert unnamed.fingerprint.endswith(state_fingerprint(model))


def test_as_backend_adapts_a_model_whose_encode_text_takes_strings():
    model = StringClip().train()
    adapted = as_backend(model)
    assert isinstance(adapted, FunctionBackend) and not model.training
    assert adapted.embed_dim == 6 and adapted.fingerprint == f"StringClip:{state_fingerprint(model)}"
    assert adapted.preprocess(None).shape == (3, 4, 4)  # the model's own preprocess
    emb = adapted.encode_images(torch.rand(2, 3, 4, 4))
    assert emb.shape == (2, 6) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-6)
    texts = adapted.encode_texts(["ab", "cd", "abc"])
    assert torch.allclose(texts[0], texts[1]) and not torch.allclose(texts[0], texts[2])
    with torch.no_grad():
        model.image_proj.bias += 1.0
    assert as_backend(model).fingerprint != adapted.fingerprint  # new weights, new fingerprint
    # build_concept_bank adapts a CLIP-style model itself.
    assert torch.allclose(build_concept_bank(model, ["ab"], ["{}"]), as_backend(model).encode_texts(["ab"]), atol=1e-6)


def test_as_backend_names_exactly_the_missing_members():
    class HalfBackend:
        preprocess = staticmethod(lambda img: torch.zeros(3, 2, 2))

        def encode_images(self, x):
            return x.flatten(1)

        def encode_texts(self, texts):
            return torch.ones(len(texts), 12)

    with pytest.raises(TypeError) as info:
        as_backend(HalfBackend())
    message = str(info.value)
    assert "lacks embed_dim, fingerprint." in message
    assert "FunctionBackend" in message and "as_backend" in message
    with pytest.raises(TypeError, match="lacks encode_images, encode_texts, preprocess, embed_dim, fingerprint"):
        as_backend(object())
    image_only = type("ImageOnly", (), {"encode_images": lambda self, x: x.flatten(1)})()
    with pytest.raises(TypeError, match="lacks encode_texts, preprocess, embed_dim, fingerprint"):
        build_concept_bank(image_only, ["a"])  # not a bare AttributeError from deep inside


def test_as_backend_says_what_a_clip_style_model_lacks(tiny_clip_name):
    import open_clip

    model = open_clip.create_model(tiny_clip_name, pretrained=None)
    with pytest.raises(TypeError, match="lacks preprocess"):
        as_backend(model, tokenizer=open_clip.get_tokenizer(tiny_clip_name))
    with pytest.raises(TypeError, match="tokenizer="):  # open_clip's encode_text takes tokens, not strings
        as_backend(model, preprocess=lambda img: torch.zeros(3, 32, 32))
    with pytest.raises(TypeError, match="tokenizer="):
        build_concept_bank(model, ["red"])

    class Remote:  # not an nn.Module: its fingerprint cannot be computed from weights
        preprocess = staticmethod(lambda img: torch.zeros(3, 2, 2))

        def encode_image(self, x):
            return x.flatten(1)

        def encode_text(self, texts):
            return torch.ones(len(texts), 12)

    with pytest.raises(TypeError, match="lacks fingerprint"):
        as_backend(Remote())
    remote = Remote()
    remote.fingerprint = "remote-v1"
    adapted = as_backend(remote, name="remote")
    assert adapted.fingerprint == "remote:remote-v1" and adapted.embed_dim == 12


def test_load_clip_refuses_bad_checkpoints(tiny_clip_name, tmp_path):
    import open_clip

    model = open_clip.create_model(tiny_clip_name, pretrained=None)
    pickled = tmp_path / "whole_model.pt"
    torch.save(model, pickled)
    with pytest.raises(ValueError, match="pickled"):
        load_clip(tiny_clip_name, checkpoint_path=pickled)
    state = model.state_dict()
    state.pop("logit_scale")
    state["extra.weight"] = torch.zeros(2)
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    with pytest.raises(WeightsMismatchError, match="logit_scale"):
        load_clip(tiny_clip_name, checkpoint_path=broken)


def test_text_encoding_trimmed_to_the_longest_prompt_is_exact(tiny_clip_name):
    """OpenClipBackend runs CLIP's text tower only up to the longest prompt of a batch: under the
    causal mask the embeddings are those of the full 77-token context (checked here), 3-4x cheaper."""
    import open_clip

    from miclip_nb.embed import _encode_text_trimmed

    for name in (tiny_clip_name, "ViT-B-16"):
        model = open_clip.create_model(name, pretrained=None).eval()
        tokens = open_clip.get_tokenizer(name)(["a photo of a dog.", "itap of a kit fox on a snowy hill, at night."])
        with torch.no_grad():
            full, trimmed = model.encode_text(tokens), _encode_text_trimmed(model, tokens)
        torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-4)


def test_concept_banks_are_cached_by_weights_and_prompts(tiny_clip_name, tmp_path, monkeypatch):
    from miclip_nb import embed

    monkeypatch.setenv("MICLIP_CACHE_DIR", str(tmp_path))
    backend = embed.load_clip(tiny_clip_name, None)
    calls = []
    encode = backend.encode_texts
    backend.encode_texts = lambda texts: calls.append(len(texts)) or encode(texts)
    first = embed.build_concept_bank(backend, ["dog", "cat"])
    again = embed.build_concept_bank(backend, ["dog", "cat"])
    assert torch.equal(first, again) and len(calls) == 1  # the second bank came from disk
    embed.build_concept_bank(backend, ["dog", "cat"], templates=["{}"])  # other prompts: embedded anew
    assert len(calls) == 2
    with torch.no_grad():
        next(backend.model.parameters()).add_(1.0)
    backend.fingerprint = f"open_clip:x:{embed.state_fingerprint(backend.model)}"  # other weights: a new bank
    assert not torch.equal(embed.build_concept_bank(backend, ["dog", "cat"]), first) and len(calls) == 3
