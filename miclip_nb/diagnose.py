"""Failure diagnosis: layer-wise semantic trajectories of mispredictions (the paper's Figure 4).

With one aligned encoder per layer, an image's representation at layer l is embedded in CLIP
space as e_l = normalize(E_n^l(a_l)). Its cosine similarity to the text embedding of the true label
and of the wrongly predicted label, layer by layer, is the image's *trajectory*. Two marks:

- the layer where the truth dominates most: argmax over layers of sim(true) - sim(wrong);
- the overtaking layer: the first layer after that one where sim(wrong) > sim(true) (None when
  the wrong label never overtakes inside the probed layers).

At the overtaking layer, the concepts closest to e_l (the two labels excluded) say what the model
started to "see" instead.

An image with NaN or inf pixels, or whose layer embeddings come out NaN or inf, gets no trajectory
and is no failure: :func:`find_failures` and :func:`diagnose` raise NonFiniteInputError naming such
images, or leave them out with a warning when called with ``on_bad="skip"``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ._checks import NonFiniteInputError, check_on_bad, nonfinite_batch, report_nonfinite  # noqa: F401 (re-exported)
from .align import AlignConfig, NeuronEncoder
from .capture import capture
from .align import fit_alignment
from .steer import predict
from .store import build_store, model_identity


def layerwise_encoders(target, backend, dataset, layers: Sequence[str], class_text_emb_cd: torch.Tensor, *,
                       pooling: str = "mean", config: AlignConfig = AlignConfig(unit_dropout=0.0), seed: int = 0,
                       device: str | None = None, batch_size: int = 128, n_items: int | None = None,
                       progress: bool = True) -> dict[str, NeuronEncoder]:
    """One encoder per layer, from a single capture pass (cached store) and cached trainings, on the
    first ``n_items`` images of ``dataset`` (anything datasets.as_dataset takes; None: all).

    The default config trains without unit dropout: a trajectory embeds whole activation vectors,
    not single units (see :mod:`miclip_nb.align`).

    Returns ``{layer: encoder}`` in the order of ``layers``.
    """
    store = build_store(target, dataset, list(layers), pooling=pooling, clip=backend, batch_size=batch_size,
                        n_items=n_items, device=device, progress=progress)
    return {layer: fit_alignment(store, class_text_emb_cd, layer=layer, config=config, seed=seed, device=device, progress=progress)
            for layer in layers}


@torch.no_grad()
def layer_embeddings(target, encoders: dict[str, NeuronEncoder], images: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """CLIP-space embeddings of images at every layer: images (N, 3, H, W) -> (L, N, D) unit-norm.

    Raises EncoderMismatchError when an encoder was trained on another model, layer or pooling.
    """
    identity = model_identity(target)
    for layer, enc in encoders.items():
        enc.check_compatible(model=identity, layer=layer, pooling=pooling)
    acts = capture(target.module, images, list(encoders), pooling)
    return torch.stack([F.normalize(enc(acts[layer].float()), dim=-1) for layer, enc in encoders.items()])


def trajectory_marks(sim_true: Sequence[float], sim_wrong: Sequence[float]) -> tuple[int, int | None]:
    """(layer index where true - wrong is largest, first later index where wrong > true or None)."""
    margin = np.asarray(sim_true) - np.asarray(sim_wrong)
    best = int(np.argmax(margin))
    later = np.nonzero(margin[best + 1 :] < 0)[0]
    return best, (best + 1 + int(later[0])) if later.size else None


@dataclass
class Trajectory:
    """One image's diagnosis."""

    layers: list[str]
    sim_true: np.ndarray  # (L,) cosine to the true label's text embedding
    sim_wrong: np.ndarray  # (L,) cosine to the wrong (predicted) label's text embedding
    true_label: int
    wrong_label: int
    best_layer: int  # index into layers
    overtake_layer: int | None  # index into layers, None when never overtaken
    top_concepts: list[list[tuple[str, float]]]  # per layer: [(concept, cosine)] best first
    image: int | None = None  # index of the image among those given to diagnose

    @property
    def overtake_concepts(self) -> list[str]:
        """Concept names at the overtaking layer (empty when there is none)."""
        return [] if self.overtake_layer is None else [c for c, _ in self.top_concepts[self.overtake_layer]]

    def frame(self) -> pd.DataFrame:
        """A table: layer, sim_true, sim_wrong, margin, top concepts."""
        return pd.DataFrame({"layer": self.layers, "sim_true": self.sim_true, "sim_wrong": self.sim_wrong,
                             "margin": self.sim_true - self.sim_wrong,
                             "top_concepts": [", ".join(c for c, _ in tc) for tc in self.top_concepts]})


