"""ipywidgets panels over the library's pure functions (no custom front-end code).

Each builder returns ``{"widget": the box to display, "parts": {name: widget}}`` so a test can set
values, click buttons and read the outputs without a browser, and a notebook just displays
``panel["widget"]``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import ipywidgets as W
import numpy as np
import torch

from . import viz
from .capture import capture
from .interpret import (DEFAULT_TEMPERATURE, SCORINGS, check_unit_embeddings, concept_unit_scores, describe, encode_concepts,
                        localize, top_k)
from .store import model_identity


@dataclass
class ExplorerState:
    """What the panels browse: aligned units, a vocabulary, and probe images with their activations."""

    unit_emb_ud: torch.Tensor  # (U, D) unit embeddings
    backend: object  # EmbeddingBackend, to embed free text
    vocab: list[str]  # concept names for descriptions
    vocab_emb_cd: torch.Tensor  # (C, D) their embeddings
    probe_acts_nu: torch.Tensor  # (N, U) pooled activations of the probe images
    probe_images: np.ndarray  # (N, H, W, 3) uint8 probe images for display
    layer: str  # the layer the units live in
    unit_label: str = "unit"  # "neuron", "SAE feature", ... for titles
    encode_text: object = None  # optional callable str -> (D,); default backend.encode_texts
    temperature: float = DEFAULT_TEMPERATURE  # the encoder's concept temperature (interpret.concept_temperature)
    # Causal scores (miclip_nb.causal), shown beside descriptions and localized units when all are given:
    target: object = None  # the model (zoo.TargetModel or nn.Module) whose ``layer`` the units live in
    probe_inputs: torch.Tensor | None = None  # (M, ...) preprocessed images the effects are measured on
    probe_labels: torch.Tensor | None = None  # (M,) their classes (each class over its own images), or None (all)
    class_names: list[str] | None = None  # the model's classes, to name effects and match concepts to classes
    edit_factory: object = None  # units.UnitSpace.edit_factory for SAE features (None: neurons)
    _effects: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.probe_acts_nu.ndim != 2:
            raise ValueError(f"probe_acts_nu must be (N, U) pooled activations, got shape {tuple(self.probe_acts_nu.shape)}")
        check_unit_embeddings(self.unit_emb_ud, n_units=int(self.probe_acts_nu.shape[1]), layer=self.layer)

    @property
    def n_units(self) -> int:
        return int(self.unit_emb_ud.shape[0])

    @property
    def has_causal(self) -> bool:
        """Whether the state holds what causal scores need (a target and probe inputs)."""
        return self.target is not None and self.probe_inputs is not None

    @property
    def effects(self):
        """causal.UnitEffects over the probe inputs, built on first use (one cached forward pass;
        each unit's effects are computed when first asked for, then kept); None without
        :attr:`has_causal`."""
        if not self.has_causal:
            return None
        if self._effects is None:
            from .causal import UnitEffects

            self._effects = UnitEffects(self.target, self.layer, self.probe_inputs, labels=self.probe_labels,
                                        edit_factory=self.edit_factory, n_units=self.n_units)
        return self._effects


def build_explorer(target, backend, unit_emb_ud, vocab, vocab_emb_cd, dataset, layer: str, n_probe: int = 512,
                   pooling: str = "mean", unit_label: str = "neuron", batch_size: int = 128,
                   temperature: float = DEFAULT_TEMPERATURE, n_causal: int = 128) -> ExplorerState:
    """Capture pooled activations of the first ``n_probe`` images of ``dataset`` (yielding PIL
    images) at ``layer`` and bundle everything the panels need.

    target: a zoo.TargetModel; unit_emb_ud: (U, D) neuron embeddings of ``layer`` of that model
    (interpret.unit_embeddings); vocab_emb_cd: (C, D); temperature: the encoder's
    interpret.concept_temperature, for ranking by posterior. n_causal: the first n probe images
    (preprocessed, with their labels; unlabelled ones make every class's effect a mean over all of
    them) are kept for the causal scores the panels show beside descriptions and localized units
    (miclip_nb.causal; computed lazily); 0 keeps none (no causal scores). Raises ValueError when U
    is not the layer's number of units, or when the embeddings' provenance names another model,
    layer or SAE features (interpret.check_unit_embeddings).
    """
    check_unit_embeddings(unit_emb_ud, model=model_identity(target), layer=layer, unit_kind="neuron")  # before capturing
    n = min(n_probe, len(dataset))
    items = [dataset[i] for i in range(n)]
    pil = [item[0] for item in items]
    acts, kept = [], []
    for start in range(0, n, batch_size):
        x = torch.stack([target.preprocess(img) for img in pil[start : start + batch_size]])
        acts.append(capture(target.module, x, layer, pooling)[layer])
        if sum(len(k) for k in kept) < n_causal:
            kept.append(x[: n_causal - sum(len(k) for k in kept)])
    images = np.stack([np.asarray(img.convert("RGB").resize((64, 64))) for img in pil])
    inputs = torch.cat(kept) if kept else None
    labels = None
    if inputs is not None:
        labels = torch.as_tensor([int(item[1]) for item in items[: len(inputs)]])
        labels = None if bool((labels < 0).any()) else labels
    return ExplorerState(unit_emb_ud, backend, list(vocab), vocab_emb_cd, torch.cat(acts), images, layer, unit_label,
                         temperature=temperature, target=target if inputs is not None else None, probe_inputs=inputs,
                         probe_labels=labels, class_names=list(getattr(target, "class_names", []) or []) or None)


def search_concept(state: ExplorerState, text: str, tau: int, scoring: str = "posterior") -> list[tuple[int, float]]:
    """[(unit, score)] of the top ``tau`` units for free text, best first.

    scoring: "posterior" (log p(text | unit) against the explorer's vocabulary,
    interpret.concept_unit_scores at ``state.temperature``) or "cosine" (the paper's plain cosine). Raises
    ValueError for empty text or an unknown scoring."""
    text = (text or "").strip()
    if not text:
        raise ValueError("type a concept first")
    if state.encode_text is not None:
        emb = state.encode_text(text)
    else:
        emb = encode_concepts(state.backend, [text])[0]
    scores = concept_unit_scores(state.unit_emb_ud, emb.reshape(1, -1), scoring, state.vocab_emb_cd, state.temperature)[0]
    units, scores = top_k(scores, tau, "units")
    return list(zip(units.tolist(), scores.tolist()))


def top_activating(state: ExplorerState, unit: int, k: int = 6) -> np.ndarray:
    """Indices of the ``k`` probe images on which ``unit`` is most active."""
    return torch.topk(state.probe_acts_nu[:, unit], min(k, state.probe_acts_nu.shape[0])).indices.numpy()


def _table(rows: list[tuple], headers: tuple[str, ...]) -> str:
    head = "".join(f"<th style='padding:2px 10px'>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td style='padding:2px 10px'>{html.escape(f'{c:.3f}' if isinstance(c, float) else str(c))}</td>" for c in r) + "</tr>"
        for r in rows
    )
    return f"<table class='miclip-table'><tr>{head}</tr>{body}</table>"


def _units_grid_png(state: ExplorerState, units: list[int], k: int) -> bytes:
    idx = [top_activating(state, u, k) for u in units]
    images = np.concatenate([state.probe_images[i] for i in idx])
    titles = [f"{state.unit_label} {u}" if j == 0 else "" for u in units for j in range(len(idx[0]))]
    fig = viz.image_grid(images, titles, ncols=len(idx[0]), size=1.0, suptitle="top-activating probe images (one row per unit)")
    return viz.figure_png(fig)


def causal_columns(state: ExplorerState, unit: int, concept: str | None = None) -> tuple[float, str]:
    """(causal score, class it is on) of ``unit`` for ``concept``: the drop of the concept's class
    logit when the unit alone is removed if the concept names one of ``state.class_names``, else
    the unit's largest class effect (causal.causal_score), over the state's probe inputs (computed
    on first use, then cached). Raises ValueError when the state has no causal inputs."""
    from .causal import causal_score, class_label

    if not state.has_causal:
        raise ValueError("this explorer has no model and probe inputs for causal scores (ExplorerState.target / probe_inputs)")
    value, cls = causal_score(state.effects.of(int(unit)), (concept or "").strip() or None, state.class_names)
    return value, "" if cls is None else str(class_label(cls, state.class_names))


def concept_search_panel(state: ExplorerState, tau: int = 5, k_images: int = 6) -> dict:
    """Type a concept -> its top units with scores and each unit's top-activating images; with a
    state that has causal inputs (:attr:`ExplorerState.has_causal`), each unit's causal score too
    (:func:`causal_columns`: its class's logit drop when the concept is a class name, else the
    largest class effect, computed lazily and cached)."""
    concept = W.Text(value="", placeholder="a concept, e.g. red", description="concept")
    tau_slider = W.IntSlider(value=tau, min=1, max=min(20, state.n_units), description="top units")
    scoring = W.Dropdown(options=list(SCORINGS), value=SCORINGS[0], description="rank by")
    search = W.Button(description="Search", button_style="primary")
    status = W.HTML()
    table = W.HTML()
    images = W.Image(format="png")

    def run(_=None):
        try:
            hits = search_concept(state, concept.value, tau_slider.value, scoring.value)
        except ValueError as err:
            status.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            return
        status.value = f"top {len(hits)} {state.unit_label}s at <code>{html.escape(state.layer)}</code> for “{html.escape(concept.value.strip())}”"
        headers = (state.unit_label, "log p among vocabulary" if scoring.value == "posterior" else "cosine")
        rows = [(u, s) for u, s in hits]
        if state.has_causal:
            rows = [row + causal_columns(state, row[0], concept.value) for row in rows]
            headers += ("causal: logit drop if removed", "on class")
        table.value = _table(rows, headers)
        images.value = _units_grid_png(state, [u for u, _ in hits], k_images)

    search.on_click(run)
    concept.continuous_update = False
    concept.observe(lambda change: run(), names="value")
    for control in (tau_slider, scoring):
        control.observe(lambda change: run() if concept.value.strip() else None, names="value")
    box = W.VBox([W.HBox([concept, tau_slider, scoring, search]), status, W.HBox([table, images])])
    return {"widget": box, "parts": {"concept": concept, "tau": tau_slider, "scoring": scoring, "search": search, "status": status,
                                     "table": table, "images": images}}


def unit_inspector_panel(state: ExplorerState, tau: int = 5, k_images: int = 8, n_effects: int = 3) -> dict:
    """Pick a unit -> its top concepts with scores, top-activating images, activation histogram;
    with a state that has causal inputs (:attr:`ExplorerState.has_causal`), beside the descriptions
    the unit's ``n_effects`` largest effects on class logits (the drop when the unit alone is
    removed, causal.UnitEffects; computed for the unit shown, then cached). A unit described
    confidently whose effects are all ~0 is one the classifier does not read."""
    unit = W.BoundedIntText(value=0, min=0, max=state.n_units - 1, description=state.unit_label[:10])
    status = W.HTML()
    table = W.HTML()
    effects = W.HTML()
    images = W.Image(format="png")
    hist = W.Image(format="png")

    def show(_=None):
        u = int(unit.value)
        top = describe(state.unit_emb_ud, u, state.vocab_emb_cd, state.vocab, tau)
        status.value = f"{state.unit_label} {u} at <code>{html.escape(state.layer)}</code>"
        table.value = _table(top, ("concept", "cosine"))
        if state.has_causal:
            from .causal import top_effects

            effects.value = _table(top_effects(state.effects.of(u), state.class_names, n_effects),
                                   ("class", "logit drop if removed"))
        idx = top_activating(state, u, k_images)
        images.value = viz.figure_png(viz.image_grid(state.probe_images[idx], ncols=k_images, size=1.0,
                                                     suptitle=f"top-activating images of {state.unit_label} {u}"))
        acts = state.probe_acts_nu[:, u].numpy()
        hist.value = viz.figure_png(viz.activation_histogram(acts, f"{state.unit_label} {u} on {len(acts)} probe images"))

    unit.observe(show, names="value")
    show()
    box = W.VBox([unit, status, W.HBox([table, effects, hist]), images])
    return {"widget": box, "parts": {"unit": unit, "status": status, "table": table, "effects": effects, "images": images,
                                     "histogram": hist}}


def failure_panel(trajectories, images_uint8: np.ndarray | None, class_names) -> dict:
    """Pick a misclassified image -> its layer-wise trajectory plot and per-layer top concepts.

    trajectories: diagnose.Trajectory list; images_uint8: (M, H, W, 3) images in the same order
    (or None).
    """
    options = [(f"#{i}: {class_names[t.true_label]} → {class_names[t.wrong_label]}", i) for i, t in enumerate(trajectories)]
    pick = W.Dropdown(options=options, description="failure")
    image = W.Image(format="png")
    plot = W.Image(format="png")
    table = W.HTML()

    def show(_=None):
        t = trajectories[pick.value]
        fig = viz.trajectory_plot(t.layers, t.sim_true, t.sim_wrong, class_names[t.true_label], class_names[t.wrong_label],
                                  t.best_layer, t.overtake_layer)
        plot.value = viz.figure_png(fig)
        if images_uint8 is not None:
            image.value = viz.figure_png(viz.image_grid(images_uint8[pick.value][None], size=1.8))
        marks = {t.best_layer: " ★", t.overtake_layer: " ✖"}
        rows = [(layer + marks.get(i, ""), round(float(t.sim_true[i]), 3), round(float(t.sim_wrong[i]), 3),
                 ", ".join(c for c, _ in t.top_concepts[i])) for i, layer in enumerate(t.layers)]
        table.value = _table(rows, ("layer", "cos(GT)", "cos(Mis.)", "closest concepts"))

    pick.observe(show, names="value")
    if options:
        show()
    box = W.VBox([pick, W.HBox([image, plot]), table])
    return {"widget": box, "parts": {"failure": pick, "image": image, "plot": plot, "table": table}}


@dataclass
class FeatureGroundingState:
    """What the SAE-feature panel browses: feature embeddings, a way to embed concepts, and a
    heatmap function over a fixed set of probe images (optionally with ground-truth masks)."""

    unit_emb_ud: torch.Tensor  # (F, D) feature embeddings (zero rows are never offered)
    encode_text: object  # callable concept str -> (D,) text embedding
    heatmap_fn: object  # callable (images (N, 3, H, W), feature) -> (N, H, W) activation maps
    images: torch.Tensor  # (N, 3, H, W) preprocessed probe images
    images_uint8: np.ndarray  # (N, h, w, 3) the same images for display
    layer: str  # the layer the SAE reads
    concepts: list[str]  # concepts offered in the panel's menu
    masks: dict | None = None  # optional {concept: (N, h, w) bool}: per-image IoU in the titles
    unit_label: str = "SAE feature"  # for titles
    quantile: float = 0.8  # heatmap threshold for the IoU (see grounding.heatmap_masks)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images_uint8.ndim != 4 or len(self.images) != len(self.images_uint8):
            raise ValueError(f"images {tuple(self.images.shape)} and images_uint8 {self.images_uint8.shape} must be "
                             "(N, 3, H, W) and (N, h, w, 3) with the same N")
        if not self.concepts:
            raise ValueError("give at least one concept")

    @property
    def n_features(self) -> int:
        """F, the number of SAE features (rows of unit_emb_ud)."""
        return int(self.unit_emb_ud.shape[0])


def build_feature_state(target, layer: str, sae, unit_emb_ud: torch.Tensor, backend, dataset, concepts,
                        n_images: int = 12, quantile: float = 0.8) -> FeatureGroundingState:
    """Bundle a model, an SAE and its aligned feature embeddings for :func:`sae_feature_panel`.

    target: a zoo.TargetModel; sae: a sae.TopKSAE trained at ``layer``; unit_emb_ud: (F, D);
    backend: the EmbeddingBackend the features were aligned with; dataset: yields (PIL image,
    label); its first ``n_images`` images are the probes. A masked dataset (``mask_concepts`` and
    ``masks(i)``, grounding.mask_grounding; e.g. the Shapes world's) also supplies masks, so the
    panel reports IoU per image.
    Raises ValueError for an empty concept list, when F is not the SAE's number of features, or
    when the embeddings' provenance names another model, layer or SAE, or neurons
    (interpret.check_unit_embeddings).
    """
    from .grounding import feature_heatmaps

    check_unit_embeddings(unit_emb_ud, n_units=sae.n_latents, model=model_identity(target), layer=layer,
                          unit_kind="SAE feature", sae=sae.fingerprint)
    concepts = list(concepts)
    n = min(n_images, len(dataset))
    pil = [dataset[i][0].convert("RGB") for i in range(n)]
    images = torch.stack([target.preprocess(img) for img in pil])
    size = tuple(images.shape[-2:])
    display = np.stack([np.asarray(img.resize(size[::-1])) for img in pil])
    masks = None
    if hasattr(dataset, "mask_concepts") and callable(getattr(dataset, "masks", None)):
        stack = np.stack([np.asarray(dataset.masks(i), dtype=bool) for i in range(n)])  # (N, K, H, W)
        names = list(dataset.mask_concepts)
        if stack.shape[-2:] == size:
            masks = {c: stack[:, names.index(c)] for c in concepts if c in names}
    cache: dict[int, np.ndarray] = {}

    def heatmap_fn(x: torch.Tensor, feature: int) -> np.ndarray:
        if x is images:  # the probe images: one forward pass per feature, then cached
            if feature not in cache:
                cache[feature] = feature_heatmaps(target, layer, sae, x, feature)
            return cache[feature]
        return feature_heatmaps(target, layer, sae, x, feature)

    def encode_text(text: str) -> torch.Tensor:
        return encode_concepts(backend, [text])[0]

    return FeatureGroundingState(unit_emb_ud, encode_text, heatmap_fn, images, display, layer, concepts, masks,
                                 quantile=quantile)


def top_features(state: FeatureGroundingState, concept: str, tau: int) -> list[tuple[int, float]]:
    """[(feature, cosine)] of the ``tau`` features most similar to ``concept`` (rows that are zero,
    e.g. rare features dropped by sae.drop_rare_units, never come first). Raises ValueError for
    empty text or tau out of range."""
    concept = (concept or "").strip()
    if not concept:
        raise ValueError("pick a concept first")
    units, scores = localize(state.unit_emb_ud, state.encode_text(concept), tau)
    return list(zip(units.tolist(), scores.tolist()))


def feature_heatmap_figure(state: FeatureGroundingState, feature: int, image_idx, concept: str | None = None):
    """The heatmaps of ``feature`` on the probe images ``image_idx`` (indices into state.images),
    titled with the peak activation and, when masks for ``concept`` are known, the IoU with them.
    Returns (matplotlib Figure, per-image IoU array or None). Raises ValueError for no images,
    IndexError for an image index out of range."""
    import torch.nn.functional as F

    from .grounding import heatmap_iou, plot_heatmaps

    idx = np.asarray(list(image_idx), dtype=int)
    if idx.size == 0:
        raise ValueError("choose at least one image")
    if idx.min() < 0 or idx.max() >= len(state.images):
        raise IndexError(f"image index out of range 0..{len(state.images) - 1}")
    heat = np.asarray(state.heatmap_fn(state.images, int(feature)))[idx]
    display = state.images_uint8[idx]
    if heat.shape[-2:] != display.shape[1:3]:
        heat = F.interpolate(torch.as_tensor(heat)[:, None], size=display.shape[1:3], mode="bilinear",
                             align_corners=False)[:, 0].numpy()
    iou = None
    mask = (state.masks or {}).get(concept) if concept else None
    if mask is not None:
        iou = heatmap_iou(heat, mask[idx], quantile=state.quantile)
    titles = [f"#{i} peak {h.max():.2f}" + ("" if iou is None or np.isnan(v) else f"\nIoU {v:.2f}")
              for i, h, v in zip(idx, heat, iou if iou is not None else [np.nan] * len(idx))]
    fig = plot_heatmaps(display, heat, titles, ncols=min(6, len(idx)),
                        suptitle=f"{state.unit_label} {feature} at {state.layer}")
    return fig, iou


def sae_feature_panel(state: FeatureGroundingState, tau: int = 5, images: tuple[int, ...] | None = None) -> dict:
    """Pick a concept -> its top SAE features (cosine); pick a feature and images -> the feature's
    heatmaps on them (with IoU against the concept's masks when known).

    Parts: ``concept`` (Dropdown), ``tau`` (IntSlider), ``feature`` (Dropdown of the top features),
    ``images`` (SelectMultiple of probe indices), ``show`` (Button), ``status``/``table`` (HTML),
    ``heatmaps`` (Image, PNG). Changing the concept refills the features and redraws; changing the
    feature or the images redraws.
    """
    n_img = len(state.images)
    concept = W.Dropdown(options=state.concepts, value=state.concepts[0], description="concept")
    tau_slider = W.IntSlider(value=min(tau, state.n_features), min=1, max=min(20, state.n_features), description="top features")
    feature = W.Dropdown(options=[], description=state.unit_label[:12])
    chosen = W.SelectMultiple(options=[(f"image {i}", i) for i in range(n_img)],
                              value=tuple(images) if images is not None else tuple(range(min(6, n_img))),
                              description="images", rows=min(6, n_img))
    show = W.Button(description="Show heatmaps", button_style="primary")
    status, table = W.HTML(), W.HTML()
    heatmaps = W.Image(format="png")
    busy = {"refill": False}

    def draw(_=None):
        if busy["refill"] or feature.value is None:
            return
        try:
            fig, iou = feature_heatmap_figure(state, int(feature.value), chosen.value, concept.value)
        except (ValueError, IndexError) as err:
            status.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            return
        heatmaps.value = viz.figure_png(fig)
        mean_iou = "" if iou is None or np.all(np.isnan(iou)) else f"; mean IoU with “{html.escape(concept.value)}” masks {np.nanmean(iou):.2f}"
        status.value = (f"{state.unit_label} {int(feature.value)} at <code>{html.escape(state.layer)}</code> on "
                        f"{len(chosen.value)} images{mean_iou}")

    def refill(_=None):
        try:
            hits = top_features(state, concept.value, tau_slider.value)
        except ValueError as err:
            status.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            return
        table.value = _table(hits, (state.unit_label, "cosine"))
        busy["refill"] = True
        try:
            feature.options = [(f"{u} (cos {s:.2f})", u) for u, s in hits]
            feature.value = hits[0][0]
        finally:
            busy["refill"] = False
        draw()

    concept.observe(refill, names="value")
    tau_slider.observe(refill, names="value")
    feature.observe(draw, names="value")
    chosen.observe(draw, names="value")
    show.on_click(draw)
    refill()
    box = W.VBox([W.HBox([concept, tau_slider]), W.HBox([W.VBox([feature, chosen, show]), table]), status, heatmaps])
    return {"widget": box, "parts": {"concept": concept, "tau": tau_slider, "feature": feature, "images": chosen,
                                     "show": show, "status": status, "table": table, "heatmaps": heatmaps}}
