"""One streaming harness for steering experiments: delta-accuracy tables, dose-response, controls.

The protocol (the paper's Table 2, extended by issue 17): for each class c, take the units a
selector picks for c (its top-tau), edit them (scale by beta: 0 = removal, 2 = enhancement) during
the forward pass, and compare with the unedited model

- on c's own images: ``delta_acc`` = accuracy after minus before;
- on a seeded sample of ``n_other`` images of the other classes: ``delta_other`` = their accuracy
  on their own labels after minus before, and ``flip_to_class`` = the share of them predicted as
  c after minus before.

``specific = delta_acc - delta_other`` separates what an edit does to its class from what it does
to every class: removing units that only class c needs gives specific ~ delta_acc, removing units
that every class needs gives specific ~ 0. All figures are percentage points; a table row averages
them over the classes.

How it runs (:func:`intervention_table`): the images are read once, chunk by chunk (a tensor, or a
dataset preprocessed item by item), so memory is bounded by one chunk whatever their number. Per
chunk: the unedited predictions, and

- where the model splits at the layer (:func:`miclip_nb.steer.tail_module`), the layer's outputs
  once; every requested edit (each class's unit set under each selector and each beta) then runs
  only the rest of the model on the rows it concerns;
- otherwise a hook on the layer edits, within one forward pass, each row with the edit of the class
  that row is evaluated for (rows grouped by edit; an image in several edits' rows is repeated).

Either way the rows of all the chunk's edits are packed into batches of ``batch_size``: a chunk
costs one forward over its images plus ceil(edited rows / batch_size) forwards (or tail passes),
however many classes, selectors and betas. Scaling by 1 is the identity (no forward); identical
(class, unit set, beta) edits are evaluated once and shared across selectors and, through
``cache``, across calls (a beta sweep after the table). Images whose pixels or unedited logits are
NaN or inf raise :class:`~miclip_nb._checks.NonFiniteInputError` naming them, or with
``on_bad="skip"`` are left out with a warning (then a first pass over the data finds them, so that
the other-class samples, drawn before the main pass, hold none of them). On CUDA every forward runs
under bf16 autocast.

Memory: the images of one chunk (on the CPU), the layer outputs of one chunk (on the model's
device, split models only), one batch, and O(N) integers (labels, predictions) plus the
classes' other-class samples (C x n_other indices).
"""

from __future__ import annotations

import bisect
import warnings
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ._checks import (SHOWN_INDICES, NonFiniteInputError, check_on_bad, describe_indices, nonfinite_batch,
                      report_nonfinite, shown_values)
from ._progress import bars_off
from .capture import resolve_layer
from .select import UnitSelector
from .steer import MODES, PAPER_BETAS, SplitError, _model_device, _recorded_output, _screened_forward, neuron_edit, tail_module

#: How a class's other-class sample is drawn: "per_class" (a generator seeded ``seed`` for each
#: class: the sample does not depend on the other classes in the call) or "shared" (one generator
#: for the classes in turn: steer.class_deltas' convention).
_STREAMS = ("per_class", "shared")
#: The betas of :func:`dose_response`.
DOSE_BETAS: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)

PER_CLASS_COLUMNS = ["method", "intervention", "beta", "seed", "class", "n", "acc_base", "acc_edit", "delta_acc",
                     "n_other", "other_acc_base", "other_acc_edit", "delta_other", "to_class_base", "to_class_edit",
                     "flip_to_class"]
LONG_COLUMNS = ["method", "intervention", "beta", "seed", "n_classes", "delta_acc", "delta_other", "specific",
                "flip_to_class"]


# --------------------------------------------------------------------------------------------
# The evaluation images


