"""Issue 14: non-UTF-8 file and class names train end to end; a failing report, plot or preview never
costs metrics.json or the checkpoints; a run without a validation split says so and names its scores
honestly; finetune-preview writes into hydra.run.dir."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, make_cfg, write_images
from lightning.pytorch.callbacks import Callback

from finetune.data.datasets import scan_dataset
from finetune.inference import evaluate
from finetune.train import train

BIN = Path(sys.executable).parent
ODD_CLASS = b"caf\xe9"  # latin-1 'café' as an old zip archive leaves it: not valid UTF-8
ODD_CLASS_NAME = "caf\\xe9"  # how finetune names that class: the byte spelled out, lossless and plain text


def odd_names(tmp_path: Path, per_class: int = 8) -> Path:
    """root/<class>/*.png where one class folder and every file name hold a byte that is not UTF-8,
    plus an undecodable image with such a name (so the data report and the report list that path)."""
    root = tmp_path / "images"
    root.mkdir()
    broot = os.fsencode(root)
    for i, (kind, folder) in enumerate((("circle", b"circle"), ("square", b"square"), ("stripes", ODD_CLASS))):
        os.mkdir(os.path.join(broot, folder))
        for k, made in enumerate(write_images(tmp_path / "staging" / kind, kind, per_class, seed=i)):
            os.rename(made, os.path.join(broot, folder, b"img\xff_%d.png" % k))
    fd = os.open(os.path.join(broot, b"circle", b"broken\xfe.png"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"not a png")
    os.close(fd)
    return root


def assert_json(path: Path):
    assert path.is_file(), path
    return json.loads(path.read_text(encoding="utf-8"))


def test_non_utf8_class_and_file_names_train_end_to_end(tmp_path, caplog):
    root = odd_names(tmp_path)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        metrics = train(make_cfg([f"data.root={root}", f"run_dir={run}", *FAST]))
    assert "not valid UTF-8" in caplog.text and ODD_CLASS_NAME in caplog.text
    assert assert_json(run / "classes.json") == [ODD_CLASS_NAME, "circle", "square"]  # sorted by name
    problems = assert_json(run / "data_report.json")["problems"]
    # JSON keeps the exact path (Python's surrogate escape): it opens the very file again.
    assert any(os.fsencode(p["path"]).endswith(b"broken\xfe.png") for p in problems)
    assert_json(run / "policy.json")
    on_disk = assert_json(run / "metrics.json")
    assert on_disk["report"] and "report_error" not in on_disk and on_disk["val/acc"] == metrics["val/acc"]
    for name in ("report.md", "report.html", "logs/metrics.csv", "config.yaml"):
        text = (run / name).read_bytes().decode("utf-8")  # every text file is valid UTF-8
        if name.startswith("report"):
            assert ODD_CLASS_NAME in text and "broken\\xfe.png" in text
    for name in ("augment_preview.png", "learning_curves.png", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name

    # finetune-eval scans the same folders and maps the odd class to the checkpoint's class.
    scores = evaluate(make_cfg([f"ckpt={run}/checkpoints/last.ckpt", f"data.root={root}", f"run_dir={tmp_path / 'ev'}",
                                "accelerator=cpu"], config_name="eval"))
    assert scores["images"] == 24  # 3 classes x 8; the broken file is skipped
    assert assert_json(tmp_path / "ev" / "eval_metrics.json")["images"] == 24


def test_a_folder_named_like_an_escaped_name_is_refused(tmp_path):
    root = odd_names(tmp_path, per_class=2)
    twin = root / ODD_CLASS_NAME  # a real folder literally named caf\xe9: the same class name
    write_images(twin, "stripes", 2, seed=9)
    with pytest.raises(Exception, match="Rename one of them"):
        scan_dataset(root)


def test_failing_plot_and_preview_leave_a_note_not_a_failed_run(tmp_path, monkeypatch, caplog, class_folders):
    import finetune.preview
    import finetune.report

    def broken(*args, **kwargs):
        raise RuntimeError("simulated plotting bug")

    monkeypatch.setattr(finetune.report, "plot_confusion", broken)  # an internal bug, as a test can make one
    monkeypatch.setattr(finetune.preview, "_save_grid", broken)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        metrics = train(make_cfg([f"data.root={class_folders}", f"run_dir={run}", *FAST]))
    assert "augmentation preview could not be drawn" in caplog.text and "augment_preview.png" in caplog.text
    assert "confusion matrix and per-class results could not be drawn" in caplog.text
    assert not (run / "augment_preview.png").exists()
    on_disk = assert_json(run / "metrics.json")
    assert on_disk["report_problems"] == [
        "confusion matrix and per-class results: RuntimeError: simulated plotting bug"]
    assert on_disk["report"] == metrics["report"] and "val/acc" in on_disk
    report = (run / "report.md").read_text()
    assert "could not be drawn (RuntimeError: simulated plotting bug)" in report and "Learning curves" in report


class BlockReport(Callback):
    """Once training ends, a folder takes report.md's place: a real cause the report cannot be written."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module):
        self.path.mkdir()


def test_unwritable_report_keeps_metrics_and_checkpoints(tmp_path, caplog, class_folders):
    run = tmp_path / "run"
    block = ["+callbacks.block._target_=test_names_and_report.BlockReport",
             f"+callbacks.block.path={run / 'report.md'}"]
    with caplog.at_level(logging.WARNING):
        metrics = train(make_cfg([f"data.root={class_folders}", f"run_dir={run}", *FAST, *block]))
    assert "The report could not be written" in caplog.text and str(run / "report.md") in caplog.text
    on_disk = assert_json(run / "metrics.json")
    assert on_disk["report"] is None and "IsADirectoryError" in on_disk["report_error"]
    assert on_disk["val/acc"] == metrics["val/acc"]
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()


def test_no_validation_split_is_said_named_and_reported(tmp_path, caplog, class_folders):
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        metrics = train(make_cfg([f"data.root={class_folders}", f"run_dir={run}", *FAST, "data.val_fraction=0",
                                  "trainer.max_epochs=2", "policy=full", "scheduler.patience=0"]))
    warning = caplog.text
    assert "NO VALIDATION SPLIT: data.val_fraction=0" in warning and "train_eval/acc" in warning
    assert "set data.val_fraction" in warning and "best.ckpt (val/acc)" in warning and "early stopping" in warning
    assert "ReduceLROnPlateau schedule follows train_eval/loss" in warning
    on_disk = assert_json(run / "metrics.json")
    assert on_disk["validation"].startswith("none: scored on training images")
    assert "train_eval/acc" in on_disk and not any(k.startswith("val/") for k in on_disk)
    assert on_disk["best_checkpoint"] is None and on_disk["scored_checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    assert "no validation split" in on_disk["checkpoint_choice"] and metrics["epochs"] == 2
    assert not (run / "checkpoints" / "best.ckpt").exists()
    with open(run / "logs" / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert "train_eval/acc" in columns and not any(c.startswith("val/") for c in columns)
    assert "NO VALIDATION SPLIT" in (run / "report.md").read_text()


def test_classes_too_small_to_split_are_a_run_without_validation(tmp_path, caplog):
    root = tmp_path / "tiny"
    for i, kind in enumerate(("circle", "square", "stripes")):
        write_images(root / kind, kind, 2, seed=i)  # 2 images: round(2 x 0.2) = 0 for validation
    with caplog.at_level(logging.WARNING):
        metrics = train(make_cfg([f"data.root={root}", f"run_dir={tmp_path / 'run'}", *FAST]))
    assert "NO VALIDATION SPLIT: data.val_fraction=0.2 gives no class a validation image" in caplog.text
    assert metrics["validation"].startswith("none") and "train_eval/acc" in metrics and "val/acc" not in metrics


def test_normal_split_says_it_validates(tmp_path, split_folders):
    metrics = train(make_cfg([f"data.root={split_folders}", f"run_dir={tmp_path / 'run'}", *FAST, "report=false"]))
    assert metrics["validation"] == "val split, 12 images" and "val/acc" in metrics and "train_eval/acc" not in metrics


def test_preview_cli_honours_hydra_run_dir_and_odd_names(tmp_path):
    root = odd_names(tmp_path, per_class=2)
    out = tmp_path / "somewhere"
    # A strict UTF-8 console (as under en_US.UTF-8): a non-UTF-8 name logged there used to be a "Logging error".
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    result = subprocess.run([str(BIN / "finetune-preview"), f"data.root={root}", "rows=3", "draws=1",
                             f"hydra.run.dir={out}"], check=False, capture_output=True, text=True, cwd=tmp_path,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Logging error" not in result.stderr
    assert "skipped 1 image(s)" in result.stdout + result.stderr  # the broken file: skipped, as training does
    assert (out / "augment_preview.png").is_file() and not (tmp_path / "augment_preview.png").exists()
