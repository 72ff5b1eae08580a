"""Train once, then use the run folder the way a user would: evaluate, predict, reload the checkpoint."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, FAST, make_cfg, write_images

from finetune.data.datamodule import ImageListDataset
from finetune.data.datasets import scan_dataset
from finetune.data.transforms import eval_transform
from finetune.errors import FinetuneError
from finetune.inference import evaluate, predict
from finetune.models.checkpoint import load_classifier
from finetune.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One real training run on train/val/test folders, shared by every test in this module."""
    base = tmp_path_factory.mktemp("roundtrip")
    root = base / "splits"
    for s, (split, n) in enumerate((("train", 10), ("val", 4), ("test", 4))):
        for i, kind in enumerate(CLASSES):
            write_images(root / split / kind, kind, n, seed=100 * s + i)
    run = base / "run"
    metrics = train(make_cfg([f"data.root={root}", f"run_dir={run}", *FAST]))
    return {"root": root, "run": run, "ckpt": run / "checkpoints" / "best.ckpt", "metrics": metrics, "base": base}


def _eval_cfg(ckpt: Path, root: Path, run_dir: Path, *extra: str):
    return make_cfg(
        [f"ckpt={ckpt}", f"data.root={root}", f"run_dir={run_dir}", "accelerator=cpu", *extra], config_name="eval"
    )


def test_metrics_json_is_complete(trained):
    saved = json.loads((trained["run"] / "metrics.json").read_text())
    for key in ("val/acc", "val/loss", "test/acc", "test/loss", "epochs", "fit_seconds"):
        assert key in saved, key
    assert saved["epochs"] == 1 and saved["fit_seconds"] > 0
    assert 0.0 <= saved["val/acc"] <= 1.0 and 0.0 <= saved["test/acc"] <= 1.0
    assert saved["images"] == {"train": 30, "val": 12, "test": 12}
    assert saved["weights"] == "offline"
    assert Path(saved["best_checkpoint"]) == trained["ckpt"]
    assert saved["test/acc"] == trained["metrics"]["test/acc"]


