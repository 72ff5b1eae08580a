"""The Python API (finetune.fit / load / advise): the README's example end to end on real images, the same
metrics as the CLI, no state leaking between calls, and the CLI's errors for bad input."""

from __future__ import annotations

import json
import logging
import struct
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import finetune
from finetune.errors import FinetuneError
from tests.conftest import run_cli, write_images

# Fast and deterministic: real Lite0 weights, 32 px, two epochs, the fixed recipe, a whole network (partial).
FAST = {"data": {"image_size": 32, "batch_size": 16}, "trainer": {"max_epochs": 2, "accelerator": "cpu",
        "devices": 1, "enable_progress_bar": False}, "recipe": "off", "policy": "partial", "report": False}
FAST_CLI = ["data.image_size=32", "data.batch_size=16", "trainer.max_epochs=2", "trainer.accelerator=cpu",
            "trainer.devices=1", "trainer.enable_progress_bar=false", "recipe=off", "policy=partial", "report=false"]


def _digits(per_class: int, classes=(0, 1, 7), offset: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """scikit-learn's real 8x8 handwritten digits as uint8 arrays (a notebook's in-memory data)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = [], []
    for c in classes:
        for i in np.flatnonzero(d.target == c)[offset:offset + per_class]:
            images.append((d.images[i] * 255 / 16).astype(np.uint8))
            labels.append(f"digit{c}")
    return images, labels


def _folders(root: Path) -> Path:
    for split, (n, offset) in {"train": (16, 0), "val": (6, 16), "test": (8, 22)}.items():
        for i, (image, label) in enumerate(zip(*_digits(n, offset=offset))):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / split / label / f"{i:03d}.png")
    return root


def test_readme_python_example_end_to_end(tmp_path):
    images, labels = _digits(20)
    # images a fit that failed before training left in the folder: replaced, not mixed in
    write_images(tmp_path / "run" / "images" / "stale", "circle", 3, seed=0)
    run = finetune.fit((images, labels), run_dir=tmp_path / "run", seed=0, data={"val_fraction": 0.25}, **{
        k: v for k, v in FAST.items() if k != "data"}, **{"data.image_size": 32})
    assert run.dir == tmp_path / "run" and (run.dir / "metrics.json").is_file() and (run.dir / "fit.log").is_file()
    assert run.metrics["val/acc"] == json.loads((run.dir / "metrics.json").read_text())["val/acc"]
    assert run.policy["policy_applied"] == "partial" and run.scored is not None and run.scored.is_file()
    assert sorted(p.name for p in (run.dir / "images").iterdir()) == ["digit0", "digit1", "digit7"]
    model = run.model()
    assert model.classes == ["digit0", "digit1", "digit7"]

    # predict on paths, on PIL images and on arrays: the same image gives the same answer each way
    paths = sorted(str(p) for p in (run.dir / "images").rglob("*.png"))[:6]
    by_path = model.predict(paths, topk=2, as_frame=False)
    by_pil = model.predict([Image.open(p) for p in paths], topk=2, as_frame=False)
    by_array = model.predict([np.asarray(Image.open(p)) for p in paths], topk=2, as_frame=False)
    assert [r["label"] for r in by_path] == [r["label"] for r in by_pil] == [r["label"] for r in by_array]
    assert by_path[0]["prob_1"] == pytest.approx(by_pil[0]["prob_1"], abs=1e-6)
    # one batch array, as notebooks hold their data (N x H x W x 3, or N x H x W grayscale like digits' X)
    batch = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    by_batch = model.predict(batch, topk=2, as_frame=False)
    assert [r["label"] for r in by_batch] == [r["label"] for r in by_path]
    assert by_batch[0]["prob_1"] == pytest.approx(by_path[0]["prob_1"], abs=1e-6)
    assert len(model.predict(batch[..., 0], as_frame=False)) == 6 and model.features(batch).shape == (6, 1280)
    with pytest.raises(finetune.FinetuneError, match="channels-first image"):
        model.predict(np.moveaxis(batch[0], -1, 0))
    assert set(by_path[0]) == {"path", "label", "probability", "label_1", "prob_1", "label_2", "prob_2", "error"}
    frame = model.predict(run.dir / "images", as_frame=True)
    assert len(frame) == 60 and list(frame.columns[:3]) == ["path", "label", "probability"]

    scores = model.evaluate(run.dir / "images")
    assert scores["images"] == 60 and 0.0 <= scores["acc"] <= 1.0
    in_memory = model.evaluate((images, labels))  # the arrays fit was given: the same 60 images, the same scores
    assert in_memory["images"] == 60 and in_memory["acc"] == pytest.approx(scores["acc"])
    assert in_memory["loss"] == pytest.approx(scores["loss"], abs=1e-5)
    with pytest.raises(finetune.FinetuneError, match="pass a labelled folder or CSV path, or"):
        model.evaluate(images)
    with pytest.raises(finetune.FinetuneError, match=r"^data \(in memory\) has classes the checkpoint does not know: "
                                                      r"cat\. The checkpoint's classes: digit0"):
        model.evaluate((images[:2], ["digit0", "cat"]))
    assert model.features(paths).shape == (6, 1280)
    exported = model.export("hf", tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file() and exported["classes"] == model.classes
    assert finetune.load(run.scored).classes == model.classes


def test_fit_gives_the_cli_metrics_and_two_fits_give_the_same(tmp_path):
    root = _folders(tmp_path / "digits")
    keys = ("val/acc", "val/loss", "test/acc", "test/loss", "epochs", "policy")
    cli = run_cli("finetune", f"data.root={root}", f"run_dir={tmp_path / 'cli'}", "seed=3", "optimizer.lr=0.002",
                  *FAST_CLI, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr[-2000:]
    from_cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    handlers = list(logging.getLogger("finetune").handlers)
    first = finetune.fit(root, run_dir=tmp_path / "api1", seed=3, optimizer={"lr": 0.002}, **FAST)
    second = finetune.fit(str(root), ["optimizer.lr=0.002", "seed=3"], run_dir=tmp_path / "api2", **FAST)
    for key in keys:
        assert first.metrics[key] == from_cli[key] == second.metrics[key], key
    # nothing left behind: no global Hydra, no extra log handlers, no working-directory change
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    assert not GlobalHydra.instance().is_initialized() and not HydraConfig.initialized()
    assert logging.getLogger("finetune").handlers == handlers and Path.cwd() != tmp_path / "api1"


def test_bad_input_gets_the_cli_errors(tmp_path, monkeypatch):
    images, labels = _digits(4)
    with pytest.raises(FinetuneError, match=r"optimizer\.lrr is not a key.*Did you mean: optimizer\.lr"):
        finetune.fit((images, labels), optimizer={"lrr": 1e-3}, run_dir=tmp_path / "a")
    with pytest.raises(FinetuneError, match="policy=nope is not one of the policy configs"):
        finetune.fit((images, labels), policy="nope", run_dir=tmp_path / "b")
    with pytest.raises(FinetuneError, match="trainer.max_epochs=ten"):
        finetune.fit((images, labels), trainer={"max_epochs": "ten"}, run_dir=tmp_path / "c")
    with pytest.raises(FinetuneError, match="12 images but 11 labels"):
        finetune.fit((images, labels[:-1]), run_dir=tmp_path / "d")
    with pytest.raises(FinetuneError, match="every label is 'digit0': a classifier needs at least 2 classes"):
        finetune.fit((images, ["digit0"] * len(images)), run_dir=tmp_path / "d1")
    assert not (tmp_path / "d1" / "images").exists()

    mixed = [*images[:-1], np.zeros((16, 16), np.uint8)]
    with pytest.raises(FinetuneError, match=r"images\[0\] is 8x8 but images\[11\] is 16x16"):
        finetune.fit((mixed, labels), run_dir=tmp_path / "e")
    with pytest.raises(FinetuneError, match="mix channel layouts"):
        finetune.fit(([*images[:-1], np.zeros((8, 8, 3), np.uint8)], labels), run_dir=tmp_path / "f")
    with pytest.raises(FinetuneError, match="float64 array; images in memory are uint8"):
        finetune.fit(([im / 255.0 for im in images], labels), run_dir=tmp_path / "g")
    with pytest.raises(FinetuneError, match="a set cannot be a config value"):
        finetune.fit((images, labels), tta={"hflip"}, run_dir=tmp_path / "h")
    with pytest.raises(FinetuneError, match="data is a int"):
        finetune.fit(3)
    with monkeypatch.context() as m:  # in a notebook, DDP (which restarts the program) gets what to use instead
        m.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
        with pytest.raises(FinetuneError, match="trainer.strategy=ddp .*use trainer.strategy=ddp_spawn"):
            finetune.fit((images, labels), trainer={"strategy": "ddp", "devices": 2}, run_dir=tmp_path / "i")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(FinetuneError, match="is not a torch checkpoint"):
        finetune.load(tmp_path / "notes.ckpt")
    assert not any((tmp_path / x).exists() for x in "abci")  # a bad config leaves no run folder


def _wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a .wandb file: W&B's LevelDB-log framing (a 7-byte file header, 32 KiB blocks, each
    chunk a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST). wandb 0.2x+ no longer ships a reader."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending
            pending = b""


def _wandb_history(run_folder: Path, wait_s: float = 60.0) -> tuple[list[dict], list[str]]:
    """The metrics rows and artifact names recorded in an offline W&B run. W&B's writer process may still be
    writing the file after the run was finished (a fresh CI machine once read it with no rows yet): read it again
    until it holds the run's exit record, which is written last."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    (record_file,) = list(run_folder.glob("wandb/offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + wait_s
    while True:
        rows, artifacts, ended = [], [], False
        for data in _wandb_records(record_file):
            record = pb.Record()
            try:
                record.ParseFromString(data)
            except DecodeError:  # the record being written: read the file again
                break
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            elif kind == "artifact":
                artifacts.append(record.artifact.name)
            ended |= kind == "exit"
        if ended or time.monotonic() > deadline:
            return rows, artifacts
        time.sleep(0.5)


def test_wandb_offline_run_holds_the_metrics_and_the_run_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    images, labels = _digits(12)
    runs = [finetune.fit((images, labels), run_dir=tmp_path / f"run{i}", logger="wandb", seed=0, **FAST)
            for i in range(2)]
    for run in runs:  # each fit its own W&B run (the first is closed at its end), with this run's metrics
        rows, artifacts = _wandb_history(run.dir)
        val_acc = [r["val/acc"] for r in rows if "val/acc" in r]
        assert len(val_acc) == 3  # two epochs, then the scored checkpoint's validation
        assert val_acc[-1] == pytest.approx(run.metrics["val/acc"], abs=1e-6)
        assert any(name.startswith("run-files-") for name in artifacts)
        assert (run.dir / "logs" / "metrics.csv").is_file()  # the CSV log stays beside it (the report reads it)
    assert len({p.name for r in runs for p in r.dir.glob("wandb/offline-run-*")}) == 2


def test_advise_returns_the_decision_fit_then_applies(tmp_path):
    root = _folders(tmp_path / "digits")
    options = {"data": {"image_size": 32}, "recipe": "off", "report": False,
               "trainer": {"max_epochs": 1, "enable_progress_bar": False}}
    decision = finetune.advise(root, **options)
    assert decision["quadrant"] in ("small_similar", "small_different", "large_similar", "large_different")
    assert decision["measurements"]["images_per_class"]["median"] == 16 and decision["reasons"]
    run = finetune.fit(root, run_dir=tmp_path / "run", **options)
    assert run.policy["quadrant"] == decision["quadrant"]
    assert run.policy["policy_applied"] == decision["policy_applied"]
    with pytest.raises(FinetuneError, match="advise reads data from a folder"):
        finetune.advise(_digits(3))
