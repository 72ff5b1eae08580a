"""Hostile data: CSVs with repeated rows, contradictory labels and leakage; a file-check cache that must not
keep read failures nor trust rewritten files; files that fail after the check; unreadable folders,
symlinks, FIFOs and messy CSVs. Everything is reported by path; nothing is dropped or trained twice silently."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from conftest import CLASSES, image_folders, write_csv, write_images

from finetune.data.datamodule import ImageDataModule
from finetune.data.datasets import scan_dataset
from finetune.data.file_checks import cache_path, check_files
from finetune.data.transforms import Preprocessing
from finetune.data.validate import validate_dataset
from finetune.errors import FinetuneError
from finetune.train import train

PP = Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=1.0)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))



def _images(root: Path, n: int = 6) -> dict[str, list[Path]]:
    return {kind: write_images(root / kind, kind, n, seed=i) for i, kind in enumerate(CLASSES)}


def _kinds(problems) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in problems:
        out.setdefault(p["path"], []).append(p["kind"])
    return out


# --------------------------------------------------------------------------- item 7: CSV listings


def test_csv_with_every_row_twice_trains_each_image_once_and_reports_it(tmp_path, fast_cfg):
    images = _images(tmp_path / "pics")
    rows = [[str(p), kind] for kind, paths in images.items() for p in paths]
    csv_path = write_csv(tmp_path / "labels.csv", ["path", "label"], rows + rows)
    metrics = train(fast_cfg(csv_path, "policy=linear_probe", "data.val_fraction=0.34", run_dir=tmp_path / "run"))

    index = scan_dataset(csv_path, val_fraction=0.34, seed=0)
    train_paths = [p for p, _ in index.splits["train"]]
    val_paths = [p for p, _ in index.splits["val"]]
    assert len(train_paths) == len(set(train_paths)) and not set(train_paths) & set(val_paths)  # no carved leakage
    assert len(train_paths) + len(val_paths) == 18 == metrics["images"]["train"] + metrics["images"]["val"]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    dupes = [p for p in report["problems"] if p["kind"] == "duplicate_within_split"]
    assert sorted(p["path"] for p in dupes) == sorted(str(p.resolve()) for ps in images.values() for p in ps)
    first = str(images["circle"][0].resolve())
    (entry,) = [p for p in dupes if p["path"] == first]
    assert "listed 2 times in train" in entry["detail"] and "line 2" in entry["detail"] and "line 20" in entry["detail"]


def test_csv_image_with_two_labels_is_left_out_under_skip_and_stops_under_error(tmp_path):
    images = _images(tmp_path / "pics")
    rows = [[str(p), kind] for kind, paths in images.items() for p in paths]
    contradictory = images["circle"][0]
    rows.append([str(contradictory), "square"])
    csv_path = write_csv(tmp_path / "labels.csv", ["path", "label"], rows)
    index = scan_dataset(csv_path, val_fraction=0.0)
    assert str(contradictory.resolve()) not in {p for p, _ in index.splits["train"]}

    cleaned, report = validate_dataset(index, on_bad_file="skip")
    assert _kinds(report.problems)[str(contradictory.resolve())] == ["label_conflict"]
    assert str(contradictory.resolve()) in report.skipped
    (conflict,) = [p for p in report.problems if p["kind"] == "label_conflict"]
    assert (
        "circle and square" in conflict["detail"] and "line 2" in conflict["detail"] and "line 20" in conflict["detail"]
    )
    assert len(cleaned.splits["train"]) == 17

    with pytest.raises(FinetuneError, match=f"{contradictory.resolve()}.*circle and square.*on_bad_file=skip"):
        validate_dataset(index, on_bad_file="error")


def test_csv_same_path_in_train_and_val_is_reported_as_leakage(tmp_path):
    images = _images(tmp_path / "pics")
    rows = [[str(p), kind, "train" if i < 4 else "val"] for kind, paths in images.items() for i, p in enumerate(paths)]
    leaked = images["stripes"][0]
    rows.append([str(leaked), "stripes", "val"])
    csv_path = write_csv(tmp_path / "labels.csv", ["path", "label", "split"], rows)
    _, report = validate_dataset(scan_dataset(csv_path))
    (problem,) = [p for p in report.problems if p["path"] == str(leaked.resolve())]
    assert problem["kind"] == "duplicate_across_splits" and problem["split"] == "train, val"
    assert "leakage" in problem["detail"]


def test_identical_images_in_two_class_folders_are_a_label_conflict(tmp_path):
    root = tmp_path / "images"
    images = _images(root)
    copy = root / "square" / "copy.png"
    shutil.copy(images["circle"][0], copy)
    _, report = validate_dataset(scan_dataset(root, val_fraction=0.0))
    kinds = _kinds(report.problems)
    assert kinds[str(copy.resolve())] == ["label_conflict"] == kinds[str(images["circle"][0].resolve())]
    assert {str(copy.resolve()), str(images["circle"][0].resolve())} <= set(report.skipped)
    with pytest.raises(FinetuneError, match="circle and square"):
        validate_dataset(scan_dataset(root, val_fraction=0.0), on_bad_file="error")


def test_one_file_in_two_class_folders_through_a_symlink_is_a_label_conflict(tmp_path):
    root = tmp_path / "images"
    images = _images(root)
    (root / "square" / "link.png").symlink_to(images["circle"][0])
    index = scan_dataset(root, val_fraction=0.0)
    assert [p["kind"] for p in index.problems] == ["label_conflict"]
    assert index.problems[0]["path"] == str(images["circle"][0].resolve())
    assert str(images["circle"][0].resolve()) not in {p for p, _ in index.splits["train"]}


# --------------------------------------------------------------------------- item 8: the check's cache


def _cached(paths: list[str]) -> dict:
    return json.loads(cache_path(paths).read_text())["files"]


def test_cache_never_keeps_a_read_failure_and_checks_the_fixed_file_again(tmp_path):
    good = write_images(tmp_path, "circle", 1, seed=0)[0]
    folder_named_png = tmp_path / "x.png"
    folder_named_png.mkdir()
    dangling = tmp_path / "gone.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    paths = [str(good), str(folder_named_png), str(dangling)]
    results, _ = check_files(paths)
    assert (
        results[str(folder_named_png)]["kind"] == "unreadable" and "folder" in results[str(folder_named_png)]["detail"]
    )
    assert results[str(dangling)]["kind"] == "dangling_symlink"
    assert set(_cached(paths)) == {str(good)}  # a failure to open says nothing about bytes: never cached

    folder_named_png.rmdir()
    shutil.copy(good, folder_named_png)  # the user fixes both
    dangling.unlink()
    shutil.copy(good, dangling)
    results, from_cache = check_files(paths)
    assert from_cache == 1 and all(results[p]["kind"] is None for p in paths)


def test_each_data_set_has_its_own_cache_holding_only_its_files(tmp_path):
    """A single cache for every set ever checked grew without end and was read whole by each run."""
    first = [str(p) for p in write_images(tmp_path / "a" / "circle", "circle", 3, seed=0)]
    second = [str(p) for p in write_images(tmp_path / "b" / "square", "square", 2, seed=1)]
    check_files(first)
    check_files(second)
    assert cache_path(first) != cache_path(second)
    assert set(_cached(first)) == set(first) and set(_cached(second)) == set(second)
    Path(first[0]).unlink()  # gone from the set: gone from its cache at the next write
    extra = str(write_images(tmp_path / "a" / "circle", "circle", 4, seed=2)[-1])
    check_files([*first[1:], extra])
    assert set(_cached([*first[1:], extra])) == {*first[1:], extra}


def test_cache_does_not_trust_a_file_rewritten_with_its_old_size_and_mtime(tmp_path):
    path = write_images(tmp_path, "circle", 1, seed=0)[0]
    assert check_files([str(path)])[0][str(path)]["kind"] is None
    st = path.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity, so ctime can move
    path.write_bytes(b"\0garbage" * (st.st_size // 8) + b"\0" * (st.st_size % 8))  # same size, in place
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime: only ctime shows the write
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    results, from_cache = check_files([str(path)])
    assert from_cache == 0 and results[str(path)]["kind"] == "not_image"


# --------------------------------------------------------------------------- item 8: a file that fails after the check


@pytest.fixture
def checked(tmp_path):
    """A checked index of class folders, and one training file broken after the check (a folder of its name)."""
    root = tmp_path / "images"
    _images(root, 5)
    index, _ = validate_dataset(scan_dataset(root, val_fraction=0.0))
    broken = Path(index.splits["train"][0][0])
    broken.unlink()
    broken.mkdir()
    return index, broken


@pytest.mark.parametrize("preload", [True, False])
def test_loader_skips_a_file_that_fails_after_the_check(checked, preload, caplog):
    index, broken = checked
    data = ImageDataModule(index, PP, batch_size=4, num_workers=0, preload=preload, on_bad_file="skip")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        data.setup("fit")
        batches = list(data.train_dataloader())
    assert sum(len(y) for _, y in batches) == 12  # drop_last: 14 or 15 samples -> 3 full batches of 4
    assert len(data.datasets["train"]) == (14 if preload else 15)  # preloaded: left out; per item: replaced
    assert any(str(broken) in r.getMessage() and "Skipping" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("preload", "workers"), [(True, 0), (False, 0), (False, 1)])
def test_loader_error_names_a_file_that_fails_after_the_check(checked, preload, workers):
    index, broken = checked
    data = ImageDataModule(index, PP, batch_size=16, eval_batch_size=16, num_workers=workers, preload=preload,
                           on_bad_file="error")
    with pytest.raises(FinetuneError, match=f"Could not read image {broken}: .*folder") as raised:
        data.setup("fit")
        list(data.val_dataloader())
    assert "Traceback" not in str(raised.value)  # a worker's error arrives as one clean message


# --------------------------------------------------------------------------- scanning: folders and links


@contextlib.contextmanager
def _as_nobody():
    """Drop to an unprivileged user (tests run as root, and root reads a chmod 000 folder)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_unreadable_class_folder_is_reported_as_unreadable_not_empty():
    base = Path(tempfile.mkdtemp())  # not under pytest's 0700 tmp folder: the unprivileged user must get in
    try:
        base.chmod(0o755)
        root = base / "images"
        _images(root, 2)
        for d in (root, *(root / k for k in CLASSES)):
            d.chmod(0o755)
        locked = root / "square"
        locked.chmod(0)
        with _as_nobody(), pytest.raises(FinetuneError, match=f"Folder {locked} cannot be read .*Permission denied"):
            scan_dataset(root)
    finally:
        (base / "images" / "square").chmod(0o755)
        shutil.rmtree(base)


