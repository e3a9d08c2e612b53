"""Plots. Each function takes arrays, returns a matplotlib Figure, and never calls ``plt.show``."""

from __future__ import annotations

import io
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns


def loss_curves(history: dict, title: str = "Alignment loss") -> plt.Figure:
    """Train/validation loss per epoch from align.train_encoder's history; marks the best epoch."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    ax.plot(epochs, history["train_loss"], label="train")
    ax.plot(epochs, history["val_loss"], label="validation")
    ax.axvline(history["best_epoch"] + 1, color="grey", ls=":", label="best (kept)")
    ax.set(xlabel="epoch", ylabel="InfoNCE (concept + image)", title=title)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def score_bars(labels: Sequence[str], scores: Sequence[float], title: str, xlabel: str = "cosine similarity") -> plt.Figure:
    """Horizontal bars, best at the top (top units of a concept, top concepts of a unit)."""
    fig, ax = plt.subplots(figsize=(4.5, 0.35 * len(labels) + 1.2))
    sns.barplot(x=list(scores), y=[str(label) for label in labels], ax=ax, color="#4c72b0", orient="h")
    ax.set(xlabel=xlabel, ylabel="", title=title)
    fig.tight_layout()
    return fig


def image_grid(images_uint8: np.ndarray, titles: Sequence[str] | None = None, ncols: int = 8, size: float = 1.2,
               suptitle: str | None = None, overlays: np.ndarray | None = None, cmap: str = "jet",
               alpha: float = 0.5) -> plt.Figure:
    """A grid of images: images_uint8 (N, H, W, 3); optional ``overlays`` (N, H, W) heatmaps drawn
    on top, each scaled to its own max."""
    n = len(images_uint8)
    ncols = max(1, min(ncols, n))
    nrows = max(1, (n + ncols - 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images_uint8[i])
            if overlays is not None:
                peak = overlays[i].max()
                ax.imshow(overlays[i] / peak if peak > 0 else overlays[i], cmap=cmap, alpha=alpha, vmin=0, vmax=1)
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return fig


def activation_histogram(acts_n: np.ndarray, title: str, marks: dict[str, float] | None = None) -> plt.Figure:
    """Histogram of one unit's activations over the probe images; optional labelled vertical marks."""
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    ax.hist(np.asarray(acts_n), bins=40, color="#55a868")
    for label, x in (marks or {}).items():
        ax.axvline(x, color="k", ls="--")
        ax.text(x, ax.get_ylim()[1] * 0.9, f" {label}", fontsize=7)
    ax.set(xlabel="activation", ylabel="images", title=title)
    fig.tight_layout()
    return fig


