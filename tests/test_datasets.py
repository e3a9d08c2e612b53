"""Dataset layouts, the errors bad folders give, and capture on real photos."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from miclip_nb.datasets import (
    DatasetError,
    PairedTransform,
    UnreadableImageError,
    image_folder,
    imagenet_sample,
    imagenet_val,
    load_image,
    open_dataset,
)
from miclip_nb.shapes import ShapesDataset

SAMPLE_NAMES = ["0000_n01440764_tench.jpg", "0002_n01484850_great_white_shark.jpg", "0004_n01494475_hammerhead.jpg"]


def write_jpeg(path, seed: int, size=(40, 30)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format="JPEG", quality=85)


@pytest.fixture
def sample_dir(tmp_path):
    """A tiny folder in the imagenet-sample-500 layout, with a README beside the photos."""
    root = tmp_path / "imagenet-sample"
    for seed, name in enumerate(SAMPLE_NAMES):
        write_jpeg(root / name, seed)
    (root / "README.md").write_text("not an image")
    return root


# ---------------------------------------------------------------- imagenet-sample layout


def test_imagenet_sample_layout(sample_dir):
    ds = imagenet_sample(sample_dir)
    assert len(ds) == 3
    assert [f.name for f in ds.files] == SAMPLE_NAMES
    assert ds.labels == [0, 2, 4]
    assert len(ds.classes) == 1000
    assert ds.classes[0] == "tench" and ds.classes[2] == "great white shark" and ds.classes[4] == "hammerhead"
    img, label = ds[1]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (40, 30) and label == 2
    assert open_dataset(sample_dir).fingerprint == ds.fingerprint  # detected from the file names


def test_imagenet_sample_wrong_index_for_wnid_raises(sample_dir):
    write_jpeg(sample_dir / "0001_n01440764_tench.jpg", 9)  # n01440764 is class 0, not 1
    with pytest.raises(DatasetError, match="0001_n01440764_tench.jpg.*index 1"):
        imagenet_sample(sample_dir)


def test_imagenet_sample_folder_without_such_files_raises(tmp_path):
    write_jpeg(tmp_path / "photo.jpg", 0)
    with pytest.raises(DatasetError, match="0000_n01440764_tench.jpg"):
        imagenet_sample(tmp_path)


def test_fingerprint_follows_the_content(sample_dir):
    before = imagenet_sample(sample_dir).fingerprint
    assert imagenet_sample(sample_dir).fingerprint == before
    write_jpeg(sample_dir / SAMPLE_NAMES[0], 42, size=(50, 50))  # same name, new photo
    assert imagenet_sample(sample_dir).fingerprint != before


def test_transform_is_applied(sample_dir):
    ds = imagenet_sample(sample_dir, transform=lambda img: img.size)
    assert ds[0] == ((40, 30), 0)


# ---------------------------------------------------------------- ImageFolder and wnid layouts


def test_image_folder_labels_follow_sorted_class_folders(tmp_path):
    write_jpeg(tmp_path / "dog" / "b.jpg", 0)
    write_jpeg(tmp_path / "cat" / "a.jpg", 1)
    write_jpeg(tmp_path / "cat" / "nested" / "c.jpg", 2)
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "d.png")
    (tmp_path / "dog" / "notes.txt").write_text("skip me")
    ds = image_folder(tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert [(f.relative_to(tmp_path).as_posix(), y) for f, y in zip(ds.files, ds.labels)] == [
        ("cat/a.jpg", 0), ("cat/nested/c.jpg", 0), ("dog/b.jpg", 1), ("dog/d.png", 1)]
    ds_open = open_dataset(tmp_path)
    assert ds_open.classes == ["cat", "dog"] and len(ds_open) == 4


def test_imagenet_val_wnid_layout(tmp_path):
    write_jpeg(tmp_path / "n01443537" / "ILSVRC2012_val_00000001.JPEG", 0)
    write_jpeg(tmp_path / "n01440764" / "ILSVRC2012_val_00000002.JPEG", 1)
    write_jpeg(tmp_path / "n01440764" / "ILSVRC2012_val_00000003.JPEG", 2)
    ds = open_dataset(tmp_path)  # detected as the wnid layout
    assert ds.labels == [0, 0, 1]  # standard ImageNet-1k indices, not folder ranks
    assert ds.classes[1] == "goldfish"
    assert imagenet_val(tmp_path).fingerprint == ds.fingerprint


def test_imagenet_val_rejects_non_wnid_folders(tmp_path):
    write_jpeg(tmp_path / "n01440764" / "a.JPEG", 0)
    write_jpeg(tmp_path / "cats" / "b.JPEG", 1)
    with pytest.raises(DatasetError, match="cats.*wnid"):
        imagenet_val(tmp_path)


# ---------------------------------------------------------------- bad folders and images


@pytest.mark.parametrize("loader", [open_dataset, image_folder, imagenet_val, imagenet_sample])
def test_missing_folder_raises(tmp_path, loader):
    with pytest.raises(DatasetError, match="does not exist"):
        loader(tmp_path / "nowhere")


@pytest.mark.parametrize("loader", [open_dataset, image_folder, imagenet_val, imagenet_sample])
def test_empty_folder_raises(tmp_path, loader):
    (tmp_path / "empty_class").mkdir()  # a class folder without images is still empty
    with pytest.raises(DatasetError, match="no "):
        loader(tmp_path if loader is not imagenet_val else tmp_path / "empty_class")


def test_file_instead_of_folder_raises(tmp_path):
    write_jpeg(tmp_path / "x.jpg", 0)
    with pytest.raises(DatasetError, match="not a folder"):
        open_dataset(tmp_path / "x.jpg")


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)


def test_garbage_image_raises_naming_the_file(tmp_path):
    bad = tmp_path / "cls" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00garbage, not a JPEG" * 10)
    with pytest.raises(UnreadableImageError, match="broken.jpg"):
        load_image(bad)
    ds = image_folder(tmp_path)  # listing works; reading the item fails clearly
    with pytest.raises(UnreadableImageError, match=str(bad)):
        ds[0]


def test_truncated_jpeg_raises_naming_the_file(tmp_path):
    good = tmp_path / "good.jpg"
    write_jpeg(good, 0, size=(64, 64))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(UnreadableImageError, match="cut.jpg"):
        load_image(cut)


def test_grey_and_rgba_images_come_out_rgb(tmp_path):
    Image.new("L", (5, 5), 3).save(tmp_path / "grey.png")
    Image.new("RGBA", (5, 5), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "grey.png").mode == "RGB"
    assert load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (1, 2, 3)


def test_unreadable_image_surfaces_from_build_store(tmp_path):
    """Capture over a folder with a broken file stops with the file's name, not a torch traceback."""
    import torch
    from torch import nn

    from miclip_nb.store import build_store
    from miclip_nb.zoo import load_target

    write_jpeg(tmp_path / "data" / "a" / "ok.jpg", 0)
    (tmp_path / "data" / "a" / "zz_bad.jpg").write_bytes(b"nope")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    target = load_target(model, preprocess=lambda img: torch.zeros(3, 8, 8), class_names=["a", "b"])
    with pytest.raises(UnreadableImageError, match="zz_bad.jpg"):
        build_store(target, open_dataset(tmp_path / "data"), "0", root=tmp_path / "stores", progress=False)


