"""Datasets MiClip runs on: whatever images you have, image folders, ImageNet layouts, plug-ins'.

Every dataset here yields ``(PIL image, label)`` and has ``classes`` (names, index = label) and a
``fingerprint`` string that identifies its content for cache keys. :func:`open_dataset` picks the
right one from a spec string or a path (a plug-in's ``"<scheme>:<rest>"``, an imagenet-sample
folder, an ImageNet-val wnid layout, an ImageFolder, or a flat folder of unlabelled photos).

:func:`as_dataset` turns anything a user has into such a dataset (an :class:`ImageDataset`): a
torch ``Dataset``, a uint8 array or tensor of images, preprocessed float tensors, a list of PIL
images or of paths, a folder or a spec. Everything that takes a dataset (``store.build_store``, ...)
calls it, so any of these can be passed directly.

Labels: an integer per image, ``-1`` where it is unknown (a flat folder of photos, images given
without labels). Alignment does not need them (it uses the model's *predicted* labels); steps that
measure accuracy do.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from . import plugins
from ._progress import bars_off

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: ``{class_index:04d}_{wnid}_{class_name}.jpg``, the layout of imagenet-sample-500.
SAMPLE_FILE_RE = re.compile(r"^(\d{1,4})_(n\d{8})_(.+)\.(?:jpe?g|png)$", re.IGNORECASE)
#: Environment variable that points at a folder in the imagenet-sample layout (used by tests/CI).
IMAGENET_SAMPLE_ENV = "MICLIP_IMAGENET_SAMPLE"


class DatasetError(ValueError):
    """A dataset folder that is missing, empty, or not in an expected layout."""


class DataFormatError(DatasetError, TypeError):
    """Something given as a dataset (or one of its items) that is not images MiClip can use; the
    message names the object and what it needs instead. A ValueError and a TypeError."""


class UnreadableImageError(OSError):
    """An image file that PIL cannot decode."""


#: Label of an image whose class is unknown (a flat folder of photos, images given without labels).
UNKNOWN_LABEL = -1


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB. Raises UnreadableImageError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err


def _listing_fingerprint(kind: str, root: Path, files: list[Path], labels: list[int]) -> str:
    """Hash of the file names, sizes, modification times and labels (content changes -> new
    fingerprint). It depends on the listed files alone, so the listing less some files (see
    :meth:`FileListDataset.without`) gets the fingerprint of the folder after deleting them."""
    h = hashlib.sha256(kind.encode())
    for f, label in zip(files, labels):
        st = f.stat()
        h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}|{label}".encode())
    return f"{kind}:{root}:{len(files)}:{h.hexdigest()[:16]}"


def _check_dir(root: str | Path) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset folder does not exist: {path}")
    if not path.is_dir():
        raise DatasetError(f"dataset path is not a folder: {path}")
    return path.resolve()


class FileListDataset(torch.utils.data.Dataset):
    """Images from a list of files with integer labels; base of the folder datasets.

    ``kind`` and ``root`` (set by the folder loaders) name the layout and folder the files were
    listed from, so that :meth:`without` can give the fingerprint of a fresh listing.
    """

    def __init__(self, files: list[Path], labels: list[int], classes: list[str], fingerprint: str, transform=None,
                 *, kind: str | None = None, root: Path | None = None):
        self.files, self.labels, self.classes = files, labels, classes
        self.fingerprint, self.transform = fingerprint, transform
        self.kind, self.root = kind, root

    @classmethod
    def listed(cls, kind: str, root: Path, files: list[Path], labels: list[int], classes: list[str], transform=None):
        """The dataset of files listed from ``root`` in layout ``kind``, fingerprinted by the listing."""
        fingerprint = _listing_fingerprint(kind, root, files, labels)
        return cls(files, labels, classes, fingerprint, transform, kind=kind, root=root)

    def without(self, indices) -> "FileListDataset":
        """This dataset less the items at ``indices`` (e.g. unreadable files), order kept.

        For a folder dataset the result (fingerprint included) is what listing the folder again
        after deleting those files gives; otherwise its fingerprint derives from this one and the
        indices. Raises IndexError for an index outside 0..len-1.
        """
        drop = sorted({int(i) for i in indices})
        if drop and not 0 <= drop[0] <= drop[-1] < len(self):
            raise IndexError(f"indices must be in 0..{len(self) - 1}, got {drop}")
        keep = sorted(set(range(len(self))) - set(drop))
        files, labels = [self.files[i] for i in keep], [self.labels[i] for i in keep]
        if self.kind is not None and self.root is not None:
            return FileListDataset.listed(self.kind, self.root, files, labels, self.classes, self.transform)
        fingerprint = f"{self.fingerprint}|without:{hashlib.sha256(str(drop).encode()).hexdigest()[:16]}"
        return FileListDataset(files, labels, self.classes, fingerprint, self.transform)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        img = load_image(self.files[index])
        return (self.transform(img) if self.transform is not None else img), self.labels[index]


def image_folder(root: str | Path, transform=None) -> FileListDataset:
    """An ImageFolder layout: ``root/<class name>/<image>``; labels follow sorted class folders.

    Raises DatasetError when the folder is missing or holds no images.
    """
    root = _check_dir(root)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
    files, labels = [], []
    for label, d in enumerate(class_dirs):
        for f in sorted(d.rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                labels.append(label)
    if not files:
        raise DatasetError(f"no images found in class subfolders of {root} (expected root/<class>/<image>)")
    return FileListDataset.listed("folder", root, files, labels, [d.name for d in class_dirs], transform)


def imagenet_val(root: str | Path, transform=None) -> FileListDataset:
    """ImageNet-1k validation in wnid folders (``root/n01440764/*.JPEG``), labelled with the
    standard 1000-class index (sorted wnids), whatever subset of classes is present.

    Raises DatasetError when the folder is missing, empty, or has non-wnid subfolders.
    """
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    root = _check_dir(root)
    wnid_to_index = {info.index_to_label_name(i): i for i in range(info.num_classes())}
    files, labels = [], []
    for d in sorted(x for x in root.iterdir() if x.is_dir()):
        if d.name not in wnid_to_index:
            raise DatasetError(f"{d} is not an ImageNet wnid folder (like n01440764)")
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                labels.append(wnid_to_index[d.name])
    if not files:
        raise DatasetError(f"no images found in wnid subfolders of {root}")
    classes = [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]
    return FileListDataset.listed("imagenet_val", root, files, labels, classes, transform)


def imagenet_sample(root: str | Path, transform=None) -> FileListDataset:
    """A flat folder of ``{class_index:04d}_{wnid}_{name}.jpg`` files (e.g. imagenet-sample-500),
    labelled with the standard ImageNet-1k index from the file name.

    Raises DatasetError when the folder is missing or has no file in that layout.
    """
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    root = _check_dir(root)
    files, labels = [], []
    for f in sorted(root.iterdir()):
        m = SAMPLE_FILE_RE.match(f.name)
        if m:
            idx = int(m.group(1))
            if info.index_to_label_name(idx) != m.group(2):
                raise DatasetError(f"{f.name}: index {idx} is not wnid {m.group(2)} in ImageNet-1k")
            files.append(f)
            labels.append(idx)
    if not files:
        raise DatasetError(f"no files named like 0000_n01440764_tench.jpg in {root}")
    classes = [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]
    return FileListDataset.listed("imagenet_sample", root, files, labels, classes, transform)


def unlabelled_folder(root: str | Path, transform=None) -> FileListDataset:
    """A flat folder of photos without labels (``root/<image>``, sorted by name): every label is
    ``-1`` (unknown) and ``classes`` is empty. Alignment uses the model's predicted labels, so it
    needs none; accuracy measurements do.

    Raises DatasetError when the folder is missing or holds no image files.
    """
    root = _check_dir(root)
    files = sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DatasetError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
    return FileListDataset.listed("unlabelled", root, files, [UNKNOWN_LABEL] * len(files), [], transform)


def open_dataset(spec: str | Path, transform=None):
    """A dataset from a spec.

    ``"<scheme>:<rest>"`` gives a plug-in's dataset (:mod:`miclip_nb.plugins`; e.g. the Shapes
    world's ``"shapes:test:2000"``); a path gives an imagenet-sample folder, an ImageNet-val wnid
    layout, a generic ImageFolder (class subfolders), or, for a folder of image files without
    class subfolders, the unlabelled photos of :func:`unlabelled_folder` (labels -1), detected
    from its contents. Raises DatasetError for a missing/empty folder or a malformed spec,
    plugins.UnknownNameError for an unknown scheme.
    """
    spec_str = str(spec)
    scheme, sep, rest = spec_str.partition(":")
    if sep and re.fullmatch(r"[A-Za-z][\w-]+", scheme) and not Path(spec_str).expanduser().exists():
        return plugins.get("dataset", scheme)(rest, transform=transform)
    root = _check_dir(os.path.expandvars(spec_str))
    entries = list(root.iterdir())
    if any(SAMPLE_FILE_RE.match(e.name) for e in entries if e.is_file()):
        return imagenet_sample(root, transform)
    subdirs = [e for e in entries if e.is_dir()]
    if subdirs and all(re.fullmatch(r"n\d{8}", d.name) for d in subdirs):
        return imagenet_val(root, transform)
    flat = [e for e in entries if e.is_file() and e.suffix.lower() in IMAGE_EXTENSIONS]
    if flat and not any(f.suffix.lower() in IMAGE_EXTENSIONS for d in subdirs for f in d.rglob("*")):
        return unlabelled_folder(root, transform)
    return image_folder(root, transform)


# --------------------------------------------------------------------------------------------
# Anything a user has, as a dataset

#: What :func:`as_dataset` accepts, for messages.
ACCEPTED = ("a folder or dataset spec (open_dataset), a torch Dataset whose items are an image or (image, label), "
            "a list of PIL images or of image paths, a uint8 array or tensor of images (N, H, W, 3) or (N, 3, H, W), "
            "or preprocessed float images (N, 3, H, W)")


def _describe(obj) -> str:
    """How messages name a user's object (never a repr: no memory addresses, no huge dumps)."""
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        kind = "numpy array" if isinstance(obj, np.ndarray) else "tensor"
        return f"the {kind} of shape {tuple(obj.shape)} and dtype {obj.dtype}"
    if isinstance(obj, (list, tuple)):
        kinds = sorted({type(x).__name__ for x in obj[:50]})
        return f"the {type(obj).__name__} of {len(obj)} {'/'.join(kinds) or 'items'}"
    if isinstance(obj, (str, Path)):
        return f"'{obj}'"
    return f"the {type(obj).__name__} object"


def _a(noun: str) -> str:
    """``noun`` with its indefinite article ("an int", "a str")."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _is_float(x) -> bool:
    return (x.dtype.is_floating_point if isinstance(x, torch.Tensor) else np.issubdtype(x.dtype, np.floating))


def _is_uint8(x) -> bool:
    return x.dtype == (torch.uint8 if isinstance(x, torch.Tensor) else np.uint8)


def to_image(x, where: str = "the image"):
    """One image as MiClip uses it: an RGB PIL image, or a (3, H, W) float32 tensor for an image
    that is already preprocessed (given to the model as it is).

    x: a PIL image; an image path; a uint8 array/tensor (H, W, 3), (3, H, W), (H, W) or with 1 or 4
    channels; a float array/tensor (3, H, W). ``where`` names it in errors. Raises
    UnreadableImageError for an unreadable file, DataFormatError for anything else.
    """
    if isinstance(x, Image.Image):
        return x if x.mode == "RGB" else x.convert("RGB")
    if isinstance(x, (str, Path)):
        return load_image(x)
    if isinstance(x, (np.ndarray, torch.Tensor)):
        shape = tuple(x.shape)
        if _is_uint8(x) and len(shape) in (2, 3):
            arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            if arr.ndim == 3 and arr.shape[-1] != 3 and (arr.shape[0] == 3 or arr.shape[-1] not in (1, 4)):
                arr = arr.transpose(1, 2, 0)  # channels first -> last (3 channels first win over 1 or 4 last)
            if arr.ndim == 3 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            if arr.ndim == 2 or arr.shape[-1] in (3, 4):
                return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
        elif _is_float(x) and len(shape) == 3 and shape[0] == 3:
            return torch.as_tensor(x).detach().cpu().to(torch.float32)
        elif _is_float(x) and len(shape) == 3 and shape[-1] == 3:
            raise DataFormatError(
                f"{where} is a float image of shape {shape} (channels last). Pass uint8 images (H, W, 3) with values "
                "0-255 (e.g. (x * 255).round().astype(np.uint8)), which get the model's and CLIP's preprocessing, or "
                "images already preprocessed for the model as float (3, H, W)")
        raise DataFormatError(
            f"{where} is an array of shape {shape} and dtype {x.dtype}; an image is uint8 (H, W, 3), (3, H, W) or "
            "(H, W), or a preprocessed float (3, H, W)")
    raise DataFormatError(f"{where} is {_a(type(x).__name__)}, not an image (a PIL image, an image path, a uint8 array "
                          "(H, W, 3) or a preprocessed float tensor (3, H, W))")


def to_label(y, where: str = "the label") -> int:
    """An integer class label; None gives -1 (unknown). Raises DataFormatError for anything else."""
    if y is None:
        return UNKNOWN_LABEL
    if isinstance(y, (torch.Tensor, np.ndarray)) and y.ndim == 0:
        y = y.item()
    if isinstance(y, (int, np.integer)) and not isinstance(y, (bool, np.bool_)):
        return int(y)
    raise DataFormatError(f"{where} is {_a(type(y).__name__)}; labels are integers (class indices), -1 for unknown")


def _split_item(item, where: str):
    """(image, label or None) of a dataset item: an image, ``(image, label)`` (more elements are
    ignored), ``(image,)``, or a dict with ``"image"``/``"img"`` and ``"label"``/``"target"``."""
    if isinstance(item, dict):
        image = next((item[k] for k in ("image", "img") if k in item), None)
        if image is None:
            raise DataFormatError(f"{where} is a dict with keys {sorted(map(str, item))[:10]}; it needs an 'image' "
                                  "(or 'img') key, and optionally 'label' (or 'target')")
        return image, next((item[k] for k in ("label", "target") if k in item), None)
    if isinstance(item, (tuple, list)):
        if not item:
            raise DataFormatError(f"{where} is an empty {type(item).__name__}; items are an image or (image, label)")
        return item[0], (item[1] if len(item) > 1 else None)
    return item, None


def _hash_image(h, image) -> None:
    """Feed an image's content (mode, size and pixels; or dtype, shape and values) to a hash."""
    if isinstance(image, Image.Image):
        h.update(f"pil|{image.mode}|{image.size}|".encode())
        h.update(image.tobytes())
    else:
        t = image.detach().cpu().contiguous()
        h.update(f"tensor|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _hash_array(arr) -> str:
    """sha256 of an array's dtype, shape and bytes (no copy when it is contiguous)."""
    a = arr.detach().cpu().contiguous().numpy() if isinstance(arr, torch.Tensor) else np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{a.dtype}|{a.shape}|".encode())
    h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()[:20]


def _hash_labels(labels: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]


class ImageDataset(torch.utils.data.Dataset):
    """The dataset :func:`as_dataset` returns: ``ds[i] -> (image, label)`` with image an RGB PIL
    image (or a preprocessed (3, H, W) float32 tensor) and label an int (-1: unknown).

    Attributes: ``fingerprint`` (identifies the content: computed on first use, see
    :func:`as_dataset`), ``classes`` (names or None), ``name`` (how messages name the user's
    object), ``files`` (image paths, for file-backed data; else None), ``preprocessed`` (True when
    the images are preprocessed tensors, which go to the model as they are).
    """

    def __init__(self, source, name: str, *, labels: Sequence[int] | None = None, fingerprint: str | None = None,
                 content_kind: str = "content", classes: Sequence[str] | None = None, preprocessed: bool | None = None,
                 derive_without: bool = False, progress: bool = True):
        if labels is None and isinstance(getattr(source, "labels", None), (list, tuple)):
            labels = source.labels  # the source knows its labels without reading images (file lists, the Shapes world)
        self.source, self.name, self.labels = source, name, None if labels is None else list(labels)
        self.classes = None if classes is None else list(classes)
        self._fingerprint, self._content_kind, self._preprocessed = fingerprint, content_kind, preprocessed
        self._derive_without, self._progress = derive_without, progress
        self.files = getattr(source, "files", None)

    def __len__(self) -> int:
        return len(self.source) if self.labels is None else len(self.labels)

    def __getitem__(self, index: int):
        where = f"item {index} of {self.name}"
        image, label = _split_item(self.source[index], where)
        if self.labels is not None:
            label = self.labels[index]
        return to_image(image, f"the image of {where}"), to_label(label, f"the label of {where}")

    @property
    def fingerprint(self) -> str:
        """Identifies the content (see :func:`as_dataset`); a content hash is computed at first use."""
        if self._fingerprint is None:  # computed on first use: reads every item once
            self._fingerprint = _content_fingerprint(self, self._content_kind, self._progress)
        return self._fingerprint

    @property
    def preprocessed(self) -> bool:
        """True when the images are preprocessed float tensors (read from item 0 where not known)."""
        if self._preprocessed is None:
            try:
                self._preprocessed = isinstance(self[0][0], torch.Tensor) if len(self) else False
            except UnreadableImageError:
                self._preprocessed = False
        return self._preprocessed

    def without(self, indices) -> "ImageDataset | None":
        """This dataset less the items at ``indices``, as :meth:`FileListDataset.without` gives it
        (same fingerprint as listing the folder again after deleting those files); None where the
        underlying data cannot say (in-memory data, overridden labels or fingerprint)."""
        if not self._derive_without or not hasattr(self.source, "without"):
            return None
        return as_dataset(self.source.without(indices), classes=self.classes)

    def __repr__(self) -> str:
        return f"ImageDataset({self.name}, n={len(self)})"


def _content_fingerprint(dataset: ImageDataset, kind: str, progress: bool) -> str:
    """Hash of every item's image and label (reads the whole dataset once)."""
    h = hashlib.sha256(kind.encode())
    for i in tqdm(range(len(dataset)), desc=f"fingerprint {dataset.name}", disable=bars_off(progress)):
        image, label = dataset[i]
        _hash_image(h, image)
        h.update(f"|{label}|".encode())
    return f"{kind}:{len(dataset)}:{h.hexdigest()[:20]}"


def _is_label_vector(labels, images) -> bool:
    """Whether ``labels`` is a 1-D integer sequence as long as ``images`` (an (images, labels) pair)."""
    try:
        arr = np.asarray(labels)
        return arr.ndim == 1 and arr.dtype.kind in "iu" and len(arr) == len(images)
    except (TypeError, ValueError):
        return False


def _check_labels(labels, n: int, name: str) -> list[int] | None:
    if labels is None:
        return None
    if isinstance(labels, (torch.Tensor, np.ndarray)):
        labels = labels.reshape(-1).tolist()
    labels = [to_label(y, f"label {i} of labels=") for i, y in enumerate(labels)]
    if len(labels) != n:
        raise DataFormatError(f"labels= has {len(labels)} entries for the {n} images of {name}")
    return labels


def as_dataset(obj, labels=None, *, fingerprint: str | None = None, classes: Sequence[str] | None = None,
               progress: bool = True) -> ImageDataset:
    """Anything that holds images, as an :class:`ImageDataset` (``ds[i] -> (image, label)``).

    obj: a folder path or dataset spec (:func:`open_dataset`; a flat folder of photos gives labels
    -1); a torch ``Dataset`` (or any object with ``len`` and indexing) whose items are an image,
    ``(image, label)`` or a dict with ``"image"`` and ``"label"``; a list of PIL images or of image
    paths; a uint8 array/tensor of images (N, H, W, 3) or (N, 3, H, W); a float array/tensor
    (N, 3, H, W) of images already preprocessed for the model (given to it as they are: then a
    CLIP backend cannot embed them). Images are PIL images, paths, uint8 arrays or preprocessed
    float tensors. An :class:`ImageDataset` is returned as it is (without overrides).

    An ``(images, labels)`` pair is the images with those labels.
    labels: (N,) integers overriding the items' labels (default: the items', -1 where none).
    fingerprint: a string that identifies the content, used instead of computing one.
    classes: class names (default: ``obj.classes`` where it has them).

    Fingerprints identify content, for store keys: a folder's is its listing (names, sizes, times);
    a list of paths likewise; an array's a hash of its bytes; a dataset's own ``.fingerprint``
    attribute where it has one; otherwise (a torch Dataset, a list of PIL images) a hash of every
    item's pixels and label. That reads the whole dataset once (as long as one pass of the model
    over it takes, less the model; a progress bar shows it), on first use; pass ``fingerprint=`` to
    skip it, promising that different content never gets the same string. Raises DataFormatError
    (a ValueError and TypeError) naming the object and what it lacks, DatasetError for a bad
    folder, and the item's error when an item cannot be read.
    """
    if isinstance(obj, ImageDataset) and labels is None and fingerprint is None and classes is None:
        return obj
    if isinstance(obj, tuple) and len(obj) == 2 and labels is None and _is_label_vector(obj[1], obj[0]):
        obj, labels = obj  # (images, labels), as a configuration holds labelled arrays
    name = _describe(obj)
    if isinstance(obj, (str, Path, os.PathLike)):
        obj = open_dataset(obj)
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return _array_dataset(obj, name, labels, fingerprint, classes)
    if isinstance(obj, (dict, set, bytes)) or not (hasattr(obj, "__len__") and hasattr(obj, "__getitem__")):
        raise DataFormatError(f"cannot use {name} as a dataset: it needs len() and indexing. Pass {ACCEPTED}")
    if len(obj) == 0:
        raise DataFormatError(f"{name} is empty")
    if isinstance(obj, (list, tuple)) and all(isinstance(x, (str, Path, os.PathLike)) for x in obj):
        files = [Path(x).expanduser().resolve() for x in obj]
        labels = _check_labels(labels, len(files), name)
        file_labels = labels if labels is not None else [UNKNOWN_LABEL] * len(files)
        if fingerprint is None:
            h = hashlib.sha256(b"files")
            for f, y in zip(files, file_labels):
                st = f.stat() if f.exists() else None
                h.update(f"{f}|{st and st.st_size}|{st and st.st_mtime_ns}|{y}".encode())
            fingerprint = f"files:{len(files)}:{h.hexdigest()[:16]}"
        source = FileListDataset(files, file_labels, list(classes or []), fingerprint)
        return ImageDataset(source, name, fingerprint=fingerprint, classes=source.classes, preprocessed=False,
                            derive_without=True)
    labels = _check_labels(labels, len(obj), name)
    own = getattr(obj, "fingerprint", None)
    classes = classes if classes is not None else getattr(obj, "classes", None)
    preprocessed = False if isinstance(obj, FileListDataset) and obj.transform is None else None
    if fingerprint is None and isinstance(own, str) and own:
        fingerprint = own if labels is None else f"{own}|labels={_hash_labels(labels)}"
        return ImageDataset(obj, name, labels=labels, fingerprint=fingerprint, classes=classes,
                            preprocessed=preprocessed, derive_without=labels is None)
    kind = "images" if isinstance(obj, (list, tuple)) else f"content:{type(obj).__name__}"
    return ImageDataset(obj, name, labels=labels, fingerprint=fingerprint, content_kind=kind, classes=classes,
                        preprocessed=preprocessed, progress=progress)


def _array_dataset(arr, name: str, labels, fingerprint: str | None, classes) -> ImageDataset:
    """An ImageDataset over a (N, H, W, 3) / (N, 3, H, W) uint8 or (N, 3, H, W) float array."""
    shape = tuple(arr.shape)
    float_chw = _is_float(arr) and len(shape) == 4 and shape[1] == 3
    uint8_images = _is_uint8(arr) and (len(shape) == 3 or (len(shape) == 4 and (shape[-1] in (1, 3, 4)
                                                                               or shape[1] in (1, 3, 4))))
    if not (float_chw or uint8_images):
        hint = " (channels last: convert to uint8 0-255)" if _is_float(arr) and len(shape) == 4 and shape[-1] == 3 else ""
        raise DataFormatError(f"cannot use {name} as images{hint}: pass uint8 (N, H, W, 3) or (N, 3, H, W) images, "
                              "or float (N, 3, H, W) images already preprocessed for the model")
    if shape[0] == 0:
        raise DataFormatError(f"{name} holds no images")
    labels = _check_labels(labels, shape[0], name)
    if fingerprint is None:
        fingerprint = f"array:{shape[0]}:{_hash_array(arr)}"
        if labels is not None:
            fingerprint += f"|labels={_hash_labels(labels)}"
    return ImageDataset(arr, name, labels=labels, fingerprint=fingerprint, classes=classes, preprocessed=float_chw)


def model_inputs(image, label: int, model_transform: Callable, clip_transform: Callable | None, where: str):
    """``(model input, CLIP input or an empty tensor, label)`` of one item of an ImageDataset: a
    PIL image goes through both preprocessings; a preprocessed float tensor goes to the model as
    it is. Raises DataFormatError when a CLIP preprocessing is asked for a preprocessed tensor."""
    if isinstance(image, torch.Tensor):
        if clip_transform is not None:
            raise DataFormatError(preprocessed_clip_message(where))
        return image, torch.zeros(0), label
    if not isinstance(image, Image.Image):
        raise DataFormatError(f"{where} is {_a(type(image).__name__)}, not a PIL image or preprocessed tensor")
    x_clip = clip_transform(image) if clip_transform is not None else torch.zeros(0)
    return model_transform(image), x_clip, label


def preprocessed_clip_message(name: str) -> str:
    """Why a CLIP backend cannot embed preprocessed tensors, and what to pass instead."""
    return (f"{name} holds images already preprocessed for the model (float tensors (3, H, W)), which go to the "
            "model as they are; a CLIP backend needs the original images to apply its own preprocessing. Pass the "
            "images as PIL images, image paths, a folder or uint8 arrays (N, H, W, 3) (the model's preprocessing "
            "then comes from the target), or build the store with clip=None")


class PairedTransform(torch.utils.data.Dataset):
    """Each item of a dataset (anything :func:`as_dataset` takes) as ``(model input, clip input or
    an empty tensor, label)`` (see :func:`model_inputs`). Both transforms run in DataLoader workers,
    so the main process only batches."""

    def __init__(self, dataset, model_transform, clip_transform=None):
        self.dataset = as_dataset(dataset)
        self.model_transform, self.clip_transform = model_transform, clip_transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, label = self.dataset[index]
        return model_inputs(img, label, self.model_transform, self.clip_transform, f"item {index} of {self.dataset.name}")


def load_images(dataset, preprocess: Callable, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of a dataset (anything :func:`as_dataset` takes), preprocessed and
    stacked: ((N, 3, H, W) float, (N,) int labels, -1 for unknown). Everything is in memory: for
    small sets (a notebook's probe images); the delta-accuracy harness streams instead."""
    ds = as_dataset(dataset, progress=False)
    n = len(ds) if n is None else min(n, len(ds))
    xs, ys = [], []
    for i in range(n):
        x, _, label = model_inputs(*ds[i], preprocess, None, f"image {i} of {ds.name}")
        xs.append(x)
        ys.append(int(label))
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)
