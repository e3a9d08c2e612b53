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
  the store of the dataset with those files deleted (:meth:`FileListDataset.without`);
- the dataset is anything :func:`~miclip_nb.datasets.as_dataset` takes (folders, torch Datasets,
  arrays, lists of images or paths); labels are -1 where unknown (alignment uses ``pred``);
- the caller's model is never moved: capture runs on it where it already sits on the requested
  device, else on a copy moved there.

Readers get the held-out split from the store (:func:`holdout`, ``split=`` of :meth:`~ActivationStore.iter_batches`
and :meth:`~ActivationStore.iter_shards`), so the alignment and the SAE hold out rows the same way.

A *unit transform* turns a layer's raw output into other per-location values before pooling (e.g.
``sae.SAECodes(sae)``: the SAE's codes of every token / location). ``build_store(...,
transform=t)`` captures them from the model; :func:`derive_store` computes them from a store of the
raw outputs (``pooling="none"``) shard by shard, without the model. Either way the field is
``acts/<layer>`` and the spec's ``unit_transform`` (``t.fingerprint``) tells the stores apart; both
routes give the same spec, so the same folder.

Under ``torch.distributed`` (``torchrun``; :mod:`miclip_nb.distributed`), :func:`build_store` run by
every rank splits the items into contiguous, shard-aligned blocks (:func:`rank_block`): rank r
writes ``shard_r<r>_<i>.safetensors`` and its own ``metadata.r<r>.json`` (resumed per rank), and
rank 0 merges the parts in rank order into ``metadata.json``. The folder and key are those of a
one-process build, and so are the rows, their order and (with nothing skipped) the shard
boundaries: readers cannot tell the two apart, and need not.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from . import distributed as _dist
from ._paths import cache_dir, sha256_file
from .capture import POOLINGS, forward_checked, hooked_activations, num_prefix_tokens, pool, resolve_layer
from .datasets import (DataFormatError, ImageDataset, UnreadableImageError, as_dataset, model_inputs,
                       preprocessed_clip_message)
from .embed import state_fingerprint
from ._progress import bars_off

SCHEMA_VERSION = 1
METADATA = "metadata.json"
INDEX_FIELD = "index"  # each row's dataset index (int64), in stores made by build_store
ROW_KEY = "_row"  # each row's position in the store, in batches of iter_batches(with_rows=True)
ON_ERROR = ("raise", "skip")
SPLITS = ("train", "val")  # the values of split= (None: every row)
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
    # The unit transform applied to each layer's raw output before pooling ("<fingerprint>|n_prefix=<n>"),
    # None for the layer's own activations. Left out of the key when None (older keys stay valid).
    unit_transform: str | None = None

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
        fields = asdict(self)
        if fields["unit_transform"] is None:
            del fields["unit_transform"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]

    def unit_identity(self, layer: str) -> str:
        """What the units of ``layer`` in this store are, as an encoder trained on them records it
        (``encoder.meta["model"]``): the model identity for the layer's own activations; for a
        unit transform, ``<model>|source=<key>|layer=<layer>|<transform>`` (for SAE codes
        ``...|sae=<SAE fingerprint>|n_prefix=<n>``, as interpret.UnitProvenance reads it)."""
        if self.unit_transform is None:
            return self.model
        return f"{self.model}|source={self.key}|layer={layer}|{self.unit_transform}"


def acts_field(layer: str) -> str:
    """Name of the field holding ``layer``'s activations."""
    return f"acts/{layer}"


def holdout(rows: torch.Tensor, fraction: float, seed: int, salt: int = 0) -> torch.Tensor:
    """Deterministic held-out membership of global row indices: a multiplicative hash of each row,
    the seed and a salt (each reader keeps its own: align 0, sae 12345), below ``fraction``.

    rows: (M,) int64; returns (M,) bool, True for held-out rows. The same arguments always give
    the same rows, whatever the shard size or reading order.
    """
    h = (rows * 2654435761 + seed * 97531 + salt) % 4294967296
    return h < int(fraction * 4294967296)


class UnitTransform(Protocol):
    """What ``build_store(transform=...)`` and :func:`derive_store` apply to a layer's raw output
    before pooling. ``fingerprint``: identifies the transform and its weights (part of the store
    key). ``__call__(acts)``: (N, T, D) tokens -> (N, T, F), (N, C, H, W) maps -> (N, F, H, W),
    (N, D) -> (N, F), on the activations' device. Optional ``check_source(model, layer)``: raise
    before any work when the transform does not belong to that model identity and layer."""

    fingerprint: str

    def __call__(self, acts: torch.Tensor) -> torch.Tensor: ...


