"""data.batch_size=auto and lr_reference_batch: the memory rule on probe numbers, the CPU answer (32, with its reason,
in the recipe and in config.yaml), the LR scaled with the batch by lr_scaling in a real fit, the config check, and DDP
ranks that chose different batches stopping together with one clear error (two real gloo processes).

The CUDA probe itself (``peak_training_memory``) needs a GPU: ``scripts/gpu_check.sh`` runs it (BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import FAST, digit_folders, make_cfg

from finetune.batch_size import MAX_BATCH, MIN_RUN_STEPS, MemoryProbe, batch_from_probe
from finetune.config import validate_train_config
from finetune.errors import FinetuneError
from finetune.models.checkpoint import read_checkpoint
from finetune.prepare import with_auto_batch_size
from finetune.train import train

GiB, MiB = 2**30, 2**20


def probe(per_image_mib: float, fixed_gib: float, total_gib: float, params_mib: float = 20) -> MemoryProbe:
    """Peaks at batch 32 and 64 that a model with these costs would show."""
    fixed = fixed_gib * GiB
    return MemoryProbe(32, int(fixed + 32 * per_image_mib * MiB), 64, int(fixed + 64 * per_image_mib * MiB),
                       int(total_gib * GiB), int(params_mib * MiB))


def test_the_batch_is_the_largest_power_of_two_the_memory_holds():
    # 24 GiB card, 40 MiB per image, 1 GiB fixed (+ 40 MiB optimizer state): 0.8 x 24 GiB holds ~465 -> 256
    batch, why = batch_from_probe(probe(40, 1.0, 24), n_train=1_000_000)
    assert batch == 256
    assert "40.0 MiB per image" in why and "the largest power of two that fits: 256 fits in 80% of 24 GiB" in why


def test_the_batch_stops_at_1024_and_where_an_epoch_would_have_too_few_steps():
    big = probe(10, 1.0, 140)  # an H200 and a small model: memory holds ~11,000
    assert batch_from_probe(big, n_train=10_000_000)[0] == MAX_BATCH
    batch, why = batch_from_probe(big, n_train=5_000)  # 5,000 / 16 = 312 -> 256: at least 16 steps an epoch
    assert batch == 256 and "at least 16 steps per epoch" in why
    batch, why = batch_from_probe(big, n_train=300)  # never below 32, the batch the defaults were tuned at
    assert batch == 32 and "32, the batch the defaults were tuned at (300 training images" in why


def test_a_fixed_budget_of_images_keeps_enough_optimizer_steps():
    """recipe=auto's budget fixes the images a run sees, so a larger batch means fewer steps: the batch keeps at
    least MIN_RUN_STEPS of them (at batch 512 a zero-config run of 30,000 images underfit, BENCHMARKS.md)."""
    big = probe(10, 1.0, 140)
    batch, why = batch_from_probe(big, n_train=10_000, seen=100_000)  # 100,000 / 500 = 200 -> 128
    assert batch == 128 == _steps_cap(100_000)
    assert "100,000 images seen in the run: at least 16 steps per epoch and 500 in the run" in why
    assert batch_from_probe(big, n_train=10_000, seen=None)[0] == 512  # steps fixed (max_steps): only per epoch
    assert batch_from_probe(big, n_train=10_000, seen=5_000)[0] == 32  # never below 32


def _steps_cap(seen: int) -> int:
    return 1 << (int(seen / MIN_RUN_STEPS).bit_length() - 1)


def test_a_model_too_large_for_the_device_is_a_clear_error():
    with pytest.raises(FinetuneError, match="data.batch_size=auto: training needs .* GiB before the first image"):
        batch_from_probe(probe(100, 30.0, 24), n_train=10_000)
    # memory for only a few images: the largest power of two below 32 is taken (no floor above what fits)
    assert batch_from_probe(probe(1000, 10.0, 24), n_train=10_000)[0] == 8


def test_on_a_cpu_auto_is_32_with_the_reason_in_the_recipe_and_the_lr_reference_in_the_config(tmp_path):
    root = digit_folders(tmp_path / "digits", per_split=10)
    run = tmp_path / "run"
    cfg = make_cfg([f"data.root={root}", f"run_dir={run}", "data.batch_size=auto", "trainer.accelerator=cpu",
                    "trainer.devices=1", "trainer.enable_progress_bar=false", "trainer.max_epochs=1",
                    "data.image_size=32", "report=false"])
    train(cfg)
    choices = {c["key"]: c for c in json.loads((run / "recipe.json").read_text())["choices"]}
    assert choices["data.batch_size"]["value"] == 32
    assert "on a CPU a larger batch does not raise the images per second" in choices["data.batch_size"]["reason"]
    assert choices["lr_reference_batch"]["value"] == 32 and choices["lr_scaling"]["value"] == "sqrt"
    saved = (run / "config.yaml").read_text()
    assert "  batch_size: 32\n" in saved and "lr_reference_batch: 32\n" in saved  # resume reads numbers, not auto
    # recipe=off resolves it too, and keeps what the user gave
    off = with_auto_batch_size(make_cfg([f"data.root={root}", *FAST, "data.batch_size=auto",
                                         "lr_reference_batch=64"]))
    assert (off.data.batch_size, off.lr_reference_batch, off.lr_scaling) == (32, 64, "sqrt")
    off = with_auto_batch_size(make_cfg([f"data.root={root}", *FAST, "data.batch_size=auto", "lr_scaling=none"]))
    assert (off.data.batch_size, off.lr_reference_batch, off.lr_scaling) == (32, 32, "none")


@pytest.mark.parametrize("scaling, factor", [("linear", 4.0), ("sqrt", 2.0)])
def test_the_lr_follows_the_batch_over_lr_reference_batch_by_lr_scaling(tmp_path, scaling, factor):
    """data.batch_size=32 with an LR set for 8 images: linear x4, sqrt x2 (none: x1, as every other test's fit), in
    the optimizer a real fit built (read back from last.ckpt; no schedule, so the LR is the one the fit started
    with)."""
    root = digit_folders(tmp_path / "digits", per_split=4)
    train(make_cfg([f"data.root={root}", f"run_dir={tmp_path / 'run'}", *FAST, "data.batch_size=32",
                    "lr_reference_batch=8", f"lr_scaling={scaling}", "optimizer=sgd", "optimizer.lr=0.01",
                    "scheduler=none", "~callbacks.early_stopping", "policy=full", "report=false"]))
    state = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    head_lr = next(g["lr"] for g in state["optimizer_states"][0]["param_groups"] if g.get("name") == "head")
    assert head_lr == pytest.approx(0.01 * factor)


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=big", "data.batch_size=big must be a positive integer, or auto"),
    ("lr_reference_batch=0", "lr_reference_batch=0 must be a positive integer (the batch optimizer.lr was set for)"),
])
def test_bad_batch_values_are_refused_naming_the_key(tmp_path, override, message):
    root = digit_folders(tmp_path / "digits", per_split=2)
    with pytest.raises(FinetuneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_train_config(make_cfg([f"data.root={root}", *FAST, override]))


DIFFERENT_BATCHES = textwrap.dedent('''
    import sys
    import lightning as L
    import torch
    from finetune.distributed import SameBatchSizeOnEveryRank

    class RankDependent(SameBatchSizeOnEveryRank):  # as if rank 1's GPU had held a different batch
        def on_fit_start(self, trainer, pl_module):
            self.batch_size += trainer.global_rank * 32
            super().on_fit_start(trainer, pl_module)

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
        def training_step(self, batch, _):
            return self.layer(batch[0]).sum()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    if __name__ == "__main__":
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=2)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, callbacks=[RankDependent(32)])
        trainer.fit(Tiny(), data)
''')


def test_ddp_ranks_with_different_batches_stop_together_with_one_clear_error(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(DIFFERENT_BATCHES)
    result = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode != 0
    assert "chose different batch sizes ([32, 64], by rank)" in result.stderr, result.stderr[-3000:]
    assert "Set data.batch_size=32" in result.stderr


def test_only_other_ranks_take_rank_zeros_choice_from_the_environment(monkeypatch):
    """Lightning's DDP children inherit rank 0's choice; rank 0 itself always decides, so a second job of a sweep
    in the same process (same run id) is not handed the first job's batch."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from finetune.batch_size import SHARED_ENV, auto_batch_size

    monkeypatch.setenv(SHARED_ENV, "run-1:64:rank 0 probed an H200")
    args = ("tf_efficientnet_lite0", 10, 64, "32-true", True, "cpu", 10_000, None, "run-1")
    assert auto_batch_size(*args)[0] == 32  # rank 0 on a CPU: its own answer, and it shares it
    monkeypatch.setenv(SHARED_ENV, "run-1:64:rank 0 probed an H200")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert auto_batch_size(*args) == (64, "rank 0 probed an H200")
    assert auto_batch_size(*args[:-1], "run-2")[0] == 32  # another run's choice is not taken


def test_the_images_a_given_length_fixes_count_epochs_only_when_the_steps_are_free():
    from finetune.recipe.auto import images_of_given_length

    assert images_of_given_length(make_cfg(["trainer.max_epochs=4"]), 1000) == 4000
    assert images_of_given_length(make_cfg(["trainer.max_epochs=4", "trainer.max_steps=100"]), 1000) is None
    assert images_of_given_length(make_cfg(["trainer.max_epochs=-1", "trainer.max_time=00:01:00:00"]), 1000) is None
