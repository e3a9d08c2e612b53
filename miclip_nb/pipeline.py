"""The MiClip pipeline composed from the library's steps, with caching of every expensive stage.

capture (store) -> class text embeddings -> align (encoder, cached by a hash of its inputs) ->
unit embeddings -> localize / describe -> delta-accuracy. Notebooks and the command line call
these functions; each is also usable alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ._paths import cache_dir
from .align import AlignConfig, NeuronEncoder, load_encoder, save_encoder, train_encoder
from .datasets import open_dataset
from .embed import DEFAULT_TEMPLATES, EmbeddingBackend, build_concept_bank, load_clip
from .interpret import concept_set, default_templates, encode_concepts, shapes_concept_prompts, unit_embeddings
from .select import MiClipSelector, RandomSelector, UnitSelector, selection
from .steer import PAPER_BETAS, class_deltas, summarize
from .store import ActivationStore, build_store
from .zoo import TargetModel, load_target
from ._progress import bars_off


@dataclass(frozen=True)
class PipelineConfig:
    """A headless MiClip run (the command line reads it from JSON/YAML)."""

    model: str = "toy_cnn"  # zoo.load_target name
    layer: str | None = None  # dotted layer; default: the model's probed layer
    pooling: str = "mean"  # capture pooling for the alignment
    clip: str = "toyclip"  # "toyclip" or an open_clip model name (e.g. "ViT-B-16")
    clip_pretrained: str | None = "openai"  # open_clip pretrained tag (ignored for toyclip)
    clip_checkpoint: str | None = None  # local CLIP weights file instead of a download
    train_data: str = "shapes:train:12000"  # dataset spec or folder for the alignment
    eval_data: str = "shapes:test:1200"  # dataset spec or folder for delta-accuracy
    n_eval: int | None = None  # cap on evaluation images (None: all)
    concepts: str = "shapes"  # vocabulary for descriptions: "shapes", "imagenet", "words"
    tau: int = 5  # units per concept
    seeds: tuple[int, ...] = (0, 1, 2)  # alignment seeds (mean +- std over them)
    n_random: int = 20  # random-unit draws for the control
    align: AlignConfig = field(default_factory=AlignConfig)  # training hyper-parameters
    batch_size: int = 128  # capture / evaluation batch size
    device: str | None = None  # None: cuda when available
    out_dir: str = "outputs/pipeline"  # where CSV/JSON results go

    def __post_init__(self) -> None:
        if self.tau < 1:
            raise ValueError("tau must be >= 1")
        if not self.seeds:
            raise ValueError("give at least one seed")

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        """Build from a plain dict (unknown keys raise TypeError naming them)."""
        d = dict(d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown config keys: {sorted(unknown)}")
        if "align" in d and isinstance(d["align"], dict):
            d["align"] = AlignConfig(**d["align"])
        if "seeds" in d:
            d["seeds"] = tuple(d["seeds"])
        return cls(**d)


def class_prompts_embedding(backend: EmbeddingBackend, class_names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
    """(C, D) text embeddings of the classes: the neuron-concept targets, and the concepts that
    localization looks for. Prompts as :func:`interpret.encode_concepts` (ToyCLIP: "a star";
    real CLIP: "a photo of a {}." averaged over templates). Duplicate class names are allowed."""
    prompts = shapes_concept_prompts()
    texts = [prompts.get(c, c) for c in class_names]
    return build_concept_bank(backend, texts, templates or default_templates(backend), allow_duplicates=True)


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def fit_alignment(
    store: ActivationStore, class_text_emb_cd: torch.Tensor, *, layer: str | None = None,
    config: AlignConfig = AlignConfig(), seed: int = 0, device: str | None = None,
    cache: bool = True, progress: bool = True,
) -> NeuronEncoder:
    """Train (or load from the cache) the encoder for one layer of a store.

    The cache key hashes the store key, layer, config, seed and the class text embeddings, so any
    change retrains. Returns the encoder in eval mode on CPU.
    """
    layer = layer or store.layers[0]
    key_src = json.dumps({"store": store.spec.key, "layer": layer, "config": asdict(config), "seed": seed,
                          "text": _tensor_digest(class_text_emb_cd), "schema": 1}, sort_keys=True)
    path = cache_dir() / "encoders" / hashlib.sha256(key_src.encode()).hexdigest()[:20] / "encoder"
    if cache and path.with_suffix(".json").is_file():
        return load_encoder(path)
    encoder, _ = train_encoder(store, class_text_emb_cd, layer=layer, config=config, seed=seed, device=device, progress=progress)
    if cache:
        save_encoder(encoder, path)
    return encoder


def load_eval_images(target: TargetModel, dataset, n: int | None = None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocess the first ``n`` images of ``dataset`` for ``target``: ((N, 3, H, W), (N,) labels)."""
    n = len(dataset) if n is None else min(n, len(dataset))
    xs, ys = [], []
    for i in tqdm(range(n), desc="load eval images", disable=bars_off(n >= 2000)):
        img, label = dataset[i]
        xs.append(target.preprocess(img))
        ys.append(label)
    return torch.stack(xs), torch.as_tensor(ys)