def delta_accuracy_bars(table, title: str = "Delta-accuracy per method") -> plt.Figure:
    """Seaborn bars of a pipeline.intervention_table long table: x = method, hue = intervention,
    error bars = std over seeds."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    sns.barplot(data=table, x="method", y="delta_acc", hue="intervention", errorbar="sd", ax=ax)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(ylabel="Δ accuracy (percentage points)", xlabel="", title=title)
    fig.tight_layout()
    return fig


def intervention_panels(long, panel: str = "setting", title: str = "Delta-accuracy of editing each class's top units",
                        wrong_mark: str = "†") -> plt.Figure:
    """The paper's Table 2 as seaborn bars, one panel per value of column ``panel`` (e.g. model and
    units): x = method, hue = intervention, bar = mean over seeds, error bar = std.

    long: rows of pipeline.intervention_table (method, intervention, beta, delta_acc) plus the
    ``panel`` column. A bar whose mean moves against the expected direction (enhancement < 0,
    removal > 0) gets ``wrong_mark`` above it. Raises KeyError for a missing column.
    """
    panels = list(dict.fromkeys(long[panel]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.8, 3.6), squeeze=False, sharey=True)
    hue_order = list(dict.fromkeys(long["intervention"]))
    for ax, name in zip(axes[0], panels):
        sub = long[long[panel] == name]
        order = list(dict.fromkeys(sub["method"]))
        sns.barplot(data=sub, x="method", y="delta_acc", hue="intervention", order=order, hue_order=hue_order,
                    errorbar="sd", ax=ax, legend=ax is axes[0][-1])
        means = sub.groupby(["intervention", "method"])["delta_acc"].mean()
        for hi, interv in enumerate(hue_order):
            beta = float(sub.loc[sub["intervention"] == interv, "beta"].iloc[0]) if "beta" in sub else 1.0
            sign = {"enhance": 1, "remove": -1}.get(interv, 0 if beta == 1.0 else (1 if beta > 1.0 else -1))
            for mi, method in enumerate(order):
                m = means.get((interv, method))
                if m is not None and sign and m * sign < 0:
                    x = mi + (hi - (len(hue_order) - 1) / 2) * 0.8 / len(hue_order)
                    ax.text(x, m, wrong_mark, ha="center", va="bottom" if m >= 0 else "top", color="#d62728", fontsize=11)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xlabel="", ylabel="Δ accuracy (pp)", title=str(name))
        ax.tick_params(axis="x", rotation=45, labelsize=7)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    if axes[0][-1].get_legend() is not None:
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1, 1), frameon=False, fontsize=7, title=None)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def beta_curves(sweeps, title: str = "Dose-response") -> plt.Figure:
    """Lines of delta-accuracy against beta; ``sweeps``: DataFrame with method, beta, delta_acc."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    sns.lineplot(data=sweeps, x="beta", y="delta_acc", hue="method", marker="o", ax=ax)
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(1, color="grey", ls=":")
    ax.set(xlabel="β (scale factor)", ylabel="Δ accuracy (pp)", title=title)
    fig.tight_layout()
    return fig


