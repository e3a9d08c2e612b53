"""Panels driven without a browser: set values, click, read what they show."""

import numpy as np
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


def test_unit_inspector_shows_descriptions_images_and_histogram():
    panel = unit_inspector_panel(_state(), tau=2)
    parts = panel["parts"]
    assert "red" in parts["table"].value.split("</tr>")[1]  # unit 0's best concept
    before = (parts["images"].value, parts["histogram"].value)
    parts["unit"].value = 3
    assert "blue" in parts["table"].value.split("</tr>")[1]
    assert parts["images"].value != before[0] and parts["histogram"].value != before[1]
    assert parts["unit"].max == 7