class _Images:
    """The evaluation images, read chunk by chunk: an (N, 3, H, W) tensor of preprocessed images,
    or a dataset of (PIL image or preprocessed tensor, label) items (PIL images go through
    ``preprocess``)."""

    def __init__(self, data, labels, preprocess: Callable | None, memo: dict | None = None):
        if not isinstance(data, (torch.Tensor, torch.utils.data.Subset)):
            from .datasets import as_dataset

            data = as_dataset(data, progress=False)  # a folder, a spec, arrays, a torch Dataset, ...
        self.data, self.preprocess = data, preprocess
        self.is_tensor = isinstance(data, torch.Tensor)
        self.n = int(data.shape[0]) if self.is_tensor else len(data)
        if self.n == 0:
            raise ValueError("no evaluation images")
        if labels is None and self.is_tensor:
            raise ValueError("images given as a tensor need their labels (labels=...)")
        if labels is None:
            labels = _dataset_labels(data, self.n, memo)
        self.labels = torch.as_tensor(labels).long().flatten()
        if self.labels.numel() != self.n:
            raise ValueError(f"{self.labels.numel()} labels for {self.n} images")
        if bool((self.labels < 0).any()):
            raise ValueError(f"{int((self.labels < 0).sum())} of the {self.n} evaluation images have no label (-1): "
                             "accuracy needs labelled images (class subfolders, or an (images, labels) pair)")

    def item(self, i: int) -> torch.Tensor:
        img = self.data[i][0]
        if isinstance(img, torch.Tensor):
            return img
        if self.preprocess is None:
            raise TypeError(f"item {i} of the dataset is a {type(img).__name__}, not a tensor, and there is no "
                            "preprocess to apply: pass a zoo.TargetModel (module + preprocess) as target")
        return self.preprocess(img)

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        if self.is_tensor:
            return self.data[start:stop]
        return torch.stack([self.item(i) for i in range(start, stop)])

    def example(self) -> torch.Tensor:
        """Two finite images (NaN and inf zeroed) to trace a split on."""
        return torch.nan_to_num(self.chunk(0, min(2, self.n)), nan=0.0, posinf=0.0, neginf=0.0)


def _classes_with_images(labels: torch.Tensor, classes) -> list[int]:
    """The classes to evaluate: ``classes`` (default: every label present) less those without an
    image, which are named in a warning. Raises ValueError when none is left."""
    present = set(labels.tolist())
    wanted = sorted(present) if classes is None else [int(c) for c in classes]
    missing = [c for c in wanted if c not in present]
    if missing and len(missing) == len(wanted):
        raise ValueError(f"none of the classes {describe_classes(missing)} has an evaluation image")
    if missing:
        warnings.warn(f"classes {describe_classes(missing)} have no evaluation image: left out", stacklevel=3)
    return [c for c in wanted if c in present]


def describe_classes(classes: Sequence[int]) -> str:
    """"[3, 7, 9]" or "[3, 7, 9, 12, 15, ...] (40 classes)"."""
    return f"[{shown_values(classes)}]" + (f" ({len(classes)} classes)" if len(classes) > SHOWN_INDICES else "")


def _label_attribute(dataset) -> torch.Tensor | None:
    """The labels a dataset lists (``labels`` / ``targets``, through torch Subsets), or None."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner = _label_attribute(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    for attr in ("labels", "targets"):
        found = getattr(dataset, attr, None)
        if found is not None and not callable(found) and len(found) == len(dataset):
            return torch.as_tensor(np.asarray(found)).long()
    return None


def _dataset_labels(dataset, n: int, memo: dict | None) -> torch.Tensor:
    """A dataset's labels: its ``labels`` / ``targets`` attribute (also through a torch Subset),
    else one pass over its items (kept in ``memo`` for later calls)."""
    found = _label_attribute(dataset)
    if found is not None:
        return found
    if memo is not None and ("_labels", n) in memo:
        return memo[("_labels", n)]
    labels = torch.as_tensor([int(dataset[i][1]) for i in range(n)])
    if memo is not None:
        memo[("_labels", n)] = labels
    return labels


def _model_and_preprocess(target) -> tuple[nn.Module, Callable | None]:
    if isinstance(target, nn.Module):
        return target, None
    module = getattr(target, "module", None)
    if not isinstance(module, nn.Module):
        raise TypeError(f"target must be a zoo.TargetModel or an nn.Module, got {type(target).__name__}")
    return module, getattr(target, "preprocess", None)


# --------------------------------------------------------------------------------------------
# The pass over the data


def _other_samples(labels: torch.Tensor, kept: torch.Tensor, classes: Sequence[int], n_other: int, seed: int,
                   stream: str) -> dict[int, torch.Tensor]:
    """Each class's other-class sample: up to ``n_other`` image indices (sorted) drawn without
    replacement from the kept images of the other classes: the first ``n_other`` of a seeded
    permutation of them (in index order). Classes without kept images of their own get none, and
    with ``stream="shared"`` draw nothing from the generator."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for c in classes:
        if not bool(((labels == c) & kept).any()):
            continue
        if stream == "per_class":
            gen = torch.Generator().manual_seed(seed)
        others = torch.nonzero((labels != c) & kept).flatten()
        out[int(c)] = others[torch.randperm(others.numel(), generator=gen)[:n_other]].sort().values
    return out


