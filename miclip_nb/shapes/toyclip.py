"""ToyCLIP: a small real open_clip CLIP model trained contrastively on the Shapes world.

ToyCLIP is the CLIP space that the offline tests and notebooks align to. It is an ordinary
open_clip ``CLIP`` (ModifiedResNet image tower with attention pooling, causal text transformer,
open_clip's own BPE tokenizer) built from ``model_configs/ToyCLIP.json``, so everything written
for ToyCLIP also runs on a real CLIP such as ``ViT-B-16``.

Training recipe (why it looks like this): plain contrastive training on full captions learns
colour and texture, the easy image statistics, and leaves the shape words' text embeddings nearly
collinear; a shape-first curriculum learns shape and then forgets texture. Here every step
embeds one batch of images once and applies open_clip's ``ClipLoss`` once per *caption type*
(full, two-attribute and single-attribute captions, see :data:`CAPTION_PARTS`). A caption type
that names only the shape turns the loss into shape classification (image->text) and shape
retrieval (text->image), so no attribute can be ignored and none is forgotten. The text tower
runs once per step on the 244 distinct captions of the world, which costs little.

Train and save the committed weights with::

    python -m miclip_nb.shapes.toyclip --seed 0 --steps 1000 --threads 1 --out-dir data/toyclip
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from .._paths import data_dir, sha256_file
from ..metrics import auroc
from .world import CONCEPT_KIND, CONCEPTS, COLORS, SHAPES, TEXTURES, WorldConfig, caption_for, render

MODEL_NAME = "ToyCLIP"
MODEL_CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"
SCHEMA_VERSION = 1
WEIGHTS_FILE = "toyclip.safetensors"
META_FILE = "toyclip.json"
TRAIN_COMMAND = "python -m miclip_nb.shapes.toyclip --seed 0 --steps 1000 --threads 1 --out-dir data/toyclip"
#: Preprocessing of ToyCLIP images: the 64x64 world images, mean = std = 0.5 (pixels to [-1, 1]).
PREPROCESS_CFG: dict = {"size": 64, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                        "interpolation": "bicubic", "resize_mode": "shortest"}
#: Caption types trained at every step: the attributes each caption names.
CAPTION_PARTS: tuple[tuple[str, ...], ...] = (
    ("color", "shape", "texture"),
    ("color", "shape"),
    ("shape", "texture"),
    ("color", "texture"),
    ("shape",),
    ("color",),
    ("texture",),
)
#: Training images are balanced-split indices from here on, so balanced[0:10**7) stays held out.
TRAIN_INDEX_OFFSET = 10_000_000
KINDS: tuple[str, ...] = ("shape", "color", "texture")


def register_toyclip_config() -> None:
    """Register ``model_configs/`` with open_clip so ``open_clip.create_model("ToyCLIP")`` works.

    Idempotent: calling it again changes nothing.
    """
    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIGS_DIR)


def toyclip_config() -> dict:
    """The open_clip model config of ToyCLIP (a copy of ``model_configs/ToyCLIP.json``)."""
    register_toyclip_config()
    return open_clip.get_model_config(MODEL_NAME)


def get_toyclip_tokenizer():
    """open_clip's BPE tokenizer with ToyCLIP's context length (works offline).

    ``tokenizer(list_of_str)`` returns a (N, 16) int64 tensor.
    """
    register_toyclip_config()
    return open_clip.get_tokenizer(MODEL_NAME)


def create_toyclip(pretrained: str | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build ToyCLIP through ``open_clip.create_model`` (random weights unless ``pretrained`` file).

    Returns an open_clip ``CLIP`` in train mode, with ToyCLIP's preprocessing config attached.
    """
    register_toyclip_config()
    return open_clip.create_model(MODEL_NAME, pretrained=pretrained, device=device,
                                  force_preprocess_cfg=dict(PREPROCESS_CFG))


_TRANSFORM = None


def toyclip_preprocess(image) -> torch.Tensor:
    """ToyCLIP's image preprocessing: PIL image or (H, W, 3) uint8 array -> (3, 64, 64) float.

    open_clip's eval transform (bicubic resize of the short side to 64, centre crop, mean = std =
    0.5); on the world's 64x64 images it equals :func:`miclip_nb.shapes.to_tensor`. Raises
    ValueError for an array that is not (H, W, 3) uint8.
    """
    global _TRANSFORM
    if _TRANSFORM is None:
        _TRANSFORM = open_clip.image_transform(
            PREPROCESS_CFG["size"], is_train=False, mean=PREPROCESS_CFG["mean"], std=PREPROCESS_CFG["std"],
            interpolation=PREPROCESS_CFG["interpolation"], resize_mode=PREPROCESS_CFG["resize_mode"])
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected a PIL image or an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
        image = Image.fromarray(arr)
    return _TRANSFORM(image)


