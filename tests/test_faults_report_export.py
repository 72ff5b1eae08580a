"""A diverging run stops with a clear error and keeps its last good checkpoint; every run writes a
report whose numbers match the model's predictions; exported models match torch."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from finetune.errors import FinetuneError
from finetune.export import export, run_onnx, sample_inputs
from finetune.members import load_members, member_probabilities
from finetune.models.checkpoint import load_classifier, read_checkpoint
from finetune.recipe.callbacks import NonFiniteLossStop
from finetune.train import train


def test_nan_loss_stops_with_the_step_and_lrs_and_keeps_the_last_good_checkpoint(class_folders, fast_cfg, tmp_path):
    # Epoch 1 trains normally; then StepLR multiplies the LR by 1e30 and the loss blows up.
    cfg = fast_cfg(class_folders, "policy=full", "optimizer=sgd", "optimizer.lr=0.01", "scheduler=step",
                   "scheduler.step_size=1", "scheduler.gamma=1e30", "trainer.max_epochs=3", "~callbacks.early_stopping")
    with pytest.raises(FinetuneError) as info:
        train(cfg)
    message = str(info.value)
    assert re.search(r"became (nan|inf).* at epoch 2, step \d+", message), message
    assert "learning rates: head 1e+28" in message  # 0.01 * 1e30
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert str(last) in message
    state = read_checkpoint(last)
    assert state["epoch"] == 0 and all(
        torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point()
    )


class _BlowsUpAtStep3(L.LightningModule):
    """A real (tiny) Lightning fit whose loss is inf from the third optimizer step on."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        return loss * float("inf") if self.global_step >= 2 else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_on_a_gpu_the_nan_check_reads_the_step_before_yet_no_checkpoint_holds_the_bad_step(tmp_path):
    """NonFiniteLossStop's GPU mode (``lagged``: each step reads the previous step's flag so the CPU never waits for
    the device) run here on the CPU: a checkpoint saved after every step still stops at the bad step, unwritten."""

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 2)), batch_size=2)
    saves = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    stop = NonFiniteLossStop(tmp_path, lagged=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        callbacks=[stop, saves])
    with pytest.raises(FinetuneError, match=r"became inf at epoch 1, step 3 \(batch 2\)"):
        trainer.fit(_BlowsUpAtStep3(), data)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)  # a plain Lightning checkpoint
    assert saved["global_step"] == 2  # step 3's save was refused


def _table(markdown: str, title: str) -> list[list[str]]:
    """The first Markdown table after ``title``, without its header rows."""
    lines = markdown.split(title, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    return table[2:] if title.startswith("#") else table[1:]


def test_report_files_and_numbers(split_folders, fast_cfg, tmp_path):
    metrics = train(fast_cfg(split_folders, "policy=full", "trainer.max_epochs=2", "monitor=val/macro_f1"))
    run = Path(metrics["run_dir"])
    for name in ("learning_curves.png", "confusion_matrix.png", "augment_preview.png"):
        with Image.open(run / name) as image:
            image.verify()
            assert image.format == "PNG"
    report = (run / "report.md").read_text()
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html  # self-contained
    # The per-class table holds the best checkpoint's real recall on the test split.
    probs = member_probabilities(load_members(metrics["best_checkpoint"]), _split(split_folders, "test"), [], 64,
                                 torch.device("cpu")).mean(0)
    labels = np.array([y for _, y in _split(split_folders, "test")])
    rows = _table(report, "## Per-class results (test split, best checkpoint)")
    classes = json.loads((run / "classes.json").read_text())
    assert [r[0] for r in rows] == classes
    pred = probs.argmax(1).numpy()
    for i, row in enumerate(rows):
        recall = float(((pred == i) & (labels == i)).sum() / (labels == i).sum())
        assert float(row[2]) == pytest.approx(recall, abs=1e-4) and int(row[4]) == int((labels == i).sum())
    assert float((pred == labels).mean()) == pytest.approx(metrics["test/acc"], abs=1e-6)
    # the scores that stay honest under imbalance, as scikit-learn computes them on the same predictions
    from sklearn.metrics import balanced_accuracy_score, f1_score

    assert metrics["test/balanced_acc"] == pytest.approx(balanced_accuracy_score(labels, pred), abs=1e-6)
    assert metrics["test/macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"), abs=1e-6)
    assert {"val/balanced_acc", "val/macro_f1"} <= set(metrics)
    summary = dict(r[:2] for r in _table(report, "| metric | value |"))
    assert float(summary["test/acc"]) == pytest.approx(metrics["test/acc"], abs=1e-4)
    assert float(summary["test/macro_f1"]) == pytest.approx(metrics["test/macro_f1"], abs=1e-4)


