"""Where the project's shipped files live."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir() -> Path:
    """The folder of committed weights and word lists.

    ``$MICLIP_DATA_DIR`` when set, else ``data/`` beside the package (the repository checkout).
    """
    env = os.environ.get("MICLIP_DATA_DIR")
    return Path(env).expanduser().resolve() if env else PACKAGE_DIR.parent / "data"


def cache_dir() -> Path:
    """The root of activation stores and trained-encoder caches.

    ``$MICLIP_CACHE_DIR`` when set, else ``~/.cache/miclip_nb``.
    """
    env = os.environ.get("MICLIP_CACHE_DIR")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "miclip_nb"