def _apply_pieces(acts: torch.Tensor, pieces: list[tuple[int, int, Callable]], inplace: bool = False) -> torch.Tensor:
    """``acts`` (B, ...) with rows lo:hi edited by each piece's edit (written into ``acts`` itself
    when ``inplace``, for a tensor nothing else holds)."""
    if len(pieces) == 1 and pieces[0][0] == 0 and pieces[0][1] == acts.shape[0]:
        return pieces[0][2](acts)
    if not inplace:
        return torch.cat([edit(acts[lo:hi]) for lo, hi, edit in pieces])
    for lo, hi, edit in pieces:
        acts[lo:hi] = edit(acts[lo:hi])
    return acts


class _RowEditHook:
    """A forward hook on the layer that edits each row of the batch with its own edit (``pieces``);
    inactive while ``pieces`` is None."""

    def __init__(self):
        self.pieces: list[tuple[int, int, Callable]] | None = None

    def __call__(self, _module, _inputs, output):
        if self.pieces is None:
            return None
        if isinstance(output, tuple):
            return (_apply_pieces(output[0], self.pieces),) + output[1:]
        return _apply_pieces(output, self.pieces)


class _Pass:
    """What a pass found: ``base`` (N,) unedited predictions (-1: image left out), ``samples``
    {class: other-class indices} and ``counts`` {edit key: [own correct, others correct, others
    predicted as the class]}."""

    def __init__(self, base, samples, counts):
        self.base, self.samples, self.counts = base, samples, counts


@torch.no_grad()
def _run(model: nn.Module, images: _Images, layer: str, todo: Mapping[tuple, tuple[int, object, float]],
         classes: Sequence[int], *, n_other: int, seed: int, stream: str, mode: str, edit_factory: Callable | None,
         batch_size: int, chunk_size: int, on_bad: str, split: str, memo: dict, layer_outputs: torch.Tensor | None = None,
         base: torch.Tensor | None = None, progress: bool = False, desc: str = "steer") -> _Pass:
    """Evaluate the edits ``todo`` (key -> (class, units, beta)) in one pass over ``images``.

    split: "auto" (the tail where the model splits at ``layer``, else the hook), "tail" (raise
    SplitError where it does not) or "hook" (full forwards). layer_outputs / base: the layer's
    outputs (N, ...) and unedited predictions of every image, precomputed (then no full forward).
    """
    check_on_bad(on_bad)
    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk_size and batch_size must be positive, got {chunk_size} and {batch_size}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if layer_outputs is not None and (base is None or split != "tail"):
        raise ValueError("precomputed layer outputs need the unedited predictions and split='tail'")
    labels, n = images.labels, images.n
    device = _model_device(model)
    tail = None
    if split not in ("auto", "tail", "hook"):
        raise ValueError(f"split must be auto, tail or hook, got {split!r}")
    if split == "tail" or (split == "auto" and todo and memo.get(("_split", layer), True)):
        try:
            tail = tail_module(model, layer, images.example().to(device))
            memo[("_split", layer)] = True
        except SplitError:
            if split == "tail":
                raise
            memo[("_split", layer)] = False
    if base is None and on_bad == "skip":  # find the images to leave out before drawing the samples
        base = _base_predictions(model, images, batch_size, chunk_size, device, on_bad, progress, desc)
    kept = base >= 0 if base is not None else torch.ones(n, dtype=torch.bool)
    samples = _other_samples(labels, kept, classes, n_other, seed, stream)
    counts = {key: [0, 0, 0] for key in todo}
    if not todo and base is not None:
        return _Pass(base, samples, counts)

    make_edit = edit_factory or neuron_edit
    edits = {key: make_edit(units, mode, beta) for key, (_c, units, beta) in todo.items()}
    new_base = torch.full((n,), -1, dtype=torch.long) if base is None else base
    bad_inputs, bad_outputs = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    failing = False  # a non-finite image was found (on_bad="raise"): only screen the rest, then raise
    hook = _RowEditHook()
    handle = resolve_layer(model, layer).register_forward_hook(hook) if tail is None and todo else None
    try:
        for start in tqdm(range(0, n, chunk_size), desc=desc, disable=bars_off(progress)):
            stop = min(n, start + chunk_size)
            acts = x = None
            if layer_outputs is not None:
                acts = layer_outputs[start:stop].to(device)
            else:
                x = images.chunk(start, stop)
                recorded: list[torch.Tensor] = []
                if tail is not None and todo and not failing:
                    with _recorded_output(model, layer) as captured:
                        preds, b_in, b_out = _screened_forward(model, x, batch_size, device,
                                                               after_batch=lambda: recorded.append(captured["out"]))
                    acts = torch.cat(recorded)
                elif base is None:
                    preds, b_in, b_out = _screened_forward(model, x, batch_size, device)
                if base is None:
                    new_base[start:stop], bad_inputs[start:stop], bad_outputs[start:stop] = preds, b_in, b_out
                    failing = failing or bool((b_in | b_out).any())
            if todo and not failing:
                _edit_chunk(model, tail, hook, acts if tail is not None else x, start, labels[start:stop],
                            (new_base[start:stop] >= 0), samples, todo, edits, counts, batch_size, device)
    finally:
        if handle is not None:
            handle.remove()
    if base is None:  # on_bad="raise" (skip found them before): name every non-finite image
        report_nonfinite(bad_inputs, bad_outputs, "raise")
    return _Pass(new_base, samples, counts)