def beta_curve_panels(sweeps, panel: str = "setting", title: str = "Dose-response: scale each class's top units by β") -> plt.Figure:
    """:func:`beta_curves` with one panel per value of column ``panel`` (shared y axis).

    sweeps: DataFrame with method, beta, delta_acc and ``panel`` (e.g. pipeline.beta_sweep_table
    rows of several models); several rows per (method, beta) (seeds) are averaged, the band
    spanning their min to max. Raises KeyError for a missing column.
    """
    panels = list(dict.fromkeys(sweeps[panel]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels) + 1.2, 3.2), squeeze=False, sharey=True)
    hue_order = list(dict.fromkeys(sweeps["method"]))
    for ax, name in zip(axes[0], panels):
        sns.lineplot(data=sweeps[sweeps[panel] == name], x="beta", y="delta_acc", hue="method", hue_order=hue_order,
                     marker="o", errorbar=("pi", 100), ax=ax, legend=ax is axes[0][-1])
        ax.axhline(0, color="k", lw=0.8)
        ax.axvline(1, color="grey", ls=":")
        ax.set(xlabel="β (scale factor)", ylabel="Δ accuracy (pp)", title=str(name))
    if axes[0][-1].get_legend() is not None:
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1, 1), frameon=False, fontsize=7, title=None)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def dose_response_panels(sweeps, title: str = "Dose-response with controls", random: str = "Random") -> plt.Figure:
    """One panel per method of a dose-response table (pipeline.beta_sweep_table of one setting):
    the method's curve, its matched-norm control ("<method> (matched norm)": random units of the
    same strength) and the ``random`` reference, delta-accuracy against beta (bands: min to max over
    seeds / draws). Methods are the rows that are neither controls nor the reference. Raises
    KeyError for a missing column, ValueError when no method is left."""
    names = list(dict.fromkeys(sweeps["method"]))
    methods = [m for m in names if not m.endswith("(matched norm)") and m != random]
    if not methods:
        raise ValueError("no method in the sweeps besides controls")
    fig, axes = plt.subplots(1, len(methods), figsize=(2.6 * len(methods) + 0.6, 2.8), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        for name, style in ((method, "-"), (f"{method} (matched norm)", "--"), (random, ":")):
            sub = sweeps[sweeps["method"] == name]
            if len(sub):
                grp = sub.groupby("beta")["delta_acc"]
                ax.plot(grp.mean().index, grp.mean().values, style, marker="o", ms=3,
                        label={method: "method", random: "random"}.get(name, "matched norm"))
                ax.fill_between(grp.min().index, grp.min().values, grp.max().values, alpha=0.15)
        ax.axhline(0, color="k", lw=0.8)
        ax.axvline(1, color="grey", ls=":")
        ax.set(xlabel="β", title=method)
    axes[0][0].set_ylabel("Δ accuracy (pp)")
    axes[0][-1].legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def trajectory_plot(layers: Sequence[str], sim_true: Sequence[float], sim_wrong: Sequence[float], true_label: str,
                    wrong_label: str, best_layer: int | None = None, overtake_layer: int | None = None,
                    title: str | None = None) -> plt.Figure:
    """The paper's Figure 4: cosine similarity to the true (blue) and wrong (orange) label per layer,
    with the layer where the truth dominates most (star) and where the wrong label overtakes (cross)."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = np.arange(len(layers))
    ax.plot(x, sim_true, "-o", color="#1f77b4", label=f"GT: {true_label}")
    ax.plot(x, sim_wrong, "-o", color="#ff7f0e", label=f"Mis.: {wrong_label}")
    if best_layer is not None:
        ax.plot(best_layer, sim_true[best_layer], "*", color="#1f77b4", ms=16, label="GT dominates most")
    if overtake_layer is not None:
        ax.plot(overtake_layer, sim_wrong[overtake_layer], "X", color="#d62728", ms=12, label="Mis. overtakes")
    ax.set_xticks(x, layers, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="cosine similarity", title=title or "Semantic trajectory across layers")
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig


def figure_png(fig: plt.Figure, dpi: int = 90) -> bytes:
    """PNG bytes of a figure (for ipywidgets.Image); closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def to_uint8(images_n3hw, mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5) -> np.ndarray:
    """Undo a (x - mean) / std normalisation for display: (N, 3, H, W) tensor -> (N, H, W, 3) uint8.

    The defaults fit the toy models and ToyCLIP (images in [-1, 1]).
    """
    x = np.asarray(images_n3hw.detach().cpu() if hasattr(images_n3hw, "detach") else images_n3hw, dtype=np.float32)
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.clip((x * s + m) * 255.0, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def thumbnails(dataset, indices: Sequence[int], size: int = 96) -> np.ndarray:
    """(N, size, size, 3) uint8 pictures of the images ``indices`` of a dataset (anything
    datasets.as_dataset takes), for grids and panels. Raises the dataset's errors, and TypeError for
    preprocessed tensors (no colours to show: use :func:`to_uint8` with their normalisation)."""
    from .datasets import as_dataset

    ds = as_dataset(dataset, progress=False)
    out = []
    for i in indices:
        image = ds[int(i)][0]
        if not hasattr(image, "convert"):
            raise TypeError(f"image {i} of {ds.name} is a preprocessed tensor; use viz.to_uint8 with its normalisation")
        out.append(np.asarray(image.convert("RGB").resize((size, size))))
    return np.stack(out)


def dataset_grid(dataset, indices: Sequence[int] = range(16), class_names: Sequence[str] | None = None, ncols: int = 8,
                 size: float = 1.2, thumb: int = 96) -> plt.Figure:
    """The images ``indices`` of a dataset (anything datasets.as_dataset takes), titled with their
    class name (``class_names``, else the dataset's ``classes``; "?" for an unknown label), each
    shown at ``thumb`` pixels. Raises as :func:`thumbnails`."""
    from .datasets import as_dataset

    ds = as_dataset(dataset, progress=False)
    names = list(class_names) if class_names is not None else ds.classes
    labels = [ds[int(i)][1] for i in indices]
    titles = [names[y] if names is not None and 0 <= y < len(names) else "?" for y in labels]
    return image_grid(thumbnails(ds, indices, thumb), titles, ncols=ncols, size=size)
