"""Several labels per image (issue 15, part 2), on real scikit-learn digits placed side by side (conftest's
digit_pairs_csv): the CSV layouts and their errors, MixUp of 0/1 rows, the one-vs-rest probe, and a run that
trains with a sigmoid per class, tunes and stores a threshold per class, reports mAP and per-class AP, and whose
thresholds predict, load(), eval and the ONNX export use."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_64, assert_user_error, digit_pairs_csv, make_cfg, run_cli, write_csv

from finetune.data.datasets import scan_dataset
from finetune.errors import FinetuneError
from finetune.models.checkpoint import CHECKPOINT_KEY, load_classifier, read_checkpoint
from finetune.multilabel import multi_hot_rows, tune_thresholds


def _images(root: Path, n: int) -> list[str]:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), 20 * i, dtype=np.uint8)).save(root / f"{i}.png")
    return [f"{i}.png" for i in range(n)]


def test_csv_layouts_give_the_same_index_and_bad_ones_are_refused(tmp_path: Path):
    names = _images(tmp_path, 6)
    labels = ["cat;dog", "dog", "cat|bird"[:3], "bird;cat", "", "dog;bird"]
    by_labels = write_csv(tmp_path / "labels.csv", ["path", "labels"], [[n, lab] for n, lab in zip(names, labels)])
    classes = ["bird", "cat", "dog"]
    one_hot = write_csv(tmp_path / "onehot.csv", ["path", *classes],
                        [[n, *("1" if c in lab.split(";") else "0" for c in classes)] for n, lab in zip(names, labels)])
    a = scan_dataset(by_labels, 0.0, task="multilabel")
    b = scan_dataset(one_hot, 0.0, task="multilabel")
    assert a.classes == b.classes == classes and a.multilabel
    assert a.splits == b.splits
    assert dict(a.splits["train"])[str((tmp_path / names[0]).resolve())] == (1, 2)  # cat, dog
    assert dict(a.splits["train"])[str((tmp_path / names[4]).resolve())] == ()  # an image of none of them
    assert a.counts()["train"] == {"bird": 2, "cat": 3, "dog": 3}

    mixed = write_csv(tmp_path / "mixed.csv", ["path", "labels"], [[names[0], "cat;dog"], [names[1], "dog|bird"]])
    with pytest.raises(FinetuneError, match=r"mix separators \(';' at .*line 2, '\|' at .*line 3\)"):
        scan_dataset(mixed, 0.0, task="multilabel")
    bad_cell = write_csv(tmp_path / "cell.csv", ["path", "cat", "dog"], [[names[0], "1", "yes"]])
    with pytest.raises(FinetuneError, match="column 'dog' holds 'yes'"):
        scan_dataset(bad_cell, 0.0, task="multilabel")
    empty_column = write_csv(tmp_path / "empty.csv", ["path", "cat", "dog"], [[names[0], "1", "0"]])
    with pytest.raises(FinetuneError, match="dog have no training row marked 1"):
        scan_dataset(empty_column, 0.0, task="multilabel")
    unseen = write_csv(tmp_path / "unseen.csv", ["path", "labels", "split"],
                       [[names[0], "cat", "train"], [names[1], "cat;dog", "val"]])
    with pytest.raises(FinetuneError, match=r"labels \['dog'\] appear in split 'val' but not in train"):
        scan_dataset(unseen, 0.0, task="multilabel")
    with pytest.raises(FinetuneError, match="Pass task=multilabel"):
        scan_dataset(by_labels, 0.0)  # task=multiclass
    with pytest.raises(FinetuneError, match="task=multilabel needs several labels per image.*is a folder"):
        scan_dataset(tmp_path, 0.0, task="multilabel")


def test_rare_classes_reach_the_validation_split():
    samples = [(f"{i}.png", (0,) if i % 10 else (0, 1)) for i in range(100)]  # class 1 on 10 images
    from finetune.data.datasets import stratified_split

    split = stratified_split(samples, {"val": 0.2}, seed=0)
    assert sum(1 in y for _, y in split["val"]) == 2 and len(split["val"]) == 20


def test_mixup_mixes_label_rows_by_the_image_weight():
    from finetune.data.mixing import BatchMixer

    torch.manual_seed(0)
    images = torch.rand(4, 3, 8, 8)
    rows = torch.tensor([[1, 0, 0, 0, 1], [0, 1, 0, 0, 0], [0, 0, 1, 1, 0], [1, 1, 0, 0, 0]]).float()
    for mixer in (BatchMixer(5, mixup_alpha=0.4, multilabel=True), BatchMixer(5, cutmix_alpha=1.0, multilabel=True)):
        mixed, targets = mixer(images, rows)
        lam = targets[1, 1]  # image 1 is mixed with image 0, which lacks class 1
        assert torch.allclose(targets, lam * rows + (1 - lam) * rows.roll(1, 0))
        if mixer.mix.__class__.__name__ == "MixUp":
            assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)


def test_one_vs_rest_probe_scores_real_pairs_above_chance():
    from sklearn.datasets import load_digits

    from finetune.policy.measure import probe_map

    d = load_digits()
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(d.data), 400), rng.integers(0, len(d.data), 400)
    features = np.hstack([d.data[a], d.data[b]])
    targets = multi_hot_rows([tuple({int(d.target[i]), int(d.target[j])}) for i, j in zip(a, b)], 10).numpy()
    assert probe_map(features, targets, folds=3, seed=0) > 0.8
    assert probe_map(features, rng.permutation(targets), folds=3, seed=0) < 0.4


def test_thresholds_maximise_each_class_f1():
    probs = torch.tensor([[0.9, 0.3], [0.6, 0.25], [0.2, 0.1], [0.1, 0.05]])
    targets = torch.tensor([[1, 1], [1, 1], [0, 0], [0, 0]]).float()
    low, high = tune_thresholds(probs, targets)
    assert 0.2 < low <= 0.6 and 0.1 < high <= 0.25  # both positives in, both negatives out


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pairs")
    csv_path = digit_pairs_csv(base / "pairs")
    run = base / "run"
    from finetune.train import train

    train(make_cfg([f"data.root={csv_path}", "task=multilabel", f"run_dir={run}", "policy=partial", *FAST_64,
                    "trainer.max_epochs=6", "augment=none", "data.batch_size=16"]))
    return {"csv": csv_path, "run": run, "base": base}


def test_a_multilabel_run_tunes_stores_and_uses_per_class_thresholds(pairs_run, tmp_path: Path):
    run, csv_path = pairs_run["run"], pairs_run["csv"]
    metrics = json.loads((run / "metrics.json").read_text())
    m = metrics["multilabel"]
    assert metrics["test/map"] > 0.6 and m["test"]["tuned"]["map"] == pytest.approx(metrics["test/map"], abs=1e-4)
    assert m["test"]["tuned"]["micro_f1"] >= m["test"]["at_0.5"]["micro_f1"]  # tuning on val helps on test
    assert "calibration" in metrics and "multilabel" in metrics["calibration"]["skipped"]
    meta = read_checkpoint(m["checkpoint"])[CHECKPOINT_KEY]
    assert meta["task"] == "multilabel" and meta["thresholds"] == [m["thresholds"][c] for c in meta["classes"]]
    report = (run / "report.md").read_text()
    assert "Per-class results (test split, several labels per image)" in report and "| AP |" in report
    assert "best.ckpt" in metrics["scored_checkpoint"] or "last.ckpt" in metrics["scored_checkpoint"]
    assert "monitor: val/map" in (run / "config.yaml").read_text()  # what picked best.ckpt and stopped early

    # The loss is binary cross-entropy; loss.class_weights weighs each class's positives (pos_weight)
    loaded = load_classifier(m["checkpoint"])
    logits, target = torch.randn(4, 10), (torch.rand(4, 10) > 0.7).float()
    assert float(loaded.module._cross_entropy(logits, target, "val")) == pytest.approx(
        float(torch.nn.functional.binary_cross_entropy_with_logits(logits, target)), abs=1e-6)

    # finetune-predict: every class at or above its threshold, and nothing else
    out = tmp_path / "pred.csv"
    result = run_cli("finetune-predict", f"ckpt={run}", f"input={pairs_run['base'] / 'pairs'}", f"output={out}",
                     "topk=10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 300
    for r in rows[:40]:
        probs = {r[f"label_{i}"]: float(r[f"prob_{i}"]) for i in range(1, 11)}
        expected = {c for c, p in probs.items() if p >= m["thresholds"][c]}
        assert set(filter(None, r["labels"].split(";"))) == expected
    import finetune

    model = finetune.load(run)
    first = model.predict([rows[0]["path"]], as_frame=False)[0]
    assert first["labels"] == [c for c in rows[0]["labels"].split(";") if c]
    scores = model.evaluate(str(csv_path), split="test")
    assert scores["map"] == pytest.approx(metrics["test/map"], abs=1e-4)

    # ONNX: sigmoid probabilities, the thresholds in the metadata
    import onnx

    from finetune.export import export, onnx_outputs

    onnx_path = tmp_path / "model.onnx"
    export(str(m["checkpoint"]), "onnx", onnx_path)
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert meta["finetune.task"] == "multilabel" and json.loads(meta["finetune.thresholds"]) == loaded.thresholds
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    (probs,) = onnx_outputs(onnx_path, x.numpy())
    assert probs.shape == (2, 10) and not np.allclose(probs.sum(1), 1.0)  # independent per class


def test_an_ensemble_uses_the_thresholds_tuned_on_its_averaged_probabilities(pairs_run, tmp_path: Path):
    """A run folder's ensemble.json carries the thresholds of the averaged model (ensemble.py / snapshots tune
    them on the averaged val probabilities); predict and eval use those, not one member's."""
    from finetune.inference import predict

    m = json.loads((pairs_run["run"] / "metrics.json").read_text())["multilabel"]
    ensemble = tmp_path / "ens"
    ensemble.mkdir()
    (ensemble / "ensemble.json").write_text(json.dumps({"members": [m["checkpoint"], m["checkpoint"]],
                                                        "kind": "seeds", "thresholds": [0.95] * 10}))
    out = tmp_path / "p.csv"
    image = pairs_run["base"] / "pairs" / "test_0.png"
    predict(make_cfg([f"ckpt={ensemble}", f"input={image}", f"output={out}", "topk=10"], "predict"))
    row = next(csv.DictReader(out.open()))
    probs = {row[f"label_{i}"]: float(row[f"prob_{i}"]) for i in range(1, 11)}
    assert set(filter(None, row["labels"].split(";"))) == {c for c, p in probs.items() if p >= 0.95}