def _split(root: Path, split: str) -> list[tuple[str, int]]:
    from finetune.data.datasets import scan_dataset

    return scan_dataset(root, 0.0, 0.0).splits[split]


def _photos() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_torch_on_real_photos_and_carries_classes(class_folders, fast_cfg, tmp_path, fmt):
    metrics = train(fast_cfg(class_folders, "policy=stage_probe"))
    out = tmp_path / f"model.{fmt}"
    result = export(metrics["best_checkpoint"], fmt, out, "uint8", _photos())
    assert result["max_abs_diff_vs_torch"] < 1e-4 and out.is_file()
    loaded = load_classifier(metrics["best_checkpoint"])
    images = sample_inputs(loaded, _photos(), "uint8")
    assert images.dtype == torch.uint8 and images.shape[-1] == loaded.preprocessing.image_size
    if fmt == "onnx":
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert json.loads(meta["finetune.classes"]) == loaded.classes
        assert json.loads(meta["finetune.preprocessing"])["image_size"] == loaded.preprocessing.image_size
        got = run_onnx(out, images.numpy())
    else:
        extra = {"finetune.classes": ""}
        module = torch.jit.load(str(out), _extra_files=extra)
        assert json.loads(extra["finetune.classes"]) == loaded.classes
        with torch.no_grad():
            got = module(images).numpy()  # one output: the open-set score only with known_score=true
    # Independent of export(): the file's output against the checkpoint's own eval path.
    pp = loaded.preprocessing
    x = (images.float() / 255 - torch.tensor(pp.mean).view(1, 3, 1, 1)) / torch.tensor(pp.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = (loaded.module(x) / loaded.temperature).softmax(-1).numpy()  # calibrated, as exported
    assert np.abs(got - expected).max() < 1e-4
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


def test_export_refuses_bad_format(class_folders, fast_cfg, tmp_path):
    metrics = train(fast_cfg(class_folders, "policy=linear_probe"))
    with pytest.raises(FinetuneError, match="format=tflite"):
        export(metrics["best_checkpoint"], "tflite", tmp_path / "m")


def test_checkpoint_writes_are_atomic(tmp_path):
    from finetune.run_files import atomic_checkpoint_io

    io = atomic_checkpoint_io()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    with pytest.raises(Exception):  # noqa: B017  (torch.save fails part-way: a lambda cannot be pickled)
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "bad": lambda: 0}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))  # the good file stands
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_scores_of_averaged_probabilities_are_honest_under_imbalance():
    """Predicting the majority class everywhere: 80% accuracy, but balanced accuracy 0.5 and macro F1 0.44
    (as finetune-eval, TTA and ensembles report them)."""
    from finetune.members import score_probabilities

    probs = torch.tensor([[0.9, 0.1]] * 10)[None]  # [members, images, classes]
    scores = score_probabilities(probs, [0] * 8 + [1] * 2)
    assert scores["acc"] == pytest.approx(0.8)
    assert scores["balanced_acc"] == pytest.approx(0.5)
    assert scores["macro_f1"] == pytest.approx((2 * 0.8 / 1.8 + 0.0) / 2, abs=1e-6)