# ---------------------------------------------------------------------------------------------
# Captions and images


def caption_bank() -> tuple[list[str], np.ndarray]:
    """Every distinct caption of the world and a lookup table.

    Returns (captions, ids_kscl): ``captions`` is a list of the 244 distinct strings, ``ids_kscl``
    a (len(CAPTION_PARTS), 6, 6, 4) int array, ``ids[k, shape, colour, texture]`` the index in
    ``captions`` of the type-k caption of an image with those attributes.
    """
    captions: list[str] = []
    index: dict[str, int] = {}
    ids = np.zeros((len(CAPTION_PARTS), len(SHAPES), len(COLORS), len(TEXTURES)), dtype=np.int64)
    for k, parts in enumerate(CAPTION_PARTS):
        for s, shape in enumerate(SHAPES):
            for c, color in enumerate(COLORS):
                for t, texture in enumerate(TEXTURES):
                    text = caption_for(shape if "shape" in parts else None, color if "color" in parts else None,
                                       texture if "texture" in parts else None)
                    if text not in index:
                        index[text] = len(captions)
                        captions.append(text)
                    ids[k, s, c, t] = index[text]
    return captions, ids


def concept_prompts() -> list[str]:
    """The single-concept prompt of every concept of :data:`CONCEPTS` ("a star", "red", "dots")."""
    return [caption_for(**{CONCEPT_KIND[c]: c}) for c in CONCEPTS]


def concept_phrases() -> dict[str, str]:
    """Concept word -> the caption ToyCLIP was trained with ("star" -> "a star", "red" -> "red")."""
    return dict(zip(CONCEPTS, concept_prompts()))


def _render_uint8(cfg: WorldConfig, split: str, indices) -> tuple[torch.Tensor, np.ndarray]:
    """(N, 3, H, W) uint8 images and (N, 3) attributes (shape, colour, texture)."""
    samples = [render(cfg, split, int(i)) for i in indices]
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
    return x, np.array([[s.shape, s.color, s.texture] for s in samples], dtype=np.int64)


