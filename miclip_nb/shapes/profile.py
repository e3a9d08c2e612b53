"""The ``toy`` profile: every notebook on the Shapes world, offline, on a laptop CPU in minutes."""

from __future__ import annotations

from ..profiles import Profile
from ..sae import SAEConfig
from .world import COLORS, SHAPES, TEXTURES


def toy_profile() -> Profile:
    """The Shapes world's settings of notebooks 00-04 (toy_cnn / toy_vit, ToyCLIP, a few thousand
    synthetic images per step)."""
    return Profile(
        name="toy", description="the Shapes world: toy_cnn / toy_vit and ToyCLIP, offline, CPU (minutes)",
        check_claims=True,  # every claim of the notebooks was measured on this world
        clip="toyclip", clip_pretrained=None,
        model="toy_cnn", layer=None, train_data="shapes:train:6000", eval_data="shapes:test:600",
        probe_data="shapes:balanced:512", vocabulary="shapes", queries=("red", "star", "dots"), steer_class="star",
        sae_model="toy_vit", sae_layer="blocks.4", sae_data="shapes:train:1500",
        sae=SAEConfig(expansion=8, k=16, epochs=5),
        grounding_concepts=tuple(COLORS + SHAPES), grounding_concept="red", grounding_data="shapes:test:300",
        table_models={"toy_cnn": "stages.2", "toy_vit": "blocks.4"},
        # "ablation" is a reference row, not a method: each class's 5 units whose removal alone costs most
        neuron_methods=("miclip", "miclip_cosine", "image_only", "random", "act_values", "netdissect", "clip_dissect",
                        "captum_gxa", "ablation"),
        sae_methods=("miclip", "miclip_cosine", "image_only", "random", "act_values", "clip_dissect", "ablation"),
        table=dict(train_data="shapes:train:2000", eval_data="shapes:test:240", seeds=(0, 1, 2), n_random=3, n_probe=200,
                   n_captum=60, n_other=64, sae=SAEConfig(expansion=4, k=8, epochs=2), sae_train_data="shapes:train:500"),
        diagnosis_model="toy_cnn", diagnosis_layers=("stages.0", "stages.1", "stages.2", "stages.3"),
        failure_data="shapes:spurious:400", failure_cause=background_texture)


def background_texture(dataset, index: int) -> str:
    """The texture behind image ``index`` of a Shapes dataset: on the spurious split it is another
    shape's typical texture, the known cause of the toy models' mistakes."""
    return TEXTURES[dataset.sample(int(index)).texture]
