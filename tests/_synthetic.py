"""A synthetic activation store with planted ground truth: unit k fires for class k (k < C).

Used by the alignment and interpretation tests, which then check that MiClip recovers the plant.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from miclip_nb.sae import SAEConfig, TopKSAE
from miclip_nb.store import ActivationStore, StoreSpec, StoreWriter, acts_field


def planted_store(root: Path, *, n: int = 3000, n_classes: int = 6, n_units: int = 32, dim: int = 16,
                  seed: int = 0, shard_size: int = 1000, constant_unit: int | None = None, nan: bool = False):
    """Write a store where unit k (k < n_classes) is active on class k, and return
    (store, class text embeddings (C, D), planted unit per class (C,))."""
    gen = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(n_classes, dim, generator=gen), dim=-1)
    labels = torch.randint(n_classes, (n,), generator=gen)
    perm = torch.randperm(n_units, generator=gen)
    planted = perm[:n_classes]  # class k -> unit planted[k]
    acts = 0.3 * torch.randn(n, n_units, generator=gen)
    acts[torch.arange(n), planted[labels]] += 2.0
    if constant_unit is not None:
        acts[:, constant_unit] = 1.5
    if nan:
        acts[5, 0] = float("nan")
    image = F.normalize(text[labels] + 0.3 * torch.randn(n, dim, generator=gen), dim=-1)
    spec = StoreSpec(model=f"planted:{seed}", layers=("layer",), pooling="mean", dataset=f"planted:{n}", n_items=n,
                     transform="none", clip="planted-clip", clip_transform="none")
    store_dir = root / spec.key
    with StoreWriter(store_dir, spec, shard_size) as writer:
        for start in range(0, n, 250):
            sl = slice(start, start + 250)
            writer.append({acts_field("layer"): acts[sl], "clip_image": image[sl], "label": labels[sl], "pred": labels[sl]})
    return ActivationStore(store_dir), text, planted


def random_sae(d_in: int, seed: int = 0) -> TopKSAE:
    """An untrained top-k SAE (expansion 2, k=8) over ``d_in`` inputs whose encoder biases are
    positive, so that every input activates k latents (for steering and heatmap tests)."""
    torch.manual_seed(seed)
    sae = TopKSAE(d_in, SAEConfig(expansion=2, k=8))
    with torch.no_grad():
        sae.b_enc.uniform_(0.0, 0.5)
    return sae
