"""Top-k sparse autoencoders (k-SAE) on a layer's token or location activations; their features as
MiClip units.

A :class:`TopKSAE` (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") maps an
activation vector x (one ViT token, or one CNN location's channels) to codes f with exactly k
selected latents:

    f = ReLU(TopK(W_enc ((x - b_pre) / s) + b_enc)),    x_hat = s * W_dec f + b_pre

``b_pre`` starts at the data mean; ``s`` is a fixed scalar (the per-dimension RMS of the centred
training data) so that hyper-parameters do not depend on the layer's scale. Decoder columns are
unit-norm: the gradient component parallel to each column is removed before every step and the
columns are renormalised after it. An auxiliary loss (AuxK) lets latents that have not fired for
``dead_steps`` steps reconstruct the residual, which revives them.

Workflow (each step streams from an :class:`~miclip_nb.store.ActivationStore`, one shard in memory):

1. ``build_store(target, dataset, [layer], pooling="none", clip=backend)``: token/map store;
2. :func:`train_sae`: the SAE and its held-out metrics (NMSE, explained variance, L0, dead share);
3. per-image pooled codes in a store that :func:`~miclip_nb.align.train_encoder` reads like
   neurons (u = f_i), so unit_embeddings / localize / describe work unchanged. An SAE code store is
   an ordinary store built with the unit transform :class:`SAECodes` (the codes of every token /
   location, pooled as the store says): ``store.derive_store(tokens, SAECodes(sae), pooling="max")``
   from the token store, or ``store.build_store(target, dataset, [layer], pooling="max",
   clip=backend, transform=SAECodes(sae))`` batch by batch from the model (on as many images as
   the alignment needs, never storing tokens); both give the same folder. Its field is
   ``acts/<layer>`` (the real layer). :func:`build_sae_code_store` and
   :func:`build_sae_code_store_from_model` are thin wrappers of these. Features seen on few images
   get noisy embeddings: :func:`drop_rare_units` keeps localize away from them (see
   :func:`feature_frequency`);
4. :func:`sae_edit_factory`: steer features with ``steer.class_deltas(..., edit_factory=...)``.

Spatial grounding of features (heatmaps, IoU with masks) lives in :mod:`miclip_nb.grounding`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed as _dist
from ._checkpoint import read_checkpoint, save_checkpoint
from ._paths import cache_dir
from ._progress import bars_off
from .embed import state_fingerprint
from .steer import MODES
from .store import ActivationStore, StoreSpec, acts_field, build_store, derive_store
from .store import infer_n_prefix as _infer_n_prefix

SAE_SCHEMA_VERSION = 1
CODE_POOLINGS = ("mean", "max")
#: The salt of the SAE's held-out split (store.holdout); align uses 0. Kept so that a seed gives
#: the same SAE as before the split moved into the store.
SAE_SPLIT_SALT = 12345


class SAEMismatchError(ValueError):
    """An SAE applied to activations of another size, model or layer than it was trained on."""


@dataclass(frozen=True)
class SAEConfig:
    """Architecture and training of a top-k SAE (the input size comes from the data)."""

    expansion: int = 8  # n_latents = expansion * d_in
    k: int = 16  # latents selected per input vector
    aux_k: int | None = None  # dead latents the AuxK loss uses per vector (None: d_in // 2; capped by the dead count)
    aux_coef: float = 1 / 32  # weight of the AuxK loss (0 disables dead-latent revival)
    dead_steps: int = 100  # a latent that has not fired for this many steps counts as dead
    epochs: int = 5  # passes over the training vectors
    batch_size: int = 4096  # vectors (tokens / locations) per optimisation step
    lr: float = 1e-3  # Adam learning rate
    max_grad_norm: float = 1.0  # gradient clipping
    val_fraction: float = 0.05  # share of images held out (by a hash of the row index) for metrics
    include_prefix: bool = True  # also train on CLS/register tokens (steering edits every token)

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if not isinstance(self.expansion, int) or self.expansion < 1:
            raise ValueError(f"expansion must be a positive integer, got {self.expansion!r}")
        if (self.aux_k is not None and self.aux_k < 1) or self.aux_coef < 0:
            raise ValueError("aux_k and aux_coef must be non-negative")
        if self.dead_steps < 1 or self.epochs < 1 or self.batch_size < 2:
            raise ValueError("dead_steps and epochs must be >= 1, batch_size >= 2")
        if self.lr <= 0 or self.max_grad_norm <= 0:
            raise ValueError("lr and max_grad_norm must be positive")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")


class TopKSAE(nn.Module):
    """A top-k sparse autoencoder over vectors of size ``d_in``.

    ``encode(x (..., d_in)) -> codes (..., n_latents)`` with at most k non-zeros (the k largest
    pre-activations, ReLU'd: exactly k selected, fewer non-zero only where a selected
    pre-activation is negative); ``decode(codes) -> (..., d_in)``; ``forward -> (recon, codes)``.
    ``meta`` holds provenance (model fingerprint, layer, store key) and training metrics.
    Raises ValueError when k > n_latents.
    """

    def __init__(self, d_in: int, config: SAEConfig = SAEConfig(), meta: dict | None = None):
        super().__init__()
        if d_in < 1:
            raise ValueError(f"d_in must be positive, got {d_in}")
        n_latents = config.expansion * d_in
        if config.k > n_latents:
            raise ValueError(f"k={config.k} is larger than the number of latents ({n_latents} = {config.expansion} x {d_in})")
        self.d_in, self.config, self.meta = d_in, config, dict(meta or {})
        w = torch.empty(n_latents, d_in)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        w = F.normalize(w, dim=1)
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        self.W_enc = nn.Parameter(w.clone())  # (F, D); tied init, as Gao et al.
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(w.T.clone().contiguous())  # (D, F), unit-norm columns
        self.register_buffer("input_scale", torch.tensor(1.0))

    @property
    def n_latents(self) -> int:
        return self.config.expansion * self.d_in

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def aux_k(self) -> int:
        """Latents the AuxK loss may use per vector (``config.aux_k``, default d_in // 2)."""
        return self.config.aux_k if self.config.aux_k is not None else max(1, self.d_in // 2)

    @property
    def fingerprint(self) -> str:
        """Identifies architecture and weights (for cache keys of code stores)."""
        return f"topk-sae:{self.d_in}x{self.n_latents}:k{self.k}:{state_fingerprint(self)}"

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise SAEMismatchError(f"SAE expects vectors of size {self.d_in}, got input of shape {tuple(x.shape)}")

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., n_latents) encoder pre-activations (before top-k)."""
        self._check(x)
        return F.linear((x - self.b_pre) / self.input_scale, self.W_enc, self.b_enc)

    def _topk(self, pre: torch.Tensor) -> torch.Tensor:
        values, index = torch.topk(pre, self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, index, F.relu(values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> codes (..., n_latents), at most k non-zeros per vector.

        Raises SAEMismatchError for another input size."""
        return self._topk(self.pre_activations(x))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., n_latents) -> reconstruction (..., d_in)."""
        if codes.shape[-1] != self.n_latents:
            raise SAEMismatchError(f"SAE has {self.n_latents} latents, got codes of shape {tuple(codes.shape)}")
        return F.linear(codes, self.W_dec) * self.input_scale + self.b_pre

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., d_in) -> (reconstruction (..., d_in), codes (..., n_latents))."""
        codes = self.encode(x)
        return self.decode(codes), codes

    def encode_features(self, x: torch.Tensor, features: Sequence[int] | torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Codes of a few latents only: (..., d_in) -> (..., len(features)), equal to
        ``encode(x)[..., features]`` without materialising all codes (rows in chunks)."""
        self._check(x)
        feats = torch.as_tensor(features, dtype=torch.long, device=x.device).flatten()
        flat = x.reshape(-1, self.d_in)
        out = []
        for start in range(0, flat.shape[0], chunk):
            pre = self.pre_activations(flat[start : start + chunk])
            index = torch.topk(pre, self.k, dim=-1).indices  # (M, k)
            selected = (index.unsqueeze(-1) == feats).any(-2)  # (M, U)
            out.append(F.relu(pre[:, feats]) * selected)
        return torch.cat(out).reshape(*x.shape[:-1], feats.numel())

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder column to unit norm (in place)."""
        self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the decoder gradient's component along each (unit-norm) column (in place)."""
        if self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g.sub_((g * w).sum(0, keepdim=True) * w)

    def check_compatible(self, model: str | None = None, layer: str | None = None) -> None:
        """Raise SAEMismatchError unless ``model`` (a store/TargetModel fingerprint) and ``layer``
        match what the SAE was trained on. Arguments left None are not checked."""
        for key, value in {"model": model, "layer": layer}.items():
            if value is not None and self.meta.get(key) is not None and value != self.meta[key]:
                raise SAEMismatchError(
                    f"SAE was trained on {key}={self.meta[key]!r}, these activations come from {key}={value!r}")


# --------------------------------------------------------------------------------------------
# Activations -> per-location vectors


def infer_n_prefix(n_tokens: int) -> int:
    """Leading non-patch tokens of a ViT output with ``n_tokens`` tokens, assuming a square patch
    grid (65 -> 1, 197 -> 1, 201 -> 5, 64 -> 0). Pass ``n_prefix`` explicitly where that fails."""
    return _infer_n_prefix(n_tokens)


def vectors(acts: torch.Tensor) -> torch.Tensor:
    """Per-location vectors, channels last: (N, T, D) -> (N, T, D); (N, C, H, W) -> (N, H*W, C);
    (N, D) -> (N, 1, D). Raises ValueError for other ranks."""
    if acts.ndim == 3:
        return acts
    if acts.ndim == 4:
        return acts.flatten(2).transpose(1, 2)
    if acts.ndim == 2:
        return acts.unsqueeze(1)
    raise ValueError(f"expected (N, D), (N, T, D) or (N, C, H, W) activations, got {tuple(acts.shape)}")


def _layer_geometry(store: ActivationStore, field_name: str, n_prefix: int | None) -> tuple[int, int]:
    """(d_in, n_prefix) of a stored layer."""
    shape = store.fields[field_name]
    if len(shape) == 1:
        return shape[0], 0
    if len(shape) == 2:
        return shape[1], infer_n_prefix(shape[0]) if n_prefix is None else n_prefix
    if len(shape) == 3:
        return shape[0], 0
    raise ValueError(f"cannot train an SAE on per-row shape {shape}")


def _flat_vectors(acts: torch.Tensor, n_prefix: int, include_prefix: bool) -> torch.Tensor:
    """The (M, D) vectors of a batch of rows' activations (prefix tokens dropped unless included)."""
    vec = vectors(acts)
    if acts.ndim == 3 and not include_prefix:
        vec = vec[:, n_prefix:]
    return vec.reshape(-1, vec.shape[-1])


def _iter_vectors(store: ActivationStore, field_name: str, n_prefix: int, include_prefix: bool,
                  val_fraction: float, seed: int, held_out: bool, shard_order: Sequence[int] | None = None,
                  ) -> Iterator[torch.Tensor]:
    """Yield, per shard (in ``shard_order``), the (M, D) vectors of its training or held-out
    images (the store's split, salt :data:`SAE_SPLIT_SALT`). One shard in memory at a time, each
    checked against its sha256 by the store."""
    for shard in store.iter_shards([field_name], split="val" if held_out else "train", val_fraction=val_fraction,
                                   split_seed=seed, salt=SAE_SPLIT_SALT, order=shard_order):
        yield _flat_vectors(shard[field_name], n_prefix, include_prefix)


# --------------------------------------------------------------------------------------------
# Training


def _aux_loss(sae: TopKSAE, pre: torch.Tensor, residual_n: torch.Tensor, dead: torch.Tensor,
              n_batch: int | None = None) -> torch.Tensor:
    """AuxK: the top ``aux_k`` dead latents reconstruct the (normalised, detached) residual.

    n_batch: distributed, the whole batch's number of vectors when ``pre`` / ``residual_n`` are
    this rank's share of it: the normaliser (the residual's spread about its mean) is then
    all-reduced over the batch, and the result is this rank's share of the batch's loss (the
    shares sum to the one-process loss)."""
    n_dead = int(dead.sum())
    k_aux = min(sae.aux_k, n_dead)
    if k_aux == 0:
        return pre.new_zeros(())
    masked = pre.masked_fill(~dead, float("-inf"))
    values, index = torch.topk(masked, k_aux, dim=-1)
    aux_codes = torch.zeros_like(pre).scatter(-1, index, F.relu(values))
    aux_recon = F.linear(aux_codes, sae.W_dec)
    if n_batch is None:
        denom = (residual_n - residual_n.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        return (aux_recon.float() - residual_n).pow(2).sum(-1).mean() / denom
    r = residual_n.float()
    mean = _dist.all_reduce(r.sum(0)) / n_batch
    denom = (_dist.all_reduce((r - mean).pow(2).sum()) / n_batch).clamp_min(1e-12)
    return (aux_recon.float() - residual_n).pow(2).sum(-1).sum() / n_batch / denom


def train_sae(
    store: ActivationStore,
    layer: str | None = None,
    config: SAEConfig = SAEConfig(),
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    n_prefix: int | None = None,
    init: TopKSAE | None = None,
    distributed: bool | None = None,
) -> tuple[TopKSAE, dict]:
    """Train a top-k SAE on one layer of a store, streaming one shard at a time.

    store: complete, built with ``pooling="none"`` (ViT tokens (N, T, D) or CNN maps (N, C, H, W);
    pooled (N, D) works too); every token / location is one training vector (channels last).
    Images are held out by a hash of their row index (``config.val_fraction``) for the metrics.
    n_prefix: leading non-patch tokens (default inferred from a square patch grid).
    init: continue from a copy of this SAE (same input size, expansion and k) instead of a fresh
    one; its ``b_pre`` and input scale are kept.
    Returns (SAE in eval mode on CPU, metrics): ``nmse`` (held-out squared error / squared
    distance to the held-out mean), ``explained_variance`` (1 - total variance of the residual /
    total variance), ``l0`` (mean non-zero codes per vector), ``dead_fraction`` (latents that never
    fire on held-out vectors), ``dead_fraction_train`` (silent for ``dead_steps`` at the end),
    ``history``. Same seed -> same SAE on CPU.

    distributed: None (default) trains data-parallel when a ``torch.distributed`` process group
    with more than one rank is initialised (:mod:`miclip_nb.distributed`), True demands one, False
    never. Every rank calls train_sae with the same arguments and draws the one-process run's
    batches (same shard order and permutations; each rank reads every training shard); rank r
    computes on the contiguous vectors ``distributed.split(B, r, W)`` of each batch of B vectors,
    its loss being its share of the batch's loss (its squared errors over B; the AuxK normaliser
    all-reduced over the batch), and the gradients are summed over ranks (one all-reduce per
    step, which also sums the fired-latent counts, so the dead-latent counters see the whole
    batch) before the parallel-component removal, clipping and the step. The mean and variance
    (``b_pre``, the input scale) and the held-out metrics are all-reduced sums over each rank's
    share of the shards. Every rank returns the same SAE, equal to a one-process run with the
    same ``batch_size`` up to float summation order (under 1e-7 apart after 2 epochs on CPU in
    tests/test_distributed.py, which checks ``atol=1e-5``). The default
    device is then ``cuda:<LOCAL_RANK>`` when CUDA is available.
    Raises ValueError for an unknown layer, NaN/inf activations, constant data or k > n_latents;
    RuntimeError for ``distributed=True`` without a process group.
    """
    layer = layer or store.layers[0]
    field_name = acts_field(layer)
    if field_name not in store.fields:
        raise ValueError(f"store has no layer {layer!r}; layers: {list(store.layers)}")
    d_in, n_prefix = _layer_geometry(store, field_name, n_prefix)
    dist_on, rank, world, device = _dist.setup(distributed, device)
    progress = progress and rank == 0
    amp = device.type == "cuda"
    sae = TopKSAE(d_in, config)  # raises for k > n_latents before any pass over the data

    def train_vectors(order=None, held_out=False):
        return _iter_vectors(store, field_name, n_prefix, config.include_prefix, config.val_fraction, seed, held_out, order)

    # Pass 1: mean and total variance of the training vectors (float64 sums, one shard at a time).
    # Distributed, each rank sums its share of the shards and the sums are all-reduced.
    my_shards = list(range(rank, len(store.meta["shards"]), world)) if dist_on else None
    total = torch.zeros(d_in, dtype=torch.float64)
    total_sq = torch.zeros((), dtype=torch.float64)
    count, finite = 0, True
    for x in train_vectors(my_shards):  # also verifies every shard's sha256, once
        x = x.double()
        if not torch.isfinite(x).all():
            if not dist_on:
                raise ValueError(f"activations of {layer!r} in {store.dir} contain NaN or inf")
            finite = False
            break
        total += x.sum(0)
        total_sq += x.pow(2).sum()
        count += x.shape[0]
    if dist_on:
        packed = _dist.all_reduce(torch.cat([total, total_sq.reshape(1),
                                             torch.tensor([count, 0 if finite else 1], dtype=torch.float64)]))
        total, total_sq, count = packed[:d_in], packed[d_in], int(packed[d_in + 1])
        if packed[d_in + 2] > 0:
            raise ValueError(f"activations of {layer!r} in {store.dir} contain NaN or inf")
    if count == 0:
        raise ValueError("no training vectors (the store is too small for val_fraction)")
    mean = total / count
    total_var = (total_sq / count - mean.pow(2).sum()).clamp_min(0)
    if total_var <= 1e-12 * max(1.0, float(mean.pow(2).sum())):
        raise ValueError(f"activations of {layer!r} are constant; nothing to encode")

    torch.manual_seed(seed)
    sae = TopKSAE(d_in, config, meta={"model": store.spec.model, "layer": layer, "store": store.spec.key,
                                      "pooling": store.spec.pooling, "dataset": store.spec.dataset, "n_prefix": n_prefix,
                                      "seed": seed})
    if init is not None:
        if (init.d_in, init.config.expansion, init.config.k) != (d_in, config.expansion, config.k):
            raise SAEMismatchError(f"init SAE is {init.d_in}x{init.n_latents} with k={init.k}; this config needs "
                                   f"{d_in}x{sae.n_latents} with k={config.k}")
        sae.load_state_dict(init.state_dict())
    else:
        with torch.no_grad():
            sae.b_pre.copy_(mean.float())
            sae.input_scale.fill_(float((total_var / d_in).sqrt()))
    sae.to(device).train()
    if dist_on:  # the same seed gives every rank the same start; rank 0's is made everyone's
        _dist.broadcast_module_(sae)
    opt = torch.optim.Adam(sae.parameters(), lr=config.lr, eps=6.25e-10)
    steps_since_fired = torch.zeros(sae.n_latents, dtype=torch.long, device=device)
    total_var_f = float(total_var)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = sum(math.ceil(n / config.batch_size) for n in _vectors_per_shard(store, field_name, n_prefix, config, seed))
    history: dict[str, list[float]] = {"train_nmse": [], "train_aux": [], "dead_fraction_train": []}
    bar = tqdm(total=config.epochs * steps_per_epoch, desc=f"SAE {layer}", disable=bars_off(progress))
    for epoch in range(config.epochs):
        sum_nmse, sum_aux, n_steps = 0.0, 0.0, 0
        order = torch.randperm(len(store.meta["shards"]), generator=gen).tolist()
        for x_shard in train_vectors(order):
            perm = torch.randperm(x_shard.shape[0], generator=gen)
            for start in range(0, x_shard.shape[0], config.batch_size):
                index = perm[start : start + config.batch_size]
                n_batch = index.numel()  # the whole batch; distributed, this rank computes on its share
                if dist_on:
                    lo, hi = _dist.split(n_batch, rank, world)
                    index = index[lo:hi]
                x = x_shard[index].to(device, non_blocking=True).float()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    pre = sae.pre_activations(x)
                    codes = sae._topk(pre)
                    recon = sae.decode(codes)
                recon = recon.float()
                if dist_on:  # this rank's share of the batch mean
                    nmse = (recon - x).pow(2).sum(-1).sum() / n_batch / total_var_f
                else:
                    nmse = (recon - x).pow(2).sum(-1).mean() / total_var_f
                dead = steps_since_fired >= config.dead_steps
                aux = torch.zeros((), device=device)
                if config.aux_coef > 0 and bool(dead.any()):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        aux = _aux_loss(sae, pre, (x - recon).detach() / sae.input_scale, dead,
                                        n_batch if dist_on else None)
                    aux = aux.float().nan_to_num(0.0)
                loss = nmse + config.aux_coef * aux
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if dist_on:  # one all-reduce: the gradients, the fired latents and the loss shares
                    fired_any = (codes > 0).any(0).float()
                    extra = _dist.reduce_gradients_(list(sae.parameters()), "sum", torch.cat(
                        [fired_any, nmse.detach().float().reshape(1), aux.detach().float().reshape(1)]))
                    fired_all, nmse, aux = extra[:-2] > 0, extra[-2], extra[-1]
                sae.remove_parallel_grad_()
                torch.nn.utils.clip_grad_norm_(sae.parameters(), config.max_grad_norm)
                opt.step()
                sae.normalize_decoder_()
                fired = fired_all if dist_on else (codes > 0).any(0)
                steps_since_fired = torch.where(fired, torch.zeros_like(steps_since_fired), steps_since_fired + 1)
                sum_nmse += float(nmse.detach())
                sum_aux += float(aux.detach())
                n_steps += 1
                bar.update(1)
                if n_steps % 20 == 0:
                    bar.set_postfix(epoch=epoch, nmse=f"{float(nmse.detach()):.3f}", dead=f"{float(dead.float().mean()):.2f}")
        history["train_nmse"].append(sum_nmse / max(n_steps, 1))
        history["train_aux"].append(sum_aux / max(n_steps, 1))
        history["dead_fraction_train"].append(float((steps_since_fired >= config.dead_steps).float().mean()))
    bar.close()

    sae.eval()
    if dist_on:
        metrics = _eval_metrics(_all_reduce_sums(_eval_sums(sae, train_vectors(my_shards, held_out=True), device)))
    else:
        metrics = evaluate_sae(sae, train_vectors(held_out=True), device=device)
    metrics["dead_fraction_train"] = history["dead_fraction_train"][-1]
    metrics["n_train_vectors"] = count
    metrics["history"] = history
    metrics["config"] = asdict(config)
    sae.meta["metrics"] = {k: v for k, v in metrics.items() if k not in ("history", "config")}
    return sae.cpu(), metrics


def _vectors_per_shard(store: ActivationStore, field_name: str, n_prefix: int, config: SAEConfig, seed: int) -> list[int]:
    """Training vectors per shard, from the metadata alone."""
    shape = store.fields[field_name]
    if len(shape) == 2:  # tokens
        per_row = shape[0] - (0 if config.include_prefix else n_prefix)
    else:  # pooled vectors or maps
        per_row = 1 if len(shape) == 1 else shape[1] * shape[2]
    return [n * per_row for n in store.split_sizes("train", config.val_fraction, seed, SAE_SPLIT_SALT)]


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, batches, device: str | torch.device | None = None, chunk: int = 8192) -> dict:
    """Reconstruction metrics over an iterable of (M, d_in) vector batches (streamed).

    Returns ``nmse``, ``explained_variance``, ``l0``, ``dead_fraction`` (latents that never fire),
    ``n_vectors``. Raises ValueError when there are no vectors.
    """
    return _eval_metrics(_eval_sums(sae, batches, device, chunk))


@torch.no_grad()
def _eval_sums(sae: TopKSAE, batches, device: str | torch.device | None = None, chunk: int = 8192) -> dict:
    """The sums behind :func:`evaluate_sae`'s metrics over ``batches`` (n may be 0)."""
    device = torch.device(device or next(sae.parameters()).device)
    sae = sae.to(device)
    n, sse, l0 = 0, 0.0, 0.0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64)
    sum_x2 = torch.zeros(sae.d_in, dtype=torch.float64)
    sum_r = torch.zeros(sae.d_in, dtype=torch.float64)
    sum_r2 = torch.zeros(sae.d_in, dtype=torch.float64)
    fired = torch.zeros(sae.n_latents, dtype=torch.bool)
    for batch in batches:
        for start in range(0, batch.shape[0], chunk):
            x = batch[start : start + chunk].to(device).float()
            recon, codes = sae(x)
            r = (x - recon).double().cpu()
            xd = x.double().cpu()
            sse += float(r.pow(2).sum())
            sum_x += xd.sum(0)
            sum_x2 += xd.pow(2).sum(0)
            sum_r += r.sum(0)
            sum_r2 += r.pow(2).sum(0)
            nz = (codes > 0).cpu()
            l0 += float(nz.sum())
            fired |= nz.any(0)
            n += x.shape[0]
    return {"n": n, "sse": sse, "l0": l0, "sum_x": sum_x, "sum_x2": sum_x2, "sum_r": sum_r, "sum_r2": sum_r2,
            "fired": fired}


