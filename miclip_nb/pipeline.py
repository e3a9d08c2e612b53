"""The MiClip pipeline: the library's steps composed, each expensive one cached on disk.

model and CLIP -> capture (store) -> the units (neurons, or an SAE's features: units.UnitSpace) ->
alignment per seed (align.fit_alignment) -> unit embeddings -> each method's selectors
(methods) -> the delta-accuracy table (intervention) -> reports (reporting). Notebooks and the
command line call these functions; every step is also a library function of its own.

Anything a user has goes in: a model name or a ``zoo.TargetModel`` (your ``nn.Module`` with its
preprocess and class names), a weights file, a CLIP name or an embedding backend object, and data
as a folder, a spec (``"shapes:test:600"`` from the Shapes-world plug-in), or an in-memory dataset
(datasets.as_dataset: tensors, arrays, a torch Dataset, a flat folder of unlabelled photos).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from . import methods as methods_mod
from .align import AlignConfig, NeuronEncoder, fit_alignment
from .datasets import as_dataset
from .embed import EmbeddingBackend, as_backend, build_concept_bank, load_clip
from .interpret import concept_set, concept_temperature, encode_concepts, unit_embeddings
from .intervention import intervention_table
from .reporting import summarize_table, table_markdown, wide_table
from .sae import SAEConfig
from .select import MiClipSelector, UnitSelector
from .store import ActivationStore, build_store
from .units import UnitSpace, neurons, sae_features
from .zoo import TargetModel, load_target

#: Fields a run cannot do without (their default None only lets the fields be listed in order).
REQUIRED: tuple[str, ...] = ("model", "train_data")
#: units= values of the configuration -> unit kind (units.UNIT_KINDS).
UNITS: dict[str, str] = {"neurons": "neuron", "sae": "sae"}


@dataclass(frozen=True)
class PipelineConfig:
    """A MiClip run. Strings and numbers only where the command line sets it (``--set key=value``);
    the Python API also takes objects where noted. Checks run in ``__post_init__``."""

    model: Any = None  # zoo.load_target name ("timm:resnet50", "toy_cnn", ...) or a zoo.TargetModel
    train_data: Any = None  # alignment images: folder, spec ("shapes:train:12000") or dataset (datasets.as_dataset)
    eval_data: Any = None  # delta-accuracy images: the same kinds (None: no table)
    weights_path: str | None = None  # the model's weights file (offline), for a model named by a string
    pretrained: bool = True  # False: a named model's random weights (smoke tests: nothing downloads)
    layer: str | None = None  # dotted layer name; default: the model's default layer
    pooling: str = "mean"  # how a layer's map / tokens become one vector per image (capture.POOLINGS)
    clip: Any = "ViT-B-16"  # an open_clip name, a registered backend ("toyclip"), or an embedding backend object
    clip_pretrained: str | None = "openai"  # open_clip pretrained tag (downloads on first use)
    clip_checkpoint: str | None = None  # a local CLIP weights file instead of the download
    n_train: int | None = None  # cap on alignment images (None: all of train_data)
    n_eval: int | None = None  # cap on evaluation images (None: all of eval_data)
    concepts: Any = None  # vocabulary of descriptions: "imagenet", "words", a plug-in's ("shapes"), a list; None: the classes
    tau: int = 5  # units per class
    seeds: tuple[int, ...] = (0, 1, 2)  # alignment seeds and baseline probing draws (mean +- std over them)
    n_random: int = 20  # draws of random units (the reference row)
    methods: tuple[str, ...] = ("miclip", "random")  # table rows: keys or table names of miclip_nb.methods
    units: str = "neurons"  # "neurons" (the layer's own) or "sae" (features of a top-k SAE on the layer)
    n_probe: int | None = 2000  # baselines: probing rows per seed (None: all)
    n_captum: int = 300  # Captum and the ablation reference: training images per seed
    captum_steps: int = 16  # Captum IG / Conductance path steps
    mask_probe: str | None = None  # NetDissect masks: a Broden-style folder (else the training data's own masks)
    n_other: int = 256  # other-class images per class (specific effect, flips; 0: skip, faster)
    sae: SAEConfig = field(default_factory=SAEConfig)  # units="sae": the SAE's architecture and training
    sae_train_data: Any = None  # units="sae": images whose tokens train the SAE (None: train_data)
    sae_pooling: str = "mean"  # units="sae": pooling of each image's codes over its tokens / locations
    sae_min_freq: float = 0.01  # units="sae": MiClip ignores features firing on fewer images (sae.drop_rare_units)
    align: AlignConfig = field(default_factory=AlignConfig)  # the alignment's training hyper-parameters
    batch_size: int = 128  # capture / evaluation batch size
    device: str | None = None  # None: cuda when available
    out_dir: str = "outputs/pipeline"  # where run() writes its CSV / Markdown / JSON

    def __post_init__(self) -> None:
        if self.model is None or self.train_data is None:
            raise ValueError("a run needs model= (a name or a zoo.TargetModel) and train_data= (a folder, spec or dataset)")
        if self.units not in UNITS:
            raise ValueError(f"units must be one of {list(UNITS)}, got {self.units!r}")
        if self.tau < 1:
            raise ValueError("tau must be >= 1")
        if not self.seeds:
            raise ValueError("give at least one seed")
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "methods", methods_mod.resolve(self.methods, UNITS[self.units]))
        if self.n_random < 0 or self.n_other < 0 or self.n_captum < 1 or self.captum_steps < 2:
            raise ValueError("n_random and n_other must be >= 0, n_captum >= 1, captum_steps >= 2")
        for name in ("n_probe", "n_train", "n_eval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive (or None for all)")

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        """Build from a plain dict (a YAML/JSON file, ``--set`` values): nested ``align`` / ``sae``
        dicts become their configs, ``methods`` may be a comma-separated string. Raises TypeError
        naming unknown keys."""
        d = dict(d)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown config keys: {sorted(unknown)}; valid keys: {[f.name for f in fields(cls)]}")
        if isinstance(d.get("align"), dict):
            d["align"] = AlignConfig(**d["align"])
        if isinstance(d.get("sae"), dict):
            d["sae"] = SAEConfig(**d["sae"])
        if isinstance(d.get("methods"), str):
            d["methods"] = tuple(m.strip() for m in d["methods"].split(",") if m.strip())
        for key in ("seeds", "methods"):
            if key in d and not isinstance(d[key], str):
                d[key] = tuple(d[key])
        return cls(**d)

    def replace(self, **changes) -> "PipelineConfig":
        """A copy with ``changes`` (checked again)."""
        return replace(self, **changes)


def field_help() -> list[tuple[str, str, str]]:
    """(name, default, comment) of every :class:`PipelineConfig` field, from the source's comments
    (for ``miclip-nb run --help``)."""
    import inspect
    import re

    out = []
    for line in inspect.getsource(PipelineConfig).splitlines():
        m = re.match(r"\s{4}(\w+): [^=]+?(?:= (.*?))?\s+# (.*)$", line)
        if m:
            default = "required" if m.group(1) in REQUIRED else (m.group(2) or "required")
            out.append((m.group(1), default.replace("field(default_factory=", "").rstrip(")"), m.group(3)))
    return out


def class_prompts_embedding(backend: EmbeddingBackend, class_names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
    """(C, D) text embeddings of the classes: the neuron-concept targets, and the concepts that
    localization looks for. Each name in the backend's own prompts (embed.concept_texts: open_clip
    templates for a real CLIP, ToyCLIP's captions) or ``templates``. Duplicate names are allowed."""
    return build_concept_bank(backend, class_names, templates, allow_duplicates=True)


