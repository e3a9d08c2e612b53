"""The stored notebooks are fit for nbval: what it must ignore is marked in a form it reads, and
every notebook keeps outputs it compares."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbval.plugin import find_comment_markers

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _code_cells(path: Path):
    return [c for c in nbformat.read(str(path), as_version=4).cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_nbval_marker_is_one_nbval_reads(path):
    """nbval honours ``# NBVAL_IGNORE_OUTPUT`` only alone on its line; with anything after it the
    cell's output is compared (a trained figure there then fails on the next machine)."""
    for cell in _code_cells(path):
        for line in cell.source.splitlines():
            if "NBVAL_" in line:
                assert dict(find_comment_markers(line)), f"{path.name}: nbval ignores the marker line {line!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_keeps_outputs_that_nbval_compares(path):
    checked = [c for c in _code_cells(path) if c.outputs and "check" not in dict(find_comment_markers(c.source))]
    assert checked, f"{path.name}: no cell with outputs that nbval compares"