def _all_reduce_sums(sums: dict) -> dict:
    """:func:`_eval_sums` summed over every rank (one all-reduce, float64)."""
    d = sums["sum_x"].numel()
    packed = _dist.all_reduce(torch.cat([torch.tensor([sums["n"], sums["sse"], sums["l0"]], dtype=torch.float64),
                                         sums["sum_x"], sums["sum_x2"], sums["sum_r"], sums["sum_r2"],
                                         sums["fired"].double()]))
    parts = packed[3:].split([d, d, d, d, sums["fired"].numel()])
    return {"n": int(packed[0]), "sse": float(packed[1]), "l0": float(packed[2]), "sum_x": parts[0], "sum_x2": parts[1],
            "sum_r": parts[2], "sum_r2": parts[3], "fired": parts[4] > 0}


def _eval_metrics(sums: dict) -> dict:
    """:func:`evaluate_sae`'s metrics from :func:`_eval_sums`. Raises ValueError when n is 0."""
    n, sse, l0, fired = sums["n"], sums["sse"], sums["l0"], sums["fired"]
    sum_x, sum_x2, sum_r, sum_r2 = sums["sum_x"], sums["sum_x2"], sums["sum_r"], sums["sum_r2"]
    if n == 0:
        raise ValueError("no vectors to evaluate on")
    var_x = (sum_x2 / n - (sum_x / n).pow(2)).sum()
    var_r = (sum_r2 / n - (sum_r / n).pow(2)).sum()
    return {"nmse": float(sse / n / var_x), "explained_variance": float(1 - var_r / var_x), "l0": l0 / n,
            "dead_fraction": float((~fired).float().mean()), "n_vectors": n}


