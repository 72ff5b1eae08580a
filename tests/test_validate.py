"""Data validation on a corpus of broken and unusual files generated here: every bad file is
reported by path and skipped (or stops the run), unusual-but-valid files train, reruns hit the cache."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, draw, write_images
from PIL import Image

from finetune.data.datasets import scan_dataset
from finetune.data.validate import validate_dataset
from finetune.errors import FinetuneError
from finetune.train import train


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch) -> tuple[Path, dict[str, Path]]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "corpus"
    for s, (split, n) in enumerate((("train", 8), ("val", 3), ("test", 3))):
        for i, kind in enumerate(CLASSES):
            write_images(root / split / kind, kind, n, seed=10 * s + i)
    folder = root / "train" / "circle"
    rng = np.random.default_rng(0)
    files = {}
    jpeg = io.BytesIO()
    Image.fromarray(draw("circle", rng, 64)).save(jpeg, format="JPEG")
    files["truncated"] = folder / "truncated.jpg"
    files["truncated"].write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    files["zero_byte"] = folder / "empty.jpg"
    files["zero_byte"].write_bytes(b"")
    files["not_image"] = folder / "notes.jpg"
    files["not_image"].write_text("this is a text file, not a photo\n")
    files["too_small"] = folder / "one_pixel.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(files["too_small"])
    # Unusual but valid: these must train.
    files["cmyk"] = folder / "cmyk.jpg"
    Image.fromarray(draw("circle", rng)).convert("CMYK").save(files["cmyk"])
    files["png16"] = folder / "sixteen_bit.png"
    Image.fromarray(draw("circle", rng)[..., 0].astype(np.uint16) * 257).save(files["png16"])
    files["palette"] = folder / "palette.png"
    pal = Image.fromarray(draw("circle", rng)).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(files["palette"], transparency=0)
    files["exif"] = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    Image.fromarray(draw("circle", rng, 40)[:, :20].copy()).save(files["exif"], exif=exif.tobytes())
    # The same image in train and test: leakage.
    original = min((root / "train" / "square").glob("*.png"))
    files["leak_train"], files["leak_test"] = original, root / "test" / "square" / "copy_of_train.png"
    shutil.copy(original, files["leak_test"])
    return root, files


BAD = ("truncated", "zero_byte", "not_image", "too_small")


def test_bad_files_are_reported_and_skipped_and_the_rest_trains(corpus, fast_cfg, tmp_path):
    root, files = corpus
    metrics = train(fast_cfg(root, "policy=linear_probe", run_dir=tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    by_path = {}
    for p in report["problems"]:
        by_path.setdefault(p["path"], []).append(p["kind"])
    for kind in BAD:
        assert by_path[str(files[kind])] == [kind], kind
        assert str(files[kind]) in report["skipped"]
    assert sorted(report["skipped"]) == sorted(str(files[k]) for k in BAD)  # nothing else dropped
    for kind in ("cmyk", "png16", "palette", "exif"):
        assert str(files[kind]) not in report["skipped"]
    assert by_path[str(files["leak_test"])] == ["duplicate_across_splits"]
    assert by_path[str(files["leak_train"])] == ["duplicate_across_splits"]
    assert metrics["images"]["train"] == 3 * 8 + 4  # + the four unusual-but-valid files
    report_md = (tmp_path / "run" / "report.md").read_text()
    assert str(files["truncated"]) in report_md and "Data check: " in report_md


def test_on_bad_file_error_stops_at_the_first_bad_file_with_its_path(corpus, fast_cfg, tmp_path):
    root, files = corpus
    first = min(str(files[k]) for k in BAD)
    with pytest.raises(FinetuneError, match=f"Bad image file {first}"):
        train(fast_cfg(root, "policy=linear_probe", "data.on_bad_file=error", run_dir=tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training


def test_rerun_reads_the_check_cache(corpus):
    root, _ = corpus
    index = scan_dataset(root, 0.0, 0.0)
    _, first = validate_dataset(index)
    _, second = validate_dataset(index)
    assert first.from_cache == 0 and second.from_cache == second.checked == first.checked


def test_class_imbalance_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "imb"
    write_images(root / "train" / "circle", "circle", 22, seed=0)
    write_images(root / "train" / "square", "square", 2, seed=1)
    _, report = validate_dataset(scan_dataset(root, 0.0, 0.0), imbalance_ratio=10)
    (imbalance,) = [p for p in report.problems if p["kind"] == "class_imbalance"]
    assert "circle has 22" in imbalance["detail"] and "square 2" in imbalance["detail"]


def test_ensemble_scores_on_the_files_its_members_trained_on(corpus, fast_cfg, tmp_path):
    root, files = corpus  # the ensemble's own scoring must skip the same bad files (it used to decode them)
    (root / "test" / "circle" / "broken.jpg").write_bytes(files["truncated"].read_bytes())
    metrics = train(fast_cfg(root, "policy=linear_probe", "ensemble.size=2", run_dir=tmp_path / "ens"))
    assert len(metrics["test/member_acc"]) == 2 and 0 <= metrics["test/acc"] <= 1