def _to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    # Same arithmetic as shapes.to_tensor: uint8 -> [-1, 1].
    return x_uint8.float().div(127.5).sub(1.0)


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def _embed(model, tokenizer, x_uint8: torch.Tensor, texts: list[str], batch: int = 500):
    """Normalized image (N, D) and text (T, D) embeddings, on CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    img = torch.cat([model.encode_image(_to_float(x_uint8[i:i + batch]).to(device), normalize=True).float().cpu()
                     for i in range(0, len(x_uint8), batch)])
    txt = model.encode_text(tokenizer(texts).to(device), normalize=True).float().cpu()
    model.train(was_training)
    return img, txt


def evaluate_toyclip(model, tokenizer, split: str = "balanced", n: int = 2000, seed: int = 0) -> dict:
    """Concept detection and zero-shot classification of ToyCLIP on ``n`` world images.

    Images are ``split`` indices [0, n) of ``WorldConfig(seed=seed)`` (never trained on).
    Returns {"auroc": {concept: AUROC of cos(image, prompt) for "has concept"}, "zero_shot_accuracy":
    {kind: accuracy of the argmax over that kind's prompts}, "min_auroc": float, "n": n, ...}.
    Raises ValueError when n is too small for every concept to be present and absent.
    """
    x, attrs = _render_uint8(WorldConfig(seed=seed), split, range(n))
    img, txt = _embed(model, tokenizer, x, concept_prompts())
    sims = (img @ txt.T).numpy()  # (n, 16)
    present = np.zeros((n, len(CONCEPTS)), dtype=bool)
    present[np.arange(n), attrs[:, 0]] = True
    present[np.arange(n), len(SHAPES) + attrs[:, 1]] = True
    present[np.arange(n), len(SHAPES) + len(COLORS) + attrs[:, 2]] = True
    aurocs = {c: float(auroc(sims[:, j], present[:, j])) for j, c in enumerate(CONCEPTS)}
    accuracy = {}
    start = 0
    for k, (kind, names) in enumerate(zip(KINDS, (SHAPES, COLORS, TEXTURES))):
        pred = sims[:, start:start + len(names)].argmax(1)
        accuracy[kind] = float((pred == attrs[:, k]).mean())
        start += len(names)
    return {"auroc": aurocs, "zero_shot_accuracy": accuracy, "min_auroc": min(aurocs.values()),
            "split": split, "n": n, "seed": seed}


def attribute_auroc(model, tokenizer, split: str = "balanced", n: int = 2000, seed: int = 0) -> dict[str, float]:
    """Per-concept AUROC of cos(image embedding, single-concept prompt embedding).

    model: an open_clip CLIP; tokenizer: its tokenizer. Uses ``split`` images [0, n) of
    ``WorldConfig(seed=seed)``. Returns {concept: AUROC} for the 16 concepts of :data:`CONCEPTS`.
    Raises ValueError when some concept is never (or always) present among the n images.
    """
    return evaluate_toyclip(model, tokenizer, split, n, seed)["auroc"]


# ---------------------------------------------------------------------------------------------
# Training


def _param_groups(model, weight_decay: float) -> list[dict]:
    # open_clip's convention: no decay on gains, biases, norms and the logit scale.
    def exclude(name, p):
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


def train_toyclip(*, seed: int = 0, steps: int = 1000, batch_size: int = 256, lr: float = 2e-3,
                  weight_decay: float = 0.1, warmup: int = 100, pool_size: int = 40_000,
                  device: str = "cpu", progress: bool = True, eval_n: int = 2000,
                  eval_every: int = 0) -> tuple[torch.nn.Module, dict]:
    """Train ToyCLIP from scratch on the balanced Shapes world.

    Fully seeded: the same arguments give the same weights on CPU (at a fixed thread count).
    ``pool_size`` images (balanced indices from :data:`TRAIN_INDEX_OFFSET`) are rendered once;
    each step draws ``batch_size`` of them (random horizontal flips) and averages one ``ClipLoss`` per
    caption type of :data:`CAPTION_PARTS`. AdamW with linear warmup and cosine decay.
    ``eval_every`` > 0 records a quick evaluation (500 images of world seed 1) every that many
    steps in ``metrics["training"]["history"]``.
    Returns (model in eval mode, on CPU, weights rounded to float16 precision as saved; metrics:
    :func:`evaluate_toyclip` on ``eval_n`` held-out balanced images plus training parameters).
    """
    if steps < 1 or batch_size < 2 or pool_size < 1:
        raise ValueError("need steps >= 1, batch_size >= 2, pool_size >= 1")
    from tqdm.auto import tqdm

    t_start = time.time()
    pool_size = min(pool_size, steps * batch_size)
    torch.manual_seed(seed)
    model = create_toyclip(device=device)
    model.visual.to(memory_format=torch.channels_last)
    model.train()
    tokenizer = get_toyclip_tokenizer()
    captions, ids_kscl = caption_bank()
    tokens = tokenizer(captions).to(device)
    pool_x, pool_attrs = _render_uint8(WorldConfig(), "balanced",
                                       range(TRAIN_INDEX_OFFSET, TRAIN_INDEX_OFFSET + pool_size))
    # (K, pool) caption id of every pool image for every caption type.
    pool_ids = torch.from_numpy(ids_kscl[:, pool_attrs[:, 0], pool_attrs[:, 1], pool_attrs[:, 2]])

    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    gen = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    bar = tqdm(range(steps), desc="ToyCLIP", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(pool_size, (batch_size,), generator=gen)
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = _to_float(pool_x[idx])
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        img = model.encode_image(x, normalize=True)
        txt_all = model.encode_text(tokens, normalize=True)
        scale = model.logit_scale.exp()
        losses = [loss_fn(img, txt_all[pool_ids[k, idx].to(device)], scale) for k in range(len(CAPTION_PARTS))]
        loss = torch.stack(losses).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if progress and (step % 10 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{scale.item():.1f}")
        if eval_every and (step + 1) % eval_every == 0:
            quick = evaluate_toyclip(model, tokenizer, "balanced", 500, seed=1)
            history.append({"step": step + 1, "loss": float(loss.item()), "min_auroc": quick["min_auroc"],
                            "zero_shot_accuracy": quick["zero_shot_accuracy"],
                            "worst": min(quick["auroc"], key=quick["auroc"].get)})
            if progress:
                bar.write(f"step {step + 1}: loss {loss.item():.3f} min AUROC {quick['min_auroc']:.3f} "
                          f"({history[-1]['worst']}) zero-shot {quick['zero_shot_accuracy']}")

    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    with torch.no_grad():  # what save_toyclip stores and load_toyclip gives back
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    train_seconds = time.time() - t_start
    metrics = evaluate_toyclip(model, tokenizer, "balanced", eval_n, seed=0)
    metrics["training"] = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
                           "weight_decay": weight_decay, "warmup": warmup, "pool_size": pool_size,
                           "caption_parts": [list(p) for p in CAPTION_PARTS], "device": str(device),
                           "torch_threads": torch.get_num_threads(), "seconds": round(train_seconds, 1),
                           "final_loss": float(loss.item()), "history": history}
    return model, metrics


# ---------------------------------------------------------------------------------------------
# Saving and loading



def save_toyclip(model, metrics: dict, out_dir: str | Path | None = None) -> Path:
    """Write ``toyclip.safetensors`` (float16 tensors), ``toyclip.json`` and ``open_clip_config.json``.

    ``toyclip.json`` holds schema_version, the open_clip config, training parameters, metrics and
    the sha256 of the weights file. ``open_clip_config.json`` lets open_clip itself load the folder
    (``open_clip.create_model_and_transforms("local-dir:<out_dir>")``). Default ``out_dir``:
    ``data_dir() / "toyclip"``. Returns the folder.
    """
    from safetensors.torch import save_file

    out = Path(out_dir) if out_dir is not None else data_dir() / "toyclip"
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in model.state_dict().items()}
    weights_path = out / WEIGHTS_FILE
    save_file(state, str(weights_path), metadata={"format": "pt", "model": MODEL_NAME})
    config = toyclip_config()
    meta = {"schema_version": SCHEMA_VERSION, "model_name": MODEL_NAME, "open_clip_config": config,
            "preprocess_cfg": PREPROCESS_CFG, "training": metrics.get("training", {}),
            "metrics": {k: v for k, v in metrics.items() if k != "training"},
            "weights_file": WEIGHTS_FILE, "sha256": sha256_file(weights_path), "train_command": TRAIN_COMMAND,
            "open_clip_version": open_clip.__version__, "torch_version": torch.__version__}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": config, "preprocess_cfg": PREPROCESS_CFG}, indent=2) + "\n")
    return out


def load_toyclip(weights_dir: str | Path | None = None):
    """Load the committed ToyCLIP through ``open_clip.create_model``.

    Returns (model in eval mode on CPU, tokenizer, preprocess) where ``preprocess`` is
    :func:`toyclip_preprocess`. Raises FileNotFoundError (naming the training command) when the
    files are missing, ValueError when the schema version or config does not match this code or
    the weights' sha256 differs from the recorded one (stale or corrupt file).
    """
    folder = Path(weights_dir) if weights_dir is not None else data_dir() / "toyclip"
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"ToyCLIP file {path} not found; train it with: {TRAIN_COMMAND}")
    meta = json.loads(meta_path.read_text())
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{meta_path} has schema_version {meta.get('schema_version')!r}, this code reads "
                         f"{SCHEMA_VERSION}; retrain with: {TRAIN_COMMAND}")
    if meta.get("open_clip_config") != toyclip_config():
        raise ValueError(f"{meta_path} was trained with another ToyCLIP config than {MODEL_CONFIGS_DIR}; "
                         f"retrain with: {TRAIN_COMMAND}")
    digest = sha256_file(weights_path)
    if digest != meta.get("sha256"):
        raise ValueError(f"{weights_path} does not match the sha256 recorded in {meta_path} "
                         f"({digest[:12]} != {str(meta.get('sha256'))[:12]}): stale or corrupt; "
                         f"retrain with: {TRAIN_COMMAND}")
    model = create_toyclip(pretrained=str(weights_path)).eval()
    return model, get_toyclip_tokenizer(), toyclip_preprocess


def format_metrics(metrics: dict) -> str:
    """A small text table of :func:`evaluate_toyclip` metrics."""
    lines = [f"{'concept':<10} {'kind':<8} AUROC"]
    lines += [f"{c:<10} {CONCEPT_KIND[c]:<8} {a:.3f}" for c, a in metrics["auroc"].items()]
    lines.append(f"min AUROC {metrics['min_auroc']:.3f}")
    lines += [f"zero-shot accuracy {k}: {a:.3f}" for k, a in metrics["zero_shot_accuracy"].items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    """Command line: train ToyCLIP, print its metrics and save it."""
    parser = argparse.ArgumentParser(description="Train ToyCLIP on the Shapes world and save it.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--pool-size", type=int, default=40_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-every", type=int, default=100, help="quick evaluation every N steps (0: off)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out-dir", default=None, help="default: data/toyclip")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, metrics = train_toyclip(seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   pool_size=args.pool_size, device=args.device,
                                   eval_every=args.eval_every)
    print(format_metrics(metrics))
    print(f"trained in {metrics['training']['seconds']:.0f} s")
    if not args.no_save:
        print(f"saved to {save_toyclip(model, metrics, args.out_dir)}")


if __name__ == "__main__":
    main()