# --------------------------------------------------------------------------------------------
# Checkpoints


def save_sae(sae: TopKSAE, path: str | Path) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json`` (schema version, d_in, config, provenance:
    model fingerprint, layer, store key; metrics). Returns the safetensors path."""
    meta = {"schema_version": SAE_SCHEMA_VERSION, "d_in": sae.d_in, "config": asdict(sae.config), "meta": sae.meta}
    return save_checkpoint(path, sae.state_dict(), meta)


def load_sae(path: str | Path, *, model: str | None = None, layer: str | None = None) -> TopKSAE:
    """Read an SAE written by :func:`save_sae` (eval mode, CPU); with ``model``/``layer`` given,
    check its provenance. Raises FileNotFoundError, ValueError (unknown schema) or
    SAEMismatchError (trained on another model or layer)."""
    meta, state = read_checkpoint(path, SAE_SCHEMA_VERSION, "SAE")
    sae = TopKSAE(int(meta["d_in"]), SAEConfig(**meta["config"]), meta["meta"])
    sae.load_state_dict(state)
    sae.check_compatible(model=model, layer=layer)
    return sae.eval()


def fit_sae(
    store: ActivationStore,
    layer: str | None = None,
    config: SAEConfig = SAEConfig(),
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    n_prefix: int | None = None,
    cache: bool = True,
    progress: bool = True,
    distributed: bool | None = None,
) -> tuple[TopKSAE, dict]:
    """:func:`train_sae`, or its cached result: the cache key (``cache_dir()/saes/<hash>``)
    hashes the store key, layer, config, seed and n_prefix, so any change retrains.
    distributed: as train_sae's (data-parallel under a process group; rank 0 writes the cache, the
    others wait for it). Returns (SAE, metrics without the per-epoch history when loaded from the cache)."""
    layer = layer or store.layers[0]
    key_src = json.dumps({"store": store.spec.key, "layer": layer, "config": asdict(config), "seed": seed,
                          "n_prefix": n_prefix, "schema": SAE_SCHEMA_VERSION}, sort_keys=True)
    path = cache_dir() / "saes" / hashlib.sha256(key_src.encode()).hexdigest()[:20] / "sae"
    if cache and path.with_suffix(".json").is_file():
        sae = load_sae(path, model=store.spec.model, layer=layer)
        return sae, dict(sae.meta.get("metrics", {}))
    sae, metrics = train_sae(store, layer, config, seed=seed, device=device, progress=progress, n_prefix=n_prefix,
                             distributed=distributed)
    if cache and _dist.enabled(distributed):  # rank 0 writes; the others wait for it (or get its error)
        _dist.on_rank0(save_sae, sae, path)
    elif cache:
        save_sae(sae, path)
    return sae, metrics


# --------------------------------------------------------------------------------------------
# SAE features as units: a store of per-image pooled codes


def pool_codes(codes_ntf: torch.Tensor, pooling: str = "mean", n_prefix: int = 0) -> torch.Tensor:
    """Per-image codes from per-location codes: (N, T, F) -> (N, F), mean or max over the
    locations after the first ``n_prefix`` (CLS excluded, as capture.pool). Raises ValueError for
    another pooling."""
    if pooling not in CODE_POOLINGS:
        raise ValueError(f"code pooling must be one of {CODE_POOLINGS}, got {pooling!r}")
    locs = codes_ntf[:, n_prefix:] if codes_ntf.shape[1] > n_prefix else codes_ntf
    return locs.mean(1) if pooling == "mean" else locs.amax(1)


def sae_store_spec(source: StoreSpec, sae: TopKSAE, layer: str, pooling: str, name: str, n_prefix: int) -> StoreSpec:
    """The spec code stores had before they became stores built with :class:`SAECodes` (kept for
    its ``model`` string, ``<model>|source=<key>|layer=<layer>|sae=<fingerprint>|n_prefix=<n>``,
    the form in which interpret.UnitProvenance reads SAE provenance; new code stores have
    ``spec.unit_identity(layer)`` of that form instead). ``source``: the spec of the token/map
    activations; the result has the same images and CLIP."""
    model = f"{source.model}|source={source.key}|layer={layer}|sae={sae.fingerprint}|n_prefix={n_prefix}"
    return StoreSpec(model=model, layers=(name,), pooling=pooling, dataset=source.dataset, n_items=source.n_items,
                     transform=source.transform, clip=source.clip, clip_transform=source.clip_transform, dtype=source.dtype)


class SAECodes:
    """A unit transform (store.UnitTransform): a layer's raw output -> the SAE's codes at every
    token / location, in the layer's layout: (N, T, D) -> (N, T, F), (N, C, H, W) -> (N, F, H, W),
    (N, D) -> (N, F) (float32). The store's pooling then pools them over patch tokens / space.

    ``build_store(target, dataset, [layer], pooling="max", transform=SAECodes(sae))`` or
    ``derive_store(tokens, SAECodes(sae), pooling="max")`` make a code store. ``fingerprint``
    identifies the SAE's architecture and current weights. The caller's SAE is never moved: codes
    on another device come from a copy of it there, made at first use (edit the SAE, make a new
    SAECodes). Raises SAEMismatchError for activations of
    another width, and from :meth:`check_source` for another model or layer than the SAE's.
    """

    def __init__(self, sae: TopKSAE):
        self.sae = sae
        self._copies: dict[str, TopKSAE] = {}

    @property
    def fingerprint(self) -> str:
        """``"sae=<TopKSAE.fingerprint>"``: the SAE's architecture and current weights."""
        return f"sae={self.sae.fingerprint}"

    def check_source(self, model: str, layer: str) -> None:
        """Raise SAEMismatchError unless the SAE was trained on this model identity and layer."""
        self.sae.check_compatible(model=model, layer=layer)

    def _on(self, device: torch.device) -> TopKSAE:
        """The SAE itself where it sits on ``device``, else its copy there (made at first use)."""
        if next(self.sae.parameters()).device == device:
            return self.sae
        if str(device) not in self._copies:
            self._copies[str(device)] = copy.deepcopy(self.sae).to(device)
        return self._copies[str(device)]

    def __call__(self, acts: torch.Tensor) -> torch.Tensor:
        sae = self._on(acts.device)
        if acts.ndim == 4:  # maps: channels last for the SAE, then back
            return sae.encode(acts.movedim(1, -1).float()).float().movedim(-1, 1)
        if acts.ndim in (2, 3):
            return sae.encode(acts.float()).float()
        raise ValueError(f"expected (N, D), (N, T, D) or (N, C, H, W) activations, got {tuple(acts.shape)}")