# --------------------------------------------------------------------------------------------
# Steps


def load_model(config: PipelineConfig) -> TargetModel:
    """The configuration's model: a name (zoo.load_target, with ``weights_path`` and ``layer``) or
    a TargetModel as it is. Raises the loader's errors, TypeError for another object."""
    if isinstance(config.model, str):
        return load_target(config.model, pretrained=config.pretrained, weights_path=config.weights_path, layer=config.layer)
    if all(hasattr(config.model, a) for a in ("module", "preprocess", "class_names")):
        return config.model
    raise TypeError(f"model must be a name or a zoo.TargetModel (zoo.load_target(module, preprocess=..., class_names=...)), "
                    f"got {type(config.model).__name__}")


def load_backend(config: PipelineConfig) -> EmbeddingBackend:
    """The configuration's CLIP: a name (embed.load_clip) or an object (embed.as_backend checks it)."""
    if isinstance(config.clip, str):
        return load_clip(config.clip, config.clip_pretrained, checkpoint_path=config.clip_checkpoint,
                         device=config.device or "cpu")
    return as_backend(config.clip)


def dataset(spec, n: int | None = None):
    """A dataset from whatever the configuration holds (datasets.as_dataset), cut to its first ``n``
    images when given (a torch Subset: the harness reads its labels through it)."""
    ds = as_dataset(spec)
    return torch.utils.data.Subset(ds, range(n)) if n is not None and n < len(ds) else ds


