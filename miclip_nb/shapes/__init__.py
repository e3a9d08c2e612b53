"""The Shapes world, one plug-in of miclip-nb: synthetic images with known ground truth, the small
models trained on them and the CLIP that embeds them.

- :mod:`~miclip_nb.shapes.world`: the generator (attributes, pixel masks, captions; ``ShapesDataset``);
- :mod:`~miclip_nb.shapes.toy_models`: ``toy_cnn`` and ``toy_vit``, the classifiers to interpret;
- :mod:`~miclip_nb.shapes.toyclip`: ToyCLIP, an open_clip model trained on the world's captions;
- :mod:`~miclip_nb.shapes.probes`: the world as a NetDissect probing set with masks;
- :mod:`~miclip_nb.shapes.groundtruth`: the ground-truth benchmark (do a method's units detect a concept?);
- :mod:`~miclip_nb.shapes.train`: retrain the shipped weights;
- :mod:`~miclip_nb.shapes.plugin`: its registrations (``shapes:<split>:<n>``, ``toy_cnn``, ``toyclip``, ...).

The generic core never imports this package: it finds the world through :mod:`miclip_nb.plugins`.
The world's generator API is re-exported here (``shapes.render_batch``, ``shapes.COLORS``, ...).
"""

from .plugin import register as _register
from .probes import ShapesMaskProbe
from .world import (COLOR_RGB, COLORS, CONCEPT_KIND, CONCEPTS, SHAPES, SPLITS, TEXTURE_ADJECTIVE, TEXTURES,
                    TYPICAL_COLOR, TYPICAL_TEXTURE, Sample, ShapesDataset, WorldConfig, caption, caption_for, render,
                    render_batch, to_tensor)

__all__ = ["COLOR_RGB", "COLORS", "CONCEPT_KIND", "CONCEPTS", "SHAPES", "SPLITS", "TEXTURE_ADJECTIVE", "TEXTURES",
           "TYPICAL_COLOR", "TYPICAL_TEXTURE", "Sample", "ShapesDataset", "ShapesMaskProbe", "WorldConfig", "caption",
           "caption_for", "render", "render_batch", "to_tensor"]

_register()  # also works from a checkout that is not pip-installed (no entry point)