def test_evaluate_reproduces_test_accuracy(trained, tmp_path):
    out = tmp_path / "eval"
    metrics = evaluate(_eval_cfg(trained["ckpt"], trained["root"], out))
    saved = json.loads((trained["run"] / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["images"] == 12
    assert abs(metrics["acc"] - saved["test/acc"]) <= 1e-6
    # eval scores the calibrated probabilities (temperature fitted on val after training)
    assert abs(metrics["loss"] - saved["calibration"]["test"]["nll_after"]) <= 1e-4
    assert json.loads((out / "eval_metrics.json").read_text()) == metrics


def test_evaluate_named_split(trained, tmp_path):
    metrics = evaluate(_eval_cfg(trained["ckpt"], trained["root"], tmp_path / "e", "split=val"))
    saved = json.loads((trained["run"] / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["images"] == 12
    assert abs(metrics["acc"] - saved["val/acc"]) <= 1e-6
    with pytest.raises(FinetuneError, match="split=validation"):
        evaluate(_eval_cfg(trained["ckpt"], trained["root"], tmp_path / "e2", "split=validation"))


def test_predict_writes_topk_csv(trained, tmp_path):
    images = trained["root"] / "test"
    output = tmp_path / "preds" / "out.csv"
    cfg = make_cfg([f"ckpt={trained['ckpt']}", f"input={images}", f"output={output}", "topk=2",
                    "accelerator=cpu"], config_name="predict")
    assert predict(cfg) == output
    with output.open(newline="") as f:
        rows = list(csv.DictReader(f))
    classes = json.loads((trained["run"] / "classes.json").read_text())

    on_disk = sorted(str(p.resolve()) for p in images.rglob("*.png"))
    assert sorted(r["path"] for r in rows) == on_disk
    assert list(rows[0]) == ["path", "label", "probability", "label_1", "prob_1", "label_2", "prob_2", "error"]
    assert all(r["error"] == "" for r in rows)
    for r in rows:
        probs = [float(r["prob_1"]), float(r["prob_2"])]
        assert probs[0] >= probs[1] >= 0 and sum(probs) <= 1 + 1e-5
        assert r["label"] == r["label_1"] and float(r["probability"]) == probs[0]
        assert r["label_1"] in classes and r["label_2"] in classes and r["label_1"] != r["label_2"]

    # The CSV agrees with the checkpoint's own forward pass.
    loaded = load_classifier(trained["ckpt"])
    first = rows[0]
    x = ImageListDataset([(first["path"], -1)], eval_transform(loaded.preprocessing))[0][0]
    with torch.inference_mode():
        p = (loaded.module(x[None]) / loaded.temperature).softmax(-1)[0]  # calibrated
    assert loaded.classes[int(p.argmax())] == first["label_1"]
    assert abs(float(p.max()) - float(first["prob_1"])) < 1e-5


def test_predict_topk_larger_than_classes_is_capped(trained, tmp_path):
    one = next((trained["root"] / "val" / "circle").glob("*.png"))
    output = tmp_path / "one.csv"
    predict(make_cfg([f"ckpt={trained['ckpt']}", f"input={one}", f"output={output}", "topk=10",
                      "accelerator=cpu"], config_name="predict"))
    rows = list(csv.reader(output.open()))
    assert len(rows) == 2 and rows[0][-3:] == ["label_3", "prob_3", "error"]
    probs = [float(v) for v in rows[1][4:-1:2]]
    assert len(probs) == 3 and abs(sum(probs) - 1) < 1e-4 and probs == sorted(probs, reverse=True)
    assert sorted(rows[1][3:-1:2]) == sorted(CLASSES)


def test_checkpoint_reloads_deterministically(trained):
    a = load_classifier(trained["ckpt"])
    b = load_classifier(trained["ckpt"])
    assert a.classes == b.classes == list(CLASSES)
    assert a.module.net.get_classifier().out_features == 3
    assert not a.module.training
    x = torch.randn(4, 3, a.preprocessing.image_size, a.preprocessing.image_size,
                    generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(a.module(x), b.module(x))
    assert a.preprocessing.image_size == 32


def test_checkpoint_is_plain_data(trained):
    data = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    meta = data["finetune"]
    assert meta["backbone"] == "tf_efficientnet_lite0"
    assert meta["classes"] == list(CLASSES) and meta["num_classes"] == 3
    assert meta["preprocessing"]["image_size"] == 32
    assert data["state_dict"]["net.classifier.weight"].shape[0] == 3
    last = torch.load(trained["run"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    scored = json.loads((trained["run"] / "metrics.json").read_text())["calibration"]
    # the scored checkpoint also holds the calibration temperature fitted on its own predictions
    calibrated_meta = meta if Path(scored["checkpoint"]).name == Path(trained["ckpt"]).name else last["finetune"]
    assert "temperature" in calibrated_meta and "open_set" in calibrated_meta  # and the open-set threshold
    fitted = ("temperature", "open_set")
    assert {k: v for k, v in last["finetune"].items() if k not in fitted} == {
        k: v for k, v in meta.items() if k not in fitted}


def test_evaluate_subset_of_classes_remaps_labels_by_name(trained, tmp_path):
    """A folder with only 'stripes' and 'circle' (sorted: circle=0, stripes=1) must be scored with the
    checkpoint's indices (circle=0, stripes=2), i.e. the same as those images within the full test set."""
    root = tmp_path / "subset"
    for kind in ("circle", "stripes"):
        for p in (trained["root"] / "test" / kind).glob("*.png"):
            (root / kind).mkdir(parents=True, exist_ok=True)
            (root / kind / p.name).write_bytes(p.read_bytes())
    metrics = evaluate(_eval_cfg(trained["ckpt"], root, tmp_path / "e"))
    assert metrics["split"] == "all" and metrics["images"] == 8

    loaded = load_classifier(trained["ckpt"])
    index = scan_dataset(root, val_fraction=0.0)
    correct = 0
    for path, label in index.splits["train"]:
        x = ImageListDataset([(path, -1)], eval_transform(loaded.preprocessing))[0][0]
        with torch.inference_mode():
            predicted = loaded.classes[int(loaded.module(x[None]).argmax())]
        correct += predicted == index.classes[label]
    assert abs(metrics["acc"] - correct / 8) <= 1e-6


def test_evaluate_unknown_class_is_a_clear_error(trained, tmp_path):
    root = tmp_path / "other"
    write_images(root / "circle", "circle", 2, seed=5)
    write_images(root / "triangle", "square", 2, seed=6)
    with pytest.raises(FinetuneError, match="triangle") as err:
        evaluate(_eval_cfg(trained["ckpt"], root, tmp_path / "e"))
    assert "circle, square, stripes" in str(err.value)


def test_evaluate_a_single_class_folder(trained, tmp_path):
    """Scoring a checkpoint on images of one class is a real use (e.g. a new batch of one product)."""
    root = tmp_path / "one"
    for p in (trained["root"] / "test" / "square").glob("*.png"):
        (root / "square").mkdir(parents=True, exist_ok=True)
        (root / "square" / p.name).write_bytes(p.read_bytes())
    metrics = evaluate(_eval_cfg(trained["ckpt"], root, tmp_path / "e"))
    assert metrics["images"] == 4 and 0.0 <= metrics["acc"] <= 1.0