@dataclass
class Prepared:
    """A run after capture: the model, the CLIP backend, the store of the layer's pooled units of the
    training images, and the class text embeddings."""

    config: PipelineConfig
    target: TargetModel
    backend: EmbeddingBackend
    store: ActivationStore
    layer: str
    class_text_emb_cd: torch.Tensor
    train: Any = None  # the alignment images as a dataset (datasets.as_dataset of config.train_data)


def prepare(config: PipelineConfig, progress: bool = True) -> Prepared:
    """Load model and CLIP, capture the training store (cached). Raises the loaders' errors and
    capture.LayerNotFoundError (with the closest names) for a layer the model lacks."""
    target = load_model(config)
    space = neurons(target, config.layer or target.default_layer)
    backend = load_backend(config)
    train = as_dataset(config.train_data)
    store = build_store(target, train, [space.layer], pooling=config.pooling, clip=backend, n_items=_cap(train, config.n_train),
                        batch_size=config.batch_size, device=config.device, progress=progress)
    return Prepared(config, target, backend, store, space.layer, class_prompts_embedding(backend, target.class_names), train)


def unit_space(prep: Prepared, progress: bool = True) -> tuple[UnitSpace, ActivationStore]:
    """The units of the run's table and the store of their per-image values.

    ``units="neurons"``: the layer's neurons and the run's store. ``units="sae"``: a top-k SAE
    trained (cached, sae.fit_sae) on the layer's tokens / locations of ``sae_train_data`` (default:
    the alignment images), and a store of each alignment image's pooled codes (a store built with
    the SAE as its transform). One SAE per run, trained with the first seed: the table's seeds vary
    the alignment and the probing draws, not the SAE.
    """
    from .sae import code_store, fit_sae

    cfg = prep.config
    if cfg.units == "neurons":
        return neurons(prep.target, prep.layer, prep.store.fields[f"acts/{prep.layer}"][0]), prep.store
    kwargs = dict(batch_size=cfg.batch_size, device=cfg.device, progress=progress)
    same = cfg.sae_train_data is None  # the alignment images train the SAE: their token store also gives the codes
    sae_data = prep.train if same else as_dataset(cfg.sae_train_data)
    tokens = build_store(prep.target, sae_data, [prep.layer], pooling="none", clip=prep.backend if same else None,
                         n_items=_cap(sae_data, cfg.n_train if same else None), **kwargs)
    sae, _ = fit_sae(tokens, prep.layer, cfg.sae, seed=cfg.seeds[0], device=cfg.device, progress=progress)
    codes = code_store(sae, tokens, target=prep.target, dataset=None if same else prep.train, clip=prep.backend,
                       n_items=_cap(prep.train, cfg.n_train), pooling=cfg.sae_pooling, **kwargs)
    return sae_features(prep.target, prep.layer, sae), codes


