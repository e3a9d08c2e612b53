"""Command line: ``miclip-nb run`` runs the pipeline headless and writes CSV / Markdown / JSON.

    miclip-nb run --config run.yaml                    # PipelineConfig fields in YAML or JSON
    miclip-nb run --profile toy --set model=toy_vit    # a profile's model and data, then overrides
    miclip-nb run --set model=timm:resnet50 --set weights_path=resnet50.safetensors \\
        --set train_data=/data/imagenet/train --set eval_data=/data/imagenet/val

Every field of pipeline.PipelineConfig can be set with ``--set key=value`` (values parsed as YAML:
``--set seeds=[0,1]``, ``--set "methods=[miclip,random,act_values]"``, ``--set align.epochs=10``);
``miclip-nb run --help`` lists them. The delta-accuracy table is written as ``delta_accuracy.csv``
and ``delta_accuracy.md`` and printed. ``miclip-nb methods`` lists the methods and the units each
works on; ``miclip-nb profiles`` the profiles. A user's error ends in a one-line message (exit
code 2); ``MICLIP_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

#: Errors a user's input can cause: printed as one line, exit code 2, no traceback.
_USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, ImportError, RuntimeError)


def _parse_sets(items: list[str]) -> dict:
    """``["a=1", "align.epochs=3"]`` -> ``{"a": 1, "align": {"epochs": 3}}`` (values as YAML)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set needs key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = [p.strip() for p in key.strip().split(".")]
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _fields_epilog() -> str:
    from .pipeline import field_help

    rows = field_help()
    width = max(len(n) for n, _, _ in rows)
    lines = ["configuration fields (--set key=value, or keys of the --config file):"]
    lines += [f"  {name:<{width}}  {comment} [default: {default}]" for name, default, comment in rows]
    return "\n".join(lines)


def _config(args, parser) -> "object":
    from .pipeline import PipelineConfig

    values: dict = {}
    if args.profile:
        from . import profiles

        values = {k: v for k, v in vars(profiles.get(args.profile).pipeline_config()).items()}
    if args.config is not None:
        if not args.config.is_file():
            parser.error(f"config file not found: {args.config}")
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            parser.error("the config file must hold a mapping of PipelineConfig fields")
        values.update(loaded)
    for key, value in _parse_sets(args.set).items():
        if isinstance(value, dict) and key in ("align", "sae"):
            current = values.get(key)
            base = vars(current) if current is not None and not isinstance(current, dict) else (current or {})
            values[key] = {**base, **value}
        else:
            values[key] = value
    for key in ("align", "sae"):  # configs from a profile are objects: from_dict takes dicts or objects
        if key in values and not isinstance(values[key], dict):
            values[key] = dict(vars(values[key]))
    return PipelineConfig.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``miclip-nb``. Returns the process exit code (2 for a user's error, with a
    one-line message and no traceback)."""
    parser = argparse.ArgumentParser(prog="miclip-nb", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="capture, align, localize, describe and measure delta-accuracy",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_fields_epilog())
    run_p.add_argument("--config", type=Path, help="YAML or JSON file with PipelineConfig fields")
    run_p.add_argument("--profile", help="start from a profile's model and data (miclip-nb profiles lists them)")
    run_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    run_p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("methods", help="list the unit-selection methods and the units each works on")
    sub.add_parser("profiles", help="list the notebook profiles")
    args = parser.parse_args(argv)

    try:
        if args.command == "methods":
            from . import methods

            for key in methods.keys():
                m = methods.get(key)
                kinds = ", ".join(sorted(m.units))
                print(f"{key:<20} {m.name:<20} units: {kinds:<12} {'(reference) ' if m.reference else ''}{m.description}")
            return 0
        if args.command == "profiles":
            from . import profiles

            for name in profiles.names():
                try:
                    print(f"{name:<12} {profiles.get(name).description}")
                except ValueError as err:  # a profile that needs a setting first (real-smoke: a folder)
                    print(f"{name:<12} (not available here: {err})")
            return 0
        config = _config(args, run_p)
        from .pipeline import run

        paths = run(config, progress=not args.quiet)
    except _USER_ERRORS as err:
        if os.environ.get("MICLIP_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"miclip-nb {args.command}: error: {type(err).__name__}: {message}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    print()
    print(paths["delta_md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