def _base_predictions(model, images: _Images, batch_size: int, chunk_size: int, device, on_bad: str,
                      progress: bool, desc: str) -> torch.Tensor:
    """Unedited predictions (N,), chunk by chunk; images with non-finite pixels or logits are -1
    (on_bad="skip", with a warning naming them) or raise NonFiniteInputError naming them."""
    n = images.n
    preds = torch.full((n,), -1, dtype=torch.long)
    bad_inputs, bad_outputs = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    for start in tqdm(range(0, n, chunk_size), desc=f"{desc}: screen", disable=bars_off(progress)):
        stop = min(n, start + chunk_size)
        preds[start:stop], bad_inputs[start:stop], bad_outputs[start:stop] = _screened_forward(
            model, images.chunk(start, stop), batch_size, device)
    keep = report_nonfinite(bad_inputs, bad_outputs, on_bad, stacklevel=5)
    return preds.masked_fill(~keep, -1)


def _edit_chunk(model, tail, hook: _RowEditHook, inputs: torch.Tensor, start: int, labels: torch.Tensor,
                kept: torch.Tensor, samples: dict[int, torch.Tensor], todo, edits, counts, batch_size: int,
                device) -> None:
    """Every edit of ``todo`` on the chunk's rows it concerns (the class's kept images and its
    other-class sample), all packed into batches: the tail on the edited layer outputs
    ``inputs``, or the model on the images ``inputs`` with the row-wise edit hook."""
    own_rows = {}
    other_rows = {}
    segments = []  # (key, first row in the stream, number of own rows, end)
    rows = []
    total = 0
    for key, (c, _units, _beta) in todo.items():
        if c not in samples:  # no kept image of its own
            continue
        if c not in own_rows:
            own_rows[c] = torch.nonzero((labels == c) & kept).flatten()
            s = samples[c]
            lo, hi = int(torch.searchsorted(s, start)), int(torch.searchsorted(s, start + labels.numel()))
            other_rows[c] = s[lo:hi] - start
        r = torch.cat([own_rows[c], other_rows[c]])
        if r.numel() == 0:
            continue
        segments.append((key, total, own_rows[c].numel(), total + r.numel()))
        rows.append(r)
        total += r.numel()
    if not total:
        return
    rows_all = torch.cat(rows)
    starts = [seg[1] for seg in segments]
    preds = torch.empty(total, dtype=torch.long)
    bad = torch.zeros(total, dtype=torch.bool)
    for b0 in range(0, total, batch_size):
        b1 = min(total, b0 + batch_size)
        pieces = []
        for key, s0, _n_own, s1 in segments[max(0, bisect.bisect_right(starts, b0) - 1):]:
            if s0 >= b1:
                break
            pieces.append((max(s0, b0) - b0, min(s1, b1) - b0, edits[key]))
        x = inputs[rows_all[b0:b1].to(inputs.device)].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if tail is not None:
                logits = tail(_apply_pieces(x, pieces, inplace=x.data_ptr() != inputs.data_ptr()))
            else:
                hook.pieces = pieces
                try:
                    logits = model(x)
                finally:
                    hook.pieces = None
        found = nonfinite_batch(x, logits)
        if found is not None:
            bad[b0:b1] = found[0] | found[1]
        preds[b0:b1] = logits.argmax(-1).cpu()
    for key, s0, n_own, s1 in segments:
        c, _units, beta = todo[key]
        if bool(bad[s0:s1].any()):
            where = (rows_all[s0:s1][bad[s0:s1]] + start).tolist()
            raise NonFiniteInputError(
                f"editing the units of class {c} ({key[2]} x{beta:g}) makes the model's logits NaN or inf for "
                f"{describe_indices(where)} (of {s1 - s0} images it was run on in this chunk) whose unedited logits "
                "are finite; check the edit's mode and beta", where)
        p = preds[s0:s1]
        own_p, other_p = p[:n_own], p[n_own:]
        other_labels = labels[rows_all[s0 + n_own:s1]]
        acc = counts[key]
        acc[0] += int((own_p == c).sum())
        acc[1] += int((other_p == other_labels).sum())
        acc[2] += int((other_p == c).sum())


