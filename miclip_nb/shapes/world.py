"""The Shapes world: synthetic images with known ground truth.

Every image shows one coloured shape (the class label) on a textured background, with clutter,
occluders and pixel noise. Attributes (shape, colour, texture, size, position) and per-pixel masks
are known, so every interpretability claim made on this world can be checked.

Images are generated lazily and deterministically from ``(split seed, index)``: a dataset of any
length costs no memory until an image is asked for, and the same index always gives the same
pixels.

Splits (see :data:`SPLITS`):

- ``train`` / ``test``: the in-distribution world. Each shape appears on its *typical texture*
  with probability ``texture_bias`` and in its *typical colour* with probability ``color_bias``;
  a model trained here learns to use colour and texture as well as shape.
- ``spurious``: the correlation is broken against the model: every shape sits on the typical
  texture of *another* shape, so a model that leans on texture makes mistakes with a known cause.
- ``balanced``: shape, colour and texture independent and uniform (for ToyCLIP and probing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
TEXTURES: tuple[str, ...] = ("dots", "stripes", "grid", "checkers")
#: Every concept of the world, in a fixed order: shapes, then colours, then textures.
CONCEPTS: tuple[str, ...] = SHAPES + COLORS + TEXTURES
CONCEPT_KIND: dict[str, str] = {
    **{s: "shape" for s in SHAPES},
    **{c: "color" for c in COLORS},
    **{t: "texture" for t in TEXTURES},
}
#: How captions name a texture ("a red star on a dotted background").
TEXTURE_ADJECTIVE: dict[str, str] = {
    "dots": "dotted",
    "stripes": "striped",
    "grid": "grid",
    "checkers": "checkered",
}
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
}
#: The texture and colour each shape is biased towards in the ``train``/``test`` splits.
TYPICAL_TEXTURE: dict[str, str] = {s: TEXTURES[i % len(TEXTURES)] for i, s in enumerate(SHAPES)}
TYPICAL_COLOR: dict[str, str] = {s: COLORS[i] for i, s in enumerate(SHAPES)}
SPLITS: dict[str, int] = {"train": 0, "test": 1, "spurious": 2, "balanced": 3}


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of the Shapes world. The defaults are the world the shipped models learned."""

    image_size: int = 64  # side of the square RGB images, pixels
    seed: int = 0  # base seed; each split and index derive their own generator from it
    texture_bias: float = 0.8  # P(typical texture of the shape) in train/test
    color_bias: float = 0.6  # P(typical colour of the shape) in train/test
    min_radius: float = 6.0  # smallest shape radius, pixels
    max_radius: float = 17.0  # largest shape radius, pixels
    occluder_prob: float = 0.5  # probability of a grey bar crossing the shape
    n_clutter_max: int = 4  # up to this many small coloured specks
    noise_std: float = 14.0  # std of the Gaussian pixel noise, 0-255 scale
    color_jitter: int = 25  # +- per-channel jitter of the shape colour

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        for name in ("texture_bias", "color_bias", "occluder_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0 < self.min_radius <= self.max_radius < self.image_size / 2:
            raise ValueError("need 0 < min_radius <= max_radius < image_size / 2")


@dataclass(frozen=True)
class Sample:
    """One generated image with its ground truth."""

    image: np.ndarray  # (H, W, 3) uint8
    shape: int  # index into SHAPES (the class label)
    color: int  # index into COLORS
    texture: int  # index into TEXTURES
    radius: float  # shape radius, pixels
    center: tuple[float, float]  # (x, y) of the shape, pixels
    object_mask: np.ndarray = field(repr=False)  # (H, W) bool: visible shape pixels
    background_mask: np.ndarray = field(repr=False)  # (H, W) bool: visible texture pixels

    @property
    def concepts(self) -> tuple[str, str, str]:
        """The three concept names present: (shape, colour, texture)."""
        return SHAPES[self.shape], COLORS[self.color], TEXTURES[self.texture]

    def concept_masks(self) -> np.ndarray:
        """Per-pixel masks for every concept of :data:`CONCEPTS`.

        Returns a (len(CONCEPTS), H, W) bool array: the shape's and colour's rows hold the visible
        object pixels, the texture's row the visible background, every other row is empty.
        """
        masks = np.zeros((len(CONCEPTS), *self.object_mask.shape), dtype=bool)
        masks[self.shape] = self.object_mask
        masks[len(SHAPES) + self.color] = self.object_mask
        masks[len(SHAPES) + len(COLORS) + self.texture] = self.background_mask
        return masks


def _rng(cfg: WorldConfig, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    return np.random.default_rng([cfg.seed, SPLITS[split], index])


def _sample_attributes(cfg: WorldConfig, split: str, rng: np.random.Generator) -> tuple[int, int, int]:
    shape = int(rng.integers(len(SHAPES)))
    typical_t = TEXTURES.index(TYPICAL_TEXTURE[SHAPES[shape]])
    typical_c = COLORS.index(TYPICAL_COLOR[SHAPES[shape]])
    if split == "balanced":
        return shape, int(rng.integers(len(COLORS))), int(rng.integers(len(TEXTURES)))
    if rng.random() < cfg.color_bias:
        color = typical_c
    else:
        color = int(rng.choice([c for c in range(len(COLORS)) if c != typical_c]))
    if split == "spurious":
        texture = int(rng.choice([t for t in range(len(TEXTURES)) if t != typical_t]))
    elif rng.random() < cfg.texture_bias:
        texture = typical_t
    else:
        texture = int(rng.choice([t for t in range(len(TEXTURES)) if t != typical_t]))
    return shape, color, texture


def _texture(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) uint8 greyish background with the named pattern."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(6.0, 10.0)
    phase_x, phase_y = rng.uniform(0, period, size=2)
    if name == "dots":
        u = (xx + phase_x) % period - period / 2
        v = (yy + phase_y) % period - period / 2
        pattern = (u**2 + v**2) < (period * 0.28) ** 2
    elif name == "stripes":
        angle = rng.choice([0.25, 0.75]) * math.pi + rng.uniform(-0.2, 0.2)
        t = xx * math.cos(angle) + yy * math.sin(angle) + phase_x
        pattern = (t % period) < period / 2
    elif name == "grid":
        pattern = ((xx + phase_x) % period < 1.6) | ((yy + phase_y) % period < 1.6)
    elif name == "checkers":
        pattern = (((xx + phase_x) // (period / 1.5)) + ((yy + phase_y) // (period / 1.5))) % 2 == 0
    else:
        raise ValueError(f"unknown texture {name!r}")
    base = rng.uniform(150, 210)
    contrast = rng.uniform(55, 90) * rng.choice([-1.0, 1.0])
    tint = rng.uniform(-12, 12, size=3)
    img = base + tint[None, None, :] + contrast * pattern[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_polygon(name: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], offset: float) -> list[tuple[float, float]]:
        pts = []
        for k in range(n * len(radii)):
            rad = radii[k % len(radii)] * r
            a = angle + offset + 2 * math.pi * k / (n * len(radii))
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts

    if name == "circle":
        return ring(32, [1.0], 0.0)
    if name == "square":
        return ring(4, [1.0], math.pi / 4)
    if name == "triangle":
        return ring(3, [1.05], -math.pi / 2)
    if name == "star":
        return ring(5, [1.1, 0.45], -math.pi / 2)
    if name == "cross":
        w = 0.36
        base = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    elif name == "heart":
        base = [
            (16 * math.sin(t) ** 3 / 16.0, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 16.0)
            for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)
        ]
    else:
        raise ValueError(f"unknown shape {name!r}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in base]


def concept_attribute(concept: str) -> tuple[int, int]:
    """(column, value) of a concept in an image's (shape, colour, texture) attribute indices: an
    image shows ``concept`` when ``attributes[column] == value``. Raises ValueError for a word that
    is not a concept of the world."""
    if concept not in CONCEPT_KIND:
        raise ValueError(f"{concept!r} is not a concept of the Shapes world; choose from {list(CONCEPTS)}")
    kind = CONCEPT_KIND[concept]
    column, values = {"shape": (0, SHAPES), "color": (1, COLORS), "texture": (2, TEXTURES)}[kind]
    return column, values.index(concept)


def sample_attributes(cfg: WorldConfig, split: str, index: int) -> tuple[int, int, int]:
    """(shape, colour, texture) indices of image ``index`` of ``split``, without rendering it (they
    are the first draws of the image's generator, so this equals ``render(...)``'s attributes).
    Raises ValueError for an unknown split."""
    return _sample_attributes(cfg, split, _rng(cfg, split, index))


def render(cfg: WorldConfig, split: str, index: int) -> Sample:
    """Generate image ``index`` of ``split`` deterministically.

    Returns a :class:`Sample`. Raises ValueError for an unknown split or a negative index.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = _rng(cfg, split, index)
    size = cfg.image_size
    shape, color, texture = _sample_attributes(cfg, split, rng)
    background = _texture(TEXTURES[texture], size, rng)

    radius = float(rng.uniform(cfg.min_radius, cfg.max_radius))
    cx, cy = rng.uniform(radius + 1, size - radius - 1, size=2)
    angle = float(rng.uniform(-0.35, 0.35))
    rgb = np.clip(np.array(COLOR_RGB[COLORS[color]]) + rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, 3), 0, 255)

    obj = Image.new("L", (size, size), 0)
    ImageDraw.Draw(obj).polygon(_shape_polygon(SHAPES[shape], cx, cy, radius, angle), fill=255)
    object_mask = np.asarray(obj) > 127

    occluder = np.zeros((size, size), dtype=bool)
    if rng.random() < cfg.occluder_prob:
        occ = Image.new("L", (size, size), 0)
        a = rng.uniform(0, math.pi)
        width = rng.uniform(2.0, max(2.5, radius * 0.45))
        ox, oy = cx + rng.uniform(-radius, radius) * 0.6, cy + rng.uniform(-radius, radius) * 0.6
        dx, dy = math.cos(a) * size, math.sin(a) * size
        ImageDraw.Draw(occ).line([(ox - dx, oy - dy), (ox + dx, oy + dy)], fill=255, width=int(round(width)))
        occluder = np.asarray(occ) > 127
    clutter = np.zeros((size, size), dtype=bool)
    clutter_rgb = np.zeros((size, size, 3), dtype=np.float32)
    for _ in range(int(rng.integers(0, cfg.n_clutter_max + 1))):
        speck = Image.new("L", (size, size), 0)
        sx, sy = rng.uniform(0, size, 2)
        sr = rng.uniform(1.5, 3.0)
        ImageDraw.Draw(speck).ellipse([sx - sr, sy - sr, sx + sr, sy + sr], fill=255)
        m = (np.asarray(speck) > 127) & ~object_mask
        clutter |= m
        clutter_rgb[m] = COLOR_RGB[COLORS[int(rng.integers(len(COLORS)))]]

    img = background.astype(np.float32)
    img[object_mask] = rgb
    img[clutter] = clutter_rgb[clutter]
    grey = rng.uniform(60, 120)
    img[occluder] = grey
    img += rng.normal(0.0, cfg.noise_std, size=img.shape)
    image = np.clip(img, 0, 255).astype(np.uint8)

    visible_object = object_mask & ~occluder
    visible_background = ~object_mask & ~occluder & ~clutter
    return Sample(image, shape, color, texture, radius, (float(cx), float(cy)), visible_object, visible_background)


def caption(sample: Sample, parts: tuple[str, ...] = ("color", "shape", "texture")) -> str:
    """A caption naming the requested attributes of ``sample``.

    ``parts`` is any non-empty subset of ("color", "shape", "texture"), e.g. ("color",) gives
    "red", ("color", "shape", "texture") gives "a red star on a dotted background".
    """
    shape, color, texture = sample.concepts
    return caption_for(shape if "shape" in parts else None, color if "color" in parts else None,
                       texture if "texture" in parts else None)


def caption_for(shape: str | None = None, color: str | None = None, texture: str | None = None) -> str:
    """Caption text for a combination of attributes; at least one must be given."""
    if shape is None and color is None and texture is None:
        raise ValueError("a caption needs at least one attribute")
    if shape is None and texture is None:
        return str(color)
    if shape is None and color is None:
        return str(texture)
    words = ["a"]
    if color is not None:
        words.append(color)
    words.append(shape if shape is not None else "shape")
    if texture is not None:
        words.append(f"on a {TEXTURE_ADJECTIVE[texture]} background")
    return " ".join(words)


class ShapesDataset(torch.utils.data.Dataset):
    """A lazily generated split of the Shapes world.

    ``ds[i]`` returns ``(image, label)`` where image is ``transform(PIL image)`` (a PIL image when
    ``transform`` is None) and label the shape index. Use :meth:`sample` for the full ground truth.
    """

    def __init__(self, split: str, n: int, cfg: WorldConfig | None = None, transform=None) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        self.split, self.n, self.cfg, self.transform = split, n, cfg or WorldConfig(), transform
        self.classes = list(SHAPES)

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int) -> Sample:
        """The :class:`Sample` (image and ground truth) at ``index``."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for a split of {self.n}")
        return render(self.cfg, self.split, index)

    def __getitem__(self, index: int):
        s = self.sample(index)
        img = Image.fromarray(s.image)
        return (self.transform(img) if self.transform is not None else img), s.shape

    def attributes(self) -> np.ndarray:
        """(n, 3) int array of (shape, colour, texture) indices of every image (drawn without
        rendering: the attributes are the first draws of each image's generator)."""
        return np.array([sample_attributes(self.cfg, self.split, i) for i in range(self.n)])

    @property
    def labels(self) -> list[int]:
        """Every image's label (its shape index), without rendering the images."""
        return self.attributes()[:, 0].tolist()

    @property
    def fingerprint(self) -> str:
        """Identifies the content of this dataset (used in cache keys)."""
        return f"shapes:{self.split}:{self.n}:{self.cfg!r}"

    #: The concepts :meth:`masks` gives a mask of, in order (the masked-dataset protocol that
    #: grounding and the feature panel read).
    mask_concepts: tuple[str, ...] = CONCEPTS

    def masks(self, index: int) -> np.ndarray:
        """(16, H, W) bool pixel masks of :attr:`mask_concepts` in image ``index``."""
        return self.sample(index).concept_masks()

    def mask_probe(self, n: int | None = None, preprocess=None):
        """The first ``n`` images of this split (all by default) as a NetDissect probing set
        (:class:`~miclip_nb.shapes.probes.ShapesMaskProbe`), preprocessed by ``preprocess``."""
        from .probes import ShapesMaskProbe

        return ShapesMaskProbe(self.split, min(n or self.n, self.n), cfg=self.cfg, preprocess=preprocess)


def to_tensor(image: np.ndarray | Image.Image) -> torch.Tensor:
    """Toy models' preprocessing: uint8 (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0)


def render_batch(cfg: WorldConfig, split: str, indices) -> tuple[torch.Tensor, np.ndarray]:
    """Render many images: returns ((N, 3, H, W) float tensor in [-1, 1], (N, 3) attribute array)."""
    samples = [render(cfg, split, int(i)) for i in indices]
    x = torch.stack([to_tensor(s.image) for s in samples])
    attrs = np.array([[s.shape, s.color, s.texture] for s in samples])
    return x, attrs
