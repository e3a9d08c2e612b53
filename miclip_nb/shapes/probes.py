"""The Shapes world as a probing set with per-pixel concept masks (a baselines.MaskProbe)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from . import world


class ShapesMaskProbe:
    """The Shapes world as a probing set: images ``start .. start + n - 1`` of ``split`` with the
    masks of :data:`~miclip_nb.shapes.world.CONCEPTS` (a class concept is its shape's mask).

    ``preprocess``: PIL image -> (3, H, W) tensor (default: the toy models' ``world.to_tensor``);
    masks keep the world's image size (64 px). Also exposes ``attributes(indices)`` ((B, 3) shape,
    colour, texture indices).
    """

    def __init__(self, split: str = "balanced", n: int = 2000, *, start: int = 0, cfg=None, preprocess: Callable | None = None):
        if split not in world.SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {sorted(world.SPLITS)}")
        if n <= 0 or start < 0:
            raise ValueError("n must be positive and start non-negative")
        self.split, self.n, self.start = split, n, start
        self.cfg = cfg or world.WorldConfig()
        self.preprocess = preprocess
        self.concepts = list(world.CONCEPTS)

    def __len__(self) -> int:
        return self.n

    def samples(self, indices: Sequence[int]):
        """The world's Sample (image and ground truth) of each probe index."""
        for i in indices:
            if not 0 <= int(i) < self.n:
                raise IndexError(f"index {i} out of range for a probe of {self.n} images")
        return [world.render(self.cfg, self.split, self.start + int(i)) for i in indices]

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, 3, H, W) preprocessed, masks (B, 16, 64, 64) bool) of the probe indices."""
        samples = self.samples(indices)
        if self.preprocess is None:
            x = torch.stack([world.to_tensor(s.image) for s in samples])
        else:
            x = torch.stack([self.preprocess(Image.fromarray(s.image)) for s in samples])
        masks = torch.from_numpy(np.stack([s.concept_masks() for s in samples]))
        return x, masks

    def attributes(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """(B, 3) (shape, colour, texture) indices of the probe images (all when ``indices`` is None)."""
        indices = range(self.n) if indices is None else indices
        return np.array([[s.shape, s.color, s.texture] for s in self.samples(indices)])
