"""Capture speed: images/s of build_store (capture + write) against bare forward passes, on CPU.

    python benchmarks/capture_speed.py [--n 512] [--threads 2] [--out benchmarks/results/capture_speed.json]

Same images, same batch size, same process; the store goes to a temporary folder. Capture includes
decoding and preprocessing each image (a DataLoader in the main process); the bare forward gets
ready tensors, so the ratio is an upper bound of the hooks' and the writer's cost. Not part of the
test suite (timings are figures to read, not assertions).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from miclip_nb import datasets, store, zoo
from miclip_nb.steer import predict


def measure(name: str, dataset, layer: str, n: int, batch_size: int) -> dict:
    target = zoo.load_target(name)
    x = torch.stack([target.preprocess(dataset[i][0]) for i in range(n)])
    predict(target.module, x[:batch_size], batch_size)  # warm-up
    start = time.perf_counter()
    predict(target.module, x, batch_size)
    bare = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        store.build_store(target, dataset, [layer], n_items=n, root=root, batch_size=batch_size, progress=False)
        captured = time.perf_counter() - start
    return {"model": name, "layer": layer, "n": n, "bare_forward_img_s": n / bare, "capture_img_s": n / captured,
            "capture_over_forward": captured / bare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/capture_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes_ds = datasets.open_dataset(f"shapes:test:{args.n}")
    rows = [measure("toy_cnn", shapes_ds, "stages.2", args.n, 128), measure("toy_vit", shapes_ds, "blocks.4", args.n, 128)]
    import os

    sample = os.environ.get(datasets.IMAGENET_SAMPLE_ENV)
    if sample:
        real = datasets.open_dataset(sample)
        rows.append(measure("efficientnet_lite0", real, "blocks.5", min(args.n, len(real), 128), 32))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"{'model':<20}{'n':>6}{'forward img/s':>16}{'capture img/s':>16}{'ratio':>8}")
    for r in rows:
        print(f"{r['model']:<20}{r['n']:>6}{r['bare_forward_img_s']:>16.1f}{r['capture_img_s']:>16.1f}{r['capture_over_forward']:>8.2f}")


if __name__ == "__main__":
    main()
