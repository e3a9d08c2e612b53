"""One command trains the three shipped models of the Shapes world and saves them under data/:

    python -m miclip_nb.shapes.train --threads 1   # toy_cnn, toy_vit, then ToyCLIP (about 35 min on one core)

Each is seeded (the shipped seeds by default); one thread reproduces the committed weights on CPU. The
sub-commands ``python -m miclip_nb.shapes.toy_models`` and ``python -m miclip_nb.shapes.toyclip`` train one
model each and take more options.
"""

from __future__ import annotations

import argparse

from . import toy_models, toyclip


def main(argv: list[str] | None = None) -> None:
    """Train and save toy_cnn, toy_vit and ToyCLIP with the shipped budgets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="default: each model's shipped seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    threads = [] if args.threads is None else ["--num-threads", str(args.threads)]
    seed = [] if args.seed is None else ["--seed", str(args.seed)]
    toy_models.main(["--models", "toy_cnn", "toy_vit", *seed, "--device", args.device, *threads])
    clip_threads = [] if args.threads is None else ["--threads", str(args.threads)]
    toyclip.main([*seed, "--device", args.device, *clip_threads])


if __name__ == "__main__":
    main()