# --------------------------------------------------------------------------------------------
# Tables


def _pct(count: int, n: int) -> float:
    """count / n in percent, NaN for n == 0 (computed as the float32 mean of a bool tensor is,
    so that the figures equal those of earlier releases bit for bit)."""
    if n == 0:
        return float("nan")
    return float(torch.tensor(count, dtype=torch.float32) / n) * 100


def _units_key(units) -> tuple[int, ...]:
    return tuple(sorted(int(u) for u in torch.as_tensor(units).flatten().tolist()))


class FixedSelector:
    """A selector that returns precomputed unit sets: ``select(c, tau)`` is ``sets[c]``.

    sets: {class index: (k,) unit indices}; tau: the set size they were built for (None: any tau
    is accepted and ignored). Raises KeyError for a class without a set, ValueError for another tau.
    """

    def __init__(self, name: str, sets: Mapping[int, torch.Tensor], tau: int | None = None):
        self.name, self.tau = name, tau
        self.sets = {int(c): torch.as_tensor(u, dtype=torch.long).flatten() for c, u in sets.items()}

    def select(self, concept: int, tau: int) -> torch.Tensor:
        """The set built for ``concept``."""
        if self.tau is not None and tau != self.tau:
            raise ValueError(f"{self.name}: its sets hold {self.tau} units, asked for tau={tau}")
        if int(concept) not in self.sets:
            raise KeyError(f"{self.name} has no units for class {concept}")
        return self.sets[int(concept)]


