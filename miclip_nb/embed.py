"""The CLIP side: an embedding-backend interface, open_clip and ToyCLIP backends, concept banks.

A backend is anything with ``encode_images``, ``encode_texts``, ``preprocess``, ``embed_dim`` and
``fingerprint`` (see :class:`EmbeddingBackend`). :class:`OpenClipBackend` wraps any open_clip model
(real CLIP ViT-B/16 'openai' on a user's machine, a plug-in's CLIP such as the Shapes world's
ToyCLIP); :class:`FunctionBackend` wraps two plain functions, so any vision-language model can be
plugged in.

A backend owns its prompts: :func:`concept_texts` turns a concept word into the texts it embeds
(``backend.prompts(concept)`` where the backend has that method, else the open_clip templates
:data:`DEFAULT_TEMPLATES` around the word as typed: "star" -> "a photo of the small star.", ...).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

def _open_clip_templates() -> tuple[str, ...]:
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES)


#: open_clip's seven ImageNet zero-shot templates ("itap of a {}.", "a bad photo of the {}.", ...):
#: what a concept word is wrapped in for a CLIP model that does not say otherwise.
DEFAULT_TEMPLATES: tuple[str, ...] = _open_clip_templates()


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be downloaded or found locally."""


@runtime_checkable
class EmbeddingBackend(Protocol):
    """What MiClip needs from a vision-language model."""

    embed_dim: int  # D, the size of the shared embedding space
    fingerprint: str  # identifies model and weights (used in cache keys)

    def preprocess(self, image) -> torch.Tensor:
        """PIL image -> (3, H, W) tensor ready for ``encode_images``."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) preprocessed images -> (N, D) L2-normalised embeddings."""

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """N strings -> (N, D) L2-normalised embeddings."""


