"""The CLIP side: an embedding-backend interface, open_clip and ToyCLIP backends, concept banks.

A backend is anything with ``encode_images``, ``encode_texts``, ``preprocess``, ``embed_dim`` and
``fingerprint`` (see :class:`EmbeddingBackend`). :class:`OpenClipBackend` wraps any open_clip model
(real CLIP ViT-B/16 'openai' on a user's machine, a plug-in's CLIP such as the Shapes world's
ToyCLIP); :class:`FunctionBackend` wraps two plain functions, so any vision-language model can be
plugged in. :func:`as_backend` checks that an object is a backend and adapts a CLIP-style model
(``encode_image`` / ``encode_text``, e.g. a raw open_clip model with its tokenizer and preprocess),
or says exactly which members it lacks.

A backend owns its prompts: :func:`concept_texts` turns a concept word into the texts it embeds
(``backend.prompts(concept)`` where the backend has that method, else the open_clip templates
:data:`DEFAULT_TEMPLATES` around the word as typed: "star" -> "a photo of the small star.", ...).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import pickle
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


class WeightsMismatchError(ValueError):
    """A weights file whose tensors do not fit the model: missing, unexpected or mis-shaped keys."""


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
            emb = _encode_text_trimmed(self.model, tokens)
        return F.normalize(emb.float(), dim=-1)


def _encode_text_trimmed(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` (N, L) -> (N, D), run on the tokens up to the longest prompt of
    the batch rather than the full context (77 for CLIP, where an ImageNet prompt needs about 20):
    under the causal mask no position sees a later one, and the pooled token (the end-of-text token)
    lies inside the trimmed length, so the result is the same, 3-4x cheaper. Used only where the
    model's ``encode_text`` is exactly open_clip's ``CLIP.encode_text`` with a causal mask and
    end-of-text pooling; anything else runs ``model.encode_text`` as it is."""
    from open_clip.model import CLIP
    from open_clip.transformer import text_global_pool

    known = (type(model).encode_text is CLIP.encode_text and isinstance(getattr(model, "attn_mask", None), torch.Tensor)
             and getattr(model, "text_pool_type", None) in ("argmax", "eos") and tokens.ndim == 2)
    used = int(tokens.ne(0).any(0).nonzero().max()) + 1 if known and tokens.ne(0).any() else tokens.shape[1]
    if not known or used >= tokens.shape[1]:
        return model.encode_text(tokens)
    tokens = tokens[:, :used]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:used].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:used, :used]))
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return x


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


#: The members an :class:`EmbeddingBackend` has, in the order error messages list them.
BACKEND_MEMBERS: tuple[str, ...] = ("encode_images", "encode_texts", "preprocess", "embed_dim", "fingerprint")


def missing_backend_members(obj) -> list[str]:
    """The :data:`BACKEND_MEMBERS` that ``obj`` lacks or has in an unusable form (a method that is
    not callable, an ``embed_dim`` that is not a positive int, a ``fingerprint`` that is not a
    non-empty str). An empty list means ``obj`` is a backend."""
    missing = []
    for member in BACKEND_MEMBERS:
        value = getattr(obj, member, None)
        if member == "embed_dim":
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        elif member == "fingerprint":
            ok = isinstance(value, str) and bool(value)
        else:
            ok = callable(value)
        if not ok:
            missing.append(member)
    return missing


def _how_to_plug_in() -> str:
    return ("To plug a model in: embed.as_backend(model, preprocess=..., tokenizer=...) adapts a CLIP-style model "
            "(encode_image(images) and encode_text(tokens or strings), e.g. an open_clip model with "
            "open_clip.get_tokenizer(name) and its preprocess); embed.FunctionBackend(image_fn, text_fn, preprocess, "
            "embed_dim, fingerprint) wraps two plain functions.")


