"""Claims: a measured figure checked against a stated bound, with a verdict that does not move.

Trained figures (an alignment's accuracy effects, an SAE's explained variance) move in their last
digits with the CPU, the BLAS and the thread count, so a notebook that stores them verbatim fails
on the next machine. A notebook therefore shows its figures in cells whose output nbval ignores,
and states what it claims about them in a cell that calls :func:`claim`: the bound is written in
the cell, the check runs on every execution (nbval runs every notebook in CI, with 1 and with 2
threads), and the printed verdict holds only the statement and its bound, so the stored output is
the same on every machine for as long as the claim holds. A claim that fails raises, naming the
measured value.
"""

from __future__ import annotations

import math

__all__ = ["ClaimError", "claim"]


class ClaimError(AssertionError):
    """A measured figure outside the bound a notebook or test states for it."""


def claim(statement: str, value: float, *, at_least: float | None = None, at_most: float | None = None,
          check: bool = True) -> str:
    """Check ``value`` against ``at_least`` / ``at_most`` (inclusive) and print ``✓ statement (bound)``.

    statement: what the figure shows, in words; value: the measured figure (a float, or anything
    ``float()`` takes); check: False where the bound was not stated for this setting (a profile's
    ``check_claims``: e.g. random weights in a smoke test), then the line says so and shows the
    value. Returns the printed line. Raises ClaimError naming the value when it is outside the
    bound or not finite, ValueError when neither bound is given.
    """
    if at_least is None and at_most is None:
        raise ValueError("give at_least, at_most or both")
    value = float(value)
    bounds = [f">= {at_least:g}" if at_least is not None else "", f"<= {at_most:g}" if at_most is not None else ""]
    bound = " and ".join(b for b in bounds if b)
    if not check:
        line = f"· {statement} (not checked in this setting: measured {value:.4g}, stated bound {bound})"
        print(line)
        return line
    ok = math.isfinite(value) and (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
    if not ok:
        raise ClaimError(f"claim failed: {statement}: measured {value:.6g}, stated bound {bound}")
    line = f"✓ {statement} (checked: {bound})"
    print(line)
    return line
