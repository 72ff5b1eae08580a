"""The run folder's lifecycle: resume with the run's own config, history kept, folders never mixed or
overwritten, clear errors for unwritable folders and full disks, file modes, stale temp files, Ctrl-C."""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import CLASSES, FAST, make_cfg, write_images

from finetune.errors import FinetuneError
from finetune.models.checkpoint import read_checkpoint
from finetune.report import read_curves
from finetune.run_folder import run_folder_lock
from finetune.train import train

BIN = Path(sys.prefix) / "bin"
PROBE = ["policy=linear_probe"]  # the fastest real training: cached features, L-BFGS head


def run_cli(*args: str, cwd: Path, preexec_fn=None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, str(BIN / "finetune"), *args], check=False, cwd=cwd, capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec_fn)


def assert_user_error(result: subprocess.CompletedProcess, *expected: str, code: int = 2) -> str:
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = " ".join(result.stderr.split())  # undo the CLI's line wrapping
    for text in expected:
        assert text in message, (text, message[-2000:])
    return message


def snapshot(run: Path) -> dict[str, bytes]:
    """The run's files (not the lock, nor what Hydra writes at every CLI start: .hydra/ and its log)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock" and p.suffix != ".log" and ".hydra" not in p.parts}


def csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def epochs_with(rows: list[dict[str, str]], key: str) -> list[int]:
    return [int(float(r["epoch"])) for r in rows if r.get(key)]


# ----------------------------------------------------------------------------- 2: resume uses the run's own config


def test_readme_resume_command_continues_with_the_runs_own_config(class_folders, fast_cfg, tmp_path):
    run = tmp_path / "run"
    train(fast_cfg(class_folders, *PROBE))
    # A SIGKILL leaves temp files of unfinished writes; ours are cleaned at the next start, others are not.
    stale = [run / "checkpoints" / ".last.ckpt.a1b2c3d4.tmp", run / ".config.yaml.x_9y8z7w.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    (run / ".notes.tmp").write_text("the user's own")

    # The README's command, plus a safe change and a retyped value equal to the run's: data.root is not needed.
    result = run_cli(f"resume={run}", "trainer.max_epochs=2", "data.image_size=32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["run_dir"] == str(run)
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 1
    config = (run / "config.yaml").read_text()
    assert "max_epochs: 2" in config and f"root: {class_folders}" in config
    assert not any(p.exists() for p in stale) and (run / ".notes.tmp").exists()
    # Hydra's log of the resumed run is in the run folder, not in a new outputs/<time>/ of the working directory.
    assert not (tmp_path / "outputs").exists()
    assert "Resuming" in "".join(p.read_text() for p in run.glob("*.log"))

    # Exactly as the README writes it: a finished run is scored again, its history intact.
    result = run_cli(f"resume={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert epochs_with(csv_rows(run), "train/acc") == [0, 1]


def test_resume_refuses_overrides_that_would_change_the_run_and_writes_nothing(class_folders, fast_cfg, tmp_path):
    run = tmp_path / "run"
    train(fast_cfg(class_folders, *PROBE))
    before = snapshot(run)
    with pytest.raises(FinetuneError) as caught:
        train(make_cfg([f"resume={run}", "data.image_size=64", "seed=3", "trainer.max_epochs=2"]))
    message = str(caught.value)
    for text in ("data.image_size=64 (the run has 32)", "seed=3 (the run has 0)", "may change only trainer.max_epochs",
                 str(run / "config.yaml")):
        assert text in message
    assert snapshot(run) == before
    # The CLI knows exactly what was typed (Hydra's overrides), a group switch included.
    result = run_cli(f"resume={run}", "policy=full", "trainer.max_epochs=2", cwd=tmp_path)
    assert_user_error(result, "policy.name=full (the run has linear_probe)", "may change only")
    assert snapshot(run) == before


def test_resume_from_a_checkpoint_file_continues_in_its_run_with_the_saved_policy(class_folders, fast_cfg, tmp_path,
                                                                                   caplog):
    run = tmp_path / "run"
    train(fast_cfg(class_folders, "policy=auto"))  # measures, then decides
    policy = (run / "policy.json").read_bytes()
    assert json.loads(policy)["measurements"] is not None
    caplog.set_level("INFO")
    metrics = train(make_cfg([f"resume={run / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=2"]))
    assert metrics["run_dir"] == str(run) and metrics["epochs"] == 2
    assert (run / "policy.json").read_bytes() == policy  # not measured again, not rewritten
    assert "Resuming with the run's policy decision" in caplog.text


def test_a_run_stopped_in_its_first_epoch_starts_again_in_place(class_folders, fast_cfg, tmp_path):
    run = tmp_path / "run"
    train(fast_cfg(class_folders, *PROBE))
    shutil.rmtree(run / "checkpoints")  # as if killed before the first epoch ended: config.yaml, no checkpoint
    (run / "metrics.json").unlink()
    metrics = train(make_cfg([f"resume={run}"]))
    assert metrics["epochs"] == 1 and (run / "checkpoints" / "last.ckpt").is_file()
    assert epochs_with(csv_rows(run), "train/acc") == [0]


def test_ensemble_resumes_every_member(class_folders, fast_cfg, tmp_path):
    run = tmp_path / "ens"
    train(fast_cfg(class_folders, *PROBE, "ensemble.size=2", run_dir=run))
    metrics = train(make_cfg([f"resume={run}", "trainer.max_epochs=2"]))
    assert len(metrics["ensemble"]["members"]) == 2
    for k in (0, 1):
        assert json.loads((run / "members" / str(k) / "metrics.json").read_text())["epochs"] == 2
        assert epochs_with(csv_rows(run / "members" / str(k)), "train/acc") == [0, 1]


# ----------------------------------------------------------------------------- 3: the history survives a resume


def test_resume_keeps_every_epoch_in_metrics_csv(class_folders, fast_cfg, tmp_path):
    run = tmp_path / "run"
    train(fast_cfg(class_folders, *PROBE, "trainer.max_epochs=2"))
    train(make_cfg([f"resume={run}", "trainer.max_epochs=4"]))
    rows = csv_rows(run)
    assert epochs_with(rows, "train/acc") == [0, 1, 2, 3]
    # One val row per epoch, and one for the final scoring (the first run's final row is not kept).
    assert epochs_with(rows, "val/acc") == [0, 1, 2, 3, 4]
    assert len([r for r in rows if not r["epoch"]]) == 4  # the LR, once per epoch
    assert [e for e, _ in read_curves(run / "logs" / "metrics.csv")["train/acc"]] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- 5: one run per folder


def test_new_run_refuses_a_folder_an_earlier_run_left_and_files_follow_the_umask(class_folders, fast_cfg, tmp_path):
    run = tmp_path / "run"
    # Hydra writes these into run_dir at startup, before the run: they are not an earlier run.
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("{}")
    (run / "main.log").write_text("")
    old = os.umask(0o002)  # group-writable, as on shared cluster filesystems
    try:
        train(fast_cfg(class_folders, *PROBE))
    finally:
        os.umask(old)
    for name in ("config.yaml", "metrics.json", "checkpoints/last.ckpt", "logs/metrics.csv"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o664, name

    before = snapshot(run)
    with pytest.raises(FinetuneError, match=f"run_dir={run} already holds files of an earlier run") as caught:
        train(fast_cfg(class_folders, *PROBE))
    assert f"finetune resume={run}" in str(caught.value)
    assert snapshot(run) == before


def test_a_second_run_into_a_folder_in_use_fails_at_once(class_folders, fast_cfg, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # Another run writing there (flock: the same for another process).
    with run_folder_lock(run), pytest.raises(FinetuneError, match=f"run_dir={run} is in use by another finetune run"):
        train(fast_cfg(class_folders, *PROBE))
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
    train(fast_cfg(class_folders, *PROBE))
    with run_folder_lock(run):  # released when the run ended
        pass


# ----------------------------------------------------------------------------- 11: unwritable folder, full disk


def test_read_only_run_folder_is_refused_before_any_work(class_folders, tmp_path):
    # Root writes anywhere: drop its permission-override capabilities, so the folder's mode applies.
    prefix = ()
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv to drop root's override of file permissions")
        prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner")
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    run = base / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        result = run_cli(f"data.root={class_folders}", f"run_dir={run}", *FAST, cwd=tmp_path, prefix=prefix)
        message = assert_user_error(result, f"run_dir={run} is not writable", "Permission denied")
        assert "Dataset:" not in result.stdout + message  # before the data is read
    finally:
        run.chmod(0o755)


def _small_file_limit() -> None:
    """Files over 2 MB fail to write (EFBIG), as on a full disk: a checkpoint is ~14 MB."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))


