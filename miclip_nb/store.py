"""A streaming, resumable activation store on disk.

One pass over a dataset records, per image: the pooled activations of each requested layer, the
CLIP image embedding, the label and the model's prediction. They are written in safetensors shards
of ``shard_size`` rows inside a folder named by a hash of everything that determines the content
(:class:`StoreSpec`): model weights, layers, pooling, dataset, transforms and CLIP backend. So:

- a different model, layer, dataset or transform gets a different folder: nothing is ever stale;
- an interrupted pass resumes from its last complete shard;
- every shard's sha256 is recorded in ``metadata.json`` and checked before the shard is first read;
  a corrupt, truncated or missing shard raises StoreError (and is rewritten by the next build);
  an edited or unreadable ``metadata.json`` raises too (and the next build starts the store over);
- memory is bounded by one shard, whatever the dataset size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ._paths import cache_dir, sha256_file
from .capture import POOLINGS, forward_checked, hooked_activations, resolve_layer
from .datasets import PairedTransform
from .embed import state_fingerprint
from ._progress import bars_off

SCHEMA_VERSION = 1
METADATA = "metadata.json"


class StoreError(RuntimeError):
    """A store that is incomplete, corrupt, or does not match what was asked for."""


@dataclass(frozen=True)
class StoreSpec:
    """Everything that determines a store's content; its hash names the folder."""

    model: str  # TargetModel.fingerprint (architecture + weight hash)
    layers: tuple[str, ...]  # dotted layer names, in order
    pooling: str  # one of capture.POOLINGS
    dataset: str  # the dataset's fingerprint (content-derived)
    n_items: int  # number of images stored (a prefix of the dataset)
    transform: str  # repr of the model preprocessing
    clip: str | None  # EmbeddingBackend.fingerprint, or None when no CLIP embeddings are stored
    clip_transform: str | None  # repr of the CLIP preprocessing
    dtype: str = "float32"  # dtype of stored activations and embeddings
    schema: int = SCHEMA_VERSION  # bump when the on-disk format changes

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {POOLINGS}")
        if not self.layers:
            raise ValueError("a store needs at least one layer")
        if self.n_items <= 0:
            raise ValueError("a store needs at least one image")

    @property
    def key(self) -> str:
        """A 20-hex-digit hash of the spec: the store's folder name."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


def acts_field(layer: str) -> str:
    """Name of the field holding ``layer``'s activations."""
    return f"acts/{layer}"