def test_symlinked_folders_are_followed_and_a_loop_is_not(tmp_path, caplog):
    root = tmp_path / "images"
    _images(root, 3)
    elsewhere = write_images(tmp_path / "more_circles", "circle", 2, seed=9)
    (root / "circle" / "more").symlink_to(tmp_path / "more_circles")  # a symlinked sub-folder
    (root / "circle" / "more_loop").symlink_to(root / "circle")  # a loop
    dots = write_images(tmp_path / "dots_elsewhere", "circle", 2, seed=8)
    (root / "dots").symlink_to(tmp_path / "dots_elsewhere")  # a symlinked class folder
    with caplog.at_level(logging.WARNING, logger="finetune"):
        index = scan_dataset(root, val_fraction=0.0)
    train = set(index.splits["train"])
    assert {(str(p.resolve()), index.classes.index("circle")) for p in elsewhere} <= train
    assert {(str(p.resolve()), index.classes.index("dots")) for p in dots} <= train
    assert len(train) == 3 * 3 + 2 + 2 and not index.problems  # the loop added nothing
    assert any("more_loop" in r.getMessage() and "links back" in r.getMessage() for r in caplog.records)


def test_dangling_symlink_and_fifo_are_listed_as_bad_files(tmp_path):
    root = tmp_path / "images"
    _images(root, 3)
    dangling = root / "circle" / "moved.jpg"
    dangling.symlink_to(tmp_path / "was_here.jpg")
    fifo = root / "square" / "pipe.png"
    os.mkfifo(fifo)
    _, report = validate_dataset(scan_dataset(root, val_fraction=0.0))
    kinds = _kinds(report.problems)
    assert kinds[str(dangling)] == ["dangling_symlink"] and kinds[str(fifo)] == ["unreadable"]
    assert {str(dangling), str(fifo)} <= set(report.skipped)
    (entry,) = [p for p in report.problems if p["path"] == str(dangling)]
    assert "dangling symlink" in entry["detail"] and "was_here.jpg" in entry["detail"]


