"""Command line: ``miclip-nb run --config run.yaml`` runs the pipeline headless and writes CSV/JSON.

Every PipelineConfig field can also be given as ``--set key=value`` (values parsed as YAML), e.g.
``miclip-nb run --set model=toy_vit --set seeds=[0,1]``. The delta-accuracy table has one row per
method: ``--set methods=[miclip,random,act_values,netdissect,clip_dissect,captum_ig]`` (see
pipeline.METHODS), on SAE features with ``--set units=sae`` (miclip, random, act_values,
clip_dissect). It is written as ``delta_accuracy.csv`` and ``delta_accuracy.md`` and printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set needs key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``miclip-nb``. Returns the process exit code."""
    parser = argparse.ArgumentParser(prog="miclip-nb", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="capture, align, localize, describe and measure delta-accuracy")
    run_p.add_argument("--config", type=Path, help="YAML or JSON file with PipelineConfig fields")
    run_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    run_p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from .pipeline import PipelineConfig, run

    values = {}
    if args.config is not None:
        if not args.config.is_file():
            parser.error(f"config file not found: {args.config}")
        values = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(values, dict):
            parser.error("the config file must hold a mapping of PipelineConfig fields")
    values.update(_parse_sets(args.set))
    try:
        config = PipelineConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    paths = run(config, progress=not args.quiet)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print()
    print(paths["delta_md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
