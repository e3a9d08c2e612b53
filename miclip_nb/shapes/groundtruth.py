"""The ground-truth benchmark: do a method's units for a concept actually detect that concept?

In the Shapes world every image's shape, colour and texture are known. For each method and each of
the 16 concepts ("circle" ... "red" ... "dots"), take the method's top-tau units for the concept and
measure how well the mean of their pooled activations detects the concept's presence: AUROC on the
``balanced`` split, where shape, colour and texture are independent (so a colour unit cannot pass
as a shape unit through the training split's correlations).

How each method picks units for a concept (all on a *probing* part of the balanced split, the
AUROC on a disjoint *evaluation* part):

- **MiClip**: the posterior of the concept's ToyCLIP text embedding against the 16 concepts for
  each unit embedding (interpret.concept_unit_scores; prompts "a star", "red", "dots");
  **MiClip (cosine)**: the paper's plain cosine similarity, same unit embeddings.
- **Act-Values**: mean activation over the probing images that have the attribute.
- **NetDissect**: IoU of the thresholded activation maps with the concept's masks.
- **CLIP-Dissect**: soft-WPMI with the concept's text embedding (on a ViT layer, the class token, as its own code reads it).
- **Captum-***: attribution to the class logit; classes are shapes, so only the 6 shape concepts
  get units (colour/texture rows are NaN and reported as missing).
- **Random**: tau random units (mean AUROC over draws), the floor; **Best unit**: the single unit
  with the highest AUROC on the evaluation images themselves, the ceiling (an oracle, not a method).

Unit activations are z-scored on the evaluation images before averaging the top units, so one unit
with a large scale does not decide the mean (set ``standardize=False`` for the raw mean).

Command line: ``python -m miclip_nb.shapes.groundtruth --model toy_cnn`` (see :func:`main`).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from .. import baselines as bl
from .. import methods
from ..interpret import DEFAULT_TEMPERATURE
from ..metrics import auroc, best_unit_auroc
from .probes import ShapesMaskProbe
from .world import COLORS, CONCEPT_KIND, CONCEPTS, SHAPES

#: The registry's methods this benchmark scores, by key (miclip_nb.methods gives their table names).
METHOD_KEYS: tuple[str, ...] = ("miclip", "miclip_cosine", "act_values", "netdissect", "clip_dissect",
                                "captum_conductance", "captum_ig", "captum_gxa")
MICLIP, MICLIP_COSINE, RANDOM = (methods.table_name(k) for k in ("miclip", "miclip_cosine", "random"))
BEST_UNIT = "Best unit (oracle)"
#: Methods the benchmark knows, in table order (table names).
METHODS: tuple[str, ...] = tuple(methods.table_name(k) for k in METHOD_KEYS)
_MICLIPS = (MICLIP, MICLIP_COSINE)


def concept_presence(attributes_n3) -> torch.Tensor:
    """(N, 3) (shape, colour, texture) indices -> (N, 16) bool presence of each of CONCEPTS."""
    attrs = torch.as_tensor(np.asarray(attributes_n3)).long()
    if attrs.ndim != 2 or attrs.shape[1] != 3:
        raise ValueError(f"expected (N, 3) attributes, got {tuple(attrs.shape)}")
    presence = torch.zeros(attrs.shape[0], len(CONCEPTS), dtype=torch.bool)
    rows = torch.arange(attrs.shape[0])
    presence[rows, attrs[:, 0]] = True
    presence[rows, len(SHAPES) + attrs[:, 1]] = True
    presence[rows, len(SHAPES) + len(COLORS) + attrs[:, 2]] = True
    return presence


def _standardize(acts_nu: torch.Tensor) -> torch.Tensor:
    acts = acts_nu.double()
    return (acts - acts.mean(0)) / acts.std(0).clamp_min(1e-8)


def topunit_aurocs(acts_nu: torch.Tensor, presence_nc, scores: dict[str, torch.Tensor], *,
                   concepts: Sequence[str] = CONCEPTS, tau: int = 5, standardize: bool = True,
                   n_random: int = 20, seed: int = 0, oracle: bool = True) -> pd.DataFrame:
    """AUROC of each method's top-``tau`` units for each concept's presence.

    acts_nu: (N, U) pooled activations of the evaluation images; presence_nc: (N, C) bool;
    scores: ``{method: (C, U)}`` (NaN rows = the method has no units for that concept: AUROC NaN).
    Adds ``Random`` (mean over ``n_random`` draws) and, with ``oracle``, the best single unit.
    Returns a tidy DataFrame: method, concept, kind, auroc, units (space-separated indices).
    Raises ValueError for shape mismatches or a concept that is always/never present.
    """
    presence = torch.as_tensor(np.asarray(presence_nc)).bool()
    acts = torch.as_tensor(acts_nu).float()
    if acts.ndim != 2 or presence.shape != (acts.shape[0], len(concepts)):
        raise ValueError(f"need (N, U) activations and (N, {len(concepts)}) presence, got {tuple(acts.shape)} and {tuple(presence.shape)}")
    if not torch.isfinite(acts).all():
        raise ValueError("activations contain NaN or inf")
    z = _standardize(acts) if standardize else acts.double()
    n_units = acts.shape[1]
    if not 1 <= tau <= n_units:
        raise ValueError(f"tau must be in 1..{n_units}, got {tau}")
    rows = []
    for method, s in scores.items():
        if s.shape != (len(concepts), n_units):
            raise ValueError(f"{method}: scores have shape {tuple(s.shape)}, expected {(len(concepts), n_units)}")
        for c, name in enumerate(concepts):
            if torch.isnan(s[c]).all():
                rows.append({"method": method, "concept": name, "kind": CONCEPT_KIND.get(name, ""), "auroc": float("nan"), "units": ""})
                continue
            units = torch.topk(torch.nan_to_num(s[c].float(), nan=-float("inf")), tau).indices
            value = auroc(z[:, units].mean(1).numpy(), presence[:, c].numpy())
            rows.append({"method": method, "concept": name, "kind": CONCEPT_KIND.get(name, ""), "auroc": float(value),
                         "units": " ".join(map(str, units.tolist()))})
    gen = torch.Generator().manual_seed(seed)
    if n_random > 0:
        draws = [torch.randperm(n_units, generator=gen)[:tau] for _ in range(n_random)]
        for c, name in enumerate(concepts):
            values = [auroc(z[:, d].mean(1).numpy(), presence[:, c].numpy()) for d in draws]
            rows.append({"method": RANDOM, "concept": name, "kind": CONCEPT_KIND.get(name, ""),
                         "auroc": float(np.mean(values)), "units": "random"})
    if oracle:
        for c, name in enumerate(concepts):
            unit, value = best_unit_auroc(acts.numpy(), presence[:, c].numpy())
            rows.append({"method": BEST_UNIT, "concept": name, "kind": CONCEPT_KIND.get(name, ""), "auroc": value, "units": str(unit)})
    return pd.DataFrame(rows)


def groundtruth_table(df: pd.DataFrame) -> pd.DataFrame:
    """Summary of :func:`topunit_aurocs` / :func:`groundtruth_benchmark`: one row per method, mean
    AUROC per concept kind (shape, color, texture) and over all concepts it covers."""
    order = list(dict.fromkeys(df["method"]))
    table = df.pivot_table(index="method", columns="kind", values="auroc", aggfunc="mean")
    table["all"] = df.groupby("method")["auroc"].mean()
    cols = [k for k in ("shape", "color", "texture") if k in table.columns] + ["all"]
    return table.reindex(order)[cols]


def groundtruth_markdown(df: pd.DataFrame, per_concept: bool = False) -> str:
    """A Markdown table of :func:`groundtruth_table` (or of every concept with ``per_concept``)."""
    table = df.pivot_table(index="method", columns="concept", values="auroc", aggfunc="mean")[list(dict.fromkeys(df["concept"]))] \
        if per_concept else groundtruth_table(df)
    table = table.reindex(list(dict.fromkeys(df["method"])))
    lines = ["| method | " + " | ".join(map(str, table.columns)) + " |", "|---|" + "---|" * len(table.columns)]
    for method, row in table.iterrows():
        lines.append(f"| {method} | " + " | ".join("–" if pd.isna(v) else f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def _clip_image_embeddings(backend, probe: ShapesMaskProbe, batch_size: int = 256) -> torch.Tensor:
    out = []
    for start in range(0, len(probe), batch_size):
        samples = probe.samples(range(start, min(start + batch_size, len(probe))))
        x = torch.stack([backend.preprocess(Image.fromarray(s.image)) for s in samples])
        out.append(backend.encode_images(x).float().cpu())
    return torch.cat(out)


def _probe_images(probe: ShapesMaskProbe, indices) -> torch.Tensor:
    return probe.batch(list(indices))[0]


def concept_scores(
    model: nn.Module, layer: str, probe: ShapesMaskProbe, *, methods: Sequence[str] = METHODS, backend=None,
    unit_emb_ud: torch.Tensor | None = None, temperature: float = DEFAULT_TEMPERATURE, pooling: str = "mean",
    n_captum_per_class: int = 50,
    captum_steps: int = 16, wpmi: bl.SoftWPMIConfig = bl.SoftWPMIConfig(), batch_size: int = 64, device=None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """(16, U) concept scores of each method on a Shapes probing set (see the module docstring).

    MiClip needs ``unit_emb_ud`` (interpret.unit_embeddings), ``backend`` (ToyCLIP) and
    ``temperature`` (the encoder's interpret.concept_temperature);
    CLIP-Dissect needs ``backend``. Captum uses the first ``n_captum_per_class`` probe images of
    each shape (target = the shape) and fills only the shape rows. Methods whose inputs are
    missing raise ValueError.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    attrs = probe.attributes()
    presence = concept_presence(attrs)

    def probe_acts(how: str) -> torch.Tensor:  # (N, U) the probe images' activations pooled by ``how``
        return torch.cat([bl.pooled_activations(model, layer, _probe_images(probe, r), how, batch_size, device)
                          for r in bl._batches(len(probe), 512)])

    needs_acts = any(m in (bl.ACT_VALUES, bl.CLIP_DISSECT) for m in methods)
    acts = probe_acts(pooling) if needs_acts else None
    concept_emb = None
    if any(m in methods for m in (*_MICLIPS, bl.CLIP_DISSECT)):
        if backend is None:
            raise ValueError("MiClip and CLIP-Dissect need a CLIP backend (e.g. load_clip('toyclip'))")
        from ..interpret import concept_unit_scores, encode_concepts

        concept_emb = encode_concepts(backend, list(CONCEPTS))
    out: dict[str, torch.Tensor] = {}
    for m in methods:
        if m in _MICLIPS:
            if unit_emb_ud is None:
                raise ValueError("MiClip needs unit_emb_ud (interpret.unit_embeddings of a trained encoder)")
            out[m] = concept_unit_scores(unit_emb_ud, concept_emb, "posterior" if m == MICLIP else "cosine",
                                         temperature=temperature)
        elif m == bl.ACT_VALUES:
            out[m] = bl.act_values_scores(acts, presence)
        elif m == bl.CLIP_DISSECT:
            cd_acts = probe_acts("cls") if bl.clip_dissect_reads_class_token(model) else acts
            out[m] = bl.soft_wpmi(cd_acts, _clip_image_embeddings(backend, probe), concept_emb, wpmi)
        elif m == bl.NETDISSECT:
            out[m] = bl.netdissect_scores(model, layer, probe, batch_size=batch_size, device=device, progress=progress)
        else:
            method = {v: k for k, v in bl.CAPTUM_METHODS.items()}[m]
            picked = np.concatenate([np.flatnonzero(attrs[:, 0] == c)[:n_captum_per_class] for c in range(len(SHAPES))])
            x = _probe_images(probe, picked.tolist())
            labels = torch.as_tensor(attrs[picked, 0])
            class_scores = bl.captum_scores(model, layer, x, labels, method, n_classes=len(SHAPES), n_steps=captum_steps,
                                            batch_size=max(1, batch_size // 4), device=device, progress=progress)
            full = torch.full((len(CONCEPTS), class_scores.shape[1]), float("nan"))
            full[: len(SHAPES)] = class_scores
            out[m] = full
    return out


def groundtruth_benchmark(
    model: nn.Module, layer: str, *, backend=None, unit_emb_ud: torch.Tensor | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    methods: Sequence[str] | None = None, n_probe: int = 2000, n_eval: int = 2000, tau: int = 5,
    pooling: str = "mean", n_random: int = 20, standardize: bool = True, cfg=None, split: str = "balanced",
    n_captum_per_class: int = 50, captum_steps: int = 16, batch_size: int = 64, device=None, progress: bool = False,
) -> pd.DataFrame:
    """The ground-truth benchmark on the Shapes world for one model and layer.

    Probing images: ``split`` indices 0..n_probe-1; evaluation images: n_probe..n_probe+n_eval-1
    (disjoint). ``methods`` default: every method whose inputs are given (MiClip only with
    ``unit_emb_ud`` and ``backend``, CLIP-Dissect only with ``backend``; ``temperature``: the
    encoder's interpret.concept_temperature, for MiClip's posterior). Returns the tidy
    DataFrame of :func:`topunit_aurocs` (method, concept, kind, auroc, units).
    """
    if methods is None:
        methods = [m for m in METHODS if (m not in _MICLIPS or (unit_emb_ud is not None and backend is not None))
                   and (m != bl.CLIP_DISSECT or backend is not None)]
    probe = ShapesMaskProbe(split, n_probe, cfg=cfg)
    scores = concept_scores(model, layer, probe, methods=methods, backend=backend, unit_emb_ud=unit_emb_ud,
                            temperature=temperature, pooling=pooling,
                            n_captum_per_class=n_captum_per_class, captum_steps=captum_steps, batch_size=batch_size,
                            device=device, progress=progress)
    eval_probe = ShapesMaskProbe(split, n_eval, start=n_probe, cfg=cfg)
    acts = torch.cat([bl.pooled_activations(model, layer, _probe_images(eval_probe, r), pooling, batch_size, device)
                      for r in bl._batches(n_eval, 512)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return topunit_aurocs(acts, concept_presence(eval_probe.attributes()), scores, tau=tau, standardize=standardize,
                              n_random=n_random)


def main(argv: list[str] | None = None) -> int:
    """``python -m miclip_nb.shapes.groundtruth --model toy_cnn [--out-dir DIR]``.

    Trains (or loads from the cache) the MiClip encoder with the pipeline's defaults, then writes
    ``groundtruth_<model>.csv`` (tidy) and ``.md`` (summary and per-concept tables), and the
    delta-accuracy table of every method on the test split (pipeline.run into ``delta_<model>/``).
    """
    import argparse
    from pathlib import Path

    from dataclasses import replace

    from ..align import fit_alignment
    from ..interpret import concept_temperature, unit_embeddings
    from ..pipeline import PipelineConfig, prepare, run

    p = argparse.ArgumentParser(description="Ground-truth benchmark and delta-accuracy of every method (Shapes world)")
    p.add_argument("--model", default="toy_cnn")
    p.add_argument("--layer", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-train", type=int, default=12000, help="train-split images for the alignment store")
    p.add_argument("--n-probe", type=int, default=2000)
    p.add_argument("--n-eval", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=1200, help="test-split images for delta-accuracy")
    p.add_argument("--n-random", type=int, default=20)
    p.add_argument("--captum-steps", type=int, default=16)
    p.add_argument("--out-dir", type=Path, default=Path("outputs/baselines"))
    p.add_argument("--skip-delta", action="store_true")
    args = p.parse_args(argv)

    config = PipelineConfig(model=args.model, layer=args.layer, seeds=tuple(args.seeds), n_random=args.n_random,
                            clip="toyclip", train_data=f"shapes:train:{args.n_train}")
    prep = prepare(config, progress=True)
    encoders = [fit_alignment(prep.store, prep.class_text_emb_cd, layer=prep.layer, config=config.align, seed=s, progress=True)
                for s in config.seeds]
    unit_embs = [unit_embeddings(e) for e in encoders]
    temps = [concept_temperature(e) for e in encoders]
    args.out_dir.mkdir(parents=True, exist_ok=True)

    frames = []
    for i, ue in enumerate(unit_embs):
        df = groundtruth_benchmark(prep.target.module, prep.layer, backend=prep.backend, unit_emb_ud=ue, temperature=temps[i],
                                   methods=list(_MICLIPS) if i else None, n_probe=args.n_probe, n_eval=args.n_eval,
                                   n_random=args.n_random, captum_steps=args.captum_steps, progress=True)
        df["seed"] = config.seeds[i]
        frames.append(df if i == 0 else df[df["method"].isin(_MICLIPS)])
    gt = pd.concat(frames, ignore_index=True)
    gt.to_csv(args.out_dir / f"groundtruth_{args.model}.csv", index=False)
    (args.out_dir / f"groundtruth_{args.model}.md").write_text(
        f"## {args.model} {prep.layer}: top-5 units, AUROC for attribute presence (balanced split)\n\n"
        + groundtruth_markdown(gt) + "\n" + groundtruth_markdown(gt, per_concept=True))
    print(groundtruth_markdown(gt))

    if not args.skip_delta:
        delta = replace(config, methods=("miclip", "miclip_cosine", "random", *METHOD_KEYS[2:]),
                        eval_data=f"shapes:test:{args.n_test}", n_probe=args.n_probe, n_captum=600,
                        captum_steps=args.captum_steps, out_dir=str(args.out_dir / f"delta_{args.model}"))
        paths = run(delta)
        print(paths["delta_md"].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