def _huge_png(path: Path, side: int = 15000) -> None:
    """A valid black 1-bit PNG of side x side pixels (225 megapixels in ~30 KB): over PIL's decompression-bomb
    limit (2 x Image.MAX_IMAGE_PIXELS, 179 megapixels), as a scanned map or a stitched panorama can be."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(bytes(side * (1 + side // 8)), 9)  # each row: filter byte 0, then side/8 bytes of 1-bit
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_an_image_too_large_to_decode_safely_is_named_so_not_corrupt(tmp_path):
    root = tmp_path / "images"
    _images(root, 3)
    huge = root / "circle" / "scan.png"
    _huge_png(huge)
    _, report = validate_dataset(scan_dataset(root, val_fraction=0.0))
    assert _kinds(report.problems)[str(huge)] == ["too_large"] and str(huge) in report.skipped
    (entry,) = [p for p in report.problems if p["path"] == str(huge)]
    assert "225 megapixels, over PIL's limit of 179" in entry["detail"] and "smaller copy" in entry["detail"]


def test_a_camera_size_jpeg_is_checked_at_a_reduced_scale_with_its_full_size_and_truncation_found(tmp_path):
    """The check decodes JPEGs at 1/8 scale (4x faster on camera photos); what it reports must not change:
    the image's full size, and truncation anywhere in the compressed stream."""
    from PIL import Image
    from skimage.data import chelsea

    from finetune.data.file_checks import check_file

    photo = Image.fromarray(chelsea()).resize((2400, 1600), Image.BICUBIC)  # a real photo at a camera's size
    for name, options in (("baseline.jpg", {}), ("progressive.jpg", {"progressive": True})):
        path = tmp_path / name
        photo.save(path, quality=90, **options)
        result = check_file(str(path))
        assert result["kind"] is None and (result["width"], result["height"]) == (2400, 1600)
        data = path.read_bytes()
        for keep in (0.5, 0.995):
            cut = tmp_path / f"cut_{keep}_{name}"
            cut.write_bytes(data[:int(len(data) * keep)])
            assert check_file(str(cut))["kind"] == "truncated", (name, keep)