def _per_class(model: nn.Module, images: _Images, layer: str, jobs: Sequence[tuple[str, int, Mapping[int, object]]],
               betas: Mapping[str, float], classes: Sequence[int], *, memo: dict, stream: str, n_other: int, seed: int,
               mode: str, edit_factory: Callable | None, batch_size: int, chunk_size: int, on_bad: str, split: str,
               layer_outputs: torch.Tensor | None = None, base: torch.Tensor | None = None, progress: bool = False,
               desc: str = "steer") -> pd.DataFrame:
    """The per-class frame (:data:`PER_CLASS_COLUMNS`) of every job (method, seed, {class: units})
    under every beta, evaluating in one pass only the edits not in ``memo``."""
    if n_other < 0:
        raise ValueError(f"n_other must be >= 0, got {n_other}")
    edit_id = None if edit_factory is None else id(edit_factory)
    labels = images.labels

    def key(c: int, units, beta: float) -> tuple:
        return ("edit", layer, mode, float(beta), edit_id, int(c), _units_key(units), n_other, seed, stream)

    def identity(beta: float) -> bool:
        return mode == "scale" and float(beta) == 1.0

    if base is None and ("_base", images.n) in memo:
        base = memo[("_base", images.n)]
    todo = {}
    for _method, _i, picked in jobs:
        for beta in betas.values():
            for c, units in picked.items():
                k = key(c, units, beta)
                if not identity(beta) and k not in memo:
                    todo[k] = (int(c), units, float(beta))
    found = _run(model, images, layer, todo, classes, n_other=n_other, seed=seed, stream=stream, mode=mode,
                 edit_factory=edit_factory, batch_size=batch_size, chunk_size=chunk_size, on_bad=on_bad, split=split,
                 memo=memo, layer_outputs=layer_outputs, base=base, progress=progress, desc=desc)
    if layer_outputs is None:
        memo[("_base", images.n)] = found.base
    memo.update({k: tuple(v) for k, v in found.counts.items()})
    base, kept = found.base, found.base >= 0

    stats = {}  # class -> (n, own correct, n others, others correct, others predicted as c), unedited
    for c in found.samples:
        own = (labels == c) & kept
        others = found.samples[c]
        stats[c] = (int(own.sum()), int((base[own] == c).sum()), others.numel(),
                    int((base[others] == labels[others]).sum()), int((base[others] == c).sum()))
    rows = []
    for method, i, picked in jobs:
        for interv, beta in betas.items():
            for c, units in picked.items():
                c = int(c)
                if c not in stats:  # no kept image of its own
                    continue
                n, own_ok, m, other_ok, to_c = stats[c]
                edited = (own_ok, other_ok, to_c) if identity(beta) else memo[key(c, units, beta)]
                acc_base, acc_edit = _pct(own_ok, n), _pct(edited[0], n)
                oth_base, oth_edit = _pct(other_ok, m), _pct(edited[1], m)
                to_base, to_edit = _pct(to_c, m), _pct(edited[2], m)
                rows.append({"method": method, "intervention": interv, "beta": float(beta), "seed": i, "class": c,
                             "n": n, "acc_base": acc_base, "acc_edit": acc_edit, "delta_acc": acc_edit - acc_base,
                             "n_other": m, "other_acc_base": oth_base, "other_acc_edit": oth_edit,
                             "delta_other": oth_edit - oth_base, "to_class_base": to_base, "to_class_edit": to_edit,
                             "flip_to_class": to_edit - to_base})
    return pd.DataFrame(rows, columns=PER_CLASS_COLUMNS)