def diagnose(target, encoders: dict[str, NeuronEncoder], images: torch.Tensor, true_labels, wrong_labels,
             class_text_emb_cd: torch.Tensor, vocab: Sequence[str], vocab_emb_cd: torch.Tensor, *,
             class_names: Sequence[str] | None = None, k: int = 3, pooling: str = "mean", batch_size: int = 128,
             on_bad: str = "raise") -> list[Trajectory]:
    """Trajectories for images (N, 3, H, W) with their true and wrong labels (N,).

    ``vocab``/``vocab_emb_cd`` (C, D) name what each layer's embedding is closest to; concepts equal
    to the true or wrong class name are left out of the top ``k``. Returns one Trajectory per image,
    in order (``Trajectory.image`` is the image's index). Images with NaN or inf pixels or layer
    embeddings get none: ``on_bad="raise"`` (default) raises NonFiniteInputError naming them,
    ``"skip"`` warns naming them and returns the other images' trajectories. Raises
    EncoderMismatchError for an encoder of another model, layer or pooling.
    """
    check_on_bad(on_bad)
    true_labels, wrong_labels = torch.as_tensor(true_labels), torch.as_tensor(wrong_labels)
    names = list(class_names) if class_names is not None else [str(i) for i in range(class_text_emb_cd.shape[0])]
    layers = list(encoders)
    bad_inputs = torch.zeros(images.shape[0], dtype=torch.bool)
    bad_outputs = torch.zeros(images.shape[0], dtype=torch.bool)
    out = []
    for start in range(0, images.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        emb_lnd = layer_embeddings(target, encoders, images[rows], pooling)
        found = nonfinite_batch(images[rows], emb_lnd.transpose(0, 1))
        if found is not None:
            bad_inputs[rows], bad_outputs[rows] = found
        sims_true = torch.einsum("lnd,nd->nl", emb_lnd, class_text_emb_cd[true_labels[rows]])
        sims_wrong = torch.einsum("lnd,nd->nl", emb_lnd, class_text_emb_cd[wrong_labels[rows]])
        concept_sims = torch.einsum("lnd,cd->nlc", emb_lnd, vocab_emb_cd)
        for j in range(emb_lnd.shape[1]):
            if found is not None and bool(found[0][j] | found[1][j]):
                continue
            t, w = int(true_labels[start + j]), int(wrong_labels[start + j])
            skip = {names[t].lower(), names[w].lower()}
            allowed = torch.tensor([v.lower() not in skip for v in vocab])
            tops = []
            for li in range(len(layers)):
                s = concept_sims[j, li].masked_fill(~allowed, -2.0)
                vals, idx = torch.topk(s, min(k, int(allowed.sum())))
                tops.append([(vocab[i], float(v)) for i, v in zip(idx.tolist(), vals.tolist())])
            st, sw = sims_true[j].numpy(), sims_wrong[j].numpy()
            best, over = trajectory_marks(st, sw)
            out.append(Trajectory(layers, st, sw, t, w, best, over, tops, image=start + j))
    report_nonfinite(bad_inputs, bad_outputs, on_bad, outputs="layer embeddings", stacklevel=2)
    return out


def failure_summary(trajectories: Sequence[Trajectory]) -> dict:
    """Across failures: how often each layer is the overtaking layer, and which concepts appear
    there most often. Returns {"overtake_counts": Series by layer (None -> 'never'),
    "concept_counts": Series by concept}."""
    layers = trajectories[0].layers if trajectories else []
    over = Counter(t.layers[t.overtake_layer] if t.overtake_layer is not None else "never" for t in trajectories)
    concepts = Counter(c for t in trajectories for c in t.overtake_concepts)
    order = [l for l in layers if l in over] + (["never"] if "never" in over else [])
    return {"overtake_counts": pd.Series({l: over[l] for l in order}, name="failures", dtype=int),
            "concept_counts": pd.Series(dict(concepts.most_common()), name="failures", dtype=int)}


def concept_hit_rate(trajectories: Sequence[Trajectory], concepts: Sequence[str], at: str = "overtake") -> tuple[float, int]:
    """How often image i's concept ``concepts[i]`` is among the top concepts of trajectory i.

    at: "overtake" (the overtaking layer; trajectories never overtaken are left out) or "best"
    (the layer where the truth dominates most, a control). Returns (rate in [0, 1], images counted).
    Raises ValueError for mismatched lengths or another ``at``.
    """
    if len(concepts) != len(trajectories):
        raise ValueError(f"{len(trajectories)} trajectories but {len(concepts)} concepts")
    if at not in ("overtake", "best"):
        raise ValueError(f"at must be 'overtake' or 'best', got {at!r}")
    hits = []
    for t, c in zip(trajectories, concepts):
        layer = t.overtake_layer if at == "overtake" else t.best_layer
        if t.overtake_layer is not None:
            hits.append(c in [name for name, _ in t.top_concepts[layer]])
    return (sum(hits) / len(hits) if hits else float("nan")), len(hits)


def find_failures(target, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                  on_bad: str = "raise") -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of misclassified images and their wrong predictions: images (N, 3, H, W), labels
    (N,) -> ((M,), (M,)).

    An image with NaN or inf pixels or logits is no failure (its "prediction" would be an argmax of
    NaN): ``on_bad="raise"`` (default) raises NonFiniteInputError naming such images, ``"skip"``
    warns naming them and leaves them out. Raises ValueError for another ``on_bad``.
    """
    pred = predict(target.module, images, batch_size, on_bad=on_bad)
    wrong = torch.nonzero((pred != torch.as_tensor(labels)) & (pred >= 0)).flatten()
    return wrong, pred[wrong]

