"""Mechanism-concept alignment: the neuron encoder E_n and its contrastive training.

For image i with pooled activations a_i, CLIP image embedding E_i(x_i) and the text embedding
E_c(c_i) of the label the model *predicted*, MiClip trains E_n to minimise

    L = InfoNCE_sym(E_n(a), E_c(c_pred)) + InfoNCE_sym(E_n(a), E_i(x))

with open_clip's ``ClipLoss`` and one learnable temperature per term. Activations are standardised
with statistics computed on the training rows and stored inside the encoder (so it takes raw
activations). Training streams mini-batches from an :class:`~miclip_nb.store.ActivationStore`;
a deterministic hash of the row index holds out a validation split for early stopping.

Unit dropout (our choice; the paper is silent). Localization queries the encoder with one unit
active at a time (``interpret.unit_embeddings``), far from the full activation vectors it sees in
training. Trained on full vectors, a linear encoder spreads each concept over many correlated
units, and a unit's column says little about what that unit alone does: on the toy CNN
(stages.2, 4000 training images) removing the top-5 units of a class (plain cosine) costs 1.3
accuracy points, as many as random units (1.5). Zeroing 95% of the standardised units of every
training row (``unit_dropout=0.95``; inverted dropout, so the encoder is unchanged at evaluation)
makes each unit's weights answer "what does this unit alone say about the image and the label",
the question localization asks: removal then costs 11.4 points, 16.3 with the posterior ranking
(mean of 3 seeds, 1200 test images; ``tests/test_miclip_toy.py``). Set it to 0 to train on whole
vectors, as :mod:`miclip_nb.diagnose` does, since it embeds whole vectors.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed as _dist
from ._checkpoint import read_checkpoint, save_checkpoint
from ._paths import cache_dir
from .store import INDEX_FIELD, ROW_KEY, ActivationStore, acts_field
from ._progress import bars_off

ENCODER_SCHEMA_VERSION = 1
#: The salt of the alignment's held-out split (store.holdout); the SAE uses its own. Kept so that a
#: seed gives the same encoder as before the split moved into the store.
ALIGN_SPLIT_SALT = 0


class EncoderMismatchError(ValueError):
    """An encoder applied to activations of another model, layer or pooling than it was trained on."""


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of a neuron encoder."""

    n_units: int  # U, input size (neurons or SAE features)
    embed_dim: int  # D, the CLIP embedding size
    kind: str = "linear"  # "linear" or "mlp"
    hidden: int = 512  # hidden width of the MLP option

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"kind must be 'linear' or 'mlp', got {self.kind!r}")
        if self.n_units <= 0 or self.embed_dim <= 0 or self.hidden <= 0:
            raise ValueError("n_units, embed_dim and hidden must be positive")


@dataclass(frozen=True)
class AlignConfig:
    """How to train the alignment."""

    kind: str = "linear"  # encoder architecture, see EncoderConfig
    hidden: int = 512  # MLP hidden width
    epochs: int = 30  # maximum passes over the training rows
    batch_size: int = 256  # rows per contrastive batch
    lr: float = 3e-3  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    val_fraction: float = 0.1  # share of rows held out (by a hash of the row index)
    patience: int = 5  # epochs without validation improvement before stopping
    concept_weight: float = 1.0  # weight of the neuron-concept (predicted label) term
    image_weight: float = 1.0  # weight of the neuron-image term
    init_temperature: float = 0.07  # initial temperature of both terms (as CLIP)
    unit_dropout: float = 0.95  # share of (standardised) input units zeroed per training row (see module doc)

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError("val_fraction must be in (0, 0.5)")
        if self.epochs <= 0 or self.batch_size < 2:
            raise ValueError("epochs must be positive and batch_size at least 2")
        if not 0.0 <= self.unit_dropout < 1.0:
            raise ValueError("unit_dropout must be in [0, 1)")
        if self.concept_weight < 0 or self.image_weight < 0 or self.concept_weight + self.image_weight == 0:
            raise ValueError("loss weights must be non-negative and not both zero")


