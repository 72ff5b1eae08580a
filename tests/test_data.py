"""Dataset scanning (three layouts, seeded stratified splits) and decoding of every image kind users have."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, write_csv, write_images
from PIL import Image

from finetune.data.datasets import scan_dataset, stratified_split
from finetune.data.images import load_image
from finetune.errors import FinetuneError
from finetune.train import train


def _paths(samples) -> set[str]:
    return {p for p, _ in samples}


def _per_class(samples) -> Counter:
    return Counter(label for _, label in samples)


# --------------------------------------------------------------------------- layouts


def test_class_folders_seeded_stratified_split(class_folders):
    index = scan_dataset(class_folders, val_fraction=0.25, test_fraction=0.25, seed=7)
    assert index.layout == "class_folders"
    assert index.classes == list(CLASSES)
    assert list(index.splits) == ["train", "val", "test"]
    # 12 images per class: 3 val, 3 test, 6 train, for every class.
    assert index.counts() == {
        "train": {c: 6 for c in CLASSES},
        "val": {c: 3 for c in CLASSES},
        "test": {c: 3 for c in CLASSES},
    }
    train_, val, test = (_paths(index.splits[s]) for s in ("train", "val", "test"))
    assert not (train_ & val) and not (train_ & test) and not (val & test)
    on_disk = {str(p.resolve()) for p in class_folders.rglob("*.png")}
    assert train_ | val | test == on_disk
    # Labels agree with the folder each file is in.
    for split in index.splits.values():
        for path, label in split:
            assert Path(path).parent.name == index.classes[label]

    again = scan_dataset(class_folders, val_fraction=0.25, test_fraction=0.25, seed=7)
    assert again.splits == index.splits
    other = scan_dataset(class_folders, val_fraction=0.25, test_fraction=0.25, seed=8)
    assert _paths(other.splits["val"]) != val
    assert other.counts() == index.counts()


def test_class_folders_without_test_fraction_have_no_test_split(class_folders):
    index = scan_dataset(class_folders, val_fraction=0.5, test_fraction=0.0, seed=0)
    assert list(index.splits) == ["train", "val"]
    assert index.counts()["val"] == {c: 6 for c in CLASSES}


def test_split_folders_are_used_as_they_are(split_folders):
    index = scan_dataset(split_folders, val_fraction=0.5, test_fraction=0.5, seed=3)
    assert index.layout == "split_folders"
    assert index.classes == list(CLASSES)
    for split, n in (("train", 10), ("val", 4), ("test", 4)):
        on_disk = {str(p.resolve()) for p in (split_folders / split).rglob("*.png")}
        assert _paths(index.splits[split]) == on_disk, split
        assert index.counts()[split] == {c: n for c in CLASSES}


def test_split_folders_without_val_carve_it_from_train(tmp_path):
    root = tmp_path / "data"
    for i, kind in enumerate(CLASSES):
        write_images(root / "train" / kind, kind, 10, seed=i)
        write_images(root / "test" / kind, kind, 2, seed=10 + i)
    index = scan_dataset(root, val_fraction=0.2, test_fraction=0.3, seed=0)
    assert index.counts() == {
        "train": {c: 8 for c in CLASSES},
        "val": {c: 2 for c in CLASSES},
        "test": {c: 2 for c in CLASSES},  # the folder, not 30 % of train
    }
    assert _paths(index.splits["test"]) == {str(p.resolve()) for p in (root / "test").rglob("*.png")}



def test_csv_paths_are_relative_to_the_csv_folder(tmp_path, monkeypatch):
    data = tmp_path / "dataset"
    rows = []
    for i, kind in enumerate(CLASSES):
        for p in write_images(data / "pics" / f"group{i}", kind, 5, seed=i):
            rows.append([str(p.relative_to(data)), kind])
    csv_path = write_csv(data / "labels.csv", ["path", "label"], rows)
    monkeypatch.chdir(tmp_path)  # the CSV's folder, not the working directory, anchors the paths

    index = scan_dataset(csv_path, val_fraction=0.4, test_fraction=0.0, seed=1)
    assert index.layout == "csv"
    assert index.classes == sorted(CLASSES)
    assert index.counts() == {"train": {c: 3 for c in CLASSES}, "val": {c: 2 for c in CLASSES}}
    everything = index.splits["train"] + index.splits["val"]
    expected = {(str((data / r[0]).resolve()), index.classes.index(r[1])) for r in rows}
    assert set(everything) == expected


def test_csv_split_column(tmp_path):
    rows = []
    for i, kind in enumerate(CLASSES):
        for j, p in enumerate(write_images(tmp_path / kind, kind, 6, seed=i)):
            split = ["train", "", "training", "val", "valid", " TEST "][j]  # '' = train; aliases; any case
            path = str(p) if j % 2 else f"{kind}/{p.name}"  # absolute, or relative to the CSV's folder
            rows.append([path, kind, split])
    csv_path = write_csv(tmp_path / "all.csv", ["path", "label", "split"], rows)
    index = scan_dataset(csv_path, val_fraction=0.9, test_fraction=0.9, seed=0)  # present splits win
    assert index.counts() == {
        "train": {c: 3 for c in CLASSES},
        "val": {c: 2 for c in CLASSES},
        "test": {c: 1 for c in CLASSES},
    }
    assert {Path(p).name for p, _ in index.splits["test"]} == {f"{k}_{i}_5.png" for i, k in enumerate(CLASSES)}


def test_stratified_split_keeps_a_training_image_per_class():
    samples = [(f"a{i}", 0) for i in range(1)] + [(f"b{i}", 1) for i in range(2)] + [(f"c{i}", 2) for i in range(3)]
    samples += [(f"d{i}", 3) for i in range(20)]
    out = stratified_split(samples, {"val": 0.5, "test": 0.5}, seed=0)
    train_counts = _per_class(out["train"])
    assert all(train_counts[c] >= 1 for c in range(4)), train_counts
    assert _per_class(out["train"])[0] == 1  # a single image stays in train
    # Together the splits are a partition of the input.
    everything = [s for split in out.values() for s in split]
    assert sorted(everything) == sorted(samples)
    # Even asking for (almost) everything leaves one training image per class.
    greedy = stratified_split(samples, {"val": 0.99}, seed=1)
    assert _per_class(greedy["train"]) == {0: 1, 1: 1, 2: 1, 3: 1}
    # Fractions that round to 0 still give a small class one image per requested split, as long as
    # two stay for training: 4 images -> 2/1/1; 3 images -> 2/1 (no test).
    small = stratified_split([(f"c{i}", 0) for i in range(4)], {"val": 0.1, "test": 0.1}, seed=0)
    assert [len(small.get(s, [])) for s in ("train", "val", "test")] == [2, 1, 1]
    smaller = stratified_split([(f"c{i}", 0) for i in range(3)], {"val": 0.1, "test": 0.1}, seed=0)
    assert [len(smaller.get(s, [])) for s in ("train", "val", "test")] == [2, 1, 0]


def test_csv_rows_missing_a_label_are_an_error(tmp_path):
    write_images(tmp_path / "x", "circle", 2, seed=0)
    (tmp_path / "labels.csv").write_text("path,label\nx/circle_0_0.png,circle\nx/circle_0_1.png\n")
    with pytest.raises(FinetuneError, match="line 3"):
        scan_dataset(tmp_path / "labels.csv")


# --------------------------------------------------------------------------- decoding


def _check_rgb(img: np.ndarray, shape: tuple[int, int]) -> None:
    assert img.dtype == np.uint8 and img.shape == (*shape, 3)


def test_grayscale_decodes_to_equal_channels(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    img = load_image(str(tmp_path / "g.png"))
    _check_rgb(img, (6, 8))
    for c in range(3):
        assert np.array_equal(img[..., c], gray)


def test_rgba_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., :3] = (200, 10, 20)
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0  # fully transparent
    rgba[0, 1, 3] = 128  # half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = load_image(str(tmp_path / "a.png"))
    _check_rgb(img, (4, 5))
    assert img[0, 0].tolist() == [255, 255, 255]
    assert img[1, 1].tolist() == [200, 10, 20]
    half = img[0, 1].astype(int)
    assert np.all(np.abs(half - np.array([227, 132, 137])) <= 2), half


def test_palette_with_transparency_becomes_white(tmp_path):
    pal = Image.new("P", (3, 2), 0)
    pal.putpalette([0, 0, 255, 255, 0, 0] + [0] * (256 * 3 - 6))  # 0 = blue, 1 = red
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)  # blue is the transparent colour
    assert Image.open(tmp_path / "p.png").mode == "P"
    img = load_image(str(tmp_path / "p.png"))
    _check_rgb(img, (2, 3))
    assert img[0, 0].tolist() == [255, 0, 0]
    assert (img.reshape(-1, 3)[1:] == 255).all()  # every other pixel was transparent blue


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 40, 257 * 128, 65535]] * 3, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode == "I;16"
    img = load_image(str(tmp_path / "d.png"))
    _check_rgb(img, (3, 4))
    assert img[0, :, 0].tolist() == [0, 40, 128, 255]  # clipping would give [0, 255, 255, 255]
    assert np.array_equal(img[..., 0], img[..., 2])


def test_cmyk_jpeg_decodes_to_rgb(tmp_path):
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)  # red in CMYK
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    img = load_image(str(tmp_path / "c.jpg"))
    _check_rgb(img, (6, 8))
    r, g, b = img[3, 4].astype(int)
    assert r > 230 and g < 25 and b < 25


@pytest.mark.parametrize("ext", ["bmp", "webp", "tiff", "tif", "gif", "jpeg"])
def test_other_formats_decode(tmp_path, ext):
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[:, :4] = (10, 200, 30)
    rgb[:, 4:] = (240, 240, 240)
    path = tmp_path / f"x.{ext}"
    Image.fromarray(rgb).save(path, **({"lossless": True} if ext == "webp" else {}))
    img = load_image(str(path))
    _check_rgb(img, (5, 7))
    tolerance = 12 if ext in ("jpeg", "gif") else 0
    assert np.abs(img[2, 1].astype(int) - [10, 200, 30]).max() <= tolerance
    assert np.abs(img[2, 6].astype(int) - [240, 240, 240]).max() <= tolerance


def test_exif_orientation_is_applied(tmp_path):
    im = Image.fromarray(np.zeros((4, 10, 3), np.uint8))  # landscape pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(str(tmp_path / "phone.jpg")).shape == (10, 4, 3)


def test_load_image_shrinks_to_max_side(tmp_path):
    Image.fromarray(np.zeros((40, 100, 3), np.uint8)).save(tmp_path / "big.png")
    assert load_image(str(tmp_path / "big.png"), max_side=20).shape == (20, 50, 3)
    assert load_image(str(tmp_path / "big.png"), max_side=80).shape == (40, 100, 3)


def test_large_jpeg_decodes_at_reduced_scale_to_the_same_picture(tmp_path):
    from skimage.data import astronaut  # a real photo, 512 x 512

    big = Image.fromarray(astronaut()).resize((1600, 1200), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # portrait on display: the draft must not confuse width and height
    big.save(tmp_path / "photo.jpg", quality=92, exif=exif)
    fast = load_image(str(tmp_path / "photo.jpg"), max_side=146)
    assert fast.shape == (195, 146, 3)  # shorter side exactly max_side, upright
    reference = Image.open(tmp_path / "photo.jpg").transpose(Image.Transpose.ROTATE_270).resize(
        (146, 195), Image.BICUBIC
    )
    assert np.abs(fast.astype(float) - np.asarray(reference, float)).mean() < 3.0  # same picture, ~1 level off


def test_broken_image_names_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(FinetuneError, match="bad.png"):
        load_image(str(tmp_path / "bad.png"))


# --------------------------------------------------------------------------- training on mixed modes


def test_training_on_grayscale_and_rgba_images(tmp_path, fast_cfg):
    root = tmp_path / "mixed"
    for i, kind in enumerate(CLASSES):
        for j, path in enumerate(write_images(root / kind, kind, 8, seed=i)):
            rgb = Image.open(path)
            if j % 2:
                rgb.convert("L").save(path)
            else:
                rgba = rgb.convert("RGBA")
                rgba.putalpha(0 if j == 0 else 200)  # one fully transparent (all white) image per class
                rgba.save(path)
    modes = {Image.open(p).mode for p in root.rglob("*.png")}
    assert modes == {"L", "RGBA"}

    run = tmp_path / "run"
    metrics = train(fast_cfg(root, run_dir=run))
    assert metrics["images"] == {"train": 18, "val": 6}
    assert 0.0 <= metrics["val/acc"] <= 1.0 and np.isfinite(metrics["val/loss"])
    assert json.loads((run / "classes.json").read_text()) == list(CLASSES)
    assert (run / "checkpoints" / "best.ckpt").is_file()


def test_float_tiff_decodes_to_visible_pixels(tmp_path):
    """Mode F (float) TIFFs with values in 0..1 are scaled to 0..255, not truncated to black."""
    import numpy as np
    from PIL import Image

    from finetune.data.images import load_image

    arr = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    path = tmp_path / "float.tif"
    Image.fromarray(arr, mode="F").save(path)
    out = load_image(str(path))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out.max() == 255 and out.min() == 0