def miclip_encoders(prep: Prepared, store: ActivationStore, progress: bool = True, image_only: bool = False) -> list[NeuronEncoder]:
    """One trained encoder per seed of the run (cached, align.fit_alignment) on ``store``'s units.
    ``image_only``: without MiClip's predicted-label term (``concept_weight=0``): the units aligned
    with CLIP's image embeddings alone, as Text-to-Concept does (the table row "Image-only aligner")."""
    cfg = prep.config
    config = replace(cfg.align, concept_weight=0.0) if image_only else cfg.align
    return [fit_alignment(store, prep.class_text_emb_cd, layer=prep.layer, config=config, seed=seed,
                          device=cfg.device, progress=progress) for seed in cfg.seeds]


def miclip_unit_embeddings(prep: Prepared, space: UnitSpace, store: ActivationStore,
                           encoders: Sequence[NeuronEncoder]) -> list[torch.Tensor]:
    """One (U, D) unit-embedding matrix per encoder. For SAE features, features firing on fewer than
    ``config.sae_min_freq`` of the images get zero rows (sae.drop_rare_units), so localization
    never picks them."""
    out = [unit_embeddings(e) for e in encoders]
    if space.kind == "sae":
        from .sae import drop_rare_units, feature_frequency

        freq = feature_frequency(store, prep.layer)
        out = [drop_rare_units(u, freq, prep.config.sae_min_freq) for u in out]
    return out


def aligned_units(prep: Prepared, space: UnitSpace, store: ActivationStore, progress: bool = True,
                  image_only: bool = False) -> tuple[list[torch.Tensor], list[float]]:
    """(unit embeddings (U, D), concept temperature) of each seed's encoder (:func:`miclip_encoders`,
    ``image_only`` as there; :func:`miclip_unit_embeddings`): what :func:`evidence` takes."""
    encoders = miclip_encoders(prep, store, progress, image_only=image_only)
    return miclip_unit_embeddings(prep, space, store, encoders), [concept_temperature(e) for e in encoders]


def _per_seed(seeds: Sequence[int], unit_embs, temperatures):
    """seed -> (unit embeddings, temperature), or None without embeddings. Raises ValueError for
    counts that differ."""
    if unit_embs is None:
        return None
    temps = list(temperatures) if temperatures is not None else [None] * len(unit_embs)
    if len(temps) != len(unit_embs):
        raise ValueError(f"{len(temps)} temperatures for {len(unit_embs)} unit-embedding matrices")
    by_seed = {s: (u, t) for s, u, t in zip(seeds, unit_embs, temps)}
    return lambda seed: by_seed[seed]