class NeuronEncoder(nn.Module):
    """E_n: raw activations (N, U) -> embeddings (N, D) (not normalised; the loss normalises).

    Holds the standardisation statistics as buffers and the provenance of its training data in
    ``meta`` (model fingerprint, layer, pooling), checked by :meth:`check_compatible`.
    """

    def __init__(self, config: EncoderConfig, meta: dict | None = None):
        super().__init__()
        self.config = config
        self.meta = dict(meta or {})
        self.register_buffer("act_mean", torch.zeros(config.n_units))
        self.register_buffer("act_std", torch.ones(config.n_units))
        self.register_buffer("constant_mask", torch.zeros(config.n_units, dtype=torch.bool))
        if config.kind == "linear":
            self.net = nn.Linear(config.n_units, config.embed_dim)
        else:
            self.net = nn.Sequential(nn.Linear(config.n_units, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.embed_dim))

    def forward(self, acts_nu: torch.Tensor, unit_dropout: float = 0.0, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """acts_nu: (N, U) raw activations -> (N, D). unit_dropout: share of standardised units
        zeroed per row in training mode (inverted dropout). mask: an (N, U) inverted-dropout mask
        (0 or 1 / (1 - p)) multiplied in instead of drawing one (distributed training draws the
        whole batch's mask on every rank and applies each rank's rows). Raises
        EncoderMismatchError for another number of units."""
        if acts_nu.shape[-1] != self.config.n_units:
            raise EncoderMismatchError(f"encoder expects {self.config.n_units} units, got activations with {acts_nu.shape[-1]}")
        z = (acts_nu - self.act_mean) / self.act_std
        if mask is not None:
            z = z * mask
        elif unit_dropout > 0 and self.training:
            z = F.dropout(z, unit_dropout, training=True)
        return self.net(z)

    @property
    def constant_units(self) -> torch.Tensor:
        """Indices of units that never varied in training (their embeddings are zero)."""
        return torch.nonzero(self.constant_mask).flatten()

    def check_compatible(self, model: str | None = None, layer: str | None = None, pooling: str | None = None) -> None:
        """Raise EncoderMismatchError unless the given provenance (a TargetModel/store model
        fingerprint, a layer name, a pooling) matches what the encoder was trained on. Arguments
        left None are not checked."""
        for key, value in {"model": model, "layer": layer, "pooling": pooling}.items():
            if value is not None and self.meta.get(key) is not None and value != self.meta[key]:
                raise EncoderMismatchError(
                    f"encoder was trained on {key}={self.meta[key]!r}, these activations come from {key}={value!r}"
                )


@torch.no_grad()
def _streaming_stats(store: ActivationStore, field_name: str, val_fraction: float,
                     seed: int, distributed: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and std of a (N, U) field over the training rows (the store's split with
    ``val_fraction``, ``seed`` and :data:`ALIGN_SPLIT_SALT`), one shard at a time (float64 sums).
    distributed: each rank sums the shards ``rank, rank + W, ...`` and the sums are all-reduced.

    Raises ValueError naming the rows with NaN or inf values (the first few and how many).
    """
    total, total_sq, count = None, None, 0
    bad_rows, bad_indices, n_bad = [], [], 0
    extra = [INDEX_FIELD] if INDEX_FIELD in store.fields else []
    order = None
    if distributed:
        rank, world = _dist.rank_and_world()
        order = range(rank, len(store.meta["shards"]), world)
    for shard in store.iter_shards([field_name, *extra], with_rows=True, order=order):
        x = shard[field_name].double()
        rows = shard[ROW_KEY]
        finite = torch.isfinite(x).all(1)
        if not finite.all():
            n_bad += int((~finite).sum())
            bad_rows += rows[~finite][:5].tolist()
            bad_indices += shard[INDEX_FIELD][~finite][:5].tolist() if extra else []
            continue
        x = x[~store.holdout(rows, val_fraction, seed, ALIGN_SPLIT_SALT)]
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
        count += x.shape[0]
    if distributed:
        width = store.fields[field_name][0]
        zeros = torch.zeros(width, dtype=torch.float64)
        packed = _dist.all_reduce(torch.cat([zeros if total is None else total, zeros if total_sq is None else total_sq,
                                             torch.tensor([count, n_bad], dtype=torch.float64)]))
        total, total_sq, count, n_bad = packed[:width], packed[width:-2], int(packed[-2]), int(packed[-1])
        if n_bad:
            found = sorted(p for part in _dist.all_gather_objects(list(zip(bad_rows, bad_indices or [None] * len(bad_rows))))
                           for p in part)[:5]
            bad_rows, bad_indices = [r for r, _ in found], [i for _, i in found] if extra else []
    if n_bad:
        where = f"rows {bad_rows[:5]}" + (f" (dataset indices {bad_indices[:5]})" if extra else "")
        raise ValueError(
            f"{field_name} contains NaN or inf in {n_bad} of {store.n_rows} rows, first {where}, in the store at "
            f"{store.dir}. The model computed them from those images: check the images and the preprocessing "
            "(e.g. a transform that produced NaN, such as normalising by a zero std), then the model and layer."
        )
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0)
    return mean.float(), var.sqrt().float(), count


class _Temperatures(nn.Module):
    def __init__(self, init: float):
        super().__init__()
        self.concept = nn.Parameter(torch.tensor(math.log(1 / init)))
        self.image = nn.Parameter(torch.tensor(math.log(1 / init)))


def alignment_loss(unit_emb: torch.Tensor, text_emb: torch.Tensor, image_emb: torch.Tensor, temps: _Temperatures,
                   concept_weight: float = 1.0, image_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The MiClip loss for one batch: weighted sum of two symmetric InfoNCE terms (open_clip ClipLoss).

    unit_emb: (B, D) encoder outputs; text_emb: (B, D) text embeddings of the predicted labels;
    image_emb: (B, D) CLIP image embeddings. Returns (loss, {"concept": .., "image": ..}).
    """
    from open_clip.loss import ClipLoss

    clip_loss = ClipLoss()
    z = F.normalize(unit_emb.float(), dim=-1)
    concept = clip_loss(z, F.normalize(text_emb.float(), dim=-1), temps.concept.clamp(max=math.log(100)).exp())
    image = clip_loss(z, F.normalize(image_emb.float(), dim=-1), temps.image.clamp(max=math.log(100)).exp())
    return concept_weight * concept + image_weight * image, {"concept": concept.item(), "image": image.item()}


def train_encoder(
    store: ActivationStore,
    class_text_emb_cd: torch.Tensor,
    *,
    layer: str | None = None,
    config: AlignConfig = AlignConfig(),
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    distributed: bool | None = None,
) -> tuple[NeuronEncoder, dict]:
    """Train a neuron encoder on one layer of a store.

    store: complete, with ``clip_image`` and ``pred`` fields; class_text_emb_cd: (C, D) text
    embeddings of the classes (row = class index, as the model predicts); layer: which captured
    layer (default: the store's first). Rows are held out for early stopping by the store's split
    (``config.val_fraction``, ``seed``; store.holdout). Returns (encoder in eval mode on CPU, history dict with
    per-epoch train/val losses, best epoch, n_train/n_val). Same seed -> same encoder on CPU.

    distributed: None (default) trains data-parallel when a ``torch.distributed`` process group
    with more than one rank is initialised (:mod:`miclip_nb.distributed`), True demands one, False
    never. Every rank then calls train_encoder with the same arguments and reads the batches of
    the one-process run (same shuffles and split); rank r encodes the contiguous rows
    ``distributed.split(B, r, W)`` of each batch of B rows (its share of the batch's unit-dropout
    mask, drawn for the whole batch on every rank); the embeddings are all-gathered with gradient
    (:func:`distributed.gather_rows`, open_clip's ``ClipLoss(local_loss=False,
    gather_with_grad=True)``), so each rank computes the one-process loss of the whole batch, the
    negatives included, and the gradients are averaged over ranks (the gathered rows' gradients
    are summed back to their rank; averaging gives the full-batch gradient). The standardisation
    statistics are all-reduced sums (each rank its share of the shards). Every rank returns the
    same encoder, equal to a one-process run with the same ``batch_size`` up to float summation
    order (under 1e-7 apart after 3-4 epochs on CPU in tests/test_distributed.py, which checks
    ``atol=1e-5``). The default
    device is then ``cuda:<LOCAL_RANK>`` when CUDA is available.
    Raises ValueError for NaN activations, a store without CLIP embeddings, or mismatched sizes;
    RuntimeError for ``distributed=True`` without a process group.
    """
    layer = layer or store.layers[0]
    field_name = acts_field(layer)
    if field_name not in store.fields:
        raise ValueError(f"store has no layer {layer!r}; layers: {list(store.layers)}")
    if "clip_image" not in store.fields:
        raise ValueError("the store has no CLIP image embeddings; build it with clip=<backend>")
    if len(store.fields[field_name]) != 1:
        raise ValueError(f"alignment needs pooled activations (N, U); layer {layer!r} has per-row shape {store.fields[field_name]}")
    n_units, embed_dim = store.fields[field_name][0], store.fields["clip_image"][0]
    if class_text_emb_cd.ndim != 2 or class_text_emb_cd.shape[1] != embed_dim:
        raise ValueError(f"class_text_emb_cd must be (C, {embed_dim}), got {tuple(class_text_emb_cd.shape)}")
    dist_on, rank, world, device = _dist.setup(distributed, device)
    progress = progress and rank == 0
    torch.manual_seed(seed)

    mean, std, n_train = _streaming_stats(store, field_name, config.val_fraction, seed, distributed=dist_on)
    constant = std < 1e-8
    if constant.all():
        raise ValueError(f"every unit of layer {layer!r} is constant over the data; nothing to align")
    if constant.any():
        warnings.warn(f"{int(constant.sum())} constant units at {layer!r}: they get zero embeddings and are never localized")

    meta = {"model": store.spec.unit_identity(layer), "layer": layer, "pooling": store.spec.pooling,
            "dataset": store.spec.dataset, "clip": store.spec.clip, "n_classes": int(class_text_emb_cd.shape[0])}
    if store.spec.unit_transform is not None:
        meta["unit_transform"] = store.spec.unit_transform
    encoder = NeuronEncoder(EncoderConfig(n_units, embed_dim, config.kind, config.hidden), meta)
    encoder.act_mean.copy_(mean)
    encoder.act_std.copy_(torch.where(constant, torch.ones_like(std), std))
    encoder.constant_mask.copy_(constant)
    with torch.no_grad():  # a constant unit carries no information: silence its input weights
        first = encoder.net if config.kind == "linear" else encoder.net[0]
        first.weight[:, constant] = 0.0
    temps = _Temperatures(config.init_temperature)
    encoder.to(device)
    temps.to(device)
    if dist_on:  # the same seed gives every rank the same start; rank 0's is made everyone's
        _dist.broadcast_module_(encoder, temps)
    text = class_text_emb_cd.to(device).float()
    params = list(encoder.parameters()) + list(temps.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    fields = [field_name, "clip_image", "pred"]

    def run_epoch(train: bool, epoch: int) -> float:
        encoder.train(train)
        total, count = 0.0, 0
        batches = store.iter_batches(fields, config.batch_size, shuffle=train, seed=seed * 1000 + epoch,
                                     split="train" if train else "val", val_fraction=config.val_fraction,
                                     split_seed=seed, salt=ALIGN_SPLIT_SALT)
        for batch in batches:
            n = batch[field_name].shape[0]
            if n < 2:
                continue
            lo, hi = _dist.split(n, rank, world)
            acts = batch[field_name][lo:hi].to(device).float()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), torch.set_grad_enabled(train):
                if dist_on:
                    mask = None
                    if train and config.unit_dropout > 0:  # the whole batch's mask, as one process draws it
                        mask = F.dropout(torch.ones(n, n_units, device=device), config.unit_dropout, training=True)[lo:hi]
                    z = _dist.gather_rows(encoder(acts, mask=mask), n)
                else:
                    z = encoder(acts, config.unit_dropout if train else 0.0)
                loss, _ = alignment_loss(z, text[batch["pred"].to(device)], batch["clip_image"].to(device),
                                         temps, config.concept_weight, config.image_weight)
            if train:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if dist_on:
                    _dist.reduce_gradients_(params, "mean")
                opt.step()
                with torch.no_grad():
                    first = encoder.net if config.kind == "linear" else encoder.net[0]
                    first.weight[:, encoder.constant_mask] = 0.0
            total += loss.item() * n
            count += n
        return total / max(count, 1)

    history = {"train_loss": [], "val_loss": [], "best_epoch": 0, "n_train": n_train, "n_val": store.n_rows - n_train}
    best_val, best_state, stale = float("inf"), None, 0
    bar = tqdm(range(config.epochs), desc=f"align {layer}", disable=bars_off(progress))
    for epoch in bar:
        history["train_loss"].append(run_epoch(True, epoch))
        with torch.no_grad():
            history["val_loss"].append(run_epoch(False, epoch))
        if dist_on:  # equal on every rank already; rank 0's makes the early-stopping decision everyone's
            losses = torch.tensor([history["train_loss"][-1], history["val_loss"][-1]], dtype=torch.float64)
            _dist.broadcast_([losses])
            history["train_loss"][-1], history["val_loss"][-1] = losses.tolist()
        bar.set_postfix(train=f"{history['train_loss'][-1]:.3f}", val=f"{history['val_loss'][-1]:.3f}")
        if history["val_loss"][-1] < best_val - 1e-4:
            best_val, stale, history["best_epoch"] = history["val_loss"][-1], 0, epoch
            best_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                break
    encoder.load_state_dict(best_state)
    history["temperature"] = {"concept": 1 / temps.concept.exp().item(), "image": 1 / temps.image.exp().item()}
    history["config"] = asdict(config)
    encoder.meta["history"] = {k: v for k, v in history.items() if k != "config"}
    return encoder.cpu().eval(), history


def save_encoder(encoder: NeuronEncoder, path: str | Path) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json`` (schema version, config, provenance, history).

    Returns the safetensors path.
    """
    meta = {"schema_version": ENCODER_SCHEMA_VERSION, "config": asdict(encoder.config), "meta": encoder.meta}
    return save_checkpoint(path, encoder.state_dict(), meta)


def load_encoder(path: str | Path) -> NeuronEncoder:
    """Read an encoder written by :func:`save_encoder`. Raises FileNotFoundError or ValueError
    (unknown schema version)."""
    meta, state = read_checkpoint(path, ENCODER_SCHEMA_VERSION, "encoder")
    encoder = NeuronEncoder(EncoderConfig(**meta["config"]), meta["meta"])
    encoder.load_state_dict(state)
    return encoder.eval()


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def fit_alignment(
    store: ActivationStore, class_text_emb_cd: torch.Tensor, *, layer: str | None = None,
    config: AlignConfig = AlignConfig(), seed: int = 0, device: str | None = None,
    cache: bool = True, progress: bool = True, distributed: bool | None = None,
) -> NeuronEncoder:
    """:func:`train_encoder`, or its cached result (``cache_dir()/encoders/<hash>``).

    The cache key hashes the store key, layer, config, seed and the class text embeddings, so any
    change retrains. Returns the encoder in eval mode on CPU. distributed: as train_encoder's
    (data-parallel under a process group; rank 0 writes the cache, the others wait for it).
    """
    layer = layer or store.layers[0]
    key_src = json.dumps({"store": store.spec.key, "layer": layer, "config": asdict(config), "seed": seed,
                          "text": _tensor_digest(class_text_emb_cd), "schema": 1}, sort_keys=True)
    path = cache_dir() / "encoders" / hashlib.sha256(key_src.encode()).hexdigest()[:20] / "encoder"
    if cache and path.with_suffix(".json").is_file():
        return load_encoder(path)
    encoder, _ = train_encoder(store, class_text_emb_cd, layer=layer, config=config, seed=seed, device=device,
                               progress=progress, distributed=distributed)
    if cache and _dist.enabled(distributed):  # rank 0 writes; the others wait for it (or get its error)
        _dist.on_rank0(save_encoder, encoder, path)
    elif cache:
        save_encoder(encoder, path)
    return encoder
