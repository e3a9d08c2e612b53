"""Shapes-CoSy: score each method's unit descriptions by rendering the described concept.

CoSy (Kopf et al., 2024) evaluates a textual description of a unit by generating images of the
description with a text-to-image model and comparing the unit's response to them with its response
to control images. Here the Shapes world's renderer stands in for the text-to-image model: for a
concept word of the world (a shape, a colour or a texture, :data:`~miclip_nb.shapes.world.CONCEPTS`)
the *concept images* are images of the ``balanced`` split that show it (the split's sampling with
that attribute fixed: every other attribute independent and uniform), the *control images* those
that do not (:func:`concept_images`, rejection over the split's indices, which draws attributes
without rendering). Both come from indices far beyond any probing set the descriptions were made
on (:data:`COSY_START`).

For a unit u described by concept c, with a_u its mean-pooled activation (the store's pooling):

- **AUC**: the AUROC of a_u separating the concept images (positive) from the controls; 1 = the
  unit fires on every concept image above every control, 0.5 = it does not tell them apart;
- **MAD**: the mean activation difference, standardised by the controls' spread,
  (mean a_u(concept) - mean a_u(control)) / std a_u(control).

Descriptions (:func:`method_descriptions`): MiClip's by ``interpret.describe`` over the 16 concepts
(top-1), CLIP-Dissect's, NetDissect's and Act-Values' by the argmax over their (16, U) concept
scores (``groundtruth.concept_scores`` on a probing part of the balanced split), and a random
description per unit (the floor). :func:`cosy_scores` scores them; :func:`cosy_summary` averages
per method; :func:`cosy_benchmark` runs both on a model and layer.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from ..metrics import auroc
from .world import CONCEPT_KIND, CONCEPTS, WorldConfig, concept_attribute, render, sample_attributes, to_tensor

#: The first balanced-split index CoSy's images are drawn from: far beyond the probing sets the
#: descriptions are made on (balanced images 0 .. n_probe - 1), so no image is seen twice.
COSY_START = 1_000_000
#: The random description's name in the tables.
RANDOM = "Random"
#: Description methods :func:`method_descriptions` knows (groundtruth table names).
DESCRIPTION_METHODS: tuple[str, ...] = ("MiClip", "CLIP-Dissect", "NetDissect", "Act-Values")
def concept_indices(concept: str, n: int, *, present: bool = True, cfg: WorldConfig | None = None,
                    split: str = "balanced", start: int = COSY_START, max_scan: int | None = None) -> list[int]:
    """The first ``n`` indices of ``split`` from ``start`` on whose image shows ``concept``
    (``present=False``: does not show it), found from the images' attributes without rendering.

    Raises ValueError for an unknown concept or split, ``n`` < 1, or fewer than ``n`` matches
    within ``max_scan`` indices (default 100 x n)."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    column, value = concept_attribute(concept)
    cfg = cfg or WorldConfig()
    found, limit = [], max_scan if max_scan is not None else 100 * n
    for index in range(start, start + limit):
        attrs = sample_attributes(cfg, split, index)
        if (attrs[column] == value) == present:
            found.append(index)
            if len(found) == n:
                return found
    raise ValueError(f"only {len(found)} of {n} images {'with' if present else 'without'} {concept!r} among "
                     f"{limit} indices of {split!r} from {start}")