def _module_device(module: torch.nn.Module) -> torch.device:
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def as_backend(obj, *, preprocess: Callable | None = None, tokenizer: Callable | None = None,
               name: str | None = None) -> EmbeddingBackend:
    """``obj`` as an :class:`EmbeddingBackend`.

    - A backend (every member of :data:`BACKEND_MEMBERS`) is returned unchanged.
    - A CLIP-style model (callable ``encode_image(images (N, 3, H, W)) -> (N, D)`` and
      ``encode_text``) is adapted: with ``tokenizer`` (strings -> token tensor, e.g.
      ``open_clip.get_tokenizer(name)``), ``encode_text`` takes its tokens and an ``nn.Module``
      becomes an :class:`OpenClipBackend` on the module's device; without one, ``encode_text``
      must take a list of strings, and the result is a :class:`FunctionBackend`. ``preprocess``
      (PIL -> (3, H, W) tensor) defaults to ``obj.preprocess``. An ``nn.Module`` is put in eval
      mode, and its fingerprint comes from its weights (:func:`state_fingerprint`); another
      object needs a ``fingerprint`` str of its own. ``name`` labels the fingerprint (default:
      the class name).

    Raises TypeError naming exactly the members ``obj`` lacks (and how to plug a model in with
    :class:`FunctionBackend` / ``as_backend``), also when a CLIP-style model lacks ``preprocess``
    or a fingerprint, or its ``encode_text`` does not take strings and no tokenizer was given.
    Raises ValueError when ``preprocess``/``tokenizer`` are given with an object that is already
    a backend (they would be ignored).
    """
    missing = missing_backend_members(obj)
    if not missing:
        if preprocess is not None or tokenizer is not None:
            raise ValueError(f"{type(obj).__name__} is already an embedding backend; preprocess= and tokenizer= "
                             "only apply to a CLIP-style model being adapted")
        return obj
    if not (callable(getattr(obj, "encode_image", None)) and callable(getattr(obj, "encode_text", None))):
        raise TypeError(f"{type(obj).__name__} is not an embedding backend: it lacks {', '.join(missing)}. "
                        f"A backend (miclip_nb.embed.EmbeddingBackend) has {', '.join(BACKEND_MEMBERS)}. "
                        + _how_to_plug_in())
    return _adapt_clip_style(obj, preprocess, tokenizer, name)


def _adapt_clip_style(model, preprocess, tokenizer, name) -> EmbeddingBackend:
    kind = type(model).__name__
    preprocess = preprocess if preprocess is not None else getattr(model, "preprocess", None)
    is_module = isinstance(model, torch.nn.Module)
    fingerprint = getattr(model, "fingerprint", None)
    lacking = [m for m, ok in (("preprocess", callable(preprocess)),
                               ("fingerprint", is_module or (isinstance(fingerprint, str) and bool(fingerprint)))) if not ok]
    if lacking:
        raise TypeError(
            f"{kind} is a CLIP-style model (encode_image/encode_text) but lacks {', '.join(lacking)}: pass "
            "as_backend(model, preprocess=...) (open_clip: the third value of create_model_and_transforms); a model "
            "that is not an nn.Module needs a fingerprint str that changes with its weights. " + _how_to_plug_in())
    label = name or kind

    def text_failure(err: Exception) -> TypeError:
        call = "(tokenizer(texts))" if tokenizer is not None else "(list of str)"
        return TypeError(
            f"{kind}.encode_text{call} failed ({type(err).__name__}: {str(err)[:160]}). If encode_text takes tokens, "
            "pass as_backend(model, tokenizer=...) (open_clip: open_clip.get_tokenizer(name)). " + _how_to_plug_in())

    if is_module:
        model.eval()
        device = _module_device(model)
        if tokenizer is not None:
            try:  # its constructor embeds one text to learn embed_dim
                return OpenClipBackend(model, tokenizer, preprocess, label, device)
            except Exception as err:
                raise text_failure(err) from err
        fingerprint = f"{label}:{state_fingerprint(model)}"

        def image_fn(images: torch.Tensor) -> torch.Tensor:
            return model.encode_image(images.to(device))
    else:
        fingerprint = f"{label}:{fingerprint}"
        image_fn = model.encode_image
    if tokenizer is not None:  # an object that is not an nn.Module, with a tokenizer
        def text_fn(texts: list[str]) -> torch.Tensor:
            return model.encode_text(tokenizer(texts))
    else:
        text_fn = model.encode_text
    try:
        with torch.no_grad():
            probe = text_fn(["a photo"])
        if not isinstance(probe, torch.Tensor) or probe.ndim != 2 or probe.shape[0] != 1:
            raise TypeError(f"returned {type(probe).__name__} {tuple(getattr(probe, 'shape', ()))}, not a (1, D) tensor")
    except Exception as err:
        raise text_failure(err) from err
    return FunctionBackend(image_fn, text_fn, preprocess, int(probe.shape[1]), fingerprint)