def _deprecated_name(name: str | None, layer: str) -> None:
    if name is not None and name != layer:
        warnings.warn(f"name={name!r} is ignored: an SAE code store's field is acts/{layer} (the layer itself); "
                      "its spec's unit_transform tells it from the layer's neurons", DeprecationWarning, stacklevel=3)


@torch.no_grad()
def build_sae_code_store(
    store: ActivationStore,
    sae: TopKSAE,
    layer: str | None = None,
    *,
    pooling: str = "mean",
    name: str | None = None,
    n_prefix: int | None = None,
    root: str | Path | None = None,
    shard_size: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> ActivationStore:
    """A store of per-image pooled SAE codes, read by align.train_encoder like neurons:
    ``store.derive_store(store, SAECodes(sae), layers=[layer], pooling=pooling, ...)``.

    pooling: "mean" (default) or "max" over patch tokens / locations. On the toy ViT, max pooling
    localized colour features a little better (a feature firing on a small object is not diluted
    by the background); with max pooling, features that fire on clutter count as present.

    store: token/map store (``pooling="none"``) of ``layer``; the result has field
    ``acts/<layer>`` (N, n_latents) plus the source's ``label``, ``pred`` and ``clip_image``
    (``name`` is ignored, with a DeprecationWarning). Its key hashes the source's spec and the SAE's
    weights, so a retrained SAE never reuses stale codes; an existing complete store is reused.
    n_prefix: default the SAE's, else inferred from a square patch grid.
    Raises SAEMismatchError when the SAE was trained on another model/layer or size, ValueError
    for an unknown pooling or layer, or a pooled store.
    """
    layer = layer or store.layers[0]
    if acts_field(layer) not in store.fields:
        raise ValueError(f"store has no layer {layer!r}; layers: {list(store.layers)}")
    if pooling not in CODE_POOLINGS:
        raise ValueError(f"code pooling must be one of {CODE_POOLINGS}, got {pooling!r}")
    _deprecated_name(name, layer)
    shape = store.fields[acts_field(layer)]
    width = shape[-1] if len(shape) != 3 else shape[0]
    if width != sae.d_in:
        raise SAEMismatchError(f"SAE expects vectors of size {sae.d_in}, layer {layer!r} has {width}")
    n_prefix = n_prefix if n_prefix is not None else sae.meta.get("n_prefix")
    if len(shape) != 2:
        n_prefix = 0  # CNN maps have no prefix tokens
    return derive_store(store, SAECodes(sae), layers=[layer], pooling=pooling, n_prefix=n_prefix, root=root,
                        shard_size=shard_size, batch_size=batch_size, device=device, progress=progress)


@torch.no_grad()
def build_sae_code_store_from_model(
    target,
    dataset,
    layer: str,
    sae: TopKSAE,
    *,
    clip=None,
    pooling: str = "mean",
    name: str | None = None,
    n_items: int | None = None,
    root: str | Path | None = None,
    batch_size: int = 64,
    shard_size: int = 2048,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> ActivationStore:
    """Like :func:`build_sae_code_store`, straight from a model: ``store.build_store(target,
    dataset, [layer], pooling=pooling, clip=clip, transform=SAECodes(sae), ...)`` captures
    ``layer`` batch by batch, encodes and pools, never storing the token/map activations (so the
    alignment can use many more images than the SAE was trained on).

    target: a zoo.TargetModel; dataset: anything datasets.as_dataset takes; clip: an
    EmbeddingBackend (needed for alignment). Same folder as :func:`build_sae_code_store` on
    ``build_store(target, dataset, [layer], pooling="none", clip=clip)`` (``name`` is ignored,
    with a DeprecationWarning). Raises SAEMismatchError when the SAE was trained on another model
    or layer (before any work) or size, ValueError for an unknown pooling.
    """
    if pooling not in CODE_POOLINGS:
        raise ValueError(f"code pooling must be one of {CODE_POOLINGS}, got {pooling!r}")
    _deprecated_name(name, layer)
    return build_store(target, dataset, [layer], pooling=pooling, clip=clip, n_items=n_items, root=root,
                       batch_size=batch_size, shard_size=shard_size, num_workers=num_workers, device=device,
                       progress=progress, transform=SAECodes(sae))


def code_store(sae: TopKSAE, tokens: ActivationStore, *, target=None, dataset=None, n_items: int | None = None,
               clip=None, pooling: str = "mean", batch_size: int = 64, device: str | torch.device | None = None,
               progress: bool = True) -> ActivationStore:
    """The store of per-image pooled codes that MiClip aligns SAE features with: from the token store
    the SAE was trained on (``dataset=None``: :func:`build_sae_code_store`, no model pass; the
    tokens' store must then hold CLIP embeddings), or from ``target`` over ``dataset`` (its first
    ``n_items``; :func:`build_sae_code_store_from_model`, with ``clip``), to align on more images
    than the SAE saw. ``tokens``: the token store of the SAE's layer. Raises as those two."""
    layer = tokens.layers[0]
    if dataset is None:
        return build_sae_code_store(tokens, sae, layer, pooling=pooling, batch_size=batch_size, device=device,
                                    progress=progress)
    if target is None:
        raise ValueError("a code store from images needs the target model (target=)")
    return build_sae_code_store_from_model(target, dataset, layer, sae, clip=clip, pooling=pooling, n_items=n_items,
                                           batch_size=batch_size, device=device, progress=progress)


@torch.no_grad()
def feature_frequency(code_store: ActivationStore, layer: str | None = None) -> torch.Tensor:
    """(F,) share of images on which each feature fires (pooled code > 0), streamed over a code
    store (built with :class:`SAECodes`; ``layer`` default its first)."""
    field_name = acts_field(layer or code_store.layers[0])
    fired, n = None, 0
    for shard in code_store.iter_shards([field_name]):
        counts = (shard[field_name] > 0).sum(0)
        fired = counts if fired is None else fired + counts
        n += shard[field_name].shape[0]
    return fired.double().div(n).float()


def drop_rare_units(unit_emb_ud: torch.Tensor, freq_u: torch.Tensor, min_freq: float = 0.01) -> torch.Tensor:
    """Unit embeddings with the rows of features that fire on fewer than ``min_freq`` of the
    images set to zero (as align does for constant units), so localize does not pick them: a
    feature seen on a handful of images gets an embedding fit to noise, and among thousands of
    features some such noise lines up with any concept. Returns a new (U, D) tensor."""
    if freq_u.shape != unit_emb_ud.shape[:1]:
        raise ValueError(f"{freq_u.shape[0]} frequencies for {unit_emb_ud.shape[0]} units")
    out = unit_emb_ud.clone()
    out[freq_u < min_freq] = 0.0
    return out


# --------------------------------------------------------------------------------------------
# Steering SAE features


def sae_edit(sae: TopKSAE, units: Sequence[int] | torch.Tensor, mode: str = "scale",
             beta: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """An edit function acts -> acts that scales (f <- beta f) or shifts (f <- f + beta) SAE
    features ``units`` at every token / location, keeping the reconstruction error:

        out = decode(edited codes) + (x - decode(codes)) = x + W_dec (edited - codes) * s

    so scale 1 / shift 0 return the input exactly. acts: (N, T, D) tokens, (N, C, H, W) maps or
    (N, D). Raises ValueError (unknown mode, no units), IndexError (unit out of range),
    SAEMismatchError (the layer's width is not the SAE's input size).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    index = torch.as_tensor(units, dtype=torch.long).flatten()
    if index.numel() == 0:
        raise ValueError("no SAE features to edit")
    if int(index.max()) >= sae.n_latents or int(index.min()) < 0:
        raise IndexError(f"feature {int(index.max())} out of range for an SAE with {sae.n_latents} latents")

    def edit(acts: torch.Tensor) -> torch.Tensor:
        x = acts.movedim(1, -1) if acts.ndim == 4 else acts
        if x.shape[-1] != sae.d_in:
            raise SAEMismatchError(f"SAE expects {sae.d_in} channels, the edited layer has {x.shape[-1]} ({tuple(acts.shape)})")
        model_sae = sae.to(acts.device)
        idx = index.to(acts.device)
        with torch.no_grad(), torch.autocast(acts.device.type, enabled=False):
            xf = x.float()
            codes = model_sae.encode_features(xf, idx)
            new = codes * beta if mode == "scale" else codes + beta
            delta = F.linear(new - codes, model_sae.W_dec[:, idx]) * model_sae.input_scale
        out = (xf + delta).to(acts.dtype)
        return out.movedim(-1, 1) if acts.ndim == 4 else out

    return edit


def sae_edit_factory(sae: TopKSAE) -> Callable[..., Callable[[torch.Tensor], torch.Tensor]]:
    """``edit_factory(units, mode, beta)`` for steer.class_deltas / pipeline.intervention_table /
    steer.edit_layer: edits SAE features instead of neurons (see :func:`sae_edit`)."""

    def factory(units, mode: str = "scale", beta: float = 0.0):
        return sae_edit(sae, units, mode, beta)

    return factory

