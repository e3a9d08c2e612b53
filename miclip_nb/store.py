"""A streaming, resumable activation store on disk.

One pass over a dataset records, per image: the pooled activations of each requested layer, the
CLIP image embedding, the label and the model's prediction. They are written in safetensors shards
of ``shard_size`` rows inside a folder named by a hash of everything that determines the content
(:class:`StoreSpec`): model weights, layers, pooling, dataset, transforms and CLIP backend. So:

- a different model, layer, dataset or transform gets a different folder: nothing is ever stale;
- an interrupted pass resumes from its last complete shard;
- every shard's sha256 is recorded in ``metadata.json`` and checked before the shard is first read,
  and again whenever the file changed since (its size, times or inode differ); a corrupt,
  truncated or missing shard raises StoreError (and is rewritten by the next build);
  an edited or unreadable ``metadata.json`` raises too (and the next build starts the store over);
- memory is bounded by one shard, whatever the dataset size;
- ``build_store(..., on_error="skip")`` leaves unreadable images out (listed in ``metadata.json``
  under ``"skipped"``); the field ``"index"`` gives each row's dataset index. It is derived from
  that list rather than stored in the shards, so the same shard files also serve, hard-linked, as
  the store of the dataset with those files deleted (:meth:`FileListDataset.without`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ._paths import cache_dir, sha256_file
from .capture import POOLINGS, forward_checked, hooked_activations, resolve_layer
from .datasets import PairedTransform, UnreadableImageError
from .embed import state_fingerprint
from ._progress import bars_off

SCHEMA_VERSION = 1
METADATA = "metadata.json"
INDEX_FIELD = "index"  # each row's dataset index (int64), in stores made by build_store
ROW_KEY = "_row"  # each row's position in the store, in batches of iter_batches(with_rows=True)
ON_ERROR = ("raise", "skip")
# A file changed within this long of its last change can keep its size, times and inode (coarse
# file-system clocks), so a shard verified that young is verified again at its next read.
_RACY_WINDOW_NS = 2_000_000_000


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


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    """(size, mtime_ns, ctime_ns, inode) of a file, or None when it is missing."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _check_shard(store_dir: Path, shard: dict) -> tuple[int, int, int, int]:
    """Check a shard file's size and sha256 against its metadata entry; return the signature it
    had before the check. Raises StoreError naming the shard when it is missing or corrupt."""
    path = store_dir / shard["file"]
    sig = _signature(path)
    if sig is None:
        raise StoreError(f"store {store_dir}: shard {shard['file']} is missing")
    if sig[0] != shard["bytes"] or sha256_file(path) != shard["sha256"]:
        raise StoreError(
            f"store {store_dir}: shard {shard['file']} is corrupt (size or sha256 differ); "
            "run build_store again with the same arguments to rewrite it"
        )
    return sig


