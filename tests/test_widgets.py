"""Panels driven without a browser: set values, click, read what they show."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from miclip_nb.embed import FunctionBackend
from miclip_nb.widgets import ExplorerState, concept_search_panel, search_concept, unit_inspector_panel

WORDS = ["red", "star", "dots", "blue"]


def _state():
    # Unit u points at word u % 4; the text backend embeds each word as its one-hot axis.
    dim = len(WORDS)
    def text_fn(texts):
        return torch.stack([F.one_hot(torch.tensor(WORDS.index(t)), dim).float() if t in WORDS else torch.ones(dim) for t in texts])
    backend = FunctionBackend(image_fn=lambda x: x.flatten(1)[:, :dim], text_fn=text_fn, preprocess=lambda im: im,
                              embed_dim=dim, fingerprint="test")
    unit_emb = F.normalize(F.one_hot(torch.arange(8) % dim, dim).float() + 0.05 * torch.arange(8)[:, None], dim=-1)
    rng = np.random.default_rng(0)
    acts = torch.from_numpy(rng.random((20, 8)).astype(np.float32))
    images = rng.integers(0, 255, (20, 16, 16, 3), dtype=np.uint8)
    return ExplorerState(unit_emb, backend, WORDS, backend.encode_texts(WORDS), acts, images, "stages.2", "neuron",
                         encode_text=lambda text: backend.encode_texts([text])[0])


def test_search_concept_ranks_units_of_that_concept():
    hits = search_concept(_state(), "star", tau=2)
    assert sorted(u for u, _ in hits) == [1, 5]


def test_concept_search_panel_updates_on_input_and_reports_errors():
    panel = concept_search_panel(_state(), tau=2)
    parts = panel["parts"]
    parts["concept"].value = "dots"
    assert ">2<" in parts["table"].value and ">6<" in parts["table"].value
    first_png = parts["images"].value
    assert first_png[:4] == b"\x89PNG"
    parts["concept"].value = "red"
    assert ">0<" in parts["table"].value and parts["images"].value != first_png
    parts["tau"].value = 3
    assert parts["table"].value.count("<tr>") == 4  # header + 3 units
    parts["concept"].value = "   "
    parts["search"].click()
    assert "type a concept" in parts["status"].value


def test_concept_search_ranks_by_posterior_or_cosine():
    state = _state()
    # Unit 7 points at what "red" and "star" share: the closest unit to "red" by cosine, but not specific to it.
    state.unit_emb_ud = torch.cat([state.unit_emb_ud[:7], F.normalize(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), dim=-1)])
    state.vocab_emb_cd = F.normalize(torch.tensor([[1.0, 0.9, 0, 0], [0.9, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]), dim=-1)
    state.encode_text = lambda text: state.vocab_emb_cd[WORDS.index(text)]
    assert search_concept(state, "red", tau=1, scoring="cosine")[0][0] == 7
    assert search_concept(state, "red", tau=1)[0][0] in (0, 4)
    with pytest.raises(ValueError, match="scoring"):
        search_concept(state, "red", 1, scoring="dot")
    parts = concept_search_panel(state, tau=1)["parts"]
    parts["concept"].value = "red"
    assert "log p among vocabulary" in parts["table"].value and ">7<" not in parts["table"].value
    parts["scoring"].value = "cosine"
    assert ">7<" in parts["table"].value and "cosine" in parts["table"].value


def test_unit_inspector_shows_descriptions_images_and_histogram():
    panel = unit_inspector_panel(_state(), tau=2)
    parts = panel["parts"]
    assert "red" in parts["table"].value.split("</tr>")[1]  # unit 0's best concept
    before = (parts["images"].value, parts["histogram"].value)
    parts["unit"].value = 3
    assert "blue" in parts["table"].value.split("</tr>")[1]
    assert parts["images"].value != before[0] and parts["histogram"].value != before[1]
    assert parts["unit"].max == 7


def _causal_state():
    """The explorer of _state() over a model that reads it: the layer "features" holds the 8 units
    (probe inputs = the probe activations), and the head reads unit 0 for class "red" and unit 1 for
    class "star". Unit 4 is described "red" like unit 0 (it points at word 4 % 4) but nothing reads it."""
    from collections import OrderedDict

    from torch import nn

    state = _state()
    head = nn.Linear(8, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[0, 0] = head.weight[1, 1] = 3.0
    state.target = nn.Sequential(OrderedDict(features=nn.Identity(), head=head)).eval()
    state.probe_inputs, state.probe_labels = state.probe_acts_nu.clone(), torch.arange(20) % 2
    state.class_names = ["red", "star"]
    state.layer = "features"
    return state


def _rows(html_table):
    return html_table.split("</tr>")[1:-1]


def test_unit_inspector_shows_each_units_causal_effect_beside_its_descriptions():
    state = _causal_state()
    parts = unit_inspector_panel(state, tau=2)["parts"]
    assert "red" in _rows(parts["table"].value)[0] and "logit drop if removed" in parts["effects"].value
    first = _rows(parts["effects"].value)[0]
    expected = 3.0 * float(state.probe_acts_nu[state.probe_labels == 0, 0].mean())
    assert ">red<" in first and f">{expected:.3f}<" in first  # unit 0: class "red" reads it
    parts["unit"].value = 4  # also described "red", read by nothing
    assert "red" in _rows(parts["table"].value)[0]
    assert all(">0.000<" in row for row in _rows(parts["effects"].value))
    assert state.effects.computed == [0, 4]  # lazily: only the units shown
    assert unit_inspector_panel(_state(), tau=2)["parts"]["effects"].value == ""  # no model: no causal column


def test_concept_search_shows_each_localized_units_causal_score():
    state = _causal_state()
    parts = concept_search_panel(state, tau=2)["parts"]
    parts["concept"].value = "red"  # a class name: the drop of the "red" logit
    rows = _rows(parts["table"].value)
    assert "causal: logit drop if removed" in parts["table"].value and len(rows) == 2
    by_unit = {int(r.split("</td>")[0].rsplit(">", 1)[1]): r for r in rows}
    assert set(by_unit) == {0, 4}
    assert ">0.000<" in by_unit[4] and ">0.000<" not in by_unit[0] and all(">red<" in r for r in rows)
    parts["concept"].value = "dots"  # not a class: the unit's largest class effect
    assert all(r.count("</td>") == 4 for r in _rows(parts["table"].value))
    assert sorted(state.effects.computed) == [0, 2, 4, 6]
    from miclip_nb.widgets import causal_columns

    assert causal_columns(state, 1, "star")[1] == "star" and causal_columns(state, 1, "star")[0] > 0
    with pytest.raises(ValueError, match="causal"):
        causal_columns(_state(), 0, "red")


def _feature_state(with_masks: bool = True):
    # Feature f points at word f % 4 and fires on a 4 x 4 square at (f, f), so each feature's
    # heatmap differs; the "red" masks cover feature 0's square exactly.
    from miclip_nb.widgets import FeatureGroundingState

    dim = len(WORDS)
    unit_emb = F.normalize(F.one_hot(torch.arange(8) % dim, dim).float() + 0.05 * torch.arange(8)[:, None], dim=-1)
    images = torch.zeros(5, 3, 16, 16)
    calls = []

    def heatmap_fn(x, feature):
        calls.append(feature)
        heat = np.zeros((x.shape[0], 16, 16), dtype=np.float32)
        r = feature
        heat[:, r : r + 4, r : r + 4] = 1.0 + feature
        return heat

    masks = np.zeros((5, 16, 16), dtype=bool)
    masks[:, 0:4, 0:4] = True
    state = FeatureGroundingState(unit_emb, lambda text: F.one_hot(torch.tensor(WORDS.index(text)), dim).float(),
                                  heatmap_fn, images, np.zeros((5, 16, 16, 3), dtype=np.uint8), "blocks.4", ["red", "star"],
                                  {"red": masks} if with_masks else None)
    return state, calls


def test_top_features_ranks_features_of_the_concept():
    from miclip_nb.widgets import top_features

    state, _ = _feature_state()
    assert sorted(u for u, _ in top_features(state, "star", 2)) == [1, 5]
    with pytest.raises(ValueError, match="concept"):
        top_features(state, " ", 2)


def test_sae_feature_panel_browses_features_and_redraws_heatmaps():
    from miclip_nb.widgets import sae_feature_panel

    state, calls = _feature_state()
    panel = sae_feature_panel(state, tau=2, images=(0, 1))
    parts = panel["parts"]
    assert parts["feature"].value == 0 and [v for _, v in parts["feature"].options] == [0, 4]
    assert ">4<" in parts["table"].value and ">0<" in parts["table"].value
    first = parts["heatmaps"].value
    assert first[:4] == b"\x89PNG" and "2 images" in parts["status"].value
    assert "mean IoU with “red” masks 1.00" in parts["status"].value  # feature 0's square is the red mask
    parts["feature"].value = 4  # a square beside the mask
    assert "mean IoU with “red” masks 0.00" in parts["status"].value and parts["heatmaps"].value != first
    parts["concept"].value = "star"
    assert [v for _, v in parts["feature"].options] == [1, 5] and parts["feature"].value == 1
    assert "IoU" not in parts["status"].value  # no masks for "star"
    star_png = parts["heatmaps"].value
    parts["images"].value = (2, 3, 4)
    assert "3 images" in parts["status"].value and parts["heatmaps"].value != star_png
    parts["tau"].value = 3
    assert parts["table"].value.count("<tr>") == 4 and len(parts["feature"].options) == 3
    n_calls = len(calls)
    parts["show"].click()
    assert len(calls) == n_calls + 1
    parts["images"].value = ()
    assert "choose at least one image" in parts["status"].value


def test_feature_heatmap_figure_checks_indices():
    import matplotlib.pyplot as plt

    from miclip_nb.widgets import FeatureGroundingState, feature_heatmap_figure

    state, _ = _feature_state(with_masks=False)
    fig, iou = feature_heatmap_figure(state, 3, [0, 4])
    assert iou is None and len([ax for ax in fig.axes if ax.images]) == 2
    plt.close(fig)
    with pytest.raises(IndexError):
        feature_heatmap_figure(state, 3, [5])
    with pytest.raises(ValueError, match="same N"):
        FeatureGroundingState(state.unit_emb_ud, state.encode_text, state.heatmap_fn, state.images,
                              state.images_uint8[:2], "x", ["red"])


# --------------------------------------------------------------------------------------------
# The panels refuse unit embeddings made for other units


def _toy_target(name="toy_cnn", seed=0):
    """A random-weight toy model as a TargetModel (toy_cnn: stages.2 and stages.3 both have 128 units;
    toy_vit: every block has 128)."""
    from miclip_nb.shapes.toy_models import TOY_CLASS_NAMES, build_toy_model, toy_preprocess
    from miclip_nb.zoo import TargetModel

    torch.manual_seed(seed)
    return TargetModel(build_toy_model(name), toy_preprocess, list(TOY_CLASS_NAMES), f"test:{name}:{seed}")


def _embeddings(n_units, meta, dim=len(WORDS)):
    from miclip_nb.align import EncoderConfig, NeuronEncoder
    from miclip_nb.interpret import unit_embeddings

    torch.manual_seed(0)
    return unit_embeddings(NeuronEncoder(EncoderConfig(n_units, dim), meta))


def _backend():
    from miclip_nb.embed import FunctionBackend

    return FunctionBackend(image_fn=lambda x: x.flatten(1)[:, :4], text_fn=lambda texts: torch.ones(len(texts), 4),
                           preprocess=lambda im: im, embed_dim=4, fingerprint="test")


def test_build_explorer_checks_the_units_of_the_layer():
    """Before: embeddings of one layer (or of no layer of this model) were accepted for another, and
    the panels failed later with an IndexError, or, at the same width, silently described the wrong units."""
    from miclip_nb.shapes import ShapesDataset
    from miclip_nb.store import model_identity
    from miclip_nb.widgets import build_explorer

    target, probe = _toy_target(), ShapesDataset("train", 4)
    explore = lambda emb, layer: build_explorer(target, _backend(), emb, WORDS, torch.eye(4), probe, layer,  # noqa: E731
                                                n_probe=4)
    meta = {"model": model_identity(target), "layer": "stages.3", "pooling": "mean"}
    state = explore(_embeddings(128, meta), "stages.3")
    assert state.n_units == 128 and state.probe_acts_nu.shape == (4, 128)
    assert explore(torch.randn(128, 4), "stages.2").n_units == 128  # a plain tensor of the right width
    with pytest.raises(ValueError, match=r"64 rows, but there are 128 units at layer 'stages.2'"):
        explore(torch.randn(64, 4), "stages.2")
    with pytest.raises(ValueError, match=r"made for layer='stages.3', but are used for layer='stages.2'"):
        explore(_embeddings(128, meta), "stages.2")  # same width, another layer
    other = _toy_target(seed=1)
    with pytest.raises(ValueError, match=rf"made for model='{model_identity(other)}'.*used for model='{model_identity(target)}'"):
        explore(_embeddings(128, {**meta, "model": model_identity(other)}), "stages.3")


def test_build_explorer_keeps_probe_inputs_for_causal_scores():
    from miclip_nb.shapes import ShapesDataset
    from miclip_nb.widgets import build_explorer

    target, probe = _toy_target(), ShapesDataset("train", 6)
    state = build_explorer(target, _backend(), torch.randn(128, 4), WORDS, torch.eye(4), probe, "stages.2", n_probe=6,
                           batch_size=4, n_causal=5)
    assert state.has_causal and state.probe_inputs.shape == (5, 3, 64, 64)
    assert state.probe_labels.tolist() == probe.labels[:5] and state.class_names == target.class_names
    assert state.effects.of(3).shape == (6,)
    off = build_explorer(target, _backend(), torch.randn(128, 4), WORDS, torch.eye(4), probe, "stages.2", n_probe=6, n_causal=0)
    assert not off.has_causal and off.effects is None


def test_build_feature_state_checks_the_sae_features():
    from _synthetic import random_sae

    from miclip_nb.sae import sae_store_spec
    from miclip_nb.shapes import ShapesDataset
    from miclip_nb.store import model_identity, store_spec
    from miclip_nb.widgets import build_feature_state

    target, probe = _toy_target("toy_vit"), ShapesDataset("train", 3)
    sae = random_sae(128)
    meta = lambda sae, layer: {  # noqa: E731 (what align.train_encoder records for a code store)
        "model": sae_store_spec(store_spec(target, probe, [layer], "none"), sae, layer, "mean", f"{layer}:sae", 1).model,
        "layer": f"{layer}:sae", "pooling": "mean"}
    build = lambda emb, layer="blocks.4", sae=sae: build_feature_state(target, layer, sae, emb, _backend(), probe,  # noqa: E731
                                                                       ["red"], n_images=3)
    features = _embeddings(sae.n_latents, meta(sae, "blocks.4"))
    assert build(features).n_features == sae.n_latents == 256
    assert build(torch.randn(256, 4)).n_features == 256
    with pytest.raises(ValueError, match=r"128 rows, but there are 256 SAE features at layer 'blocks.4'"):
        build(torch.randn(128, 4))
    with pytest.raises(ValueError, match=r"made for layer='blocks.3', but are used for layer='blocks.4'"):
        build(_embeddings(256, meta(sae, "blocks.3")))
    other = random_sae(128, seed=1)
    with pytest.raises(ValueError, match=r"made for sae='topk-sae.*but are used for sae='topk-sae"):
        build(features, sae=other)
    neurons = _embeddings(256, {"model": model_identity(target), "layer": "blocks.4", "pooling": "mean"})
    with pytest.raises(ValueError, match=r"made for unit_kind='neuron', but are used for unit_kind='SAE feature'"):
        build(neurons)
