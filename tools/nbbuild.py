"""Tiny helpers to write notebooks from Python cell lists (used by tools/make_notebooks.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat


PARAMS_TOY_REAL = '''
import os
# Parameters. "toy": the Shapes world, offline, CPU, minutes. "real": the paper's setting
# (ImageNet folders, CLIP ViT-B/16 'openai' downloaded on first use, a GPU).
PROFILE = "toy"
SEED = 0
IMAGENET_TRAIN = os.environ.get("IMAGENET_TRAIN", "/data/imagenet/train")  # real profile only
IMAGENET_VAL = os.environ.get("IMAGENET_VAL", "/data/imagenet/val")        # real profile only
'''


def params(extra: str = ""):
    """The parameters cell every notebook starts with (toy/real profile), plus notebook-specific lines."""
    extra = textwrap.dedent(extra).strip()
    return code(PARAMS_TOY_REAL.strip() + ("\n" + extra if extra else ""))


def md(text: str):
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str, ignore_output: str | None = None):
    """A code cell; ``ignore_output``: why nbval must not compare its output (figures that move with
    float rounding), written as the cell's ``# NBVAL_IGNORE_OUTPUT`` marker."""
    body = textwrap.dedent(text).strip()
    if ignore_output:
        body = f"# NBVAL_IGNORE_OUTPUT\n# ({ignore_output})\n" + body
    return nbformat.v4.new_code_cell(body)


def write(path: Path, cells) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, str(path))