def _long(per_class: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, intervention, beta, seed): the means over classes (in class order)."""
    rows = []
    for (method, interv, beta, seed), g in per_class.groupby(["method", "intervention", "beta", "seed"], sort=False):
        d_acc, d_other = float(np.mean(g["delta_acc"].tolist())), float(np.mean(g["delta_other"].tolist()))
        rows.append({"method": method, "intervention": interv, "beta": beta, "seed": seed, "n_classes": len(g),
                     "delta_acc": d_acc, "delta_other": d_other, "specific": d_acc - d_other,
                     "flip_to_class": float(np.mean(g["flip_to_class"].tolist()))})
    return pd.DataFrame(rows, columns=LONG_COLUMNS)


def _betas(betas) -> dict[str, float]:
    if isinstance(betas, Mapping):
        return {str(k): float(v) for k, v in betas.items()}
    return {f"x{float(b):g}": float(b) for b in betas}


def intervention_table(
    target, data, layer: str, selectors: Mapping[str, Sequence[UnitSelector] | UnitSelector], *,
    labels=None, tau: int = 5, betas: Mapping[str, float] | Sequence[float] = PAPER_BETAS,
    classes: Sequence[int] | None = None, edit_factory: Callable | None = None, mode: str = "scale",
    n_other: int = 256, seed: int = 0, batch_size: int = 256, chunk_size: int = 2048, cache: dict | None = None,
    progress: bool = True, per_class: bool = False, on_bad: str = "raise",
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """The delta-accuracy table: for each method (a list of selectors: seeds or draws) and each
    intervention (name -> beta), the class-averaged effect of editing each class's top-``tau`` units.

    target: a zoo.TargetModel (module + preprocess) or an nn.Module. data: anything
    datasets.as_dataset takes (a folder, a spec, arrays, a torch Dataset), or an (N, 3, H, W) tensor
    of preprocessed images (then ``labels`` (N,) is required), or a dataset of (PIL image or
    preprocessed tensor, label) items, read ``chunk_size`` images at a time (PIL images go through
    ``target.preprocess``; labels come from ``labels``, else its ``labels``/``targets`` (also
    through a torch Subset), else one pass over it). selectors: {method name: [selector, ...]} (a single selector is a list of one);
    each selector's ``select(c, tau)`` gives class c's units. betas: {intervention name: beta} or a
    sequence of betas (named "x<beta>"). classes: default every label present; classes without
    images are left out. ``edit_factory(units, mode, beta)``: the edit (default neurons,
    steer.neuron_edit; ``sae.sae_edit_factory(sae)`` for SAE features). n_other: other-class images
    per class (a sample drawn with a generator seeded ``seed``, the same for every beta and
    selector; 0: delta_other, specific and flip_to_class are NaN). batch_size: rows per forward
    pass; chunk_size: images read and held at a time. cache: a dict to pass again to later calls on
    the same model and data (a beta sweep: evaluated edits, unedited predictions and labels are
    reused; images an earlier call left out stay out). on_bad: images with NaN/inf pixels or
    unedited logits raise ("raise") or are left out with a warning ("skip", at the cost of a first
    pass that finds them). See the module docstring for how the pass runs and what it keeps in
    memory.

    Returns the long table, one row per (method, intervention, beta, seed = selector index):
    n_classes, delta_acc, delta_other, specific (= delta_acc - delta_other), flip_to_class (means
    over classes, percentage points). With ``per_class=True`` returns (long, per-class table), the
    latter with one row per class as well: class, n, acc_base, acc_edit, delta_acc, n_other,
    other_acc_base, other_acc_edit, delta_other, to_class_base, to_class_edit, flip_to_class.
    Raises NonFiniteInputError (images with NaN/inf pixels or logits, ``on_bad="raise"``; an edit
    that makes a kept image's logits non-finite, always), ValueError (bad arguments, labels that do
    not match the images), TypeError (a dataset of PIL images without a preprocess),
    LayerNotFoundError (unknown layer).
    """
    model, preprocess = _model_and_preprocess(target)
    memo = cache if cache is not None else {}
    images = _Images(data, labels, preprocess, memo)
    classes = _classes_with_images(images.labels, classes)
    jobs = []
    for name, sels in selectors.items():
        sels = [sels] if hasattr(sels, "select") else list(sels)
        jobs += [(name, i, {c: sel.select(c, tau) for c in classes}) for i, sel in enumerate(sels)]
    table = _per_class(model, images, layer, jobs, _betas(betas), classes, memo=memo, stream="per_class",
                       n_other=n_other, seed=seed, mode=mode, edit_factory=edit_factory, batch_size=batch_size,
                       chunk_size=chunk_size, on_bad=on_bad, split="auto", progress=progress, desc="interventions")
    long = _long(table)
    return (long, table) if per_class else long


def dose_response(target, data, layer: str, selectors: Mapping[str, Sequence[UnitSelector] | UnitSelector],
                  betas: Sequence[float] = DOSE_BETAS, **kwargs) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Dose-response: :func:`intervention_table` with one intervention per beta (named "x<beta>"),
    e.g. scale 0 (removal) .. 3. Pass the ``cache`` of an earlier table to reuse its edits (beta 0
    and 2 of the paper's table) and unedited predictions. Same arguments, returns and errors as
    :func:`intervention_table` (long table: one row per method, beta and selector)."""
    return intervention_table(target, data, layer, selectors, betas=list(betas), **kwargs)


# --------------------------------------------------------------------------------------------
# Random units of the same strength


@torch.no_grad()
def mean_abs_activation(store, layer: str | None = None) -> torch.Tensor:
    """(U,) mean |activation| of each unit over an activation store (store.ActivationStore, its
    ``acts/<layer>`` field of pooled activations (N, U)), streamed shard by shard: the strength
    :func:`matched_norm_selectors` matches. Raises KeyError for a layer the store lacks."""
    from .store import acts_field

    field = acts_field(layer or store.layers[0])
    total, n = None, 0
    for shard in store.iter_shards([field]):
        a = shard[field].double().abs().flatten(1) if shard[field].ndim > 2 else shard[field].double().abs()
        total = a.sum(0) if total is None else total + a.sum(0)
        n += a.shape[0]
    return (total / max(n, 1)).float()


