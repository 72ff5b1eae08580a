"""Kill a training process with SIGKILL mid-run, resume it in the same run folder, and get exactly
what an uninterrupted run gets (trainer.deterministic=true): weights, metrics, LR schedule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import CLASSES, FAST, make_cfg, write_images

from finetune.models.checkpoint import read_checkpoint
from finetune.train import train

RECIPE = ["policy=full", "augment=light", "trainer.deterministic=true", "trainer.max_epochs=4", "data.batch_size=4",
          "scheduler=plateau", "scheduler.patience=0", "~callbacks.early_stopping"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    root = tmp_path / "data"
    for s, (split, n) in enumerate((("train", 14), ("val", 4), ("test", 4))):
        for i, kind in enumerate(CLASSES):
            write_images(root / split / kind, kind, n, seed=10 * s + i)
    overrides = [f"data.root={root}", *FAST, *RECIPE]
    overrides = [o for o in overrides if not o.startswith(("trainer.max_epochs=1", "data.batch_size=8"))]

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "finetune"), *overrides, f"run_dir={killed}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.4)  # into the next epoch
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not (killed / "metrics.json").exists()
    stopped_at = read_checkpoint(last)["epoch"]
    assert stopped_at < 3  # killed before the end

    resumed = train(make_cfg([*overrides, f"run_dir={killed}", f"resume={killed}"]))
    straight = train(make_cfg([*overrides, f"run_dir={tmp_path / 'straight'}"]))

    for key in ("val/acc", "val/loss", "test/acc", "test/loss", "epochs"):
        assert resumed[key] == straight[key], key
    a = read_checkpoint(last)
    b = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"]
    for name, value in b["state_dict"].items():
        assert torch.equal(a["state_dict"][name], value), name
    lrs = [[g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]] for ckpt in (a, b)]
    assert lrs[0] == lrs[1]
    assert json.loads((killed / "metrics.json").read_text())["lr_reductions"] == straight["lr_reductions"]


def test_a_step_budget_run_killed_inside_its_epoch_resumes_from_its_last_step_checkpoint(tmp_path):
    """recipe=auto on data too large for whole passes trains a fraction of an epoch: last.ckpt is also written
    every tenth of the run, so a kill inside that one epoch resumes from there and ends at the step budget."""
    from conftest import image_folders

    root = image_folders(tmp_path / "imgs", 400)  # 1200 images: 960 train, 120 batches of 8 per epoch
    overrides = [f"data.root={root}", "recipe=auto", "recipe.budget=60", "policy=full", "data.image_size=32",
                 "data.batch_size=8", "trainer.accelerator=cpu", "trainer.devices=1",
                 "trainer.enable_progress_bar=false"]  # 60 images at 64 px = 240 at 32 px, x3: 90 steps of 8
    killed = tmp_path / "killed"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "finetune"), *overrides, f"run_dir={killed}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    chosen = {c["key"]: c["value"] for c in json.loads((killed / "recipe.json").read_text())["choices"]}
    assert chosen["trainer.max_steps"] == 90 and chosen["callbacks.last_checkpoint.every_n_train_steps"] == 9
    saved = read_checkpoint(last)
    assert saved["epoch"] == 0 and 9 <= saved["global_step"] < 90  # inside the first (and only) epoch

    metrics = train(make_cfg([*overrides, f"run_dir={killed}", f"resume={killed}"]))
    assert read_checkpoint(last)["global_step"] == 90 and "val/acc" in metrics
