"""The stored notebooks are fit for nbval: what it must ignore is marked in a form it reads, and
every notebook keeps outputs it compares."""

from __future__ import annotations

from pathlib import Path

import jupytext
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_each_notebook_agrees_with_its_script(path):
    """The percent script beside each notebook is its one source: their cells must be the same (an
    edit on either side is carried to the other with `jupytext --sync`; tools/execute_notebooks.sh
    does it before executing)."""
    script = path.with_suffix(".py")
    assert script.is_file(), f"{path.name} has no paired script {script.name}"
    ipynb = nbformat.read(str(path), as_version=4)
    py = jupytext.read(str(script))
    cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]  # noqa: E731
    assert cells(py) == cells(ipynb), f"{script.name} and {path.name} differ: run jupytext --sync {script}"
    assert "formats: ipynb,py:percent" in script.read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_widget_state_is_stored(path):
    assert "widgets" not in nbformat.read(str(path), as_version=4).metadata


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_cells_hold_calls_not_profile_branches(path):
    """The profile object carries the toy/real choice: no cell tests which profile it is."""
    source = path.with_suffix(".py").read_text()
    assert "PROFILE ==" not in source and "PROFILE !=" not in source