def test_images_next_to_class_folders_are_reported_not_dropped_silently(tmp_path, caplog):
    root = tmp_path / "images"
    _images(root, 2)
    write_images(root, "circle", 1, seed=5)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        scan_dataset(root, val_fraction=0.0)
    assert any("not in a class sub-folder" in r.getMessage() and "circle_5_0.png" in r.getMessage()
               for r in caplog.records)


# --------------------------------------------------------------------------- messy CSVs


def test_csv_with_bom_blank_lines_spaces_and_semicolons_reads(tmp_path):
    images = _images(tmp_path, 2)
    lines = ["\ufeff Path ; LABEL ;Split", ""]
    for kind, paths in images.items():
        lines += [f" {paths[0].relative_to(tmp_path)} ; {kind} ;train",
                  f"{paths[1].relative_to(tmp_path)};{kind}; VALID ", ";;"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    index = scan_dataset(tmp_path / "labels.csv")
    assert index.classes == sorted(CLASSES)
    assert index.counts() == {"train": {c: 1 for c in CLASSES}, "val": {c: 1 for c in CLASSES}}


def test_csv_errors_give_the_real_line_number_and_why(tmp_path, monkeypatch):
    images = _images(tmp_path / "data", 2)
    csv_path = tmp_path / "data" / "labels.csv"
    csv_path.write_text(f"path,label\n\n{images['circle'][0]},circle\n\nsquare,square\n")
    with pytest.raises(FinetuneError, match="line 5: .*square: a folder"):
        scan_dataset(csv_path)
    csv_path.write_text(f"path,label,split\n\n{images['circle'][0]},circle,dev\n")
    with pytest.raises(FinetuneError, match="line 3: split 'dev' is not a split name .*valid"):
        scan_dataset(csv_path)
    csv_path.write_text(f"path,label\n{images['circle'][0]},circle,extra\n")
    with pytest.raises(FinetuneError, match="line 2 has 3 fields but the header has 2"):
        scan_dataset(csv_path)
    monkeypatch.chdir(tmp_path)  # a path written relative to the working directory, not to the CSV
    csv_path.write_text(f"path,label\n{images['circle'][0].relative_to(tmp_path)},circle\n")
    with pytest.raises(FinetuneError,
                       match="does not exist \\(but .*circle_0_0.png does: paths are relative to the CSV"):
        scan_dataset(csv_path)


def test_labels_that_differ_only_in_case_or_spacing_are_reported(tmp_path):
    images = _images(tmp_path, 2)
    rows = [[str(p), {"circle": "Cat", "square": " cat_ ", "stripes": "dog"}[kind]]
            for kind, paths in images.items() for p in paths]
    index = scan_dataset(write_csv(tmp_path / "l.csv", ["path", "label"], rows), val_fraction=0)
    assert index.classes == ["Cat", "cat_", "dog"]  # spaces around a label are stripped; the rest is kept
    _, report = validate_dataset(index)
    (similar,) = [p for p in report.problems if p["kind"] == "similar_class_names"]
    assert similar["classes"] == ["Cat", "cat_"]


def test_loader_workers_follow_the_device_the_data_path_and_the_processes_sharing_the_cores(tmp_path, monkeypatch):
    """data.num_workers=auto: a CPU step uses every core (preloaded images transform in-process, files stream
    with a few workers); on a GPU the cores are free while it steps, so workers are used either way; DDP ranks
    on one machine split its cores."""
    index = scan_dataset(image_folders(tmp_path / "imgs", 2), 0.0)
    monkeypatch.setattr("os.cpu_count", lambda: 16)

    def workers(preloaded: bool, **kw) -> int:
        return ImageDataModule(index, PP, **kw)._resolve_workers(preloaded)

    assert (workers(True), workers(False)) == (0, 4)
    assert (workers(True, on_gpu=True), workers(False, on_gpu=True)) == (8, 8)
    assert workers(True, on_gpu=True, processes_per_machine=4) == 3  # 16 cores / 4 ranks, one for the rank
    assert workers(True, on_gpu=True, num_workers=2) == 2  # a number is kept