def evidence(prep: Prepared, space: UnitSpace, store: ActivationStore, unit_embs: Sequence[torch.Tensor] | None = None,
             temperatures: Sequence[float] | None = None, progress: bool = False,
             image_only: tuple[Sequence[torch.Tensor], Sequence[float]] | None = None) -> methods_mod.Evidence:
    """What the run's methods read (methods.Evidence): the store, the class embeddings, the seeds,
    MiClip's unit embeddings and temperatures per seed (and ``image_only``'s: (embeddings,
    temperatures) of the image-only aligner), the training images for Captum and the ablation
    reference, NetDissect's masks (config.mask_probe, or the training data's own), and the training
    images' store under another pooling (CLIP-Dissect reads a ViT layer's class token)."""
    from . import baselines as bl

    cfg = prep.config
    miclip = _per_seed(cfg.seeds, unit_embs, temperatures)
    image_only = _per_seed(cfg.seeds, *image_only) if image_only is not None else None

    from .datasets import load_images

    train = prep.train if prep.train is not None else as_dataset(cfg.train_data)

    def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n training images drawn by the seed, with their labels (the model's prediction where unknown)."""
        rows = bl.probe_rows(prep.store.n_rows, n, seed)
        picked = range(prep.store.n_rows) if rows is None else rows.tolist()
        x, y = load_images(torch.utils.data.Subset(train, list(picked)), prep.target.preprocess)
        if bool((y < 0).any()):
            from .steer import predict

            y = torch.where(y < 0, predict(prep.target.module, x), y)
        return x, y

    def mask_probe():
        if cfg.mask_probe is not None:
            return bl.FolderMaskProbe(cfg.mask_probe, prep.target.preprocess, concepts=list(prep.target.class_names))
        source = getattr(train, "source", train)
        if callable(getattr(source, "mask_probe", None)):  # a dataset that knows its masks (the Shapes world)
            return source.mask_probe(prep.store.n_rows, preprocess=prep.target.preprocess)
        return None

    stores = {prep.store.spec.pooling: prep.store}

    def pooled(pooling: str) -> ActivationStore:
        """The training images' store of the layer's neurons pooled by ``pooling`` (built or found
        once, then the same store for every seed and method)."""
        if pooling not in stores:
            stores[pooling] = build_store(prep.target, train, [prep.layer], pooling=pooling, clip=prep.backend,
                                          n_items=_cap(train, cfg.n_train), batch_size=cfg.batch_size, device=cfg.device,
                                          progress=progress)
        return stores[pooling]

    return methods_mod.Evidence(space, store, prep.class_text_emb_cd, cfg.seeds, n_random=cfg.n_random, pooled=pooled,
                                image_only=image_only,
                                n_probe=cfg.n_probe, n_captum=cfg.n_captum, captum_steps=cfg.captum_steps, images=images,
                                mask_probe=mask_probe() if "netdissect" in cfg.methods else None, miclip=miclip,
                                device=cfg.device, progress=progress)


def method_selectors(ev: methods_mod.Evidence, keys: Sequence[str]) -> dict[str, list[UnitSelector]]:
    """``{table name: [one selector per seed or draw]}`` for the methods ``keys``, in that order."""
    return {methods_mod.table_name(k): methods_mod.get(k).selectors(ev) for k in keys}


@dataclass
class DeltaResult:
    """One delta-accuracy table and what made it (for beta sweeps and inspection).

    long / table: the harness's long table and its summary (reporting.summarize_table);
    selectors: the rows' selectors; unit_embs / temperatures: MiClip's per seed (None without
    MiClip); eval_data: the evaluation images (a dataset, read in chunks); cache: evaluated edits.
    """

    prep: Prepared
    space: UnitSpace
    store: ActivationStore
    selectors: dict[str, list[UnitSelector]]
    unit_embs: list[torch.Tensor] | None
    temperatures: list[float] | None
    eval_data: Any
    long: pd.DataFrame
    table: pd.DataFrame
    cache: dict


def delta_accuracy(config: PipelineConfig, prep: Prepared | None = None, progress: bool = True) -> DeltaResult:
    """The delta-accuracy table of ``config.methods`` on ``config.units``: capture and SAE (cached),
    MiClip's alignment per seed (cached), each method's selectors, then enhancement and removal
    (steer.PAPER_BETAS) of every class's top-``config.tau`` units on ``config.eval_data``.

    prep: a :func:`prepare` result to reuse (e.g. neurons then SAE features), used when its model,
    layer, pooling, CLIP and training data are those of ``config``. Raises ValueError without
    eval_data, and the errors of the steps.
    """
    if config.eval_data is None:
        raise ValueError("delta_accuracy needs eval_data= (the images whose accuracy the edits change)")
    same = ("model", "weights_path", "layer", "pooling", "clip", "clip_pretrained", "clip_checkpoint", "train_data", "n_train")
    if prep is None or any(getattr(prep.config, k) != getattr(config, k) for k in same):
        prep = prepare(config, progress)
    else:
        prep = Prepared(config, prep.target, prep.backend, prep.store, prep.layer, prep.class_text_emb_cd, prep.train)
    space, store = unit_space(prep, progress)
    unit_embs = temperatures = image_only = None
    if any(m in config.methods for m in ("miclip", "miclip_cosine")):
        unit_embs, temperatures = aligned_units(prep, space, store, progress)
    if "image_only" in config.methods:
        image_only = aligned_units(prep, space, store, progress, image_only=True)
    selectors = method_selectors(evidence(prep, space, store, unit_embs, temperatures, progress, image_only),
                                 config.methods)
    eval_data = dataset(config.eval_data, config.n_eval)
    cache: dict = {}
    long = intervention_table(prep.target, eval_data, prep.layer, selectors, tau=config.tau, edit_factory=space.edit_factory,
                              n_other=config.n_other, batch_size=config.batch_size, cache=cache, progress=progress)
    return DeltaResult(prep, space, store, selectors, unit_embs, temperatures, eval_data, long, summarize_table(long), cache)


#: Relative tolerances tried in turn for a method's matched-norm control (beta_sweep_table).
MATCHED_NORM_TOLERANCES: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)