def deterministic_init(fn):
    """Decorator for model loaders: run ``fn`` with torch's CPU generator seeded 0 inside a fork of
    its state, so that a model built with random weights (``pretrained=None`` / ``False``: smoke
    tests) is the same on every call, with the same fingerprint (its stores and prompt banks are
    then found in the cache again), and the caller's random state is left as it was."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return fn(*args, **kwargs)

    return wrapper


@deterministic_init
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
    for a missing checkpoint, WeightsMismatchError naming the keys of a checkpoint that does not fit,
    ValueError for an unknown name or a checkpoint holding a pickled model.
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
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path))
        except pickle.UnpicklingError as err:
            raise ValueError(f"{path} holds pickled Python objects, not just tensors (e.g. a whole model saved with "
                             "torch.save(model, path)): refused, since unpickling can run arbitrary code. Save "
                             "model.state_dict() instead.") from err
        except RuntimeError as err:  # load_state_dict(strict=True): torch's message names the keys
            if not any(k in str(err) for k in ("Missing key", "Unexpected key", "size mismatch")):
                raise
            raise WeightsMismatchError(f"CLIP checkpoint {path} does not fit open_clip {name!r}: {str(err)[:600]}") from err
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
    batch_size: int = 256, allow_duplicates: bool = False, cache: bool = True, progress: bool = True,
) -> torch.Tensor:
    """Text embeddings of ``concepts``, each averaged over its prompts (:func:`concept_texts`:
    ``templates``, or the backend's own) and re-normalised, as open_clip's zero-shot classifier does.

    With ``cache``, the bank is kept on disk (``cache_dir()/concept_banks/<hash>.safetensors``) under
    a hash of the backend's fingerprint (its weights) and every prompt, so the 1000 ImageNet classes
    x 7 templates are embedded once per CLIP model, not once per notebook. Returns (C, D) unit-norm
    rows, in the order given. Raises ValueError for an empty list, an empty concept, duplicates
    (unless ``allow_duplicates``: ImageNet has two "crane" classes), a template without ``{}``, or a
    backend that gives concepts different numbers of prompts; TypeError (see :func:`as_backend`)
    for an object that is not a backend nor CLIP-style.
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from ._paths import cache_dir
    from ._progress import bars_off

    if not callable(getattr(backend, "encode_texts", None)):  # a CLIP-style model, or a clear TypeError
        backend = as_backend(backend)
    concepts = [str(c).strip() for c in concepts] if allow_duplicates else validate_concepts(concepts)
    if not concepts or not all(concepts):
        raise ValueError("concepts must be non-empty strings")
    texts = [concept_texts(backend, c, templates) for c in concepts]
    if len({len(t) for t in texts}) != 1:
        raise ValueError("the backend gives concepts different numbers of prompts; pass templates=")
    key = hashlib.sha256(repr((backend.fingerprint, texts)).encode()).hexdigest()[:24]
    path = cache_dir() / "concept_banks" / f"{key}.safetensors"
    if cache and path.is_file():
        return load_file(str(path))["bank"]
    rows = []
    bar = tqdm(range(0, len(texts), batch_size), desc=f"embed {len(texts)} concepts", disable=bars_off(progress and len(texts) > batch_size))
    for start in bar:
        chunk = texts[start : start + batch_size]
        emb = backend.encode_texts([t for ts in chunk for t in ts]).reshape(len(chunk), len(chunk[0]), -1)
        rows.append(F.normalize(emb.mean(1), dim=-1))
    bank = torch.cat(rows)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"bank": bank.contiguous()}, str(tmp))
        tmp.replace(path)
    return bank


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
