"""miclip-nb: MiClip in Jupyter. Align a frozen vision model's units (neurons or SAE features) with
CLIP space, then localize concepts, describe units, steer them and diagnose failures.

The stages, one module each (``from miclip_nb import store``): capture -> store -> embed ->
align -> interpret -> select / methods -> steer / intervention -> reporting; sae, grounding,
diagnose, baselines beside them; pipeline composes them; viz and widgets show them; profiles set
the notebooks' setting; plugins find named datasets, models and backends (the Shapes world,
``miclip_nb.shapes``, is one plug-in). The names in :data:`__all__` are the curated entry points,
imported on first use so that ``import miclip_nb`` stays cheap.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("miclip-nb")
except PackageNotFoundError:  # a checkout that is not installed
    __version__ = "0+unknown"

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    # loading what the user has
    "load_target": "zoo", "TargetModel": "zoo", "load_clip": "embed", "as_backend": "embed",
    "FunctionBackend": "embed", "open_dataset": "datasets", "as_dataset": "datasets",
    # capture and the store
    "build_store": "store", "ActivationStore": "store", "capture": "capture", "layer_names": "capture",
    # units, alignment, interpretation
    "UnitSpace": "units", "AlignConfig": "align", "train_encoder": "align", "fit_alignment": "align",
    "unit_embeddings": "interpret", "encode_concepts": "interpret", "concept_set": "interpret",
    "concept_temperature": "interpret", "localize": "interpret", "describe": "interpret",
    # steering and the tables
    "intervene": "steer", "intervention_table": "intervention", "PipelineConfig": "pipeline",
    # notebooks
    "Profile": "profiles", "claim": "claims",
}
_SUBMODULES = ("align", "baselines", "capture", "claims", "datasets", "diagnose", "distributed", "embed", "grounding",
               "interpret",
               "intervention", "methods", "metrics", "pipeline", "plugins", "profiles", "reporting", "sae", "select",
               "steer", "store", "units", "viz", "widgets", "zoo")

__all__ = ["__version__", *_EXPORTS, *_SUBMODULES]


def __getattr__(name: str):
    """Import a submodule or a curated name on first use."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES or name == "shapes":
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'miclip_nb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
