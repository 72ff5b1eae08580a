"""Two-process DDP on CPU (gloo) against one process with the same global batch: same weights and
metrics within float tolerance, and one run folder with one set of outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLASSES, make_cfg, write_images

from finetune.models.checkpoint import read_checkpoint
from finetune.train import train

# Full-batch steps (each rank's 12 images = one batch; 24 in one batch alone), BatchNorm on its running
# statistics (SyncBatchNorm is CUDA-only), no
# dropout and no augmentation: the two runs then compute the same gradients, up to summation order.
COMMON = ["data.image_size=32", "policy=full", "augment=none", "+model.kwargs.drop_rate=0.0", "trainer.max_epochs=2",
          "~callbacks.early_stopping", "scheduler=none", "optimizer=sgd", "optimizer.lr=0.01",
          "regularization.trainable_bn=eval",
          "trainer.enable_progress_bar=false", "lr_scaling=linear", "report=false"]
TOLERANCE = 1e-4  # max abs difference of any weight and of the losses


def _uneven_splits(root: Path) -> Path:
    """train 24 images (12 per rank), val 9 and test 15: the scoring splits do not divide by 2 ranks."""
    for s, (split, n) in enumerate((("train", 8), ("val", 3), ("test", 5))):
        for i, kind in enumerate(CLASSES):
            write_images(root / split / kind, kind, n, seed=10 * s + i)
    return root


def _assert_matches_one_process(run: Path, root: Path, single_dir: Path) -> None:
    """The two-process run's metrics and last weights equal one process with the global batch (24) and the LR
    the linear rule gives two processes (0.01 x 2)."""
    single = train(make_cfg([f"data.root={root}", *COMMON, "data.batch_size=24", "optimizer.lr=0.02",
                             "trainer.accelerator=cpu", "trainer.devices=1", f"run_dir={single_dir}"]))
    two = json.loads((run / "metrics.json").read_text())
    for key in ("val/loss", "test/loss"):
        assert abs(two[key] - single[key]) < TOLERANCE, key
    assert two["val/acc"] == single["val/acc"] and two["test/acc"] == single["test/acc"]
    a = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    b = read_checkpoint(single_dir / "checkpoints" / "last.ckpt")["state_dict"]
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in b if b[k].is_floating_point())
    assert worst < TOLERANCE, worst


def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    """Also: val (9 images) and test (15) do not divide by the 2 ranks, and every image counts once
    (Lightning's DistributedSampler would pad each rank's share with repeats)."""
    root = _uneven_splits(tmp_path / "data")
    ddp_dir = tmp_path / "ddp"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "finetune"), f"data.root={root}", *COMMON, "data.batch_size=12",
         "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", f"run_dir={ddp_dir}"],
        check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Learning rates x2 (lr_scaling=linear)" in result.stdout + result.stderr
    assert "replicates some samples" not in result.stderr  # Lightning's padding sampler was not used
    _assert_matches_one_process(ddp_dir, root, tmp_path / "single")
    # One run folder, one set of run-level files (rank 0 wrote them), no per-rank copies.
    names = sorted(p.name for p in ddp_dir.iterdir())
    for name in ("metrics.json", "policy.json", "data_report.json", "classes.json", "config.yaml"):
        assert names.count(name) == 1
    assert sorted(p.name for p in (ddp_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert not list(tmp_path.glob("outputs"))  # no stray Hydra folders from the second rank


def test_ddp_ranks_share_rank_zeros_decision_and_train_a_cached_head_on_all_features(tmp_path):
    root = tmp_path / "data"
    for s, (split, n) in enumerate((("train", 8), ("val", 4), ("test", 4))):
        for i, kind in enumerate(CLASSES):
            write_images(root / split / kind, kind, n, seed=10 * s + i)
    # policy=auto measures on rank 0 only; the table's small cells are pointed at linear_probe here.
    common = [f"data.root={root}", "data.image_size=32", "policy=auto", "policy.actions.small_similar=linear_probe",
              "policy.actions.small_different=linear_probe", "policy.actions.small_different_last_stage=linear_probe",
              "trainer.max_epochs=2", "report=false",
              "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]
    result = subprocess.run([str(Path(sys.executable).parent / "finetune"), *common, "trainer.devices=2",
                             "trainer.strategy=ddp", f"run_dir={tmp_path / 'ddp'}"],
                            check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    single = train(make_cfg([*common, "trainer.devices=1", f"run_dir={tmp_path / 'single'}"]))
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    record = json.loads((tmp_path / "ddp" / "policy.json").read_text())
    assert record["feature_cache"]["used"] and record["policy_applied"] == "linear_probe"
    assert "Rank 1: applying rank 0's policy decision (linear_probe)" in result.stdout + result.stderr
    a = read_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")["state_dict"]["net.classifier.weight"]
    b = read_checkpoint(tmp_path / "single" / "checkpoints" / "last.ckpt")["state_dict"]["net.classifier.weight"]
    assert float((a - b).abs().max()) < TOLERANCE and abs(ddp["val/loss"] - single["val/loss"]) < TOLERANCE


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_on_one_machine_train_one_run_that_matches_one_process(tmp_path):
    """Multi-node as a cluster runs it: two torchrun "nodes" (one process each) meet at a c10d rendezvous on
    127.0.0.1, Lightning reads the torchrun environment (trainer.num_nodes=2), and the two write one run
    folder whose weights and metrics match one process with the same global batch."""
    root = _uneven_splits(tmp_path / "data")
    run = tmp_path / "two-nodes"
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=finetune-test", "-m", "finetune",
               f"data.root={root}", *COMMON, "data.batch_size=12", "trainer.accelerator=cpu", "trainer.devices=1",
               "trainer.num_nodes=2", "trainer.strategy=ddp", f"run_dir={run}"]
    nodes = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    _assert_matches_one_process(run, root, tmp_path / "single")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert sum("Learning rates x2 (lr_scaling=linear)" in o for o in outputs) == 1  # rank 0 logs the plan


@pytest.mark.parametrize("how", ["killed", pytest.param("hung", marks=pytest.mark.slow)])
def test_a_lost_rank_stops_the_run_with_the_checkpoint_to_resume_from_and_resume_takes_fewer_processes(tmp_path, how):
    """One of two DDP processes dies (SIGKILL) or hangs (SIGSTOP) mid-run: the other stops within seconds of
    the death, or of ddp_timeout_s for the hang (not torch's 30-minute collective timeout), with one paragraph
    naming the intact last.ckpt and the resume command, exit 75; resume=RUN then continues on one process;
    a resume shorter than the checkpoint gets a clear error."""
    import os
    import signal
    import time

    root = _uneven_splits(tmp_path / "data")
    run = tmp_path / "run"
    common = [c for c in COMMON if not c.startswith("trainer.max_epochs")]
    parent = subprocess.Popen(
        [str(Path(sys.executable).parent / "finetune"), f"data.root={root}", *common, "trainer.max_epochs=500",
         "data.batch_size=4", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
         f"run_dir={run}", f"ddp_timeout_s={20 if how == 'hung' else 300}"],
        # files, not pipes: a stopped rank keeps its inherited pipe ends open, and reading them would wait for it
        cwd=tmp_path, stdout=(tmp_path / "out.log").open("w"), stderr=(tmp_path / "err.log").open("w"))
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.is_file() and parent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    children = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True, check=False)
    ranks = [int(p) for p in children.stdout.split()]
    assert last.is_file() and len(ranks) == 1, (ranks, parent.poll())
    time.sleep(2)  # mid-epoch, a few epochs in
    os.kill(ranks[0], signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    lost = time.monotonic()
    try:
        parent.wait(timeout=120)
    finally:
        if how == "hung":
            os.kill(ranks[0], signal.SIGKILL)
    err = (tmp_path / "err.log").read_text()
    assert time.monotonic() - lost < 60
    assert parent.returncode == 75, err[-3000:]
    assert "Traceback" not in err
    message = " ".join(err.split())
    assert "Another process of this 2-process run stopped" in message and f"finetune resume={run}" in message
    epoch = read_checkpoint(last)["epoch"]  # intact: it loads
    resumed = subprocess.run(
        [str(Path(sys.executable).parent / "finetune"), f"resume={run}", "trainer.devices=1", "trainer.strategy=auto",
         f"trainer.max_epochs={epoch + 3}"], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == epoch + 3
    short = subprocess.run([str(Path(sys.executable).parent / "finetune"), f"resume={run}", "trainer.max_epochs=1"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert short.returncode == 2 and "Traceback" not in short.stderr
    assert "Pass a larger trainer.max_epochs" in " ".join(short.stderr.split())