def test_a_checkpoint_that_cannot_be_written_is_named_and_the_last_good_one_kept(class_folders, fast_cfg, tmp_path):
    run = tmp_path / "run"
    train(fast_cfg(class_folders, *PROBE))
    last = run / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    result = run_cli(f"resume={run}", "trainer.max_epochs=2", cwd=tmp_path, preexec_fn=_small_file_limit)
    assert_user_error(result, "Could not save the checkpoint", str(run / "checkpoints"), "File too large",
                      f"resume={run}")
    assert last.read_bytes() == good and read_checkpoint(last)["epoch"] == 0
    assert not list((run / "checkpoints").glob(".*.tmp"))


# ----------------------------------------------------------------------------- Ctrl-C during fit


def test_ctrl_c_during_training_says_how_to_resume(tmp_path):
    root = tmp_path / "data"
    for i, kind in enumerate(CLASSES):
        write_images(root / kind, kind, 30, seed=i)
    run = tmp_path / "run"
    args = [f"data.root={root}", f"run_dir={run}", *FAST, "trainer.max_epochs=50", "policy=full", "data.batch_size=4",
            "~callbacks.early_stopping"]
    # A suite started in the background (nohup, `&`) ignores SIGINT, and an ignored signal is inherited across
    # exec (a handled one is reset to the default): handled here while the child starts, so it sees the Ctrl-C.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([str(BIN / "finetune"), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert_user_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr),
                      f"Interrupted; continue with: finetune resume={run}", code=130)