def _check_transform(transform) -> str:
    """The transform's fingerprint; TypeError unless it is a unit transform."""
    fingerprint = getattr(transform, "fingerprint", None)
    if not callable(transform) or not isinstance(fingerprint, str) or not fingerprint:
        raise TypeError(
            f"transform must be a unit transform: an object with a non-empty `fingerprint` string and "
            f"`__call__(layer output) -> per-location values` (e.g. sae.SAECodes(sae)); got a {type(transform).__name__}")
    return fingerprint


def _transform_source(transform, model: str, layers: Sequence[str]) -> None:
    check = getattr(transform, "check_source", None)
    if check is not None:
        for layer in layers:
            check(model, layer)



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

    @staticmethod
    def holdout(rows: torch.Tensor, fraction: float, seed: int, salt: int = 0) -> torch.Tensor:
        """(M,) bool: which global ``rows`` are held out (see :func:`holdout`)."""
        return holdout(rows, fraction, seed, salt)

    def _split_keep(self, rows: torch.Tensor, split: str | None, val_fraction: float, split_seed: int,
                    salt: int) -> torch.Tensor | None:
        """Mask of ``rows`` in ``split`` (None: all rows, no mask)."""
        if split is None:
            return None
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        held = holdout(rows, val_fraction, split_seed, salt)
        return held if split == "val" else ~held

    def split_sizes(self, split: str, val_fraction: float, split_seed: int = 0, salt: int = 0) -> list[int]:
        """Rows of each shard in ``split`` ("train" or "val"; see :meth:`iter_shards`), from the
        metadata alone."""
        return [int(self._split_keep(torch.arange(o, o + sh["n"]), split, val_fraction, split_seed, salt).sum())
                for o, sh in zip(self.row_offsets, self.meta["shards"])]

    def iter_shards(self, fields: Sequence[str] | None = None, *, split: str | None = None, val_fraction: float = 0.1,
                    split_seed: int = 0, salt: int = 0, with_rows: bool = False,
                    order: Sequence[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Yield :meth:`read_shard` of every shard (in ``order``, default first to last): one shard
        in memory at a time.

        split: None (every row), "train" or "val": only the shard's rows that :func:`holdout`
        (``val_fraction``, ``split_seed``, ``salt``) keeps out of / holds out for validation.
        with_rows: also ``ROW_KEY`` (``"_row"``), the (n,) int64 global row indices.
        Raises as :meth:`read_shard`, ValueError for a bad split.
        """
        self._require_complete()
        names = self._field_names(fields)
        offsets = self.row_offsets
        for index in range(len(offsets)) if order is None else order:
            data = self.read_shard(index, names)
            rows = torch.arange(offsets[index], offsets[index] + self.meta["shards"][index]["n"])
            keep = self._split_keep(rows, split, val_fraction, split_seed, salt)
            if keep is not None:
                data, rows = {k: v[keep] for k, v in data.items()}, rows[keep]
            if with_rows:
                data[ROW_KEY] = rows
            yield data

    def load(self, field: str) -> torch.Tensor:
        """The whole field as one tensor (N, ...). For stores that fit in memory."""
        return torch.cat([s[field] for s in self.iter_shards([field])])

    def acts(self, layer: str | None = None) -> torch.Tensor:
        """All activations of ``layer`` (default: the only/first layer), (N, U) or (N, ...)."""
        return self.load(acts_field(layer or self.layers[0]))

    def iter_batches(
        self, fields: Sequence[str], batch_size: int, *, shuffle: bool = False, seed: int = 0, with_rows: bool = False,
        split: str | None = None, val_fraction: float = 0.1, split_seed: int = 0, salt: int = 0,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Mini-batches ``{field: (B, ...) tensor}`` over the store, one shard in memory at a time.

        With ``shuffle``, shard order and rows within each shard are permuted by ``seed``. With
        ``with_rows``, each batch also holds ``ROW_KEY`` (``"_row"``): the (B,) int64 global row
        indices of its rows. split: None (every row), "train" or "val" (:func:`holdout` with
        ``val_fraction``, ``split_seed``, ``salt``): each batch of ``batch_size`` rows keeps those
        of the split, so a split's batches hold up to ``batch_size`` rows and both splits of one
        ``seed`` cut the same shuffled sequence (empty batches are not yielded). Raises as
        :meth:`read_shard`, ValueError for a bad split.
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
                keep = self._split_keep(idx + offsets[si], split, val_fraction, split_seed, salt)
                if keep is not None:
                    idx = idx[keep]
                    if len(idx) == 0:
                        continue
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

    def __init__(self, store_dir: Path, spec: StoreSpec, shard_size: int, *, meta_name: str = METADATA,
                 shard_prefix: str = "shard_", n_expected: int | None = None):
        """store_dir: the store folder (created); spec: its StoreSpec; shard_size: rows per shard.
        meta_name / shard_prefix / n_expected: the metadata file, the shard file names and the
        number of images (written + skipped) that make it complete: by default the store's own
        ``metadata.json``, ``shard_<i>.safetensors`` and ``spec.n_items``; one rank's part of a
        distributed build writes ``metadata.r<r>.json``, ``shard_r<r>_<i>.safetensors`` and its
        block's size. An existing metadata file is continued."""
        self.dir, self.spec, self.shard_size = Path(store_dir), spec, shard_size
        self.meta_name, self.shard_prefix = meta_name, shard_prefix
        self.n_expected = spec.n_items if n_expected is None else n_expected
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / meta_name
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
        name = f"{self.shard_prefix}{len(self.meta['shards']):05d}.safetensors"
        tmp = self.dir / (name + ".tmp")
        save_file(shard, str(tmp))
        os.replace(tmp, self.dir / name)
        path = self.dir / name
        if not self.meta["fields"]:
            self.meta["fields"] = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in shard.items()}
        self.meta["shards"].append({"file": name, "n": n, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        _write_json_atomic(self.dir / self.meta_name, self.meta)
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
            self.meta["complete"] = self.n_rows + len(self.meta.get("skipped", [])) == self.n_expected
            _write_json_atomic(self.dir / self.meta_name, self.meta)
        # On an error the partial shard in memory is dropped; complete shards stay for resuming.


def _truncate_to_valid(store_dir: Path, meta_name: str = METADATA, first: int = 0) -> int:
    """Drop shards that are missing or corrupt (and all after them), and the skipped images
    recorded after the last kept row; return the dataset index to resume from. ``meta_name`` /
    ``first``: the metadata file and the dataset index of its first item (one rank's part of a
    distributed build)."""
    meta_path = store_dir / meta_name
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
    start = first + int(_dataset_indices(torch.tensor([rows - 1]), [s["index"] - first for s in skipped])) + 1 \
        if rows else first
    before = [s for s in skipped if s["index"] < start]
    if len(kept) != len(meta["shards"]) or len(before) != len(skipped):
        meta["shards"], meta["complete"] = kept, False
        if "skipped" in meta:
            meta["skipped"] = before
        _write_json_atomic(meta_path, meta)
    return start


class _Items(torch.utils.data.Dataset):
    """Items ``start..stop-1`` of an ImageDataset as ``(dataset index, (model input, CLIP input,
    label))`` (datasets.model_inputs); with ``skip``, an unreadable image gives ``(dataset index,
    error text)`` instead of raising."""

    def __init__(self, dataset: ImageDataset, model_transform, clip_transform, start: int, stop: int, skip: bool):
        self.dataset, self.model_transform, self.clip_transform = dataset, model_transform, clip_transform
        self.start, self.stop, self.skip = start, stop, skip

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        index = self.start + i
        try:
            image, label = self.dataset[index]
            return index, model_inputs(image, label, self.model_transform, self.clip_transform,
                                       f"item {index} of {self.dataset.name}")
        except UnreadableImageError as err:
            if not self.skip:
                raise
            return index, str(err)


def _collate(items: list) -> tuple:
    """(batch of the readable items or None, [(dataset index, error text)] of the unreadable ones)."""
    good = [item for _, item in items if not isinstance(item, str)]
    bad = [(index, item) for index, item in items if isinstance(item, str)]
    return (torch.utils.data.default_collate(good) if good else None), bad


def _register_without_skipped(store: "ActivationStore", dataset) -> None:
    """File a store that skipped unreadable images also under its key for
    ``dataset.without(skipped)``, so that listing the folder again after deleting those files
    reuses it. Its shards are hard links to this store's (copies where links fail)."""
    without = getattr(dataset, "without", None)
    derived = without([s["index"] for s in store.skipped]) if store.skipped and without is not None else None
    if derived is None:
        return
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
               dtype: torch.dtype = torch.float32, transform=None) -> StoreSpec:
    """The :class:`StoreSpec` for capturing ``layers`` of ``target`` (a zoo.TargetModel) on
    ``dataset`` (anything :func:`~miclip_nb.datasets.as_dataset` takes), optionally with a CLIP
    backend and a unit transform (see :func:`build_store`). Raises ValueError for a bad n_items or
    pooling, DataFormatError for data that are not images, TypeError for a bad transform."""
    dataset = as_dataset(dataset)
    n = len(dataset) if n_items is None else n_items
    if not 0 < n <= len(dataset):
        raise ValueError(f"n_items must be in 1..{len(dataset)}, got {n}")
    unit_transform = None
    if transform is not None:
        unit_transform = f"{_check_transform(transform)}|n_prefix={num_prefix_tokens(target.module)}"
    return StoreSpec(
        model=model_identity(target), layers=tuple(layers), pooling=pooling, dataset=dataset.fingerprint, n_items=n,
        transform=describe_transform(target.preprocess), clip=None if clip is None else clip.fingerprint,
        clip_transform=None if clip is None else describe_transform(getattr(clip, "_preprocess", clip.preprocess)),
        dtype=str(dtype), unit_transform=unit_transform,
    )


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """The device asked for (default: CUDA when available), with CUDA's index made explicit."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def module_on_device(module: nn.Module, device: str | torch.device) -> tuple[nn.Module, bool]:
    """(module to run on ``device``, whether it is a copy): the caller's own module when every
    parameter and buffer already sits on ``device``; otherwise ``copy.deepcopy(module).to(device)``,
    so the caller's module is never moved (the copy costs the model's memory once more, on
    ``device``, for as long as it is used)."""
    device = torch.device(device)
    tensors = list(module.parameters()) + list(module.buffers())
    if all(_same_device(t.device, device) for t in tensors):
        return module, False
    return copy.deepcopy(module).to(device), True


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """The module in eval mode inside the block; each submodule's training flag restored after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


def _open_existing(store_dir: Path, spec: StoreSpec) -> "ActivationStore | None":
    """The store at ``store_dir`` when it has ``spec`` (complete or not); None when there is none,
    after deleting a folder whose metadata is unreadable or whose spec differs (warning)."""
    if not (store_dir / METADATA).is_file():
        return None
    try:
        existing = ActivationStore(store_dir)
    except StoreError as err:
        existing = None
        warnings.warn(f"{err}; deleting it and rebuilding the store from scratch", stacklevel=3)
    if existing is None or existing.spec != spec:
        shutil.rmtree(store_dir)  # a hash collision or a hand-edited folder: never reuse it
        return None
    return existing


def _usable(existing: "ActivationStore") -> bool:
    """True when a store is complete and every shard checks out (a warning names a bad one,
    which the caller then rewrites from there on)."""
    if not existing.complete:
        return False
    try:
        existing.verify()
    except StoreError as err:
        warnings.warn(f"{err}; rewriting it", stacklevel=3)
        return False
    return True


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
    transform=None,
    distributed: bool | None = None,
) -> ActivationStore:
    """Capture ``layers`` of ``target`` over ``dataset`` into a store, or reuse/resume an existing one.

    target: a zoo.TargetModel; dataset: anything :func:`~miclip_nb.datasets.as_dataset` takes (a
    folder, a torch Dataset of images or (image, label), a list of PIL images or paths, a uint8
    (N, H, W, 3) / (N, 3, H, W) array, preprocessed float (N, 3, H, W) images, which go to the model
    as they are); labels -1 (unknown) are stored as they are. layers: names (default
    ``target.default_layer``); clip: an EmbeddingBackend or None (it needs the original images,
    not preprocessed tensors). The model runs on ``device`` (default CUDA when available): on
    ``target.module`` itself when it already sits there, else on a copy, so the caller's module
    is never moved (nor left in another train/eval mode).
    transform: a unit transform (:class:`UnitTransform`, e.g. ``sae.SAECodes(sae)``) applied to each
    layer's raw output before ``pooling``; the field stays ``acts/<layer>``, the spec records the
    transform, and the store equals ``derive_store(<the pooling="none" store>, transform, pooling=...)``.
    on_error: what an unreadable image does: ``"raise"`` (UnreadableImageError naming the file)
    or ``"skip"`` (a warning naming it; the image is left out and listed in ``metadata.json``
    under ``"skipped"``; the field ``"index"`` maps rows to dataset indices). After skipping, the
    store is also filed under the key of ``dataset.without(skipped)`` (folder datasets), so
    deleting the unreadable files does not recapture it. on_error is not part of the store's key
    (a store that skipped nothing is the same either way); ``"raise"`` refuses one that skipped.
    Stores land in ``root`` (default ``cache_dir()/stores``)/<spec key>. Returns the complete store.
    distributed: None (default) runs distributed when a ``torch.distributed`` process group with
    more than one rank is initialised (torchrun; :mod:`miclip_nb.distributed`), True demands one,
    False never. Distributed, every rank calls build_store with the same arguments: rank r of W
    captures the contiguous, shard-aligned block :func:`rank_block` of the items into its own
    shards ``shard_r<r>_<i>.safetensors`` and ``metadata.r<r>.json`` (on ``cuda:<LOCAL_RANK>`` by
    default), and rank 0 merges the parts, in rank order, into ``metadata.json`` after a barrier.
    The key does not depend on W; the rows, their order and values are a one-process build's (the
    same batches of ``batch_size`` when ``shard_size`` is a multiple of it, as by default; the same
    shard boundaries unless images are skipped). An interrupted distributed build resumes per rank
    (from each part's last valid shard, with the same W; another W recaptures the blocks that
    moved); a complete store is reused whoever built it (its shards verified by all ranks, each
    its share). A rank that raises (e.g. an unreadable image with ``on_error="raise"``) ends
    its process: the launcher (torchrun) then stops the others.
    Raises LayerNotFoundError before any work for an unknown layer; DataFormatError (a ValueError)
    for data that are not images, or preprocessed tensors with a CLIP backend; TypeError for a
    bad transform (and what its ``check_source`` raises); UnreadableImageError with
    ``on_error="raise"`` for an unreadable image, also one a reused store skipped, and whenever
    no image at all can be read.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    distributed = _dist.enabled(distributed)
    progress = progress and _dist.rank_and_world()[0] == 0
    if layers is None:
        if target.default_layer is None:
            raise ValueError("name the layers to capture (this model has no default layer)")
        layers = [target.default_layer]
    layers = [layers] if isinstance(layers, str) else list(layers)
    for layer in layers:
        resolve_layer(target.module, layer)
    if transform is not None:
        _check_transform(transform)
    dataset = as_dataset(dataset, progress=progress)
    if clip is not None and dataset.preprocessed:
        raise DataFormatError(preprocessed_clip_message(dataset.name))
    spec = store_spec(target, dataset, layers, pooling, clip, n_items, dtype, transform)
    if transform is not None:
        _transform_source(transform, spec.model, layers)
    store_dir = (Path(root) if root is not None else cache_dir() / "stores") / spec.key
    if distributed:
        return _build_distributed(target, dataset, spec, store_dir, layers, pooling, clip, transform,
                                  batch_size=batch_size, shard_size=shard_size, num_workers=num_workers, device=device,
                                  dtype=dtype, progress=progress, on_error=on_error)
    existing = _open_existing(store_dir, spec)
    if existing is not None:
        if on_error == "raise" and existing.skipped:
            files = [s["file"] or f"item {s['index']}" for s in existing.skipped]
            raise UnreadableImageError(f"cannot read image(s) {files}: store {store_dir} was built with "
                                       "on_error='skip' and leaves them out; pass on_error='skip' to use it")
        if _usable(existing):
            _register_without_skipped(existing, dataset)
            return existing
    start = _truncate_to_valid(store_dir) if (store_dir / METADATA).is_file() else 0

    with StoreWriter(store_dir, spec, shard_size) as writer:
        writer.meta["on_error"] = on_error
        writer.meta.setdefault("skipped", [])
        _capture_rows(writer, target, dataset, spec, layers, pooling, clip, transform, start, spec.n_items,
                      batch_size=batch_size, grid=False, num_workers=num_workers, device=_resolve_device(device),
                      dtype=dtype, progress=progress, on_error=on_error, stacklevel=3)
        if writer.n_rows == 0:
            raise UnreadableImageError(f"none of the {spec.n_items} images of the dataset could be read")
    store = ActivationStore(store_dir)
    _register_without_skipped(store, dataset)
    return store


def _grid_batches(start: int, stop: int, batch_size: int) -> list[list[int]]:
    """Batches of positions ``0..stop-start-1`` (items ``start..stop-1``) cut where the dataset's
    global batch grid (multiples of ``batch_size``) cuts: a rank's block gets the batches a
    one-process build forms, but for the one straddling its block's edges."""
    edges = [start, *range((start // batch_size + 1) * batch_size, stop, batch_size), stop]
    return [list(range(a - start, b - start)) for a, b in zip(edges, edges[1:]) if b > a]


def _capture_rows(writer: "StoreWriter", target, dataset, spec: StoreSpec, layers: Sequence[str], pooling: str, clip,
                  transform, start: int, stop: int, *, batch_size: int, grid: bool, num_workers: int,
                  device: torch.device, dtype: torch.dtype, progress: bool, on_error: str, stacklevel: int) -> None:
    """Capture dataset items ``start..stop-1`` into ``writer`` (see :func:`build_store`); ``grid``:
    batches cut on the global grid of ``batch_size`` (:func:`_grid_batches`) rather than from ``start``."""
    module, _ = module_on_device(target.module, device)
    n_prefix = num_prefix_tokens(module)
    items = _Items(dataset, target.preprocess, None if clip is None else clip.preprocess, start, stop,
                   skip=on_error == "skip")
    batching = dict(batch_sampler=_grid_batches(start, stop, batch_size)) if grid else dict(batch_size=batch_size)
    loader = torch.utils.data.DataLoader(items, num_workers=num_workers, collate_fn=_collate,
                                         pin_memory=device.type == "cuda", **batching)
    files = dataset.files
    hook_pooling = pooling if transform is None else "none"
    with _eval_mode(module) as model, hooked_activations(model, layers, hook_pooling) as captured, torch.no_grad():
        if grid:
            first, total = 0, len(loader)
        else:
            first, total = start // batch_size, (spec.n_items + batch_size - 1) // batch_size
        bar = tqdm(loader, desc=f"capture {','.join(layers)}", initial=first, total=total, disable=bars_off(progress))
        for batch, unreadable in bar:
            for index, message in unreadable:
                warnings.warn(f"{message}; left out of the store (on_error='skip')", stacklevel=stacklevel)
                writer.skip(index, None if files is None else str(files[index]))
            if batch is None:
                continue
            x_model, x_clip, labels = batch
            x_model = x_model.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = forward_checked(model, x_model)
                values = captured if transform is None else {
                    layer: pool(transform(captured[layer]), pooling, n_prefix) for layer in layers}
            rows = {acts_field(layer): values[layer].to(dtype) for layer in layers}
            rows["label"] = torch.as_tensor(labels, dtype=torch.long)
            rows["pred"] = logits.argmax(-1).cpu()
            if clip is not None:
                rows["clip_image"] = clip.encode_images(x_clip).to(dtype)
            writer.append(rows)


# --------------------------------------------------------------------------------------------
# Distributed capture (torch.distributed; see miclip_nb.distributed)

#: One rank's part of a distributed build: its metadata file and its shards' name prefix.
PART_METADATA = "metadata.r{rank}.json"
PART_SHARD_PREFIX = "shard_r{rank}_"
_PART_RE = re.compile(r"metadata\.r(\d+)\.json")


def rank_block(n_items: int, shard_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """The dataset items ``[lo, hi)`` that ``rank`` of ``world_size`` captures in a distributed
    build: a contiguous run of whole shard slots (slots ``[S*r//W, S*(r+1)//W)`` of the
    ``S = ceil(n_items / shard_size)`` slots of ``shard_size`` items), so the store's shard
    boundaries are a one-process build's (with nothing skipped). A rank gets an empty block when
    there are fewer slots than ranks."""
    slots = -(-n_items // shard_size)
    a, b = _dist.split(slots, rank, world_size)
    return min(a * shard_size, n_items), min(b * shard_size, n_items)


def _read_json(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _resume_part(store_dir: Path, spec: StoreSpec, rank: int, lo: int, hi: int, shard_size: int) -> int:
    """Where this rank's part resumes: after its last valid shard when its metadata file is for
    the same spec, block and shard size; else its block's start, after deleting its old files."""
    path = store_dir / PART_METADATA.format(rank=rank)
    if not path.is_file():
        return lo
    meta = _read_json(path)
    if (meta is not None and meta.get("key") == spec.key and meta.get("block") == [lo, hi]
            and meta.get("shard_size") == shard_size and isinstance(meta.get("shards"), list)):
        return _truncate_to_valid(store_dir, path.name, lo)
    for old in store_dir.glob(PART_SHARD_PREFIX.format(rank=rank) + "*"):
        old.unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    return lo


def _merge_parts(store_dir: Path, spec: StoreSpec, world_size: int, shard_size: int, on_error: str) -> dict:
    """Write the store's ``metadata.json`` from the ranks' complete parts (shards in rank order,
    so rows in dataset order), drop parts of ranks beyond ``world_size`` and shard files no longer
    listed; return the merged metadata. Raises StoreError for a missing, incomplete or
    inconsistent part."""
    shards, skipped, fields = [], [], {}
    for rank in range(world_size):
        part = _read_json(store_dir / PART_METADATA.format(rank=rank))
        if part is None or part.get("key") != spec.key or not part.get("complete"):
            raise StoreError(f"store {store_dir}: rank {rank}'s part is missing or incomplete; run the build again")
        if part["fields"] and fields and part["fields"] != fields:
            raise StoreError(f"store {store_dir}: rank {rank} wrote fields {part['fields']}, lower ranks {fields}")
        fields = fields or part["fields"]
        shards += part["shards"]
        skipped += part.get("skipped", [])
    meta = {"schema": SCHEMA_VERSION, "key": spec.key, "spec": asdict(spec), "shard_size": shard_size, "fields": fields,
            "shards": shards, "complete": sum(s["n"] for s in shards) + len(skipped) == spec.n_items,
            "on_error": on_error, "skipped": sorted(skipped, key=lambda s: s["index"]), "world_size": world_size}
    _write_json_atomic(store_dir / METADATA, meta)
    for path in store_dir.iterdir():
        match = _PART_RE.fullmatch(path.name)
        if match and int(match.group(1)) >= world_size:
            path.unlink(missing_ok=True)
    listed = {s["file"] for s in shards}
    for path in store_dir.glob("shard_*.safetensors*"):
        if path.name not in listed:
            path.unlink(missing_ok=True)
    return meta


def _drop_merged(store_dir: Path, meta: dict) -> None:
    """Delete a store's ``metadata.json`` and the shards it lists that no rank's part owns (a
    one-process build's), so that the ranks' parts rebuild it."""
    for shard in meta.get("shards", []):
        if not re.match(r"shard_r\d+_", shard["file"]):
            (store_dir / shard["file"]).unlink(missing_ok=True)
    (store_dir / METADATA).unlink(missing_ok=True)


def _build_distributed(target, dataset, spec: StoreSpec, store_dir: Path, layers: Sequence[str], pooling: str, clip,
                       transform, *, batch_size: int, shard_size: int, num_workers: int, device, dtype: torch.dtype,
                       progress: bool, on_error: str) -> "ActivationStore":
    """build_store's distributed route (see :func:`build_store`, ``distributed``)."""
    rank, world = _dist.rank_and_world()

    def inspect() -> str:  # rank 0: "none", "complete" (shards still to verify) or "build"
        existing = _open_existing(store_dir, spec)
        if existing is None:
            return "none"
        if on_error == "raise" and existing.skipped:
            files = [s["file"] or f"item {s['index']}" for s in existing.skipped]
            raise UnreadableImageError(f"cannot read image(s) {files}: store {store_dir} was built with "
                                       "on_error='skip' and leaves them out; pass on_error='skip' to use it")
        if existing.complete:
            return "complete"
        _drop_merged(store_dir, existing.meta)
        return "build"

    state = _dist.on_rank0(inspect)
    if state == "complete":  # every rank checks the sha256 of its share of the shards
        existing = ActivationStore(store_dir)
        problem = None
        try:
            for i in range(rank, len(existing.meta["shards"]), world):
                _check_shard(store_dir, existing.meta["shards"][i])
        except StoreError as err:
            problem = str(err)
        problems = [p for p in _dist.all_gather_objects(problem) if p]

        def reuse_or_drop() -> bool:
            if problems:
                warnings.warn(f"{problems[0]}; rewriting it", stacklevel=5)
                _drop_merged(store_dir, existing.meta)
                return False
            _register_without_skipped(existing, dataset)
            return True

        if _dist.on_rank0(reuse_or_drop):
            return ActivationStore(store_dir)

    lo, hi = rank_block(spec.n_items, shard_size, rank, world)
    store_dir.mkdir(parents=True, exist_ok=True)
    start = _resume_part(store_dir, spec, rank, lo, hi, shard_size)
    writer = StoreWriter(store_dir, spec, shard_size, meta_name=PART_METADATA.format(rank=rank),
                         shard_prefix=PART_SHARD_PREFIX.format(rank=rank), n_expected=hi - lo)
    writer.meta.update({"block": [lo, hi], "rank": rank, "world_size": world, "on_error": on_error})
    writer.meta.setdefault("skipped", [])
    with writer:
        if start < hi:
            device = _resolve_device(device or _dist.default_device())
            _capture_rows(writer, target, dataset, spec, layers, pooling, clip, transform, start, hi,
                          batch_size=batch_size, grid=True, num_workers=num_workers, device=device, dtype=dtype,
                          progress=progress, on_error=on_error, stacklevel=4)
    _dist.barrier()

    def merge() -> None:
        meta = _merge_parts(store_dir, spec, world, shard_size, on_error)
        if not meta["shards"]:
            raise UnreadableImageError(f"none of the {spec.n_items} images of the dataset could be read")
        _register_without_skipped(ActivationStore(store_dir), dataset)

    _dist.on_rank0(merge)
    return ActivationStore(store_dir)


def infer_n_prefix(n_tokens: int) -> int:
    """Leading non-patch tokens of a ViT output with ``n_tokens`` tokens, assuming a square patch
    grid (65 -> 1, 197 -> 1, 201 -> 5, 64 -> 0). Pass ``n_prefix`` explicitly where that fails."""
    side = math.isqrt(n_tokens)
    return n_tokens - side * side


@torch.no_grad()
def derive_store(
    source: ActivationStore,
    transform,
    *,
    layers: Sequence[str] | str | None = None,
    pooling: str = "mean",
    n_prefix: int | None = None,
    root: str | Path | None = None,
    shard_size: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> ActivationStore:
    """A new store with ``transform`` applied to ``layers`` of ``source`` and then ``pooling``,
    shard by shard, without a model pass (or reuse/resume it).

    source: a complete store of raw outputs (``pooling="none"``: tokens (N, T, D) or maps
    (N, C, H, W) per row); transform: a unit transform (:class:`UnitTransform`, e.g.
    ``sae.SAECodes(sae)``); layers: default every layer of the source; pooling: of the transformed
    per-location values (capture.POOLINGS; over patch tokens, the first ``n_prefix`` excluded,
    default inferred from a square patch grid). The result has the same rows, ``label``, ``pred``,
    ``clip_image`` and skipped list as the source, and ``acts/<layer>`` of the transformed values;
    its spec is the one ``build_store(..., pooling=pooling, transform=transform)`` gives on the
    source's model and images, so both routes share the folder (``root``, default
    ``cache_dir()/stores``). Memory: one source shard, and one batch of ``batch_size`` rows of
    per-location transform outputs. Raises StoreError for an incomplete or corrupt source,
    ValueError for a pooled or already transformed source, an unknown layer or pooling, TypeError
    for a bad transform, and what the transform raises on the source's per-row shape (checked on
    one zero row before any work). Under a ``torch.distributed`` process group of several ranks
    (every rank calling it), rank 0 derives the store and every rank returns it.
    """
    fingerprint = _check_transform(transform)
    source._require_complete()
    if source.spec.pooling != "none" or source.spec.unit_transform is not None:
        raise ValueError(f"derive_store needs the raw per-location outputs of a layer: a store built with "
                         f"pooling='none' and no transform; {source.dir} has pooling={source.spec.pooling!r}"
                         + (f" and transform {source.spec.unit_transform!r}" if source.spec.unit_transform else ""))
    layers = list(source.layers) if layers is None else [layers] if isinstance(layers, str) else list(layers)
    for layer in layers:
        if acts_field(layer) not in source.fields:
            raise ValueError(f"store has no layer {layer!r}; layers: {list(source.layers)}")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
    shapes = {layer: source.fields[acts_field(layer)] for layer in layers}
    if n_prefix is None:
        tokens = [shape for shape in shapes.values() if len(shape) == 2]
        n_prefix = infer_n_prefix(tokens[0][0]) if tokens else 0
    _transform_source(transform, source.spec.model, layers)
    device = _resolve_device(device)
    for shape in shapes.values():  # fail on the per-row shape before any work
        transform(torch.zeros(1, *shape, device=device))
    spec = replace(source.spec, layers=tuple(layers), pooling=pooling, unit_transform=f"{fingerprint}|n_prefix={n_prefix}")
    store_dir = (Path(root) if root is not None else cache_dir() / "stores") / spec.key
    if _dist.enabled(None):  # one writer: rank 0 derives, every rank gets its result (or its error)
        return ActivationStore(_dist.on_rank0(lambda: str(_derive(
            source, transform, spec, store_dir, layers, pooling, n_prefix, batch_size, shard_size, device,
            progress).dir)))
    return _derive(source, transform, spec, store_dir, layers, pooling, n_prefix, batch_size, shard_size, device, progress)


def _derive(source: ActivationStore, transform, spec: StoreSpec, store_dir: Path, layers: Sequence[str], pooling: str,
            n_prefix: int, batch_size: int, shard_size: int | None, device: torch.device,
            progress: bool) -> ActivationStore:
    """derive_store's work, once its arguments are checked (see :func:`derive_store`)."""
    existing = _open_existing(store_dir, spec)
    if existing is not None and _usable(existing):
        return existing
    if (store_dir / METADATA).is_file():
        _truncate_to_valid(store_dir)
    dtype = getattr(torch, spec.dtype.split(".")[-1])
    extra = [f for f in source.fields if not f.startswith("acts/") and f != INDEX_FIELD]
    with StoreWriter(store_dir, spec, shard_size or int(source.meta.get("shard_size", 2048))) as writer:
        done = writer.n_rows  # rows of the shards kept from an interrupted pass
        if "skipped" in source.meta:
            writer.meta["skipped"] = source.skipped
        if "on_error" in source.meta:
            writer.meta["on_error"] = source.meta["on_error"]
        offsets = source.row_offsets
        todo = [i for i, sh in enumerate(source.meta["shards"]) if offsets[i] + sh["n"] > done]
        for si in tqdm(todo, desc=f"derive {','.join(layers)}", disable=bars_off(progress)):
            shard = source.read_shard(si, [acts_field(layer) for layer in layers] + extra)
            first = max(done - offsets[si], 0)
            for start in range(first, source.meta["shards"][si]["n"], batch_size):
                sl = slice(start, start + batch_size)
                rows = {}
                for layer in layers:
                    acts = shard[acts_field(layer)][sl].to(device)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        rows[acts_field(layer)] = pool(transform(acts), pooling, n_prefix).cpu().to(dtype)
                rows.update({f: shard[f][sl] for f in extra})
                writer.append(rows)
    return ActivationStore(store_dir)