def test_multilabel_refusals(pairs_run, tmp_path: Path):
    run, csv_path = pairs_run["run"], pairs_run["csv"]
    from finetune.inference import predict

    with pytest.raises(FinetuneError, match="is multi-label"):
        predict(make_cfg([f"ckpt={run}", f"input={pairs_run['base'] / 'pairs' / 'test_0.png'}",
                          f"output={tmp_path / 'p.csv'}", "unknown=auto"], "predict"))
    result = run_cli("finetune", f"data.root={csv_path}", f"run_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_user_error(result, "has a 'labels' column", "task=multilabel")
    from finetune.config_checks import check_train_config  # what `finetune` checks before importing torch

    for override, message in (("data.sampler=balanced", "not defined when an image has several classes"),
                              ("monitor=val/balanced_acc", "monitor=val/balanced_acc is logged with task=multiclass"),
                              ("callbacks.early_stopping.monitor=val/balanced_acc", "callbacks.early_stopping.monitor"),
                              ("open_set.fit=true", "open_set.fit=true works with task=multiclass only")):
        with pytest.raises(FinetuneError, match=message):
            check_train_config(make_cfg([f"data.root={csv_path}", "task=multilabel", override]))
    with pytest.raises(FinetuneError, match="monitor=val/map is logged with task=multilabel only"):
        check_train_config(make_cfg([f"data.root={csv_path}", "monitor=val/map"]))
