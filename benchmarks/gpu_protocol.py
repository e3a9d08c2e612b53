"""The paper's protocol at ImageNet scale, timed: for the day a GPU is lent (or your own GPU server).

    python benchmarks/gpu_protocol.py                  # ResNet-50 and ViT-B/16, 50,000 images, bf16 on CUDA
    python benchmarks/gpu_protocol.py --small          # the same code on a few images: a CPU smoke run

For each model (random weights: nothing downloads; the figures are throughputs, not accuracies)
and CLIP ViT-B/16 (random weights) as the embedding model, on generated images (random pixels
drawn per index, so no dataset is needed and memory does not grow with N), it measures

- capture: images/s of ``store.build_store`` (the model's forward, the layer's pooled
  activations, CLIP's image embedding, predictions, shards on disk);
- alignment: rows/s of ``align.train_encoder`` on that store (1000 classes);
- SAE: vectors/s of ``sae.train_sae`` on a token store of the layer (``--sae-images`` images);
- the protocol: wall time of the delta-accuracy table of the paper (1000 classes x 50 images, each
  class's top-5 units removed and enhanced, MiClip against 5 random draws), through
  ``intervention.intervention_table``.

bf16 autocast is on for CUDA (the library's default there). Prints a Markdown table and writes
``benchmarks/results/gpu_protocol.json``. Not part of the test suite (tests/test_benchmarks.py
runs ``--small`` on the CPU to keep the script working).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

MODELS = {"resnet50": ("timm:resnet50", "layer4.0"), "vit_b16": ("timm:vit_base_patch16_224", "blocks.10")}


class GeneratedImages(torch.utils.data.Dataset):
    """``n`` images of ``size`` px with random pixels drawn from their index, labels ``i % n_classes``:
    ImageNet-sized data without a dataset on disk. Has a ``fingerprint`` and ``labels``."""

    def __init__(self, n: int, n_classes: int = 1000, size: int = 256):
        self.n, self.n_classes, self.size = n, n_classes, size
        self.labels = [i % n_classes for i in range(n)]
        self.fingerprint = f"generated:{n}:{n_classes}:{size}"

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng(i)
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)), self.labels[i]


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run(model_key: str, args, clip, root: Path) -> dict:
    """Every figure of one model (see the module docstring)."""
    from miclip_nb import align, embed, interpret, intervention, sae, select, store, zoo

    name, _, layer = model_key.partition("@")
    name, layer = MODELS.get(name, (name, layer or None))
    target = zoo.load_target(name, pretrained=False, layer=layer)
    layer = layer or target.default_layer
    n_classes = len(target.class_names)
    data = GeneratedImages(args.n_images, n_classes)
    kw = dict(batch_size=args.batch_size, num_workers=args.workers, root=root, progress=not args.quiet)

    st, capture_s = _timed(lambda: store.build_store(target, data, [layer], clip=clip, **kw))
    class_emb, _ = _timed(lambda: embed.build_concept_bank(clip, target.class_names, allow_duplicates=True))
    config = align.AlignConfig(epochs=args.align_epochs, batch_size=args.align_batch, patience=args.align_epochs)
    (encoder, history), align_s = _timed(lambda: align.train_encoder(st, class_emb, config=config, progress=not args.quiet))
    rows_seen = (history["n_train"] + history["n_val"]) * len(history["train_loss"])

    tokens = store.build_store(target, data, [layer], pooling="none", n_items=min(args.sae_images, len(data)), **kw)
    sae_cfg = sae.SAEConfig(expansion=args.sae_expansion, k=args.sae_k, epochs=1, batch_size=args.sae_batch)
    (_, metrics), sae_s = _timed(lambda: sae.train_sae(tokens, layer, sae_cfg, progress=not args.quiet))

    unit_emb = interpret.unit_embeddings(encoder)
    selectors = {"MiClip": [select.MiClipSelector(unit_emb, class_emb, temperature=interpret.concept_temperature(encoder))],
                 "Random": [select.RandomSelector(unit_emb.shape[0], s) for s in range(5)]}
    eval_data = GeneratedImages(args.protocol_images, n_classes)
    table, protocol_s = _timed(lambda: intervention.intervention_table(
        target, eval_data, layer, selectors, n_other=0, batch_size=args.batch_size, chunk_size=args.chunk_size,
        progress=not args.quiet))
    return {"model": name, "layer": layer, "n_images": len(data), "capture_images_per_s": len(data) / capture_s,
            "alignment_rows_per_s": rows_seen / align_s, "sae_vectors_per_s": metrics["n_train_vectors"] / sae_s,
            "protocol_images": len(eval_data), "protocol_s": protocol_s, "protocol_rows": len(table)}


def main(argv: list[str] | None = None) -> int:
    """Run the figures for ``--models`` and print them; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), help="resnet50, vit_b16, or any zoo name[@layer]")
    p.add_argument("--clip", default="ViT-B-16", help="open_clip architecture of the embedding model (random weights)")
    p.add_argument("--clip-config", type=Path, default=None, help="a folder of open_clip model configs to register")
    p.add_argument("--n-images", type=int, default=50_000)
    p.add_argument("--protocol-images", type=int, default=50_000, help="the protocol's images (50 per class)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--align-epochs", type=int, default=2)
    p.add_argument("--align-batch", type=int, default=4096)
    p.add_argument("--sae-images", type=int, default=5000)
    p.add_argument("--sae-expansion", type=int, default=8)
    p.add_argument("--sae-k", type=int, default=32)
    p.add_argument("--sae-batch", type=int, default=8192)
    p.add_argument("--small", action="store_true", help="a few images and small batches: a CPU smoke run")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_protocol.json")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.small:
        args.n_images, args.protocol_images, args.batch_size, args.chunk_size, args.workers = 40, 40, 8, 64, 0
        args.align_batch, args.sae_images, args.sae_expansion, args.sae_k, args.sae_batch = 16, 4, 1, 4, 256

    import open_clip

    from miclip_nb import embed

    if args.clip_config is not None:
        open_clip.add_model_config(args.clip_config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip = embed.load_clip(args.clip, None, device=device)
    env = {"device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
           "torch": torch.__version__, "bf16_autocast": device == "cuda", "small": args.small}
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(m, args, clip, Path(tmp)) for m in args.models]
    lines = ["| model | layer | capture img/s | alignment rows/s | SAE vectors/s | protocol (images, wall s) |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['layer']} | {r['capture_images_per_s']:.1f} | {r['alignment_rows_per_s']:.0f} | "
              f"{r['sae_vectors_per_s']:.0f} | {r['protocol_images']}, {r['protocol_s']:.1f} |" for r in results]
    print(f"environment: {env}")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
