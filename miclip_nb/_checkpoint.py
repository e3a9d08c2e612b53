"""One on-disk format for the small trained modules (neuron encoders, SAEs).

``<path>.safetensors`` holds the state dict, ``<path>.json`` a schema version and whatever
describes the module (config, provenance, history).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``state`` (tensors, moved to CPU) and the JSON ``meta``; returns the safetensors path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = path.with_suffix(".safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(weights))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return weights


def read_checkpoint(path: str | Path, schema_version: int, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, state) of a checkpoint written by :func:`save_checkpoint`.

    what: the module's name for messages ("encoder", "SAE"). Raises FileNotFoundError when either
    file is missing, ValueError when the meta's ``schema_version`` is not ``schema_version``.
    """
    path = Path(path)
    meta_path, weights = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"no {what} checkpoint at {path} (need {meta_path.name} and {weights.name})")
    meta = json.loads(meta_path.read_text())
    if meta.get("schema_version") != schema_version:
        raise ValueError(f"{what} checkpoint schema {meta.get('schema_version')} != {schema_version}")
    return meta, load_file(str(weights))