def matched_norm_selectors(selector: UnitSelector, n_units: int, acts_norm_u: torch.Tensor, classes: Sequence[int],
                           tau: int = 5, n_draws: int = 10, seed: int = 0, *, tol: float = 0.05, pool: int = 20,
                           max_swaps: int = 1000, name: str | None = None) -> list[FixedSelector]:
    """A random control of the same strength as a method: for each class, random unit sets whose
    summed mean activation norm matches that of the set ``selector`` picks.

    acts_norm_u: (U,) each unit's mean |activation| (e.g. :func:`mean_abs_activation`); n_units: U.
    Sampling, per class c and draw d (a numpy generator seeded (seed, d, c), so a set depends on
    nothing else), with S = ``selector.select(c, tau)`` and target = the sum of its norms:

    1. each unit of S (strongest first) is replaced by a unit drawn uniformly among the ``pool``
       units whose norm is closest to its own, S and the units already drawn left out;
    2. while the drawn set R misses the target by more than ``tol`` (relative: |sum R - target| >
       tol * target; a unit near the top or bottom of the norms has neighbours on one side only,
       so step 1 can miss), a random unit of R is swapped for a random unit outside S and R, the
       swap kept only when it brings the sum closer (at most ``max_swaps`` proposals).

    Each set thus has |S| distinct units, none of S, summed norm within ``tol`` of S's, and units
    of about the strength of those they stand for.
    Returns ``n_draws`` FixedSelectors (name: ``name`` or "<selector name> matched-norm random"),
    each with one set per class. Raises ValueError for a norm vector of another length than
    ``n_units``, non-finite or negative norms, fewer than |S| units outside S, or a class whose sum
    no set reaches within ``tol`` in ``max_swaps`` proposals (the method picks units far stronger
    or weaker than the rest: widen ``tol``).
    """
    norms = torch.as_tensor(acts_norm_u, dtype=torch.float64).flatten()
    if norms.numel() != n_units:
        raise ValueError(f"acts_norm_u has {norms.numel()} entries for {n_units} units")
    if not bool(torch.isfinite(norms).all()) or bool((norms < 0).any()):
        raise ValueError("acts_norm_u must be finite and non-negative (mean |activation| per unit)")
    if pool < 1 or n_draws < 1:
        raise ValueError(f"pool and n_draws must be positive, got {pool} and {n_draws}")
    values = norms.numpy()
    label = name or f"{getattr(selector, 'name', 'selector')} matched-norm random"
    sets: list[dict[int, torch.Tensor]] = [{} for _ in range(n_draws)]
    for c in classes:
        chosen = torch.as_tensor(selector.select(int(c), tau), dtype=torch.long).flatten().numpy()
        k = len(chosen)
        if n_units - k < k:
            raise ValueError(f"class {c}: {k} units to match but only {n_units - k} units outside the method's set")
        target = float(values[chosen].sum())
        for d in range(n_draws):
            rng = np.random.default_rng([seed, d, int(c)])
            free = np.ones(n_units, dtype=bool)
            free[chosen] = False
            drawn = []
            for u in chosen[np.argsort(-values[chosen], kind="stable")]:
                candidates = np.flatnonzero(free)
                near = candidates[np.argsort(np.abs(values[candidates] - values[u]), kind="stable")[:pool]]
                pick = int(rng.choice(near))
                drawn.append(pick)
                free[pick] = False
            miss = float(values[drawn].sum()) - target
            for _ in range(max_swaps):
                if abs(miss) <= tol * target:
                    break
                i, new = int(rng.integers(k)), int(rng.choice(np.flatnonzero(free)))
                changed = miss - values[drawn[i]] + values[new]
                if abs(changed) < abs(miss):
                    free[drawn[i]], free[new] = True, False
                    drawn[i], miss = new, changed
            if abs(miss) > tol * target:
                raise ValueError(f"class {c}: no random set within {tol:.0%} of the method's summed norm "
                                 f"({target:.4g}) after {max_swaps} swaps; widen tol")
            sets[d][int(c)] = torch.tensor(drawn, dtype=torch.long)
    return [FixedSelector(label, s, tau) for s in sets]
