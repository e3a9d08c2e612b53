"""Where the project's shipped files live."""

from __future__ import annotations

import hashlib
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


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (weights and store shards are checked by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