def beta_sweep_table(result: DeltaResult, betas: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0), *,
                     max_selectors: int | None = 1, matched_norm: bool = True, n_matched: int = 3,
                     progress: bool = False) -> pd.DataFrame:
    """Dose-response curves of every method of a :func:`delta_accuracy` result: the harness's long
    table for scaling each class's top units by each beta, with two controls beside each method:
    Random (the table's random draws) and, with ``matched_norm``, ``<method> (matched norm)``:
    ``n_matched`` random unit sets per class whose summed mean |activation| equals that of the
    method's own set (intervention.matched_norm_selectors), so a method's effect can be told from
    the effect of editing units that are merely strong; a method with no such control within the
    widest of :data:`MATCHED_NORM_TOLERANCES` gets none. ``attrs["matched_norm_tolerance"]`` of
    the returned table: {method: the tolerance its control was matched within}.
    ``max_selectors``: the first n selectors of each method (None: all). Edits already evaluated
    (beta 0 and 2) are reused."""
    from .intervention import dose_response, matched_norm_selectors, mean_abs_activation

    cfg = result.prep.config
    selectors = {m: sels[:max_selectors] if max_selectors else sels for m, sels in result.selectors.items()}
    if matched_norm:
        norms = mean_abs_activation(result.store, result.space.layer)
        classes = list(range(len(result.prep.target.class_names)))
        tolerances = {}
        for method in [m for m in selectors if not methods_mod.get(m).reference]:
            # A method that picks the very strongest units has no equal among the rest: the tolerance
            # widens until a control exists (recorded in the table's attrs["matched_norm_tolerance"]).
            for tol in MATCHED_NORM_TOLERANCES:
                try:
                    selectors[f"{method} (matched norm)"] = matched_norm_selectors(
                        selectors[method][0], norms.numel(), norms, classes, cfg.tau, n_matched, seed=0, tol=tol,
                        name=f"{method} (matched norm)")
                    tolerances[method] = tol
                    break
                except ValueError:
                    continue
    table = dose_response(result.prep.target, result.eval_data, result.prep.layer, selectors, betas=betas, tau=cfg.tau,
                          edit_factory=result.space.edit_factory, n_other=cfg.n_other, batch_size=cfg.batch_size,
                          cache=result.cache, progress=progress)
    table.attrs["matched_norm_tolerance"] = tolerances if matched_norm else {}
    return table