def _dataset_indices(rows: torch.Tensor, skipped: Sequence[int]) -> torch.Tensor:
    """Dataset index of each store row (int64), rows being the dataset's items in order less the
    ``skipped`` indices: row r is item r + (number of skipped s with s - #skipped below s <= r)."""
    s = torch.tensor(sorted(skipped), dtype=torch.long)
    return rows + torch.searchsorted(s - torch.arange(len(s)), rows, right=True)


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
        self._verified: dict[str, tuple] = {}  # shard file -> signature when this reader checked its sha256
        if self.meta.get("key") != self.spec.key:
            raise StoreError(f"store {self.dir}: metadata.json was edited (its spec no longer hashes to its key)")

    @property
    def skipped(self) -> list[dict]:
        """Images left out as unreadable (``build_store(on_error="skip")``): ``{"index", "file"}`` each."""
        return list(self.meta.get("skipped", []))

    @property
    def complete(self) -> bool:
        """True when every image of the spec has been written (or skipped as unreadable)."""
        return bool(self.meta.get("complete")) and self.n_rows + len(self.skipped) == self.spec.n_items

    @property
    def n_rows(self) -> int:
        """Number of images written so far."""
        return sum(s["n"] for s in self.meta["shards"])

    @property
    def row_offsets(self) -> list[int]:
        """The global row index of each shard's first row."""
        offsets, total = [], 0
        for shard in self.meta["shards"]:
            offsets.append(total)
            total += shard["n"]
        return offsets

    @property
    def fields(self) -> dict[str, list[int]]:
        """Field name -> per-row shape (e.g. ``{"acts/stages.2": [128], "label": [], "index": []}``)."""
        fields = {k: v["shape"] for k, v in self.meta["fields"].items()}
        if "skipped" in self.meta:  # written by build_store
            fields[INDEX_FIELD] = []
        return fields

    @property
    def layers(self) -> tuple[str, ...]:
        return self.spec.layers

    def verify(self) -> None:
        """Check every shard's size and sha256 (a file this reader checked before is hashed again only
        if it changed since). Raises StoreError naming the first bad shard."""
        for shard in self.meta["shards"]:
            self._verify_shard(shard)

    def _verify_shard(self, shard: dict) -> tuple[Path, tuple]:
        """The shard's path and signature, its sha256 checked unless this reader checked the file
        in exactly this state (same size, times and inode) before."""
        path, sig = self.dir / shard["file"], _signature(self.dir / shard["file"])
        if sig is not None and self._verified.get(shard["file"]) == sig:
            return path, sig
        self._verified.pop(shard["file"], None)
        sig = _check_shard(self.dir, shard)
        if time.time_ns() - max(sig[1], sig[2]) > _RACY_WINDOW_NS:
            self._verified[shard["file"]] = sig
        return path, sig

    def _require_complete(self) -> None:
        if not self.complete:
            raise StoreError(
                f"store {self.dir} is incomplete ({self.n_rows + len(self.skipped)}/{self.spec.n_items} images); "
                "run build_store again with the same arguments to resume it"
            )

    def _field_names(self, fields: Sequence[str] | None) -> list[str]:
        names = list(fields) if fields is not None else list(self.fields)
        unknown = [f for f in names if f not in self.fields]
        if unknown:
            raise KeyError(f"store has no field(s) {unknown}; fields: {list(self.fields)}")
        return names

    def read_shard(self, index: int, fields: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """One shard as ``{field: (n_shard, ...) tensor}`` (default: every field).

        The file's sha256 is checked first: at this reader's first read of it, and again whenever
        the file changed since. Raises StoreError for an incomplete store or a missing, corrupt or
        changing shard (naming it), KeyError for an unknown field, IndexError for a bad index.
        """
        self._require_complete()
        names = self._field_names(fields)
        shard = self.meta["shards"][index]
        for _ in range(2):  # a file replaced while being read is checked and read again
            path, sig = self._verify_shard(shard)
            with safe_open(path, framework="pt") as f:
                data = {name: f.get_tensor(name) for name in names if name != INDEX_FIELD}
            if _signature(path) == sig:
                break
        else:
            raise StoreError(f"store {self.dir}: shard {shard['file']} keeps changing while being read")
        if INDEX_FIELD in names:
            rows = torch.arange(shard["n"]) + self.row_offsets[index]
            data[INDEX_FIELD] = _dataset_indices(rows, [s["index"] for s in self.skipped])
        return {name: data[name] for name in names}

    def iter_shards(self, fields: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Yield :meth:`read_shard` of every shard, in order (bounded memory)."""
        self._require_complete()
        names = self._field_names(fields)
        for index in range(len(self.meta["shards"])):
            yield self.read_shard(index, names)

    def load(self, field: str) -> torch.Tensor:
        """The whole field as one tensor (N, ...). For stores that fit in memory."""
        return torch.cat([s[field] for s in self.iter_shards([field])])

    def acts(self, layer: str | None = None) -> torch.Tensor:
        """All activations of ``layer`` (default: the only/first layer), (N, U) or (N, ...)."""
        return self.load(acts_field(layer or self.layers[0]))

    def iter_batches(
        self, fields: Sequence[str], batch_size: int, *, shuffle: bool = False, seed: int = 0, with_rows: bool = False
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Mini-batches ``{field: (B, ...) tensor}`` over the store, one shard in memory at a time.

        With ``shuffle``, shard order and rows within each shard are permuted by ``seed``. With
        ``with_rows``, each batch also holds ``ROW_KEY`` (``"_row"``): the (B,) int64 global row
        indices of its rows. Raises as :meth:`read_shard`.
        """
        self._require_complete()
        gen = torch.Generator().manual_seed(seed)
        n_shards, offsets = len(self.meta["shards"]), self.row_offsets
        shard_order = torch.randperm(n_shards, generator=gen).tolist() if shuffle else range(n_shards)
        for si in shard_order:
            data = self.read_shard(si, fields)
            n = self.meta["shards"][si]["n"]
            order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                batch = {k: v[idx] for k, v in data.items()}
                if with_rows:
                    batch[ROW_KEY] = idx + offsets[si]
                yield batch

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
        """Add a batch: ``{field: (n, ...) tensor}``, the same n for every field.

        Raises ValueError for different row counts or a reserved field name ("index", "_row").
        """
        lengths = {v.shape[0] for v in rows.values()}
        if len(lengths) != 1:
            raise ValueError(f"fields have different row counts: { {k: v.shape[0] for k, v in rows.items()} }")
        if INDEX_FIELD in rows or ROW_KEY in rows:
            raise ValueError(f"{INDEX_FIELD!r} and {ROW_KEY!r} are reserved field names")
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

    def skip(self, index: int, file: str | None) -> None:
        """Record dataset item ``index`` (read from ``file``) as left out of the store."""
        self.meta.setdefault("skipped", []).append({"index": int(index), "file": file})

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self._buffered:
                self._flush(self._buffered)
            self.meta["complete"] = self.n_rows + len(self.meta.get("skipped", [])) == self.spec.n_items
            _write_json_atomic(self.dir / METADATA, self.meta)
        # On an error the partial shard in memory is dropped; complete shards stay for resuming.


def _truncate_to_valid(store_dir: Path) -> int:
    """Drop shards that are missing or corrupt (and all after them), and the skipped images
    recorded after the last kept row; return the dataset index to resume from."""
    meta_path = store_dir / METADATA
    meta = json.loads(meta_path.read_text())
    kept = []
    for shard in meta["shards"]:
        try:
            _check_shard(store_dir, shard)
        except StoreError:
            break
        kept.append(shard)
    for shard in meta["shards"][len(kept):]:
        (store_dir / shard["file"]).unlink(missing_ok=True)
    rows, skipped = sum(s["n"] for s in kept), meta.get("skipped", [])
    start = int(_dataset_indices(torch.tensor([rows - 1]), [s["index"] for s in skipped])) + 1 if rows else 0
    before = [s for s in skipped if s["index"] < start]
    if len(kept) != len(meta["shards"]) or len(before) != len(skipped):
        meta["shards"], meta["complete"] = kept, False
        if "skipped" in meta:
            meta["skipped"] = before
        _write_json_atomic(meta_path, meta)
    return start


class _Items(torch.utils.data.Dataset):
    """Items ``start..stop-1`` of a PairedTransform as ``(dataset index, item)``; with ``skip``,
    an unreadable image gives ``(dataset index, error text)`` instead of raising."""

    def __init__(self, paired: PairedTransform, start: int, stop: int, skip: bool):
        self.paired, self.start, self.stop, self.skip = paired, start, stop, skip

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        try:
            return self.start + i, self.paired[self.start + i]
        except UnreadableImageError as err:
            if not self.skip:
                raise
            return self.start + i, str(err)


def _collate(items: list) -> tuple:
    """(batch of the readable items or None, [(dataset index, error text)] of the unreadable ones)."""
    good = [item for _, item in items if not isinstance(item, str)]
    bad = [(index, item) for index, item in items if isinstance(item, str)]
    return (torch.utils.data.default_collate(good) if good else None), bad


def _register_without_skipped(store: "ActivationStore", dataset) -> None:
    """File a store that skipped unreadable images also under its key for
    ``dataset.without(skipped)``, so that listing the folder again after deleting those files
    reuses it. Its shards are hard links to this store's (copies where links fail)."""
    if not store.skipped or not hasattr(dataset, "without"):
        return
    derived = dataset.without([s["index"] for s in store.skipped])
    spec = replace(store.spec, dataset=derived.fingerprint, n_items=store.spec.n_items - len(store.skipped))
    out = store.dir.parent / spec.key
    try:
        if ActivationStore(out).complete:
            return
    except StoreError:
        pass
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for shard in store.meta["shards"]:
        try:
            os.link(store.dir / shard["file"], tmp / shard["file"])
        except OSError:
            shutil.copy2(store.dir / shard["file"], tmp / shard["file"])
    _write_json_atomic(tmp / METADATA, {**store.meta, "key": spec.key, "spec": asdict(spec), "skipped": []})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


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
    on_error: str = "raise",
) -> ActivationStore:
    """Capture ``layers`` of ``target`` over ``dataset`` into a store, or reuse/resume an existing one.

    target: a zoo.TargetModel; dataset: yields (PIL image, label) and has ``fingerprint``;
    layers: names (default ``target.default_layer``); clip: an EmbeddingBackend or None.
    on_error: what an unreadable image does: ``"raise"`` (UnreadableImageError naming the file)
    or ``"skip"`` (a warning naming it; the image is left out and listed in ``metadata.json``
    under ``"skipped"``; the field ``"index"`` maps rows to dataset indices). After skipping, the
    store is also filed under the key of ``dataset.without(skipped)`` (folder datasets), so
    deleting the unreadable files does not recapture it. on_error is not part of the store's key
    (a store that skipped nothing is the same either way); ``"raise"`` refuses one that skipped.
    Stores land in ``root`` (default ``cache_dir()/stores``)/<spec key>. Returns the complete store.
    Raises LayerNotFoundError before any work for an unknown layer; UnreadableImageError with
    ``on_error="raise"`` for an unreadable image, also one a reused store skipped, and whenever
    no image at all can be read.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
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
        elif on_error == "raise" and existing.skipped:
            files = [s["file"] or f"item {s['index']}" for s in existing.skipped]
            raise UnreadableImageError(f"cannot read image(s) {files}: store {store_dir} was built with "
                                       "on_error='skip' and leaves them out; pass on_error='skip' to use it")
        elif existing.complete:
            try:
                existing.verify()
            except StoreError as err:  # rewritten below from the first bad shard on
                warnings.warn(f"{err}; rewriting it", stacklevel=2)
            else:
                _register_without_skipped(existing, dataset)
                return existing
    start = _truncate_to_valid(store_dir) if (store_dir / METADATA).is_file() else 0

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = target.module.to(device).eval()
    paired = PairedTransform(dataset, target.preprocess, None if clip is None else clip.preprocess)
    loader = torch.utils.data.DataLoader(
        _Items(paired, start, spec.n_items, skip=on_error == "skip"), batch_size=batch_size, num_workers=num_workers,
        collate_fn=_collate, pin_memory=device.type == "cuda",
    )
    files = getattr(dataset, "files", None)
    with StoreWriter(store_dir, spec, shard_size) as writer, hooked_activations(model, layers, pooling) as captured, torch.no_grad():
        writer.meta["on_error"] = on_error
        writer.meta.setdefault("skipped", [])
        bar = tqdm(loader, desc=f"capture {','.join(layers)}", initial=start // batch_size,
                   total=(spec.n_items + batch_size - 1) // batch_size, disable=bars_off(progress))
        for batch, unreadable in bar:
            for index, message in unreadable:
                warnings.warn(f"{message}; left out of the store (on_error='skip')", stacklevel=2)
                writer.skip(index, None if files is None else str(files[index]))
            if batch is None:
                continue
            x_model, x_clip, labels = batch
            x_model = x_model.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = forward_checked(model, x_model)
            rows = {acts_field(layer): captured[layer].to(dtype) for layer in layers}
            rows["label"] = torch.as_tensor(labels, dtype=torch.long)
            rows["pred"] = logits.argmax(-1).cpu()
            if clip is not None:
                rows["clip_image"] = clip.encode_images(x_clip).to(dtype)
            writer.append(rows)
        if writer.n_rows == 0:
            raise UnreadableImageError(f"none of the {spec.n_items} images of the dataset could be read")
    store = ActivationStore(store_dir)
    _register_without_skipped(store, dataset)
    return store