def concept_images(concept: str, n: int, *, present: bool = True, cfg: WorldConfig | None = None,
                   split: str = "balanced", start: int = COSY_START,
                   preprocess: Callable | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Render ``n`` images that show ``concept`` (``present=False``: controls without it), the
    other attributes as the split samples them (balanced: independent and uniform).

    Returns (images (n, 3, H, W), preprocessed by ``preprocess`` (PIL -> tensor; default
    world.to_tensor, the toy models' input), attributes (n, 3) shape / colour / texture indices).
    Raises as :func:`concept_indices`.
    """
    samples = [render(cfg or WorldConfig(), split, i) for i in
               concept_indices(concept, n, present=present, cfg=cfg, split=split, start=start)]
    return _preprocessed(samples, preprocess), np.array([[s.shape, s.color, s.texture] for s in samples])


def _preprocessed(samples, preprocess: Callable | None) -> torch.Tensor:
    if preprocess is None:
        return torch.stack([to_tensor(s.image) for s in samples])
    return torch.stack([preprocess(Image.fromarray(s.image)) for s in samples])


def _standardised_difference(pos: np.ndarray, neg: np.ndarray) -> float:
    diff = float(pos.mean() - neg.mean())
    spread = float(neg.std(ddof=1)) if len(neg) > 1 else 0.0
    if spread > 1e-12:
        return diff / spread
    return 0.0 if abs(diff) <= 1e-12 else float(np.sign(diff) * np.inf)


def cosy_scores(model: nn.Module, layer: str, descriptions: Mapping[str, Mapping[int, str]], *, n_images: int = 100,
                cfg: WorldConfig | None = None, start: int = COSY_START, pooling: str = "mean",
                preprocess: Callable | None = None, batch_size: int = 64, device=None) -> pd.DataFrame:
    """CoSy scores of every description: for each method, unit and the concept it is described by,
    the AUC and MAD of the unit's pooled activation on ``n_images`` concept images against
    ``n_images`` controls (see the module docstring).

    descriptions: ``{method: {unit: concept}}`` (concepts of the world); every concept's images and
    controls are rendered once and shared by all methods and units (one forward pass over their
    union). Returns a DataFrame: method, unit, concept, kind, auc, mad. Raises ValueError for a
    concept outside the world (and as :func:`concept_indices`), IndexError for a unit the layer lacks.
    """
    from ..baselines import pooled_activations

    cfg = cfg or WorldConfig()
    concepts = list(dict.fromkeys(c for d in descriptions.values() for c in d.values()))
    for c in concepts:
        concept_attribute(c)
    sets = {c: (concept_indices(c, n_images, cfg=cfg, start=start), concept_indices(c, n_images, present=False, cfg=cfg,
                                                                                     start=start)) for c in concepts}
    union = sorted({i for pos, neg in sets.values() for i in (*pos, *neg)})
    rows = []
    if union:
        where = {index: row for row, index in enumerate(union)}
        images = _preprocessed([render(cfg, "balanced", i) for i in union], preprocess)
        acts = pooled_activations(model, layer, images, pooling, batch_size, device).double().numpy()  # (M, U)
        for method, described in descriptions.items():
            for unit, concept in described.items():
                if not 0 <= int(unit) < acts.shape[1]:
                    raise IndexError(f"unit {unit} out of range for a layer of {acts.shape[1]} units")
                pos, neg = sets[concept]
                a_pos, a_neg = acts[[where[i] for i in pos], int(unit)], acts[[where[i] for i in neg], int(unit)]
                labels = np.r_[np.ones(len(a_pos), bool), np.zeros(len(a_neg), bool)]
                rows.append({"method": method, "unit": int(unit), "concept": concept, "kind": CONCEPT_KIND[concept],
                             "auc": float(auroc(np.r_[a_pos, a_neg], labels)),
                             "mad": _standardised_difference(a_pos, a_neg)})
    return pd.DataFrame(rows, columns=["method", "unit", "concept", "kind", "auc", "mad"])


def cosy_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method of :func:`cosy_scores` (in order): units, auc (mean), auc_median,
    auc_high (share of descriptions with AUC >= 0.9), mad (mean, infinite MADs left out), mad_median."""
    rows = []
    for method, g in df.groupby("method", sort=False):
        mad = g["mad"].replace([np.inf, -np.inf], np.nan)
        rows.append({"method": method, "units": len(g), "auc": float(g["auc"].mean()), "auc_median": float(g["auc"].median()),
                     "auc_high": float((g["auc"] >= 0.9).mean()), "mad": float(mad.mean()), "mad_median": float(mad.median())})
    return pd.DataFrame(rows, columns=["method", "units", "auc", "auc_median", "auc_high", "mad", "mad_median"]).set_index("method")


# --------------------------------------------------------------------------------------------
# Each method's descriptions


def argmax_descriptions(scores_cu: torch.Tensor, units: Sequence[int] | None = None,
                        concepts: Sequence[str] = CONCEPTS) -> dict[int, str]:
    """``{unit: concept}``: each unit's highest-scoring concept under a (len(concepts), U) score
    matrix (NaN never chosen; units whose column is all NaN are left out). Raises ValueError when
    the rows are not the concepts."""
    if scores_cu.ndim != 2 or scores_cu.shape[0] != len(concepts):
        raise ValueError(f"need ({len(concepts)}, U) scores, got {tuple(scores_cu.shape)}")
    units = range(scores_cu.shape[1]) if units is None else units
    out = {}
    for u in units:
        column = scores_cu[:, int(u)].float()
        if not bool(torch.isnan(column).all()):
            out[int(u)] = concepts[int(torch.nan_to_num(column, nan=-float("inf")).argmax())]
    return out


def miclip_descriptions(unit_emb_ud: torch.Tensor, concept_emb_cd: torch.Tensor, units: Sequence[int] | None = None,
                        concepts: Sequence[str] = CONCEPTS) -> dict[int, str]:
    """``{unit: concept}``: MiClip's top description of each unit (interpret.describe, tau=1) over
    ``concepts`` (concept_emb_cd: their (C, D) unit-norm text embeddings). Units whose embedding is
    zero (constant or dropped units) are left out."""
    from ..interpret import describe

    units = range(unit_emb_ud.shape[0]) if units is None else units
    return {int(u): describe(unit_emb_ud, int(u), concept_emb_cd, list(concepts), tau=1)[0][0]
            for u in units if bool(unit_emb_ud[int(u)].abs().sum() > 0)}


def random_descriptions(units: Sequence[int], seed: int = 0, concepts: Sequence[str] = CONCEPTS) -> dict[int, str]:
    """``{unit: concept}``: a concept drawn uniformly for each unit (seeded), the floor."""
    gen = np.random.default_rng(seed)
    return {int(u): concepts[int(gen.integers(len(concepts)))] for u in units}


def method_descriptions(model: nn.Module, layer: str, *, backend, unit_emb_ud: torch.Tensor,
                        units: Sequence[int] | None = None, n_probe: int = 1000,
                        methods: Sequence[str] = DESCRIPTION_METHODS, random_seed: int | None = 0, cfg=None,
                        batch_size: int = 64, device=None, progress: bool = False) -> dict[str, dict[int, str]]:
    """``{method: {unit: concept}}``: each method's top description of each unit (default every
    unit) over the 16 concepts: MiClip by interpret.describe of ``unit_emb_ud`` against ``backend``'s
    concept embeddings; CLIP-Dissect, NetDissect and Act-Values by the argmax of their (16, U)
    groundtruth.concept_scores on balanced images 0 .. ``n_probe`` - 1; with ``random_seed``, a
    "Random" description per unit. Raises ValueError for an unknown method.
    """
    from ..interpret import encode_concepts
    from .groundtruth import concept_scores
    from .probes import ShapesMaskProbe

    unknown = [m for m in methods if m not in DESCRIPTION_METHODS]
    if unknown:
        raise ValueError(f"unknown description method(s) {unknown}; choose from {list(DESCRIPTION_METHODS)}")
    n_units = int(unit_emb_ud.shape[0])
    units = list(range(n_units)) if units is None else [int(u) for u in units]
    out: dict[str, dict[int, str]] = {}
    others = [m for m in methods if m != "MiClip"]
    scores = {}
    if others:
        probe = ShapesMaskProbe("balanced", n_probe, cfg=cfg)
        scores = concept_scores(model, layer, probe, methods=others, backend=backend, batch_size=batch_size, device=device,
                                progress=progress)
    for m in methods:
        if m == "MiClip":
            out[m] = miclip_descriptions(unit_emb_ud, encode_concepts(backend, list(CONCEPTS)), units)
        else:
            out[m] = argmax_descriptions(scores[m], units)
    if random_seed is not None:
        out[RANDOM] = random_descriptions(units, random_seed)
    return out


def cosy_benchmark(model: nn.Module, layer: str, *, backend, unit_emb_ud: torch.Tensor, units: Sequence[int] | None = None,
                   n_probe: int = 1000, n_images: int = 100, methods: Sequence[str] = DESCRIPTION_METHODS,
                   random_seed: int | None = 0, cfg=None, pooling: str = "mean", batch_size: int = 64, device=None,
                   progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict[int, str]]]:
    """Shapes-CoSy of every method's descriptions of ``units`` (default all) of ``layer``:
    :func:`method_descriptions` then :func:`cosy_scores` with ``n_images`` concept and control
    images per concept. Returns (scores (method, unit, concept, kind, auc, mad), summary
    (:func:`cosy_summary`), the descriptions). Raises as the two."""
    descriptions = method_descriptions(model, layer, backend=backend, unit_emb_ud=unit_emb_ud, units=units, n_probe=n_probe,
                                       methods=methods, random_seed=random_seed, cfg=cfg, batch_size=batch_size,
                                       device=device, progress=progress)
    df = cosy_scores(model, layer, descriptions, n_images=n_images, cfg=cfg, pooling=pooling, batch_size=batch_size,
                     device=device)
    return df, cosy_summary(df), descriptions


def main(argv: list[str] | None = None) -> int:
    """``python -m miclip_nb.shapes.cosy --model toy_cnn [--layer L] [--seed 0] [--n-train 4000]``:
    aligns MiClip (align.fit_alignment on ``--n-train`` train-split images through ToyCLIP, seed
    ``--seed``; cached), runs :func:`cosy_benchmark` on every unit of the layer and prints the
    summary per method (mean AUC and MAD). ``--out FILE`` also writes the tidy scores as CSV."""
    import argparse
    from pathlib import Path

    from ..align import fit_alignment
    from ..interpret import unit_embeddings
    from ..pipeline import PipelineConfig, prepare

    p = argparse.ArgumentParser(description="Shapes-CoSy: score each method's unit descriptions (Shapes world)")
    p.add_argument("--model", default="toy_cnn")
    p.add_argument("--layer", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=4000, help="train-split images for the alignment")
    p.add_argument("--n-probe", type=int, default=1000, help="balanced images the baselines' descriptions are made on")
    p.add_argument("--n-images", type=int, default=100, help="concept and control images per concept")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    config = PipelineConfig(model=args.model, layer=args.layer, clip="toyclip", train_data=f"shapes:train:{args.n_train}",
                            seeds=(args.seed,))
    prep = prepare(config, progress=True)
    encoder = fit_alignment(prep.store, prep.class_text_emb_cd, layer=prep.layer, seed=args.seed, progress=True)
    df, summary, _ = cosy_benchmark(prep.target.module, prep.layer, backend=prep.backend,
                                    unit_emb_ud=unit_embeddings(encoder), n_probe=args.n_probe, n_images=args.n_images,
                                    progress=True)
    if args.out is not None:
        df.to_csv(args.out, index=False)
    print(f"Shapes-CoSy, {args.model} {prep.layer}, alignment seed {args.seed}: every unit's top description")
    print(summary.round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
