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

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import baselines as bl
from ._paths import cache_dir
from .align import AlignConfig, NeuronEncoder, load_encoder, save_encoder, train_encoder
from .datasets import open_dataset
from .embed import EmbeddingBackend, build_concept_bank, load_clip
from .interpret import DEFAULT_TEMPERATURE, concept_set, concept_temperature, encode_concepts, unit_embeddings
from .sae import SAEConfig
from .select import MiClipSelector, RandomSelector, UnitSelector, selection
from .steer import PAPER_BETAS, SplitError, cache_layer_outputs, cached_class_deltas, class_deltas, summarize
from .store import ActivationStore, acts_field, build_store
from .zoo import TargetModel, load_target
from ._progress import bars_off

MICLIP = "MiClip"
MICLIP_COSINE = "MiClip (cosine)"
RANDOM = "Random"
#: Config names of the unit-selection methods -> their names in the tables.
METHODS: dict[str, str] = {
    "miclip": MICLIP,  # posterior scoring against the classes (interpret module docstring)
    "miclip_cosine": MICLIP_COSINE,  # the paper's plain-cosine localization, same encoders
    "random": RANDOM,
    "act_values": bl.ACT_VALUES,
    "netdissect": bl.NETDISSECT,
    "clip_dissect": bl.CLIP_DISSECT,
    "captum_conductance": bl.CAPTUM_METHODS["conductance"],
    "captum_ig": bl.CAPTUM_METHODS["integrated_gradients"],
    "captum_gxa": bl.CAPTUM_METHODS["grad_x_act"],
    "ablation": bl.ABLATION,  # a causal reference (what zeroing each unit alone costs), not a method
}
#: Rows that are references, not methods: never marked best in a table.
REFERENCE_ROWS: tuple[str, ...] = (RANDOM, bl.ABLATION)
#: The methods that work on SAE features (the others need the model's own units).
SAE_METHODS: tuple[str, ...] = ("miclip", "miclip_cosine", "random", "act_values", "clip_dissect")
UNIT_KINDS = ("neurons", "sae")