def intervention_table(
    target: TargetModel, images: torch.Tensor, labels: torch.Tensor, layer: str,
    selectors: dict[str, list[UnitSelector]], *, tau: int = 5, betas: dict[str, float] = PAPER_BETAS,
    classes: Sequence[int] | None = None, edit_factory=None, progress: bool = True,
) -> pd.DataFrame:
    """The delta-accuracy table: for each method (a list of selectors = seeds/draws) and each
    intervention, the class-averaged delta-accuracy, mean +- std over the list.

    Returns a long DataFrame: method, intervention, beta, seed, delta_acc, flip_to_class.
    """
    classes = sorted(set(labels.tolist())) if classes is None else list(classes)
    rows = []
    for name, sels in selectors.items():
        for i, sel in enumerate(tqdm(sels, desc=name, disable=bars_off(progress))):
            picked = selection(sel, classes, tau)
            for interv, beta in betas.items():
                df = class_deltas(target.module, images, labels, layer, picked, mode="scale", beta=beta, edit_factory=edit_factory)
                rows.append({"method": name, "intervention": interv, "beta": beta, "seed": i,
                             "delta_acc": df["delta_acc"].mean(), "flip_to_class": df["flip_to_class"].mean()})
    return pd.DataFrame(rows)


def summarize_table(long: pd.DataFrame) -> pd.DataFrame:
    """Collapse seeds: one row per (method, intervention) with mean and std of delta_acc."""
    out = []
    for (method, interv), grp in long.groupby(["method", "intervention"], sort=False):
        mean, std = summarize(grp["delta_acc"].tolist())
        out.append({"method": method, "intervention": interv, "delta_acc_mean": mean, "delta_acc_std": std,
                    "flip_to_class_mean": float(grp["flip_to_class"].mean()), "n": len(grp)})
    return pd.DataFrame(out)


@dataclass
class Prepared:
    """What a run needs after capture: the model, the CLIP backend, the store, class embeddings."""

    config: PipelineConfig
    target: TargetModel
    backend: EmbeddingBackend
    store: ActivationStore
    layer: str
    class_text_emb_cd: torch.Tensor


def prepare(config: PipelineConfig, progress: bool = True) -> Prepared:
    """Load model and CLIP, capture the training store (cached). Raises the loaders' errors."""
    target = load_target(config.model)
    layer = config.layer or target.default_layer
    if layer is None:
        raise ValueError(f"{config.model} has no default layer; set layer in the config")
    backend = load_clip(config.clip, config.clip_pretrained, checkpoint_path=config.clip_checkpoint, device=config.device or "cpu")
    dataset = open_dataset(config.train_data)
    store = build_store(target, dataset, [layer], pooling=config.pooling, clip=backend, batch_size=config.batch_size,
                        device=config.device, progress=progress)
    return Prepared(config, target, backend, store, layer, class_prompts_embedding(backend, target.class_names))