def test_resume_refuses_a_new_length_for_a_schedule_fitted_to_the_old_one(class_folders, fast_cfg, tmp_path):
    """Cosine's T_max (and one-cycle's total_steps) come back from the checkpoint: training longer would
    climb the cosine back up, or step past one-cycle's end; a plateau run may be extended."""
    run = tmp_path / "run"
    train(fast_cfg(class_folders, "policy=full", "scheduler=cosine"))
    before = snapshot(run)
    with pytest.raises(FinetuneError) as caught:
        train(make_cfg([f"resume={run}", "trainer.max_epochs=3"]))
    message = str(caught.value)
    assert "trainer.max_epochs=3 (the run has 1)" in message and "CosineAnnealingLR" in message
    assert snapshot(run) == before


def test_resume_of_a_run_without_last_ckpt_says_why(class_folders, fast_cfg, tmp_path):
    run = tmp_path / "run"
    train(fast_cfg(class_folders, *PROBE, "~callbacks.last_checkpoint"))
    with pytest.raises(FinetuneError, match="has no checkpoints/last.ckpt to continue from"):
        train(make_cfg([f"resume={run}", "trainer.max_epochs=2"]))


def test_an_open_ended_run_with_plateau_and_warmup_trains_to_max_steps(class_folders, fast_cfg):
    """trainer.max_epochs=-1 (Lightning: no epoch limit) bounded by max_steps: Lightning leaves the batch
    count unknown there, which made the scheduler setup fail with an OverflowError."""
    metrics = train(fast_cfg(class_folders, "policy=full", "trainer.max_epochs=-1", "trainer.max_steps=6",
                             "scheduler.warmup_epochs=1"))
    assert metrics["epochs"] >= 1 and "val/acc" in metrics
