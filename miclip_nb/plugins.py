"""Plug-ins: the named datasets, models, embedding backends, vocabularies and notebook profiles the
generic core resolves by name, without importing whoever provides them.

A plug-in is a function that calls :func:`register` for each thing it offers. Installed packages
declare theirs under the entry-point group ``miclip_nb.plugins`` (pyproject.toml); they are loaded
the first time a name is looked up. The Shapes world (``miclip_nb.shapes``) is one such plug-in:
it offers the ``shapes:<split>:<n>`` datasets, the ``toy_cnn`` / ``toy_vit`` models, the
``toyclip`` backend, the ``shapes`` vocabulary and the ``toy`` profile. Register your own in a
notebook with ``plugins.register("target", "my_model", factory)``.

What each kind's factory takes and returns (see :data:`KINDS`):

- ``dataset``: ``factory(rest: str, transform) -> Dataset`` for ``open_dataset("<name>:<rest>")``;
- ``target``: ``factory(layer: str | None, weights_path: str | None) -> zoo.TargetModel``;
- ``backend``: ``factory(device, checkpoint_path) -> embed.EmbeddingBackend`` for ``load_clip(name)``;
- ``concepts``: ``factory() -> list[str]`` for ``interpret.concept_set(name)``;
- ``profile``: ``factory() -> profiles.Profile`` for ``profiles.get(name)``.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable

__all__ = ["ENTRY_POINT_GROUP", "KINDS", "UnknownNameError", "get", "has", "load_plugins", "names", "register"]

#: The entry-point group installed packages declare their plug-in functions under.
ENTRY_POINT_GROUP = "miclip_nb.plugins"
#: Kind -> what a name of that kind is, for messages.
KINDS: dict[str, str] = {
    "dataset": "dataset scheme",
    "target": "model",
    "backend": "embedding backend",
    "concepts": "concept set",
    "profile": "profile",
}

_registry: dict[str, dict[str, tuple[Callable, str]]] = {kind: {} for kind in KINDS}
_loaded: list[str] = []
_load_errors: dict[str, str] = {}


class UnknownNameError(KeyError):
    """A name that no plug-in registered for its kind."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown plug-in kind {kind!r}; kinds: {list(KINDS)}")


def register(kind: str, name: str, factory: Callable, *, description: str = "") -> None:
    """Make ``name`` resolvable for ``kind`` (see the module docstring for each factory's contract).

    Registering a name again replaces it (a plug-in reloaded in a notebook). Names are
    case-insensitive. Raises ValueError for an unknown kind or an empty name, TypeError when
    ``factory`` is not callable."""
    _check_kind(kind)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a {KINDS[kind]} needs a non-empty name, got {name!r}")
    if not callable(factory):
        raise TypeError(f"the factory of {kind} {name!r} must be callable, got {type(factory).__name__}")
    _registry[kind][name.strip().lower()] = (factory, description)


def load_plugins() -> list[str]:
    """Run every installed plug-in (entry-point group :data:`ENTRY_POINT_GROUP`) once; return the
    names of those loaded so far. A plug-in that fails to load is left out, and its error is named
    in the message of a later failed lookup."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _loaded or ep.name in _load_errors:
            continue
        try:
            ep.load()()
            _loaded.append(ep.name)
        except Exception as err:  # a broken plug-in must not take the core down
            _load_errors[ep.name] = f"{type(err).__name__}: {err}"
    return list(_loaded)


def names(kind: str) -> list[str]:
    """The registered names of ``kind``, sorted (installed plug-ins loaded first)."""
    _check_kind(kind)
    load_plugins()
    return sorted(_registry[kind])


def get(kind: str, name: str) -> Callable:
    """The factory registered as ``name`` for ``kind``.

    Raises UnknownNameError listing the registered names (and any plug-in that failed to load)."""
    _check_kind(kind)
    key = str(name).strip().lower()
    if key not in _registry[kind]:
        load_plugins()
    if key not in _registry[kind]:
        known = ", ".join(sorted(_registry[kind])) or "none"
        broken = "".join(f"; plug-in {p!r} failed to load ({e})" for p, e in _load_errors.items())
        raise UnknownNameError(f"no {KINDS[kind]} named {name!r} (registered: {known}){broken}. "
                               f"A plug-in registers one with miclip_nb.plugins.register({kind!r}, name, factory).")
    return _registry[kind][key][0]


def has(kind: str, name: str) -> bool:
    """Whether ``name`` is registered for ``kind`` (installed plug-ins loaded first)."""
    return str(name).strip().lower() in names(kind)
