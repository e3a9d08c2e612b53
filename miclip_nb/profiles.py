"""Profiles: everything a notebook needs to know about *which* setting it runs, in one object.

Every notebook starts with ``P = profiles.get(PROFILE)`` and reads its models, layers, data and
sizes from ``P``; its cells hold calls, not ``if PROFILE == ...`` branches. Three ways to pick:

- ``"real"`` (this module): the paper's setting: ResNet-50, ViT-B/16 and CLIP ViT-B/16 on
  ImageNet folders (``$IMAGENET_TRAIN``, ``$IMAGENET_VAL``), CLIP ViT-B/16 'openai' as the
  embedding model (weights download on first use), a GPU;
- a plug-in's, e.g. ``"toy"`` from the Shapes world (offline, CPU, minutes);
- your own: ``profiles.get("real").replace(model="timm:convnext_tiny", train_data="/my/photos")``,
  or a ``Profile(...)`` built from scratch, with your models (names or ``zoo.TargetModel`` objects),
  weights files, CLIP backend and data (folders, or anything ``datasets.as_dataset`` takes).

``PROFILE`` defaults to ``$MICLIP_PROFILE`` in the notebooks, so a whole run can switch setting
without editing them (tests run the real architectures with random weights that way:
:func:`real_smoke`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from . import plugins
from .align import AlignConfig
from .sae import SAEConfig

__all__ = ["Profile", "get", "names", "real", "real_smoke"]

#: The paper's methods on neurons (NetDissect needs a Broden-style mask folder: $BRODEN_IMAGENET).
PAPER_NEURON_METHODS = ("miclip", "miclip_cosine", "image_only", "random", "act_values", "netdissect", "clip_dissect",
                        "captum_ig", "captum_gxa")
#: The methods that work on SAE features (methods.keys("sae") without the costly ablation reference).
PAPER_SAE_METHODS = ("miclip", "miclip_cosine", "image_only", "random", "act_values", "clip_dissect")


@dataclass(frozen=True)
class Profile:
    """The setting of every notebook. Models are zoo.load_target names or zoo.TargetModel objects,
    data are folders, specs or datasets (datasets.as_dataset), CLIP a name or a backend object."""

    name: str  # how the notebooks print it
    description: str  # one line: what runs, where, how long
    # the embedding model
    clip: Any  # open_clip name, registered backend name, or backend object
    clip_pretrained: str | None  # open_clip pretrained tag (None: random weights, for smoke tests)
    # notebooks 00 and 01: one model, aligned at one layer
    model: Any  # the model to interpret
    layer: str | None  # its layer (None: the model's default)
    train_data: Any  # alignment images
    eval_data: Any  # images whose accuracy the edits change, and probe images of the panels
    vocabulary: Any  # concept set for descriptions ("imagenet", "shapes", "words" or a list)
    queries: tuple[str, ...]  # concepts the notebooks localize
    steer_class: str  # the class whose units the tour removes
    probe_data: Any = None  # images the panels browse (None: eval_data)
    n_probe: int = 512  # how many of them
    n_train: int | None = None  # cap on alignment images (None: all)
    n_eval: int | None = None  # cap on evaluation images (None: all)
    pretrained: bool = True  # False: the models' random weights (smoke tests; nothing downloads)
    check_claims: bool = False  # the notebooks' claims were measured for this setting: check them
    # notebook 02: SAE features
    sae_model: Any = None  # the model whose layer the SAE reads
    sae_layer: str | None = None  # that layer
    sae_data: Any = None  # images whose tokens train the SAE
    n_sae_images: int | None = None  # cap on them (tokens take disk: T x D floats per image)
    n_code_images: int | None = None  # images whose pooled codes train the alignment (None: the SAE's images)
    sae: SAEConfig = field(default_factory=SAEConfig)  # the SAE's architecture and training
    grounding_concepts: tuple[str, ...] = ()  # concepts whose features are localized and grounded
    grounding_concept: str = ""  # the one drawn as heatmaps
    grounding_data: Any = None  # images of the heatmaps, the removal check and the panel (None: eval_data)
    # notebook 03: intervention tables
    table_models: dict[str, str] = field(default_factory=dict)  # model -> layer
    neuron_methods: tuple[str, ...] = PAPER_NEURON_METHODS  # table rows on neurons
    sae_methods: tuple[str, ...] = PAPER_SAE_METHODS  # table rows on SAE features
    table: dict = field(default_factory=dict)  # further pipeline.PipelineConfig fields of the tables
    sweep_tables: int | None = None  # notebook 03: how many tables (first ones) get dose-response sweeps; None: all
    # notebook 04: failure diagnosis
    diagnosis_model: Any = None  # the model whose failures are traced
    diagnosis_layers: tuple[str, ...] = ()  # its layers, in order
    failure_data: Any = None  # images it fails on
    n_failures: int | None = None  # cap on those images
    failure_cause: Any = None  # (dataset, index) -> the concept known to mislead the model there, or None

    def replace(self, **changes) -> "Profile":
        """A copy with ``changes`` (any field)."""
        return replace(self, **changes)

    def pipeline_config(self, **overrides):
        """A pipeline.PipelineConfig of notebooks 00/01's model and data (``overrides``: any field)."""
        from .pipeline import PipelineConfig

        base = dict(model=self.model, layer=self.layer, clip=self.clip, clip_pretrained=self.clip_pretrained,
                    pretrained=self.pretrained, train_data=self.train_data, eval_data=self.eval_data,
                    n_train=self.n_train, n_eval=self.n_eval, concepts=self.vocabulary)
        return PipelineConfig(**(base | overrides))

    def table_config(self, model: str, layer: str, units: str = "neurons", **overrides):
        """The PipelineConfig of one table of notebook 03 (``units``: "neurons" or "sae")."""
        methods = self.neuron_methods if units == "neurons" else self.sae_methods
        return self.pipeline_config(**(dict(model=model, layer=layer, methods=methods, units=units, sae=self.sae)
                                       | self.table | overrides))