def run(config: PipelineConfig, progress: bool = True) -> dict[str, Path]:
    """The headless pipeline: capture, align (per seed), localize, describe, delta-accuracy.

    Writes to ``config.out_dir``: ``localization.csv`` (class, seed, rank, unit, score),
    ``descriptions.csv`` (seed, unit, rank, concept, score), ``delta_accuracy_long.csv``,
    ``delta_accuracy.csv`` / ``.md`` (the table) and ``run.json`` (config and figures).
    Returns the paths written.
    """
    prep = prepare(config, progress)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eval_ds = open_dataset(config.eval_data)
    images, labels = load_eval_images(prep.target, eval_ds, config.n_eval)
    classes = sorted(set(labels.tolist()))
    vocab = concept_set(config.concepts)
    vocab_emb = encode_concepts(prep.backend, vocab)

    loc_rows, desc_rows, miclip = [], [], []
    for seed in config.seeds:
        encoder = fit_alignment(prep.store, prep.class_text_emb_cd, layer=prep.layer, config=config.align, seed=seed,
                                device=config.device, progress=progress)
        unit_emb = unit_embeddings(encoder)
        sel = MiClipSelector(unit_emb, prep.class_text_emb_cd)
        miclip.append(sel)
        for c in classes:
            units = sel.select(c, config.tau)
            scores = unit_emb[units] @ prep.class_text_emb_cd[c]
            for rank, (u, s) in enumerate(zip(units.tolist(), scores.tolist())):
                loc_rows.append({"class": prep.target.class_names[c], "seed": seed, "rank": rank, "unit": u, "score": s})
                sims = vocab_emb @ unit_emb[u]
                top = torch.topk(sims, min(3, len(vocab)))
                for r2, (ci, cs) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
                    desc_rows.append({"seed": seed, "unit": u, "rank": r2, "concept": vocab[ci], "score": cs})
    n_units = prep.store.fields[f"acts/{prep.layer}"][0]
    selectors = {"MiClip": miclip, "Random": [RandomSelector(n_units, s) for s in range(config.n_random)]}
    long = intervention_table(prep.target, images, labels, prep.layer, selectors, tau=config.tau, classes=classes, progress=progress)
    table = summarize_table(long)
    paths = {
        "localization": out / "localization.csv", "descriptions": out / "descriptions.csv",
        "delta_long": out / "delta_accuracy_long.csv", "delta": out / "delta_accuracy.csv",
        "delta_md": out / "delta_accuracy.md", "run": out / "run.json",
    }
    pd.DataFrame(loc_rows).to_csv(paths["localization"], index=False)
    pd.DataFrame(desc_rows).drop_duplicates().to_csv(paths["descriptions"], index=False)
    long.to_csv(paths["delta_long"], index=False)
    table.to_csv(paths["delta"], index=False)
    paths["delta_md"].write_text(table_markdown(table))
    paths["run"].write_text(json.dumps({"config": _jsonable(asdict(config)), "store": str(prep.store.dir),
                                        "table": table.to_dict(orient="records")}, indent=1))
    return paths


def table_markdown(table: pd.DataFrame) -> str:
    """A Markdown table: rows = methods, columns = interventions, cells 'mean (+- std)'."""
    interventions = list(dict.fromkeys(table["intervention"]))
    lines = ["| method | " + " | ".join(f"{i} dAcc (%)" for i in interventions) + " |",
             "|---|" + "---|" * len(interventions)]
    for method, grp in table.groupby("method", sort=False):
        cells = []
        for i in interventions:
            r = grp[grp["intervention"] == i]
            cells.append(f"{r['delta_acc_mean'].iloc[0]:+.2f} (± {r['delta_acc_std'].iloc[0]:.2f})" if len(r) else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