def localization_rows(result: DeltaResult, vocab: Sequence[str], vocab_emb: torch.Tensor) -> tuple[list[dict], list[dict]]:
    """(localization rows: class, seed, rank, unit, scoring, score, cosine; description rows: seed,
    unit, rank, concept, score) of MiClip's top units per class and seed."""
    prep, cfg = result.prep, result.prep.config
    scoring = "posterior" if "miclip" in cfg.methods else "cosine"
    loc, desc = [], []
    for seed, unit_emb, temperature in zip(cfg.seeds, result.unit_embs, result.temperatures):
        sel = MiClipSelector(unit_emb, prep.class_text_emb_cd, scoring=scoring, temperature=temperature)
        cosine = torch.nn.functional.normalize(prep.class_text_emb_cd.float(), dim=-1) @ unit_emb.float().T
        for c in range(len(prep.target.class_names)):
            units = sel.select(c, cfg.tau)
            for rank, u in enumerate(units.tolist()):
                loc.append({"class": prep.target.class_names[c], "seed": seed, "rank": rank, "unit": u, "scoring": scoring,
                            "score": float(sel.scores_cu[c, u]), "cosine": float(cosine[c, u])})
                top = torch.topk(vocab_emb @ unit_emb[u], min(3, len(vocab)))
                desc += [{"seed": seed, "unit": u, "rank": r, "concept": vocab[i], "score": float(v)}
                         for r, (i, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()))]
    return loc, desc


def run(config: PipelineConfig, progress: bool = True) -> dict[str, Path]:
    """The headless pipeline: capture, align (per seed), localize, describe, and the delta-accuracy
    table of every method in ``config.methods`` on ``config.units``.

    Writes to ``config.out_dir``: ``localization.csv`` and ``descriptions.csv`` when MiClip is among
    the methods, ``delta_accuracy_long.csv`` (one row per method, intervention and seed),
    ``delta_accuracy.csv`` (one row per method), ``delta_accuracy.md`` (Markdown; entries against
    the expected direction marked †) and ``run.json`` (config and figures). Returns the paths.
    """
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = delta_accuracy(config, progress=progress)
    prep = res.prep
    paths: dict[str, Path] = {}
    if res.unit_embs is not None:
        vocab = concept_set(config.concepts) if config.concepts is not None else list(dict.fromkeys(prep.target.class_names))
        loc, desc = localization_rows(res, vocab, encode_concepts(prep.backend, vocab))
        paths |= {"localization": out / "localization.csv", "descriptions": out / "descriptions.csv"}
        pd.DataFrame(loc).to_csv(paths["localization"], index=False)
        pd.DataFrame(desc).drop_duplicates().to_csv(paths["descriptions"], index=False)
    paths |= {"delta_long": out / "delta_accuracy_long.csv", "delta": out / "delta_accuracy.csv",
              "delta_md": out / "delta_accuracy.md", "run": out / "run.json"}
    res.long.to_csv(paths["delta_long"], index=False)
    wide_table(res.table).to_csv(paths["delta"])
    title = (f"{prep.target.name} {prep.layer}, {res.space.label}s: delta-accuracy of editing each class's top-{config.tau} "
             f"units, mean (± std) over {len(config.seeds)} seeds ({config.n_random} draws for Random)")
    paths["delta_md"].write_text(f"## {title}\n\n" + table_markdown(res.table))
    settings = {f.name: asdict(v) if f.name in ("align", "sae") else _jsonable(v)
                for f in fields(config) for v in [getattr(config, f.name)]}
    paths["run"].write_text(json.dumps({"config": settings, "store": str(res.store.dir), "units": res.space.kind,
                                        "table": res.table.to_dict(orient="records")}, indent=1))
    return paths


def _cap(ds, n: int | None) -> int | None:
    """``n_items`` for build_store: ``n`` where it is below the dataset's length, else None (all)."""
    return n if n is not None and n < len(ds) else None


def _jsonable(obj):
    """JSON-safe: containers recursively; an object that is not a plain value by its description."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return getattr(obj, "fingerprint", None) or getattr(obj, "name", None) or type(obj).__name__
