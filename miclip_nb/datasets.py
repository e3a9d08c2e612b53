"""Datasets MiClip runs on: the Shapes world, image folders, ImageNet layouts.

Every dataset here yields ``(PIL image, label)`` and has ``classes`` (names, index = label) and a
``fingerprint`` string that identifies its content for cache keys. :func:`open_dataset` picks the
right one from a spec string or a path.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from . import plugins

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: ``{class_index:04d}_{wnid}_{class_name}.jpg``, the layout of imagenet-sample-500.
SAMPLE_FILE_RE = re.compile(r"^(\d{1,4})_(n\d{8})_(.+)\.(?:jpe?g|png)$", re.IGNORECASE)
#: Environment variable that points at a folder in the imagenet-sample layout (used by tests/CI).
IMAGENET_SAMPLE_ENV = "MICLIP_IMAGENET_SAMPLE"


class DatasetError(ValueError):
    """A dataset folder that is missing, empty, or not in an expected layout."""


class UnreadableImageError(OSError):
    """An image file that PIL cannot decode."""


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


def open_dataset(spec: str | Path, transform=None):
    """A dataset from a spec.

    ``"<scheme>:<rest>"`` gives a plug-in's dataset (:mod:`miclip_nb.plugins`; e.g. the Shapes
    world's ``"shapes:test:2000"``); a path gives an imagenet-sample folder, an ImageNet-val wnid
    layout, or a generic ImageFolder, detected from its contents. Raises DatasetError for a
    missing/empty folder or a malformed spec, plugins.UnknownNameError for an unknown scheme.
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
    return image_folder(root, transform)


class PairedTransform(torch.utils.data.Dataset):
    """Wrap a PIL-yielding dataset so each item is ``(model input, clip input or None, label)``.

    Both transforms run in DataLoader workers, so the main process only batches.
    """

    def __init__(self, dataset, model_transform, clip_transform=None):
        self.dataset, self.model_transform, self.clip_transform = dataset, model_transform, clip_transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, label = self.dataset[index]
        if not isinstance(img, Image.Image):
            raise TypeError("PairedTransform needs a dataset that yields PIL images (transform=None)")
        x_model = self.model_transform(img)
        x_clip = self.clip_transform(img) if self.clip_transform is not None else torch.zeros(0)
        return x_model, x_clip, label