def method_keys(methods: Sequence[str]) -> tuple[str, ...]:
    """Normalise method names to the keys of :data:`METHODS`: a key ("act_values") or a table
    name ("Act-Values"), case-insensitive. Returns the keys in the given order, duplicates removed.
    Raises ValueError listing the valid names for an unknown one, or for an empty list."""
    if isinstance(methods, str):
        methods = [methods]
    lookup = {k: k for k in METHODS} | {v.lower(): k for k, v in METHODS.items()}
    unknown = [m for m in methods if str(m).lower() not in lookup]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {list(METHODS)} (or their table names {list(METHODS.values())})")
    keys = tuple(dict.fromkeys(lookup[str(m).lower()] for m in methods))
    if not keys:
        raise ValueError(f"give at least one method; valid: {list(METHODS)}")
    return keys


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
    seeds: tuple[int, ...] = (0, 1, 2)  # alignment seeds and baseline probe draws (mean +- std over them)
    n_random: int = 20  # random-unit draws for the control
    methods: tuple[str, ...] = ("miclip", "random")  # table rows: keys of METHODS (or their table names)
    units: str = "neurons"  # "neurons" (the layer's units) or "sae" (top-k SAE features of the layer)
    n_probe: int | None = 2000  # baselines: probing rows drawn per seed from the store / mask probe (None: all)
    n_captum: int = 300  # Captum: training images drawn per seed
    captum_steps: int = 16  # Captum IG / Conductance path steps
    mask_probe: str | None = None  # NetDissect masks: Broden-style folder (baselines.FolderMaskProbe); None: Shapes world
    n_other: int = 256  # other-class images per class for flip_to_class (0: skip, faster)
    sae: SAEConfig = field(default_factory=SAEConfig)  # units="sae": the SAE's architecture and training
    sae_train_data: str | None = None  # units="sae": images whose tokens train the SAE (None: train_data)
    sae_pooling: str = "mean"  # units="sae": pooling of the codes per image
    sae_min_freq: float = 0.01  # units="sae": MiClip ignores features firing on fewer images (sae.drop_rare_units)
    align: AlignConfig = field(default_factory=AlignConfig)  # training hyper-parameters
    batch_size: int = 128  # capture / evaluation batch size
    device: str | None = None  # None: cuda when available
    out_dir: str = "outputs/pipeline"  # where CSV/JSON results go

    def __post_init__(self) -> None:
        if self.tau < 1:
            raise ValueError("tau must be >= 1")
        if not self.seeds:
            raise ValueError("give at least one seed")
        object.__setattr__(self, "seeds", tuple(self.seeds))
        object.__setattr__(self, "methods", method_keys(self.methods))
        if self.units not in UNIT_KINDS:
            raise ValueError(f"units must be one of {UNIT_KINDS}, got {self.units!r}")
        if self.units == "sae":
            bad = [m for m in self.methods if m not in SAE_METHODS]
            if bad:
                raise ValueError(f"method(s) {bad} do not run on SAE features; with units='sae' choose from {list(SAE_METHODS)}")
        if self.n_random < 0 or self.n_other < 0 or self.n_captum < 1 or self.captum_steps < 2:
            raise ValueError("n_random and n_other must be >= 0, n_captum >= 1, captum_steps >= 2")
        if self.n_probe is not None and self.n_probe < 1:
            raise ValueError("n_probe must be positive (or None for every row)")

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        """Build from a plain dict (unknown keys raise TypeError naming them)."""
        d = dict(d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown config keys: {sorted(unknown)}")
        if "align" in d and isinstance(d["align"], dict):
            d["align"] = AlignConfig(**d["align"])
        if "sae" in d and isinstance(d["sae"], dict):
            d["sae"] = SAEConfig(**d["sae"])
        for key in ("seeds", "methods"):
            if key in d and not isinstance(d[key], str):
                d[key] = tuple(d[key])
        if isinstance(d.get("methods"), str):  # "--set methods=miclip,act_values"
            d["methods"] = tuple(m.strip() for m in d["methods"].split(",") if m.strip())
        return cls(**d)


def class_prompts_embedding(backend: EmbeddingBackend, class_names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
    """(C, D) text embeddings of the classes: the neuron-concept targets, and the concepts that
    localization looks for. Each name in the backend's own prompts (embed.concept_texts: open_clip
    templates for a real CLIP, ToyCLIP's captions) or ``templates``. Duplicate names are allowed."""
    return build_concept_bank(backend, class_names, templates, allow_duplicates=True)


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
    classes: Sequence[int] | None = None, edit_factory=None, n_other: int = 256, mode: str = "scale",
    cache: dict | None = None, max_cache_bytes: int = 2 << 30, progress: bool = True,
) -> pd.DataFrame:
    """The delta-accuracy table: for each method (a list of selectors = seeds/draws) and each
    intervention (name -> beta), the class-averaged delta-accuracy of editing each class's top-tau
    units, one row per selector.

    images: (N, 3, H, W) preprocessed; labels: (N,). ``edit_factory(units, mode, beta)``: the edit
    (default neurons; ``sae.sae_edit_factory(sae)`` for SAE features). Where the model splits at
    ``layer`` (steer.tail_module) the layer's outputs are computed once and each edit runs only
    the rest of the model (steer.cached_class_deltas), otherwise (or when the outputs would take
    more than ``max_cache_bytes``) the whole model (steer.class_deltas).
    Each (class, unit set, beta) is evaluated once: selectors that pick the same units share it,
    and scale 1 is the identity (delta 0, no forward pass). ``cache``: a dict to pass again to
    later calls on the same model and images (e.g. a beta sweep after the table); entries are
    keyed by layer, edit factory, mode, beta, class and unit set.
    ``n_other``: other-class images per class for flip_to_class (0: NaN, faster).

    Returns a long DataFrame: method, intervention, beta, seed, delta_acc, flip_to_class.
    """
    classes = sorted(set(labels.tolist())) if classes is None else list(classes)
    memo = cache if cache is not None else {}
    outputs_key = ("_layer_outputs", layer)
    if outputs_key not in memo:
        memo[outputs_key] = _layer_outputs_or_none(target.module, images, layer, max_cache_bytes)
    edit_id = None if edit_factory is None else id(edit_factory)

    present = set(labels.tolist())

    def key(c: int, units: torch.Tensor, beta: float) -> tuple:
        return (layer, edit_id, mode, float(beta), int(c), tuple(sorted(int(u) for u in units)), n_other)

    def evaluate(todo: dict[int, torch.Tensor], beta: float) -> None:
        if mode == "scale" and float(beta) == 1.0:  # the identity
            memo.update({key(c, u, beta): (0.0, 0.0 if n_other else float("nan")) for c, u in todo.items()})
            return
        kwargs = dict(mode=mode, beta=beta, edit_factory=edit_factory, n_other=n_other)
        # Without other-class images a class's result does not depend on the others in the call,
        # so one call covers them all; with them, one call per class keeps each class's sample fixed.
        for part in [todo] if n_other == 0 else [{c: u} for c, u in todo.items()]:
            if memo[outputs_key] is not None:
                df = cached_class_deltas(target.module, images, labels, layer, part, cache=memo[outputs_key], **kwargs)
            else:
                df = class_deltas(target.module, images, labels, layer, part, **kwargs)
            for c, d, f in zip(df["class"], df["delta_acc"], df["flip_to_class"]):
                memo[key(int(c), part[int(c)], beta)] = (float(d), float(f))

    rows = []
    for name, sels in selectors.items():
        for i, sel in enumerate(tqdm(sels, desc=name, disable=bars_off(progress))):
            picked = {c: u for c, u in selection(sel, classes, tau).items() if c in present}
            for interv, beta in betas.items():
                todo = {c: u for c, u in picked.items() if key(c, u, beta) not in memo}
                if todo:
                    evaluate(todo, beta)
                effects = [memo[key(c, u, beta)] for c, u in picked.items()]
                rows.append({"method": name, "intervention": interv, "beta": beta, "seed": i,
                             "delta_acc": float(np.mean([e[0] for e in effects])),
                             "flip_to_class": float(np.mean([e[1] for e in effects]))})
    return pd.DataFrame(rows)


def _layer_outputs_or_none(model, images: torch.Tensor, layer: str, max_bytes: int):
    """(layer outputs, base predictions) for steer.cached_class_deltas, or None where the model
    does not split at ``layer`` or the outputs of all images would exceed ``max_bytes``."""
    from .capture import hooked_activations
    from .steer import tail_module

    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    example = images[:2].to(device)
    try:
        tail_module(model, layer, example)
    except SplitError:
        return None
    with torch.no_grad(), hooked_activations(model, layer, "none") as captured:
        model(example[:1])
        per_image = next(iter(captured.values()))[0].numel() * 4
    if per_image * images.shape[0] > max_bytes:
        return None
    return cache_layer_outputs(model, images, layer)


def summarize_table(long: pd.DataFrame) -> pd.DataFrame:
    """Collapse seeds: one row per (method, intervention) with its beta, mean and std of delta_acc,
    mean flip_to_class and n (seeds or draws)."""
    out = []
    for (method, interv), grp in long.groupby(["method", "intervention"], sort=False):
        mean, std = summarize(grp["delta_acc"].tolist())
        out.append({"method": method, "intervention": interv, "beta": float(grp["beta"].iloc[0]),
                    "delta_acc_mean": mean, "delta_acc_std": std,
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


@dataclass
class UnitSpace:
    """The units a table edits: the layer's neurons, or the features of an SAE on that layer.

    store: pooled per-image activations (neurons) or codes (SAE) with ``label`` and ``clip_image``;
    store_layer: its layer name (``"<layer>:sae"`` for codes); n_units: U; edit_factory: None
    (neurons) or ``sae.sae_edit_factory(sae)``; sae: the SAE or None.
    """

    kind: str
    store: ActivationStore
    store_layer: str
    n_units: int
    edit_factory: object = None
    sae: object = None


def neuron_space(prep: Prepared) -> UnitSpace:
    """The layer's own units, read from the run's pooled store."""
    return UnitSpace("neurons", prep.store, prep.layer, prep.store.fields[acts_field(prep.layer)][0])


def sae_space(prep: Prepared, progress: bool = True) -> UnitSpace:
    """Train (or load from the cache) a top-k SAE on the layer's tokens / locations and encode the
    alignment images into a store of pooled codes (sae.fit_sae, sae.build_sae_code_store).

    The SAE trains on ``config.sae_train_data`` (default: the alignment images, whose token store
    then also gives the codes; otherwise the codes are computed from the model batch by batch).
    One SAE per run (trained with the first seed): the table's seeds vary the alignment and the
    probe draws, not the SAE. Raises sae.SAEMismatchError / ValueError from those functions.
    """
    from .sae import build_sae_code_store, build_sae_code_store_from_model, fit_sae, sae_edit_factory

    cfg = prep.config
    kwargs = dict(batch_size=cfg.batch_size, device=cfg.device, progress=progress)
    sae_data = cfg.sae_train_data or cfg.train_data
    same = sae_data == cfg.train_data
    tokens = build_store(prep.target, open_dataset(sae_data), [prep.layer], pooling="none",
                         clip=prep.backend if same else None, **kwargs)
    sae, _ = fit_sae(tokens, prep.layer, cfg.sae, seed=cfg.seeds[0], device=cfg.device, progress=progress)
    if same:
        codes = build_sae_code_store(tokens, sae, prep.layer, pooling=cfg.sae_pooling, device=cfg.device, progress=progress)
    else:
        codes = build_sae_code_store_from_model(prep.target, open_dataset(cfg.train_data), prep.layer, sae, clip=prep.backend,
                                                pooling=cfg.sae_pooling, **kwargs)
    return UnitSpace("sae", codes, codes.layers[0], sae.n_latents, sae_edit_factory(sae), sae)


def unit_space(prep: Prepared, progress: bool = True) -> UnitSpace:
    """:func:`neuron_space` or :func:`sae_space`, as ``prep.config.units`` says."""
    return sae_space(prep, progress) if prep.config.units == "sae" else neuron_space(prep)


def miclip_encoders(prep: Prepared, space: UnitSpace, progress: bool = True) -> list[NeuronEncoder]:
    """One trained encoder per seed of ``prep.config.seeds`` (cached, :func:`fit_alignment`)."""
    cfg = prep.config
    return [fit_alignment(space.store, prep.class_text_emb_cd, layer=space.store_layer, config=cfg.align, seed=seed,
                          device=cfg.device, progress=progress) for seed in cfg.seeds]


def miclip_unit_embeddings(prep: Prepared, space: UnitSpace, progress: bool = True,
                           encoders: Sequence[NeuronEncoder] | None = None) -> list[torch.Tensor]:
    """One (U, D) unit-embedding matrix per seed of ``prep.config.seeds`` (``encoders``, default
    :func:`miclip_encoders`). For SAE features, features firing on fewer than
    ``config.sae_min_freq`` of the images get zero rows (sae.drop_rare_units), so localization
    never picks them."""
    cfg = prep.config
    out = [unit_embeddings(e) for e in (encoders if encoders is not None else miclip_encoders(prep, space, progress))]
    if space.kind == "sae":
        from .sae import drop_rare_units, feature_frequency

        freq = feature_frequency(space.store, space.store_layer)
        out = [drop_rare_units(u, freq, cfg.sae_min_freq) for u in out]
    return out


def _mask_probe(prep: Prepared):
    cfg = prep.config
    if cfg.mask_probe is not None:
        return bl.FolderMaskProbe(cfg.mask_probe, prep.target.preprocess, concepts=list(prep.target.class_names))
    train = open_dataset(cfg.train_data)
    if callable(getattr(train, "mask_probe", None)):  # a dataset that knows its masks (the Shapes world)
        return train.mask_probe(prep.store.n_rows, preprocess=prep.target.preprocess)
    raise ValueError("netdissect needs concept masks: set mask_probe to a Broden-style folder whose concept folders are the class names")


def _load_images(target: TargetModel, dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in indices:
        img, label = dataset[int(i)]
        xs.append(target.preprocess(img))
        ys.append(label)
    return torch.stack(xs), torch.as_tensor(ys)


def baseline_scores(prep: Prepared, space: UnitSpace, methods: Sequence[str], seed: int, progress: bool = False) -> dict[str, torch.Tensor]:
    """(C, U) class scores of the baselines ``methods`` (keys of :data:`METHODS`) for one seed.

    The seed draws the probing set (baselines.probe_rows): ``config.n_probe`` store rows
    (Act-Values, CLIP-Dissect) and mask-probe images (NetDissect), ``config.n_captum`` training
    images (Captum); the scores come from baselines.class_baseline_scores. Returns
    ``{table name: scores}``. Raises ValueError for NetDissect without masks (see ``mask_probe``).
    """
    cfg = prep.config
    names = [METHODS[m] for m in methods]
    if not names:
        return {}
    kwargs: dict = {}
    if METHODS["netdissect"] in names:
        probe = _mask_probe(prep)
        rows = bl.probe_rows(len(probe), cfg.n_probe, seed)
        kwargs["mask_probe"] = probe if rows is None else bl.SubsetProbe(probe, rows)
    if any(n in (*bl.CAPTUM_METHODS.values(), bl.ABLATION) for n in names):
        train = open_dataset(cfg.train_data)
        rows = bl.probe_rows(len(train), cfg.n_captum, seed)
        kwargs["captum_images"], kwargs["captum_labels"] = _load_images(prep.target, train, range(len(train)) if rows is None else rows.tolist())
    return bl.class_baseline_scores(
        prep.target.module, space.store_layer, space.store, methods=names, n_classes=len(prep.target.class_names),
        class_emb_cd=prep.class_text_emb_cd, n_steps=cfg.captum_steps, device=cfg.device, progress=progress,
        rows=bl.probe_rows(space.store.n_rows, cfg.n_probe, seed), **kwargs)


def method_selectors(prep: Prepared, space: UnitSpace, unit_embs: Sequence[torch.Tensor] | None = None,
                     progress: bool = False, temperatures: Sequence[float] | None = None) -> dict[str, list[UnitSelector]]:
    """The table's rows: ``{table name: [one selector per seed or draw]}`` for ``config.methods``,
    in that order. MiClip: one selector per unit-embedding matrix (``unit_embs``, one per seed;
    ``temperatures``: each encoder's interpret.concept_temperature, default
    interpret.DEFAULT_TEMPERATURE);
    Random: ``config.n_random`` draws; each baseline: one per seed (:func:`baseline_scores`).
    Raises ValueError when MiClip is asked for without ``unit_embs``, or with a number of
    temperatures other than that of unit-embedding matrices."""
    cfg = prep.config
    base = [m for m in cfg.methods if m not in ("miclip", "miclip_cosine", "random")]
    per_seed = bl.score_selectors([baseline_scores(prep, space, base, seed, progress) for seed in cfg.seeds]) if base else {}
    out: dict[str, list[UnitSelector]] = {}
    for m in cfg.methods:
        if m in ("miclip", "miclip_cosine"):
            if unit_embs is None:
                raise ValueError("MiClip needs unit_embs (miclip_unit_embeddings)")
            scoring = "posterior" if m == "miclip" else "cosine"
            temps = list(temperatures) if temperatures is not None else [DEFAULT_TEMPERATURE] * len(unit_embs)
            if len(temps) != len(unit_embs):
                raise ValueError(f"{len(temps)} temperatures for {len(unit_embs)} unit-embedding matrices")
            out[METHODS[m]] = [MiClipSelector(u, prep.class_text_emb_cd, METHODS[m], scoring, t) for u, t in zip(unit_embs, temps)]
        elif m == "random":
            out[RANDOM] = [RandomSelector(space.n_units, s) for s in range(cfg.n_random)]
        else:
            out[METHODS[m]] = per_seed[METHODS[m]]
    return out


@dataclass
class DeltaResult:
    """One delta-accuracy table and what made it (for beta sweeps and inspection).

    long / table: :func:`intervention_table` and :func:`summarize_table` outputs; selectors: the
    rows' selectors; unit_embs: MiClip's (U, D) unit embeddings per seed (None without MiClip);
    temperatures: their encoders' learned concept temperatures (interpret.concept_temperature);
    images (N, 3, H, W) / labels (N,): the evaluation set; cache: the evaluated edits.
    """

    prep: Prepared
    space: UnitSpace
    selectors: dict[str, list[UnitSelector]]
    unit_embs: list[torch.Tensor] | None
    images: torch.Tensor
    labels: torch.Tensor
    long: pd.DataFrame
    table: pd.DataFrame
    cache: dict
    temperatures: list[float] | None = None


def delta_accuracy(config: PipelineConfig, prep: Prepared | None = None, progress: bool = True,
                   eval_set: tuple[torch.Tensor, torch.Tensor] | None = None) -> DeltaResult:
    """The delta-accuracy table of ``config.methods`` on ``config.units``: capture and SAE (cached),
    MiClip alignment per seed (cached), each method's selectors, then enhancement and removal
    (:data:`~miclip_nb.steer.PAPER_BETAS`) of every class's top-``config.tau`` units.

    prep: a :func:`prepare` result to reuse (e.g. neurons then SAE features); ignored unless its
    model, layer, pooling, CLIP and training data are those of ``config``. eval_set: preprocessed
    (images, labels) to reuse instead of loading ``config.eval_data``. Raises the errors of the
    steps (unknown methods already fail in PipelineConfig).
    """
    same = ("model", "layer", "pooling", "clip", "clip_pretrained", "clip_checkpoint", "train_data")
    if prep is None or any(getattr(prep.config, k) != getattr(config, k) for k in same):
        prep = prepare(config, progress)
    else:
        prep = Prepared(config, prep.target, prep.backend, prep.store, prep.layer, prep.class_text_emb_cd)
    space = unit_space(prep, progress)
    images, labels = eval_set if eval_set is not None else load_eval_images(prep.target, open_dataset(config.eval_data), config.n_eval)
    unit_embs = temperatures = None
    if any(m in config.methods for m in ("miclip", "miclip_cosine")):
        encoders = miclip_encoders(prep, space, progress)
        unit_embs = miclip_unit_embeddings(prep, space, progress, encoders)
        temperatures = [concept_temperature(e) for e in encoders]
    selectors = method_selectors(prep, space, unit_embs, progress, temperatures)
    cache: dict = {}
    long = intervention_table(prep.target, images, labels, prep.layer, selectors, tau=config.tau,
                              edit_factory=space.edit_factory, n_other=config.n_other, cache=cache, progress=progress)
    return DeltaResult(prep, space, selectors, unit_embs, images, labels, long, summarize_table(long), cache, temperatures)


def beta_sweep_table(result: DeltaResult, betas: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0), *,
                     max_selectors: int | None = None, progress: bool = False) -> pd.DataFrame:
    """Dose-response of every method of a :func:`delta_accuracy` result: delta-accuracy of scaling
    each class's top units by each beta. ``max_selectors``: use only the first n selectors of each
    method (seeds/draws; None: all). Edits already evaluated (beta 0 and 2) are reused.
    Returns the long table of :func:`intervention_table` (method, intervention, beta, seed, ...)."""
    selectors = {m: sels[:max_selectors] if max_selectors else sels for m, sels in result.selectors.items()}
    return intervention_table(result.prep.target, result.images, result.labels, result.prep.layer, selectors,
                              tau=result.prep.config.tau, betas={f"x{b:g}": float(b) for b in betas},
                              edit_factory=result.space.edit_factory, n_other=result.prep.config.n_other,
                              cache=result.cache, progress=progress)


def run(config: PipelineConfig, progress: bool = True) -> dict[str, Path]:
    """The headless pipeline: capture, align (per seed), localize, describe, and the delta-accuracy
    table of every method in ``config.methods`` on ``config.units`` (neurons or SAE features).

    Writes to ``config.out_dir``: ``localization.csv`` (class, seed, rank, unit, scoring, score, cosine) and
    ``descriptions.csv`` (seed, unit, rank, concept, score) when MiClip is among the methods,
    ``delta_accuracy_long.csv`` (one row per method, intervention and seed), ``delta_accuracy.csv``
    (the table: one row per method, mean/std/wrong-direction flag per intervention),
    ``delta_accuracy.md`` (the same in Markdown, wrong-direction entries marked †) and
    ``run.json`` (config and figures). Returns the paths written.
    """
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = delta_accuracy(config, progress=progress)
    prep, space = res.prep, res.space
    classes = sorted(set(res.labels.tolist()))
    loc_rows, desc_rows = [], []
    if res.unit_embs is not None:
        vocab = concept_set(config.concepts)
        vocab_emb = encode_concepts(prep.backend, vocab)
        for seed, unit_emb, temperature in zip(config.seeds, res.unit_embs, res.temperatures):
            sel = MiClipSelector(unit_emb, prep.class_text_emb_cd, scoring="posterior" if "miclip" in config.methods else "cosine",
                                 temperature=temperature)
            for c in classes:
                units = sel.select(c, config.tau)
                cosines = unit_emb[units] @ torch.nn.functional.normalize(prep.class_text_emb_cd[c].float(), dim=-1)
                for rank, (u, s, cos) in enumerate(zip(units.tolist(), sel.scores_cu[c, units].tolist(), cosines.tolist())):
                    loc_rows.append({"class": prep.target.class_names[c], "seed": seed, "rank": rank, "unit": u,
                                     "scoring": sel.scoring, "score": s, "cosine": cos})
                    top = torch.topk(vocab_emb @ unit_emb[u], min(3, len(vocab)))
                    for r2, (ci, cs) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
                        desc_rows.append({"seed": seed, "unit": u, "rank": r2, "concept": vocab[ci], "score": cs})
    paths = {"localization": out / "localization.csv", "descriptions": out / "descriptions.csv"} if loc_rows else {}
    paths |= {"delta_long": out / "delta_accuracy_long.csv", "delta": out / "delta_accuracy.csv",
              "delta_md": out / "delta_accuracy.md", "run": out / "run.json"}
    if loc_rows:
        pd.DataFrame(loc_rows).to_csv(paths["localization"], index=False)
        pd.DataFrame(desc_rows).drop_duplicates().to_csv(paths["descriptions"], index=False)
    res.long.to_csv(paths["delta_long"], index=False)
    wide_table(res.table).to_csv(paths["delta"])
    title = (f"{prep.target.name} {prep.layer}, {space.kind}: delta-accuracy of editing each class's top-{config.tau} units, "
             f"mean (± std) over {len(config.seeds)} seeds ({config.n_random} draws for Random)")
    paths["delta_md"].write_text(f"## {title}\n\n" + table_markdown(res.table))
    paths["run"].write_text(json.dumps({"config": _jsonable(asdict(config)), "store": str(space.store.dir), "units": space.kind,
                                        "table": res.table.to_dict(orient="records")}, indent=1))
    return paths


#: Sign a delta-accuracy is expected to have per intervention (paper Table 2: enhancement up, removal down).
EXPECTED_SIGN: dict[str, int] = {"enhance": 1, "remove": -1}
#: Plain-text mark of an entry that moves against the expected direction (the paper's red).
WRONG_MARK = "†"


def expected_sign(intervention: str, beta: float | None = None) -> int:
    """+1 (accuracy should rise), -1 (should fall) or 0 (no expectation) for an intervention:
    its entry in :data:`EXPECTED_SIGN`, else from the scale beta (> 1: +1, < 1: -1)."""
    if intervention in EXPECTED_SIGN:
        return EXPECTED_SIGN[intervention]
    if beta is None or pd.isna(beta) or float(beta) == 1.0:
        return 0
    return 1 if float(beta) > 1.0 else -1


def against_expected(table: pd.DataFrame) -> pd.Series:
    """Bool per row of :func:`summarize_table` (columns intervention, delta_acc_mean, optional
    beta): the mean has the sign opposite to :func:`expected_sign`; exactly 0 is not flagged."""
    betas = table["beta"] if "beta" in table else [None] * len(table)
    signs = [expected_sign(i, b) for i, b in zip(table["intervention"], betas)]
    return pd.Series([bool(s != 0 and m * s < 0) for s, m in zip(signs, table["delta_acc_mean"])], index=table.index)


def wide_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table with rows = methods (index ``method``): per intervention ``<name>_mean``,
    ``<name>_std`` and ``<name>_wrong`` (against the expected direction), then ``n`` (seeds or
    draws). Input: :func:`summarize_table`'s output."""
    table = table.assign(wrong=against_expected(table))
    out = pd.DataFrame(index=pd.Index(list(dict.fromkeys(table["method"])), name="method"))
    for interv, grp in table.groupby("intervention", sort=False):
        g = grp.set_index("method")
        out[f"{interv}_mean"], out[f"{interv}_std"], out[f"{interv}_wrong"] = g["delta_acc_mean"], g["delta_acc_std"], g["wrong"]
    out["n"] = table.groupby("method", sort=False)["n"].max()
    return out


def table_markdown(table: pd.DataFrame) -> str:
    """A Markdown table from :func:`summarize_table`: rows = methods, columns = interventions,
    cells 'mean (± std)'. Entries against the expected direction get :data:`WRONG_MARK` (the
    paper's red), the best method per column (Random and Ablation excluded; none when no method moves the
    expected way) is bold; a legend line follows."""
    table = table.assign(wrong=against_expected(table))
    interventions = list(dict.fromkeys(table["intervention"]))
    best = {}
    for i in interventions:
        rows = table[(table["intervention"] == i) & ~table["method"].isin(REFERENCE_ROWS)]
        sign = expected_sign(i, rows["beta"].iloc[0] if "beta" in rows and len(rows) else None)
        if len(rows) and sign and (rows["delta_acc_mean"] * sign).max() > 0:  # no bold when nothing moves the right way
            best[i] = rows.loc[(rows["delta_acc_mean"] * sign).idxmax(), "method"]
    arrows = {1: " (↑)", -1: " (↓)", 0: ""}
    head = [f"{i} ΔAcc (%){arrows[expected_sign(i, table.loc[table['intervention'] == i, 'beta'].iloc[0] if 'beta' in table else None)]}"
            for i in interventions]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(interventions)]
    for method, grp in table.groupby("method", sort=False):
        cells = []
        for i in interventions:
            r = grp[grp["intervention"] == i]
            if not len(r):
                cells.append("")
                continue
            cell = f"{r['delta_acc_mean'].iloc[0]:+.2f} (± {r['delta_acc_std'].iloc[0]:.2f})"
            cell = f"**{cell}**" if best.get(i) == method else cell
            cells.append(cell + (f" {WRONG_MARK}" if bool(r["wrong"].iloc[0]) else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", f"{WRONG_MARK}: moves against the expected direction (the paper's red); bold: best method per column."]
    return "\n".join(lines) + "\n"


#: Column headers of the paper's Table 2 per intervention.
PAPER_HEADERS: dict[str, str] = {"enhance": "Enhancement ΔAcc (%) (↑)", "remove": "Removal ΔAcc (%) (↓)"}


def paper_table(tables: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's Table 2 layout from several :func:`summarize_table` outputs.

    tables: ``{column label (a model, or "model · units"): summary}``. Returns ``(cells, wrong)``:
    DataFrames with rows = methods (in order of first appearance) and columns = a MultiIndex
    (intervention header, label), enhancement columns first; ``cells`` holds "mean (± std)"
    strings, with :data:`WRONG_MARK` appended where the entry moves against the expected direction,
    ``wrong`` the matching booleans (False where a method is missing). Raises ValueError for no tables.
    """
    if not tables:
        raise ValueError("give at least one summary table")
    methods = list(dict.fromkeys(m for t in tables.values() for m in t["method"]))
    interventions = list(dict.fromkeys(i for t in tables.values() for i in t["intervention"]))
    columns = pd.MultiIndex.from_tuples([(PAPER_HEADERS.get(i, f"{i} ΔAcc (%)"), label) for i in interventions for label in tables])
    cells = pd.DataFrame("", index=pd.Index(methods, name="method"), columns=columns)
    wrong = pd.DataFrame(False, index=cells.index, columns=columns)
    for label, t in tables.items():
        t = t.assign(wrong=against_expected(t))
        for _, r in t.iterrows():
            col = (PAPER_HEADERS.get(r["intervention"], f"{r['intervention']} ΔAcc (%)"), label)
            cells.loc[r["method"], col] = (f"{r['delta_acc_mean']:+.2f} (± {r['delta_acc_std']:.2f})"
                                           + (f" {WRONG_MARK}" if r["wrong"] else ""))
            wrong.loc[r["method"], col] = bool(r["wrong"])
    return cells, wrong


def style_paper_table(tables: dict[str, pd.DataFrame], color: str = "#d62728"):
    """:func:`paper_table`'s cells as a pandas Styler: entries against the expected direction in
    red (they also keep their text mark), the best method of each column (Random and Ablation excluded) in
    bold, with a fixed table id so that its HTML is the same on every run."""
    cells, wrong = paper_table(tables)
    css = wrong.map(lambda w: f"color: {color}" if w else "")
    for label, t in tables.items():
        for interv, grp in t[~t["method"].isin(REFERENCE_ROWS)].groupby("intervention", sort=False):
            sign = expected_sign(interv, grp["beta"].iloc[0] if "beta" in grp else None)
            if sign and (grp["delta_acc_mean"] * sign).max() > 0:
                best = grp.loc[(grp["delta_acc_mean"] * sign).idxmax(), "method"]
                col = (PAPER_HEADERS.get(interv, f"{interv} ΔAcc (%)"), label)
                css.loc[best, col] = "; ".join(filter(None, [css.loc[best, col], "font-weight: bold"]))
    return cells.style.apply(lambda _: css, axis=None).set_uuid("miclip_table2")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
