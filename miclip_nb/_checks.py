"""Non-finite values (NaN, inf) in images and in what a model computes from them.

A NaN image fed to a classifier yields NaN logits, and ``argmax`` of NaN logits is a valid-looking
class; averaged into an accuracy or a trajectory it becomes a plausible number. The functions that
turn images into results (:func:`miclip_nb.steer.predict`, :func:`miclip_nb.diagnose.diagnose`,
...) screen every batch with :func:`nonfinite_batch` and then either raise
:class:`NonFiniteInputError` naming the images, or, when the caller passed ``on_bad="skip"``,
leave those images out with a warning that names them (:func:`report_nonfinite`).
"""

from __future__ import annotations

import warnings

import torch

#: What to do with images whose pixels, or whose model outputs, are NaN or inf.
ON_BAD = ("raise", "skip")
#: How many indices a message lists before it says "..." (the count is always given).
SHOWN_INDICES = 5


class NonFiniteInputError(ValueError):
    """Images that hold NaN or inf, or on which the model computes NaN or inf.

    ``indices``: all the offending image indices (positions in the images the caller passed).
    """

    def __init__(self, message: str, indices: list[int]):
        super().__init__(message)
        self.indices = indices


def check_on_bad(on_bad: str) -> None:
    """Raise ValueError unless ``on_bad`` is one of :data:`ON_BAD`."""
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """(N,) bool on CPU: which rows of ``x`` (N, ...) hold a NaN or inf."""
    finite = torch.isfinite(x)
    return ~(finite.flatten(1) if x.ndim > 1 else finite[:, None]).all(1).cpu()


def nonfinite_batch(inputs: torch.Tensor, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """None when ``inputs`` (B, ...) and ``outputs`` (B, ...) are all finite (one device sync);
    otherwise (B,) bool masks: rows whose inputs are non-finite, and rows whose inputs are finite
    but whose outputs are not (the model made them non-finite)."""
    if bool(torch.isfinite(inputs).all() & torch.isfinite(outputs).all()):
        return None
    bad_inputs = nonfinite_rows(inputs)
    return bad_inputs, nonfinite_rows(outputs) & ~bad_inputs


def shown_values(values) -> str:
    """The first :data:`SHOWN_INDICES` of ``values``, comma-separated, then ", ..." if there are more."""
    values = list(values)
    return ", ".join(str(v) for v in values[:SHOWN_INDICES]) + (", ..." if len(values) > SHOWN_INDICES else "")


def describe_indices(indices) -> str:
    """"1 image (index 4)", "3 images (indices 1, 4, 9)", "12 images (indices 0, 1, 2, 3, 4, ...)"."""
    indices = [int(i) for i in indices]
    shown = shown_values(indices)
    if len(indices) == 1:
        return f"1 image (index {shown})"
    return f"{len(indices)} images (indices {shown})"


def report_nonfinite(bad_inputs: torch.Tensor, bad_outputs: torch.Tensor, on_bad: str, *,
                     outputs: str = "logits", stacklevel: int = 3) -> torch.Tensor:
    """Act on the images found bad: return the (N,) bool mask of images to keep.

    bad_inputs / bad_outputs: (N,) bool, images with non-finite pixels / with finite pixels but
    non-finite ``outputs`` (e.g. "logits", "layer embeddings"). When any is set: ``on_bad="raise"``
    raises NonFiniteInputError naming them (first indices and counts); ``"skip"`` warns naming them
    and drops them from the mask.
    """
    check_on_bad(on_bad)
    bad = bad_inputs | bad_outputs
    if not bool(bad.any()):
        return ~bad
    problems = []
    if bool(bad_inputs.any()):
        problems.append(f"NaN or inf pixels in {describe_indices(torch.nonzero(bad_inputs).flatten().tolist())}")
    if bool(bad_outputs.any()):
        problems.append(f"the model's {outputs} are NaN or inf for "
                        f"{describe_indices(torch.nonzero(bad_outputs).flatten().tolist())} with finite pixels")
    message = f"{'; '.join(problems)}, among {bad.numel()} images"
    if on_bad == "raise":
        raise NonFiniteInputError(f"{message}. Fix or drop those images, or pass on_bad='skip' to leave them out",
                                  torch.nonzero(bad).flatten().tolist())
    warnings.warn(f"{message}: left out", stacklevel=stacklevel)
    return ~bad