def real() -> Profile:
    """The paper's setting (see the module docstring). Data come from ``$IMAGENET_TRAIN`` and
    ``$IMAGENET_VAL`` (ImageNet train / val folders in wnid subfolders), NetDissect's masks from
    ``$BRODEN_IMAGENET`` when set (else NetDissect is left out)."""
    train = os.environ.get("IMAGENET_TRAIN", "/data/imagenet/train")
    val = os.environ.get("IMAGENET_VAL", "/data/imagenet/val")
    broden = os.environ.get("BRODEN_IMAGENET")
    neuron_methods = PAPER_NEURON_METHODS if broden else tuple(m for m in PAPER_NEURON_METHODS if m != "netdissect")
    return Profile(
        name="real", description="the paper's models on ImageNet, CLIP ViT-B/16 'openai'; a GPU (hours)",
        clip="ViT-B-16", clip_pretrained="openai",
        model="timm:resnet50", layer=None, train_data=train, eval_data=val, vocabulary="imagenet",
        queries=("kit fox", "green", "stripes"), steer_class="tiger", n_train=None, n_eval=None,
        sae_model="clip:ViT-B-16/openai", sae_layer="visual.transformer.resblocks.10", sae_data=train,
        n_sae_images=20_000, n_code_images=200_000, sae=SAEConfig(expansion=16, k=32, epochs=2),
        grounding_concepts=("kit fox", "green", "red", "stripes", "wheel"), grounding_concept="kit fox",
        table_models={"timm:resnet50": "layer4.0", "timm:vit_base_patch16_224": "blocks.10",
                      "clip:ViT-B-16/openai": "visual.transformer.resblocks.10"},
        neuron_methods=neuron_methods,
        table=dict(seeds=(0, 1, 2), n_random=20, n_probe=100_000, n_captum=5_000, mask_probe=broden, batch_size=256,
                   sae_train_data=val),
        diagnosis_model="clip:ViT-B-16/openai",
        diagnosis_layers=tuple(f"visual.transformer.resblocks.{i}" for i in range(12)),
        failure_data=val, n_failures=2000)


def real_smoke(images: str | None = None, n: int = 24) -> Profile:
    """The real profile's architectures with *random* weights (nothing downloads) on a folder of
    real photos with small counts, to check on a CPU that the paper's setting runs end to end: its
    figures are meaningless. ``images``: a folder (default ``$MICLIP_IMAGENET_SAMPLE``, e.g. the
    imagenet-sample-500 layout); ``n``: images per step. Raises ValueError without a folder."""
    folder = images or os.environ.get("MICLIP_IMAGENET_SAMPLE")
    if not folder:
        raise ValueError("real_smoke needs a folder of photos: pass images= or set $MICLIP_IMAGENET_SAMPLE")
    import torch

    from .datasets import open_dataset

    base = real()
    photos = open_dataset(folder)
    first = torch.utils.data.Subset(photos, range(min(n, len(photos))))  # the heatmaps', removal's and panel's images
    return base.replace(
        name="real-smoke", description="the paper's architectures with random weights on a few real photos (CPU smoke test)",
        clip_pretrained=None, pretrained=False, train_data=folder, eval_data=folder, n_train=n, n_eval=n,
        # a few words rather than 1000 ImageNet names (each costs CLIP's text tower 7 prompts on a CPU),
        # and a class whose photo is among the first n of imagenet-sample (class 0)
        vocabulary=("tench", "fish", "dog", "bird", "red", "green", "stripes", "water", "grass", "snow"),
        steer_class="tench", n_probe=n, grounding_data=first,
        sae_model="clip:ViT-B-16", sae_data=folder, n_sae_images=n // 2, n_code_images=n,
        sae=SAEConfig(expansion=1, k=8, epochs=1, batch_size=256),
        table_models={"timm:resnet50": "layer4.0", "timm:vit_base_patch16_224": "blocks.10",
                      "clip:ViT-B-16": "visual.transformer.resblocks.10"},
        neuron_methods=("miclip", "miclip_cosine", "image_only", "random", "act_values", "clip_dissect", "captum_gxa"),
        # the tables' cost is (classes x (1 + n_other) images) x methods x seeds x 6 tables through the
        # tail of ResNet-50 / ViT-B/16 on a CPU: half the images, one other-class image each
        table=dict(seeds=(0,), n_random=2, n_probe=n, n_captum=4, captum_steps=2, n_eval=n // 2, n_other=1, batch_size=8,
                   align=AlignConfig(epochs=2, batch_size=8)),
        # the sweeps re-run every method at 3 more doses with 3 matched-norm controls each: the first
        # table's (ResNet-50's neurons) checks the path; CLIP's classifier does not split, so its
        # edits are full forwards
        sweep_tables=1,
        diagnosis_model="clip:ViT-B-16", failure_data=folder, n_failures=n)


_CORE = {"real": real, "real-smoke": real_smoke}


def names() -> list[str]:
    """The profiles :func:`get` knows: the core's and the plug-ins'."""
    return sorted(set(_CORE) | set(plugins.names("profile")))


def get(profile: str | Profile) -> Profile:
    """A profile by name (:func:`names`), or a Profile as it is. Raises plugins.UnknownNameError
    listing the known names."""
    if isinstance(profile, Profile):
        return profile
    key = str(profile).strip().lower()
    if key in _CORE:
        return _CORE[key]()
    return plugins.get("profile", key)()