def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class ActivationStore:
    """Read access to a store folder. Use :func:`build_store` to make one, or ``ActivationStore(dir)``."""

    def __init__(self, store_dir: str | Path):
        self.dir = Path(store_dir)
        meta_path = self.dir / METADATA
        if not meta_path.is_file():
            raise StoreError(f"no activation store at {self.dir} (missing {METADATA})")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise StoreError(f"store {self.dir}: {METADATA} is unreadable ({err})") from err
        if not isinstance(self.meta, dict) or self.meta.get("schema") != SCHEMA_VERSION:
            schema = self.meta.get("schema") if isinstance(self.meta, dict) else None
            raise StoreError(f"store {self.dir} has schema {schema}, this version reads {SCHEMA_VERSION}")
        try:
            spec = dict(self.meta["spec"])
            spec["layers"] = tuple(spec["layers"])
            self.spec = StoreSpec(**spec)
        except (KeyError, TypeError, ValueError) as err:
            raise StoreError(f"store {self.dir}: {METADATA} was edited (its spec is not valid: {err})") from err
        self._verified: set[str] = set()  # shards whose sha256 was checked by this reader
        if self.meta.get("key") != self.spec.key:
            raise StoreError(f"store {self.dir}: metadata.json was edited (its spec no longer hashes to its key)")

    @property
    def complete(self) -> bool:
        """True when every image of the spec has been written."""
        return bool(self.meta.get("complete")) and self.n_rows == self.spec.n_items

    @property
    def n_rows(self) -> int:
        """Number of images written so far."""
        return sum(s["n"] for s in self.meta["shards"])

    @property
    def fields(self) -> dict[str, list[int]]:
        """Field name -> per-row shape (e.g. ``{"acts/stages.2": [128], "label": []}``)."""
        return {k: v["shape"] for k, v in self.meta["fields"].items()}

    @property
    def layers(self) -> tuple[str, ...]:
        return self.spec.layers

    def verify(self) -> None:
        """Check every shard's size and sha256. Raises StoreError naming the first bad shard."""
        for shard in self.meta["shards"]:
            self._verify_shard(shard)

    def _verify_shard(self, shard: dict) -> Path:
        path = self.dir / shard["file"]
        if shard["file"] in self._verified:
            return path
        if not path.is_file():
            raise StoreError(f"store {self.dir}: shard {shard['file']} is missing")
        if path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
            raise StoreError(
                f"store {self.dir}: shard {shard['file']} is corrupt (size or sha256 differ); "
                "run build_store again with the same arguments to rewrite it"
            )
        self._verified.add(shard["file"])
        return path

    def _require_complete(self) -> None:
        if not self.complete:
            raise StoreError(
                f"store {self.dir} is incomplete ({self.n_rows}/{self.spec.n_items} images); "
                "run build_store again with the same arguments to resume it"
            )

    def iter_shards(self, fields: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Yield one dict ``{field: (n_shard, ...) tensor}`` per shard, in order (bounded memory)."""
        self._require_complete()
        names = list(fields) if fields is not None else list(self.meta["fields"])
        unknown = [f for f in names if f not in self.meta["fields"]]
        if unknown:
            raise KeyError(f"store has no field(s) {unknown}; fields: {list(self.meta['fields'])}")
        for shard in self.meta["shards"]:
            # Checked on first read (one extra pass over the file): a corrupt shard is never used.
            with safe_open(self._verify_shard(shard), framework="pt") as f:
                yield {name: f.get_tensor(name) for name in names}

    def load(self, field: str) -> torch.Tensor:
        """The whole field as one tensor (N, ...). For stores that fit in memory."""
        return torch.cat([s[field] for s in self.iter_shards([field])])

    def acts(self, layer: str | None = None) -> torch.Tensor:
        """All activations of ``layer`` (default: the only/first layer), (N, U) or (N, ...)."""
        return self.load(acts_field(layer or self.layers[0]))

    def iter_batches(
        self, fields: Sequence[str], batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Mini-batches over the store, one shard in memory at a time.

        With ``shuffle``, shard order and rows within each shard are permuted by ``seed``.
        """
        gen = torch.Generator().manual_seed(seed)
        shard_order = torch.randperm(len(self.meta["shards"]), generator=gen) if shuffle else range(len(self.meta["shards"]))
        self._require_complete()
        for si in shard_order:
            shard = self.meta["shards"][int(si)]
            with safe_open(self._verify_shard(shard), framework="pt") as f:
                data = {name: f.get_tensor(name) for name in fields}
            n = shard["n"]
            order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                yield {k: v[idx] for k, v in data.items()}

    def __repr__(self) -> str:
        return f"ActivationStore({self.dir}, layers={list(self.layers)}, rows={self.n_rows}/{self.spec.n_items})"


class StoreWriter:
    """Context manager that appends rows to a store folder in shards, atomically.

    Each full shard is written to a temporary file, renamed into place, and recorded (with its
    sha256) in ``metadata.json``; a crash loses at most the rows of the shard being filled.
    """

    def __init__(self, store_dir: Path, spec: StoreSpec, shard_size: int):
        self.dir, self.spec, self.shard_size = Path(store_dir), spec, shard_size
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / METADATA
        if meta_path.is_file():
            self.meta = json.loads(meta_path.read_text())
        else:
            self.meta = {"schema": SCHEMA_VERSION, "key": spec.key, "spec": asdict(spec), "shard_size": shard_size,
                         "fields": {}, "shards": [], "complete": False}
        self._buffer: dict[str, list[torch.Tensor]] = {}
        self._buffered = 0

    @property
    def n_rows(self) -> int:
        return sum(s["n"] for s in self.meta["shards"]) + self._buffered

    def append(self, rows: dict[str, torch.Tensor]) -> None:
        """Add a batch: ``{field: (n, ...) tensor}``, the same n for every field."""
        lengths = {v.shape[0] for v in rows.values()}
        if len(lengths) != 1:
            raise ValueError(f"fields have different row counts: { {k: v.shape[0] for k, v in rows.items()} }")
        for k, v in rows.items():
            self._buffer.setdefault(k, []).append(v.detach().cpu())
        self._buffered += lengths.pop()
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        data = {k: torch.cat(v) for k, v in self._buffer.items()}
        shard = {k: v[:n].contiguous() for k, v in data.items()}
        rest = {k: [v[n:]] for k, v in data.items() if v.shape[0] > n}
        name = f"shard_{len(self.meta['shards']):05d}.safetensors"
        tmp = self.dir / (name + ".tmp")
        save_file(shard, str(tmp))
        os.replace(tmp, self.dir / name)
        path = self.dir / name
        if not self.meta["fields"]:
            self.meta["fields"] = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in shard.items()}
        self.meta["shards"].append({"file": name, "n": n, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        _write_json_atomic(self.dir / METADATA, self.meta)
        self._buffer = rest
        self._buffered -= n

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self._buffered:
                self._flush(self._buffered)
            self.meta["complete"] = self.n_rows == self.spec.n_items
            _write_json_atomic(self.dir / METADATA, self.meta)
        # On an error the partial shard in memory is dropped; complete shards stay for resuming.


def _truncate_to_valid(store_dir: Path) -> int:
    """Drop shards that are missing or corrupt (and all after them); return the rows kept."""
    meta_path = store_dir / METADATA
    meta = json.loads(meta_path.read_text())
    kept = []
    for shard in meta["shards"]:
        path = store_dir / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
            break
        kept.append(shard)
    for shard in meta["shards"][len(kept):]:
        (store_dir / shard["file"]).unlink(missing_ok=True)
    if len(kept) != len(meta["shards"]):
        meta["shards"], meta["complete"] = kept, False
        _write_json_atomic(meta_path, meta)
    return sum(s["n"] for s in kept)


def describe_transform(transform) -> str:
    """A stable text for a preprocessing callable: its repr without memory addresses
    (functions are named by module and qualified name, plus a hash of their code, so editing a
    function's body in a notebook gives a new store key)."""
    if hasattr(transform, "__qualname__") and hasattr(transform, "__module__"):
        text = f"{transform.__module__}.{transform.__qualname__}"
        code = getattr(transform, "__code__", None)
        if code is not None:
            body = code.co_code + re.sub(r" at 0x[0-9a-fA-F]+", "", repr(code.co_consts)).encode()
            text += f"#{hashlib.sha256(body).hexdigest()[:12]}"
        return text
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def model_identity(target) -> str:
    """Identifies a target model *as it is now*: its fingerprint plus a hash of its current weights,
    so a model edited or fine-tuned in place after loading gets a new identity (new stores, and
    encoders trained on the old weights are refused)."""
    return f"{target.fingerprint}|weights={state_fingerprint(target.module)}"


def store_spec(target, dataset, layers: Sequence[str], pooling: str, clip=None, n_items: int | None = None,
               dtype: torch.dtype = torch.float32) -> StoreSpec:
    """The :class:`StoreSpec` for capturing ``layers`` of ``target`` (a zoo.TargetModel) on
    ``dataset`` (with a ``fingerprint``), optionally with a CLIP backend."""
    fingerprint = getattr(dataset, "fingerprint", None)
    if fingerprint is None:
        raise ValueError("the dataset needs a .fingerprint attribute (see miclip_nb.datasets)")
    n = len(dataset) if n_items is None else n_items
    if not 0 < n <= len(dataset):
        raise ValueError(f"n_items must be in 1..{len(dataset)}, got {n}")
    return StoreSpec(
        model=model_identity(target), layers=tuple(layers), pooling=pooling, dataset=fingerprint, n_items=n,
        transform=describe_transform(target.preprocess), clip=None if clip is None else clip.fingerprint,
        clip_transform=None if clip is None else describe_transform(getattr(clip, "_preprocess", clip.preprocess)),
        dtype=str(dtype),
    )


def build_store(
    target,
    dataset,
    layers: Sequence[str] | str | None = None,
    *,
    pooling: str = "mean",
    clip=None,
    n_items: int | None = None,
    root: str | Path | None = None,
    batch_size: int = 64,
    shard_size: int = 2048,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> ActivationStore:
    """Capture ``layers`` of ``target`` over ``dataset`` into a store, or reuse/resume an existing one.

    target: a zoo.TargetModel; dataset: yields (PIL image, label) and has ``fingerprint``;
    layers: names (default ``target.default_layer``); clip: an EmbeddingBackend or None.
    Stores land in ``root`` (default ``cache_dir()/stores``)/<spec key>. Returns the complete store.
    Raises LayerNotFoundError before any work for an unknown layer.
    """
    if layers is None:
        if target.default_layer is None:
            raise ValueError("name the layers to capture (this model has no default layer)")
        layers = [target.default_layer]
    layers = [layers] if isinstance(layers, str) else list(layers)
    for layer in layers:
        resolve_layer(target.module, layer)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    spec = store_spec(target, dataset, layers, pooling, clip, n_items, dtype)
    store_dir = Path(root) if root is not None else cache_dir() / "stores"
    store_dir = store_dir / spec.key
    if (store_dir / METADATA).is_file():
        try:
            existing = ActivationStore(store_dir)
        except StoreError as err:
            existing = None
            warnings.warn(f"{err}; deleting it and rebuilding the store from scratch", stacklevel=2)
        if existing is None or existing.spec != spec:
            shutil.rmtree(store_dir)  # a hash collision or a hand-edited folder: never reuse it
        elif existing.complete:
            try:
                existing.verify()
                return existing
            except StoreError as err:  # rewritten below from the first bad shard on
                warnings.warn(f"{err}; rewriting it", stacklevel=2)
    done = _truncate_to_valid(store_dir) if (store_dir / METADATA).is_file() else 0

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = target.module.to(device).eval()
    remaining = torch.utils.data.Subset(dataset, range(done, spec.n_items))
    loader = torch.utils.data.DataLoader(
        PairedTransform(remaining, target.preprocess, None if clip is None else clip.preprocess),
        batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda",
    )
    with StoreWriter(store_dir, spec, shard_size) as writer, hooked_activations(model, layers, pooling) as captured, torch.no_grad():
        bar = tqdm(loader, desc=f"capture {','.join(layers)}", initial=done // batch_size,
                   total=(spec.n_items + batch_size - 1) // batch_size, disable=bars_off(progress))
        for x_model, x_clip, labels in bar:
            x_model = x_model.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = forward_checked(model, x_model)
            rows = {acts_field(layer): captured[layer].to(dtype) for layer in layers}
            rows["label"] = torch.as_tensor(labels, dtype=torch.long)
            rows["pred"] = logits.argmax(-1).cpu()
            if clip is not None:
                rows["clip_image"] = clip.encode_images(x_clip).to(dtype)
            writer.append(rows)
    return ActivationStore(store_dir)