def state_fingerprint(module: torch.nn.Module) -> str:
    """A short sha256 over a module's parameter and buffer values (identifies the weights)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class OpenClipBackend:
    """An open_clip CLIP model as an :class:`EmbeddingBackend`.

    ``model``: an open_clip CLIP; ``tokenizer``: its tokenizer; ``preprocess``: PIL -> tensor;
    ``name``: a label for the cache key (the weight values are hashed in as well); ``templates``:
    the prompt templates of :meth:`prompts` (each with one ``{}``; default
    :data:`DEFAULT_TEMPLATES`); ``phrases``: concept words to put in the templates in place of the
    word itself (a CLIP trained on its own captions, e.g. ToyCLIP's ``{"star": "a star"}``).
    """

    def __init__(self, model, tokenizer, preprocess: Callable, name: str, device: str | torch.device = "cpu", *,
                 templates: Sequence[str] = DEFAULT_TEMPLATES, phrases: dict[str, str] | None = None):
        if not templates or any(t.count("{}") != 1 for t in templates):
            raise ValueError(f"every template must contain '{{}}' once, got {list(templates)}")
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self._preprocess = preprocess
        self.name = name
        self.device = torch.device(device)
        self.templates, self.phrases = tuple(templates), dict(phrases or {})
        self.embed_dim = int(self.encode_texts(["x"]).shape[1])
        self.fingerprint = f"open_clip:{name}:{state_fingerprint(model)}"

    def prompts(self, concept: str) -> list[str]:
        """The texts embedded for a concept word: each template around the word (or its phrase)."""
        return [t.format(self.phrases.get(concept, concept)) for t in self.templates]

    def preprocess(self, image) -> torch.Tensor:
        """PIL image -> (3, H, W) tensor for this CLIP model."""
        return self._preprocess(image)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) preprocessed images -> (N, D) unit-norm float32 embeddings."""
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            emb = self.model.encode_image(images.to(self.device))
        return F.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """N strings -> (N, D) unit-norm float32 embeddings. Raises ValueError on empty input."""
        texts = list(texts)
        if not texts or any(not str(t).strip() for t in texts):
            raise ValueError("texts must be a non-empty list of non-empty strings")
        tokens = self.tokenizer(texts).to(self.device)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            emb = self.model.encode_text(tokens)
        return F.normalize(emb.float(), dim=-1)


@dataclass
class FunctionBackend:
    """Wrap your own embedding functions as an :class:`EmbeddingBackend`.

    ``image_fn``: (N, 3, H, W) -> (N, D); ``text_fn``: list of N str -> (N, D); ``preprocess``:
    PIL -> (3, H, W); ``fingerprint``: a string that changes whenever the functions' weights do.
    Outputs are L2-normalised here.
    """

    image_fn: Callable[[torch.Tensor], torch.Tensor]
    text_fn: Callable[[list[str]], torch.Tensor]
    preprocess: Callable
    embed_dim: int
    fingerprint: str

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D) unit-norm embeddings."""
        return F.normalize(self.image_fn(images).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """N strings -> (N, D) unit-norm embeddings."""
        texts = list(texts)
        if not texts or any(not str(t).strip() for t in texts):
            raise ValueError("texts must be a non-empty list of non-empty strings")
        return F.normalize(self.text_fn(texts).float(), dim=-1)


def load_clip(
    name: str = "ViT-B-16",
    pretrained: str | None = "openai",
    *,
    checkpoint_path: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> OpenClipBackend:
    """Load a CLIP embedding backend.

    ``name``: a backend a plug-in registered (:mod:`miclip_nb.plugins`, e.g. the Shapes world's
    ``"toyclip"``, offline; ``checkpoint_path`` is handed to its factory), or an open_clip model
    name with a ``pretrained`` tag (downloaded from the hub on first use, e.g.
    ``("ViT-B-16", "openai")``), or ``checkpoint_path`` to a local weights file of that
    architecture, or ``pretrained=None`` for random weights (tests only).
    Raises WeightsUnavailableError with instructions when weights cannot be obtained, FileNotFoundError
    for a missing checkpoint, ValueError for an unknown name.
    """
    import open_clip

    from . import plugins

    if name not in open_clip.list_models():  # open_clip's names first: a generic run never loads plug-ins
        if plugins.has("backend", name):
            return plugins.get("backend", name)(device=device, checkpoint_path=checkpoint_path)
        raise ValueError(f"unknown CLIP model {name!r}: neither an open_clip model (see open_clip.list_models()) "
                         f"nor a registered backend ({plugins.names('backend')})")
    if checkpoint_path is not None:
        path = Path(checkpoint_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path))
        label = f"{name}:{path.name}"
    else:
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        except Exception as err:  # open_clip raises RuntimeError after the hub fails
            raise WeightsUnavailableError(
                f"could not get weights {name!r}/{pretrained!r} ({type(err).__name__}: {str(err)[:200]}). "
                "They download from the Hugging Face hub on first use; offline, download the file on a "
                "machine with internet and pass load_clip(name, checkpoint_path='open_clip_pytorch_model.bin'), "
                "or use load_clip('toyclip') for the offline Shapes world."
            ) from err
        label = f"{name}:{pretrained}"
    return OpenClipBackend(model, open_clip.get_tokenizer(name), preprocess, label, device)


def concept_texts(backend: EmbeddingBackend, concept: str, templates: Sequence[str] | None = None) -> list[str]:
    """The texts a backend embeds for one concept word: ``templates`` around the word when given,
    else the backend's own ``prompts(concept)``, else :data:`DEFAULT_TEMPLATES` around the word.
    Raises ValueError for a template without exactly one ``{}``."""
    if templates is not None:
        if not templates or any(t.count("{}") != 1 for t in templates):
            raise ValueError(f"every template must contain '{{}}' once, got {list(templates)}")
        return [t.format(concept) for t in templates]
    prompts = getattr(backend, "prompts", None)
    return list(prompts(concept)) if callable(prompts) else [t.format(concept) for t in DEFAULT_TEMPLATES]


def build_concept_bank(
    backend: EmbeddingBackend, concepts: Sequence[str], templates: Sequence[str] | None = None,
    batch_size: int = 256, allow_duplicates: bool = False,
) -> torch.Tensor:
    """Text embeddings of ``concepts``, each averaged over its prompts (:func:`concept_texts`:
    ``templates``, or the backend's own) and re-normalised, as open_clip's zero-shot classifier does.

    Returns (C, D) unit-norm rows, in the order given. Raises ValueError for an empty list, an
    empty concept, duplicates (unless ``allow_duplicates``: ImageNet has two "crane" classes), a
    template without ``{}``, or a backend that gives concepts different numbers of prompts.
    """
    concepts = [str(c).strip() for c in concepts] if allow_duplicates else validate_concepts(concepts)
    if not concepts or not all(concepts):
        raise ValueError("concepts must be non-empty strings")
    rows = []
    for start in range(0, len(concepts), batch_size):
        texts = [concept_texts(backend, c, templates) for c in concepts[start : start + batch_size]]
        if len({len(t) for t in texts}) != 1:
            raise ValueError("the backend gives concepts different numbers of prompts; pass templates=")
        emb = backend.encode_texts([t for ts in texts for t in ts]).reshape(len(texts), len(texts[0]), -1)
        rows.append(F.normalize(emb.mean(1), dim=-1))
    return torch.cat(rows)


def validate_concepts(concepts: Sequence[str]) -> list[str]:
    """Check a concept list: non-empty, no empty strings, no duplicates (case-insensitive).

    Returns the stripped list. Raises ValueError naming the offending entries.
    """
    if isinstance(concepts, str):
        raise ValueError("concepts must be a list of strings, not one string")
    cleaned = [str(c).strip() for c in concepts]
    if not cleaned:
        raise ValueError("the concept list is empty")
    if any(not c for c in cleaned):
        raise ValueError("the concept list contains an empty concept")
    counts = Counter(c.lower() for c in cleaned)
    dups = sorted(c for c, n in counts.items() if n > 1)
    if dups:
        raise ValueError(f"the concept list has duplicates: {dups[:10]}")
    return cleaned
