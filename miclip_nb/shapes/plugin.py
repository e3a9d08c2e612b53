"""The Shapes world's registrations with the generic core (:mod:`miclip_nb.plugins`).

Installed as the entry point ``shapes`` of the group ``miclip_nb.plugins`` (pyproject.toml), and run
on ``import miclip_nb.shapes`` as well, so the world works from a checkout that is not installed.
"""

from __future__ import annotations

from .. import plugins

#: The layer each toy model is probed at by default (the penultimate stage / block).
TOY_LAYERS: dict[str, str] = {"toy_cnn": "stages.2", "toy_vit": "blocks.4"}


def _dataset(rest: str, transform=None):
    from ..datasets import DatasetError
    from .world import ShapesDataset

    parts = rest.split(":")
    if len(parts) != 2 or not parts[1].isdigit():
        raise DatasetError(f"expected 'shapes:<split>:<n>' (e.g. 'shapes:test:600'), got 'shapes:{rest}'")
    return ShapesDataset(parts[0], int(parts[1]), transform=transform)


def _toy_target(name: str):
    def factory(layer: str | None = None, weights_path=None):
        """The committed model (``weights_path``: a folder holding ``<name>.safetensors`` and its JSON)."""
        from ..zoo import TargetModel
        from .toy_models import TOY_CLASS_NAMES, load_toy_model, toy_preprocess

        return TargetModel(load_toy_model(name, weights_path), toy_preprocess, list(TOY_CLASS_NAMES), name,
                           layer or TOY_LAYERS[name])

    return factory


def _toyclip(device="cpu", checkpoint_path=None):
    from ..embed import OpenClipBackend
    from .toyclip import concept_phrases, load_toyclip

    model, tokenizer, preprocess = load_toyclip(checkpoint_path)
    # ToyCLIP was trained on bare captions ("a star", "red", "dots"): no "a photo of" templates.
    return OpenClipBackend(model, tokenizer, preprocess, "ToyCLIP", device, templates=("{}",), phrases=concept_phrases())


def _concepts():
    from .world import CONCEPTS

    return list(CONCEPTS)


def _toy_profile():
    from .profile import toy_profile

    return toy_profile()


def register() -> None:
    """Register the world's dataset scheme, models, backend, vocabulary and profile."""
    plugins.register("dataset", "shapes", _dataset, description="the Shapes world: shapes:<split>:<n>")
    for name in TOY_LAYERS:
        plugins.register("target", name, _toy_target(name), description=f"{name}, trained on the Shapes world")
    plugins.register("backend", "toyclip", _toyclip, description="ToyCLIP, a 64-d CLIP of the Shapes world")
    plugins.register("concepts", "shapes", _concepts, description="the 16 concepts of the Shapes world")
    plugins.register("profile", "toy", _toy_profile, description="every notebook on the Shapes world, offline, CPU")