def folder_of_nine(root):
    files = []
    for i in range(9):
        files.append(root / ["a", "b", "c"][i // 3] / f"img{i}.jpg")
        write_jpeg(files[-1], i)
    return files


def test_without_is_the_folder_listed_again_after_deleting_the_files(tmp_path):
    from miclip_nb.datasets import _listing_fingerprint

    files = folder_of_nine(tmp_path / "data")
    ds = open_dataset(tmp_path / "data")
    assert ds.without([]).fingerprint == ds.fingerprint
    less = ds.without([4, 7])
    for i in (4, 7):
        files[i].unlink()
    fresh = open_dataset(tmp_path / "data")
    assert less.fingerprint == fresh.fingerprint != ds.fingerprint
    assert less.files == fresh.files and less.labels == fresh.labels == [0, 0, 0, 1, 1, 2, 2]
    assert (less.kind, less.root, less.classes) == (fresh.kind, fresh.root, fresh.classes)
    assert (fresh.kind, fresh.root, fresh.classes) == ("folder", ds.root, ["a", "b", "c"])
    # computed from the remaining files alone
    assert _listing_fingerprint("folder", ds.root, fresh.files, fresh.labels) == fresh.fingerprint
    with pytest.raises(IndexError, match="0..8"):
        ds.without([9])


def test_without_for_the_imagenet_sample_layout(sample_dir):
    ds = open_dataset(sample_dir)
    less = ds.without([1])
    (sample_dir / SAMPLE_NAMES[1]).unlink()
    fresh = open_dataset(sample_dir)
    assert less.fingerprint == fresh.fingerprint and less.labels == fresh.labels == [0, 4]


def test_deleting_a_whole_class_folder_changes_labels_and_fingerprint(tmp_path):
    """Removing class b's folder shifts class c's label: that listing is new content, not ``without``."""
    files = folder_of_nine(tmp_path / "data")
    less = open_dataset(tmp_path / "data").without([3, 4, 5])
    for f in files[3:6]:
        f.unlink()
    files[3].parent.rmdir()
    fresh = open_dataset(tmp_path / "data")
    assert fresh.files == less.files and fresh.labels != less.labels
    assert fresh.fingerprint != less.fingerprint


def test_without_on_a_dataset_with_its_own_fingerprint(sample_dir):
    from miclip_nb.datasets import FileListDataset

    full = open_dataset(sample_dir)
    ds = FileListDataset(full.files, full.labels, full.classes, "mine")
    assert ds.without([0]).fingerprint.startswith("mine|without:") and len(ds.without([0])) == 2
    assert ds.without([0]).fingerprint != ds.without([1]).fingerprint


# ---------------------------------------------------------------- the Shapes world by spec


def test_shapes_spec():
    ds = open_dataset("shapes:spurious:7")
    assert isinstance(ds, ShapesDataset) and ds.split == "spurious" and len(ds) == 7
    assert ds.fingerprint != open_dataset("shapes:test:7").fingerprint
    img, label = ds[0]
    assert img.size == (64, 64) and 0 <= label < 6


@pytest.mark.parametrize("spec", ["shapes:test", "shapes:test:many", "shapes:test:5:6", "shapes:test:-3"])
def test_malformed_shapes_spec_raises(spec):
    with pytest.raises(DatasetError, match="shapes:<split>:<n>"):
        open_dataset(spec)


@pytest.mark.parametrize("spec,match", [("shapes:nosplit:5", "unknown split"), ("shapes:test:0", "positive")])
def test_bad_shapes_values_raise(spec, match):
    with pytest.raises(ValueError, match=match):
        open_dataset(spec)


def test_paired_transform_needs_images_and_names_the_dataset():
    paired = PairedTransform(ShapesDataset("test", 2, transform=lambda img: 0), lambda img: img)
    with pytest.raises(TypeError, match=r"item 0 of the ShapesDataset object is an int, not an image \(a PIL image") as err:
        paired[0]
    assert "PairedTransform" not in str(err.value)


# ---------------------------------------------------------------- real photos (CI sets the folder)


def test_capture_on_real_photos_with_efficientnet_lite0(imagenet_sample_dir, tmp_path):
    from miclip_nb.store import build_store
    from miclip_nb.zoo import load_target

    ds = open_dataset(imagenet_sample_dir)
    assert len(ds) >= 32
    target = load_target("efficientnet_lite0")
    store = build_store(target, ds, n_items=32, root=tmp_path, batch_size=16, progress=False)
    assert store.complete and store.n_rows == 32
    acts = store.acts()
    assert acts.shape == (32, 192) and acts.isfinite().all()
    assert (acts.std(0) > 0).float().mean() > 0.9  # real, varied activations
    labels, preds = store.load("label"), store.load("pred")
    assert labels.tolist() == ds.labels[:32]
    accuracy = (preds == labels).float().mean().item()
    # Chance is 1/1000; the real weights get about 0.84 on these photos.
    assert accuracy >= 0.6, f"top-1 {accuracy:.2f} on 32 real photos"


# ---------------------------------------------------------------- as_dataset: anything a user has


def pixels(n: int = 4, seed: int = 0, size=(6, 5)):
    """(n, H, W, 3) uint8 random images."""
    return np.random.default_rng(seed).integers(0, 256, (n, size[1], size[0], 3), dtype=np.uint8)


def same_pil(a, b) -> bool:
    return a.mode == b.mode == "RGB" and a.size == b.size and a.tobytes() == b.tobytes()


def test_arrays_lists_and_tensors_give_the_same_images():
    import torch

    from miclip_nb.datasets import ImageDataset, as_dataset

    x = pixels()
    forms = {
        "uint8 NHWC array": as_dataset(x),
        "uint8 NCHW tensor": as_dataset(torch.from_numpy(x).permute(0, 3, 1, 2)),
        "list of PIL": as_dataset([Image.fromarray(p) for p in x]),
        "list of HWC arrays": as_dataset(list(x)),
    }
    for name, ds in forms.items():
        assert isinstance(ds, ImageDataset) and len(ds) == 4, name
        for i in range(4):
            img, label = ds[i]
            assert same_pil(img, Image.fromarray(x[i])) and label == -1, name
    assert as_dataset(forms["list of PIL"]) is forms["list of PIL"]  # idempotent
    grey = as_dataset(np.zeros((2, 5, 5), dtype=np.uint8))
    assert grey[1][0].mode == "RGB" and grey[1][0].size == (5, 5)


def test_preprocessed_float_images_stay_tensors():
    import torch

    from miclip_nb.datasets import as_dataset

    x = torch.randn(3, 3, 8, 8)
    ds = as_dataset(x, labels=[2, 0, 1])
    assert ds.preprocessed and not as_dataset(pixels()).preprocessed
    image, label = ds[1]
    assert torch.equal(image, x[1]) and image.dtype == torch.float32 and label == 0
    assert as_dataset(x.double().numpy()).preprocessed  # numpy float64 too, as float32
    assert as_dataset(x.double().numpy())[0][0].dtype == torch.float32


def test_torch_datasets_of_images_or_pairs_or_dicts():
    import torch

    from miclip_nb.datasets import as_dataset

    x = pixels()

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.from_numpy(x[i]), torch.tensor(i % 2)

    class Dicts(Pairs):
        def __getitem__(self, i):
            return {"image": Image.fromarray(x[i]), "label": i}

    class Bare(Pairs):
        def __getitem__(self, i):
            return Image.fromarray(x[i])

    assert [as_dataset(Pairs())[i][1] for i in range(4)] == [0, 1, 0, 1]
    assert [as_dataset(Dicts())[i][1] for i in range(4)] == [0, 1, 2, 3]
    assert [as_dataset(Bare())[i][1] for i in range(4)] == [-1] * 4
    assert as_dataset(Bare(), labels=[3, 2, 1, 0])[0][1] == 3
    assert all(same_pil(as_dataset(d)[2][0], Image.fromarray(x[2])) for d in (Pairs(), Dicts(), Bare()))
    assert as_dataset(Pairs(), classes=["even", "odd"]).classes == ["even", "odd"]


def test_fingerprints_follow_content_never_identity(tmp_path):
    import torch

    from miclip_nb.datasets import as_dataset

    x = pixels()
    fp = as_dataset(x).fingerprint
    assert fp == as_dataset(x.copy()).fingerprint and " at 0x" not in fp
    changed = x.copy()
    changed[0, 0, 0, 0] ^= 1
    assert len({fp, as_dataset(changed).fingerprint, as_dataset(x[:3]).fingerprint,
                as_dataset(x, labels=[0, 1, 2, 3]).fingerprint, as_dataset(x, fingerprint="mine").fingerprint}) == 5
    pil = [Image.fromarray(p) for p in x]
    assert as_dataset(pil).fingerprint == as_dataset([p.copy() for p in pil]).fingerprint
    assert as_dataset(pil).fingerprint != as_dataset(pil[::-1]).fingerprint
    # a torch Dataset's own fingerprint is kept (existing stores keep their keys)
    shapes = ShapesDataset("test", 3)
    assert as_dataset(shapes).fingerprint == shapes.fingerprint
    assert as_dataset(shapes, labels=[0, 0, 0]).fingerprint != shapes.fingerprint


def test_a_list_of_paths_and_a_flat_folder(tmp_path):
    from miclip_nb.datasets import as_dataset, unlabelled_folder

    for i in range(3):
        write_jpeg(tmp_path / "photos" / f"p{i}.jpg", i)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    files = sorted((tmp_path / "photos").glob("*.jpg"))
    listed = as_dataset([str(f) for f in files], labels=[1, 0, 1])
    assert listed.files == files and [listed[i][1] for i in range(3)] == [1, 0, 1]
    assert same_pil(listed[2][0], load_image(files[2]))
    flat = open_dataset(tmp_path / "photos")  # no class subfolders: unlabelled photos
    assert flat.labels == [-1, -1, -1] and flat.classes == [] and flat.files == files
    assert as_dataset(tmp_path / "photos").fingerprint == flat.fingerprint == unlabelled_folder(tmp_path / "photos").fingerprint
    assert as_dataset(str(tmp_path / "photos"))[0][1] == -1
    files[1].unlink()
    assert flat.without([1]).fingerprint == open_dataset(tmp_path / "photos").fingerprint
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        unlabelled_folder(tmp_path / "empty_dir")


def test_class_subfolders_still_win_over_loose_files(tmp_path):
    write_jpeg(tmp_path / "cat" / "a.jpg", 0)
    write_jpeg(tmp_path / "loose.jpg", 1)
    ds = open_dataset(tmp_path)
    assert ds.classes == ["cat"] and ds.labels == [0]


@pytest.mark.parametrize("bad, match", [
    ({"a": 1}, r"cannot use the dict object as a dataset: it needs len\(\) and indexing"),
    (42, r"cannot use the int object as a dataset"),
    ([], r"the list of 0 items is empty"),
    (np.zeros((2, 4, 4, 3), dtype=np.float32), r"channels last: convert to uint8"),
    (np.zeros((2, 4, 4, 3), dtype=np.int64), r"shape \(2, 4, 4, 3\) and dtype int64 as images"),
    (np.zeros((0, 4, 4, 3), dtype=np.uint8), r"holds no images"),
])
def test_unusable_objects_are_named_with_what_they_need(bad, match):
    from miclip_nb.datasets import DataFormatError, as_dataset

    with pytest.raises(DataFormatError, match=match) as err:
        as_dataset(bad)
    assert isinstance(err.value, ValueError) and isinstance(err.value, TypeError)


def test_bad_items_and_labels_are_named():
    from miclip_nb.datasets import DataFormatError, as_dataset

    with pytest.raises(DataFormatError, match=r"the label of item 1 of the list of 2 tuple is a str; labels are integers"):
        as_dataset([(Image.new("RGB", (2, 2)), 0), (Image.new("RGB", (2, 2)), "cat")])[1]
    with pytest.raises(DataFormatError, match=r"labels= has 2 entries for the 4 images"):
        as_dataset(pixels(), labels=[0, 1])
    with pytest.raises(DataFormatError, match=r"item 0 of the list of 1 dict is a dict with keys \['pixels'\]"):
        as_dataset([{"pixels": 1}])[0]
