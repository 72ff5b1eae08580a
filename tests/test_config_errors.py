"""Bad config values and mistyped keys: one FinetuneError paragraph that names the key, before any heavy work.

Most values are checked in-process through validate_train_config; a few commands go through the real CLI,
where Hydra's own errors (a mistyped key or group option) must also exit 2 without a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, assert_user_error, image_folders, make_cfg, run_cli

from finetune.cli.main import report_errors
from finetune.config import validate_train_config
from finetune.errors import FinetuneError
from finetune.models.backbone import load_pretrained
from finetune.train import train


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return image_folders(tmp_path_factory.mktemp("config_errors") / "images", 4)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "notes.txt"
    path.write_text("hello\n")
    return path


# --------------------------------------------------------------------------- in-process: values and types

BAD_VALUES = [
    ("trainer.max_epochs=ten", "trainer.max_epochs=ten"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0"),
    ("seed=abc", "seed=abc"),
    ("seed=-1", "seed=-1"),
    ("seed=1.5", "seed=1.5"),
    ("data.val_fraction=abc", "data.val_fraction=abc"),
    ("data.num_workers=-1", "data.num_workers=-1"),
    ("data.num_workers=abc", "data.num_workers=abc"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("data.eval_batch_size=0", "data.eval_batch_size=0"),
    ("data.image_size=-5", "data.image_size=-5"),
    ("data.image_size=0", "data.image_size=0"),  # 0 used to fall back to the backbone's size silently
    ("data.preload_max_gb=abc", "data.preload_max_gb=abc"),
    ("trainer.devices=0", "trainer.devices=0"),
    ("trainer.precision=fp17", "trainer.precision=fp17"),
    ("trainer.accelerator=gpux", "Did you mean: gpu"),
    ("ensemble.size=abc", "ensemble.size=abc"),
    ("tta=hflip", "tta=[hflip]"),  # a string, not a list: was read letter by letter
    ("optimizer.lr=-1", "optimizer.lr=-1"),
    ("optimizer.lr=0", "optimizer.lr=0"),
    ("optimizer.lr=abc", "optimizer.lr=abc"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1"),
    ("optimizer=momentum optimizer.momentum=-0.5", "optimizer.momentum=-0.5"),
    ("optimizer=nesterov optimizer.momentum=0", "Nesterov"),  # torch's own check, before any data is read
    ("optimizer.betas=[2,0.9]", "beta"),
    ("+optimizer.lrr=0.1", "optimizer.lrr is not an argument of torch.optim.AdamW. Did you mean: lr?"),
    ("+scheduler.patiense=3", "Did you mean: patience?"),
    ("scheduler=step scheduler.step_size=abc", "scheduler.step_size=abc"),
    ("optimizer._target_=torch.optim.Adamx", "optimizer._target_=torch.optim.Adamx"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_is_named_before_any_work(images, overrides, expected):
    cfg = make_cfg([f"data.root={images}", *FAST, *overrides.split()])
    with pytest.raises(FinetuneError) as info:
        validate_train_config(cfg)
    assert expected in str(info.value)


@pytest.mark.parametrize("overrides", ["trainer.devices=[0]", "trainer.max_epochs=-1", "trainer.precision=bf16-mixed",
                                       "optimizer=lbfgs", "scheduler.min_lr=[0.0]", "data.num_workers=0",
                                       "policy.cache=false"])
def test_valid_values_still_pass(images, overrides):
    validate_train_config(make_cfg([f"data.root={images}", *FAST, overrides]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_preset_without_gpu_says_use_cpu(images):
    cfg = make_cfg([f"data.root={images}", "trainer=gpu"])
    with pytest.raises(FinetuneError, match="trainer=cpu"):
        validate_train_config(cfg)


@pytest.mark.parametrize("content", [b"hello\n", b"", b"\x00\x01garbage" * 50])
def test_weights_file_that_is_not_weights(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(FinetuneError, match="model.weights="):
        load_pretrained("tf_efficientnet_lite0", str(path))


def test_weights_file_with_none_of_the_backbones_tensors(tmp_path):
    """timm loads files non-strictly once the classifier is dropped: such a file trained from random weights."""
    path = tmp_path / "other.pth"
    torch.save({"net.conv_stem.weight": torch.zeros(1)}, path)
    with pytest.raises(FinetuneError, match="holds none of tf_efficientnet_lite0's tensors"):
        load_pretrained("tf_efficientnet_lite0", str(path))


def test_missing_weights_file_fails_in_validation(images, tmp_path):
    cfg = make_cfg([f"data.root={images}", *FAST, f"model.weights={tmp_path / 'nope.pth'}"])
    with pytest.raises(FinetuneError, match="model.weights="):
        validate_train_config(cfg)


def test_ctrl_c_before_fit_is_one_line_exit_130(capsys):
    def task(cfg):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        report_errors(task)(make_cfg())
    assert info.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_lbfgs_head_records_that_optimizer_lr_is_unused(images, tmp_path):
    """policy=linear_probe trains its head with L-BFGS on cached features: optimizer.lr does nothing there."""
    run = tmp_path / "run"
    train(make_cfg([f"data.root={images}", f"run_dir={run}", *FAST, "policy=linear_probe", "optimizer.lr=0.5",
                    "report=false"]))
    record = json.loads((run / "policy.json").read_text())
    why = record["feature_cache"]["why"]
    assert record["feature_cache"]["head_solver"] == "lbfgs"
    assert "optimizer.lr=0.5" in why and "policy.head_solver=optimizer" in why


# --------------------------------------------------------------------------- CLI: Hydra's errors and ours

CLI_BAD = [
    ("optimizer.lrr=0.1", ("optimizer.lrr", "Did you mean: optimizer.lr?")),  # Hydra: ConfigCompositionException
    ("optimiser=adam", ("optimiser", "Did you mean: optimizer?")),
    ("trainer.max_epoch=3", ("trainer.max_epoch", "trainer.max_epochs")),
    ("augment=heavvy", ("augment=heavvy", "Did you mean: heavy?")),  # Hydra: MissingConfigException
    ("+optimizer.lrr=0.1", ("optimizer.lrr", "lr")),  # Hydra's own hint for the typo: torch would get it
    ("trainer.max_epochs=ten", ("trainer.max_epochs=ten",)),  # failed in fit, after the data check
]


@pytest.mark.parametrize(("override", "expected"), CLI_BAD, ids=[c[0] for c in CLI_BAD])
def test_cli_config_error_is_exit_2_before_heavy_work(images, tmp_path, override, expected):
    run = tmp_path / "run"
    result = run_cli("finetune", f"data.root={images}", f"run_dir={run}", *FAST, override, cwd=tmp_path)
    assert_user_error(result, *expected)
    leftovers = {p.name for p in run.iterdir()} if run.exists() else set()
    assert not leftovers & {"checkpoints", "config.yaml", "data_report.json", "policy.json"}, leftovers


def test_cli_weights_text_file(images, tmp_path, text_file):
    result = run_cli("finetune", f"data.root={images}", f"run_dir={tmp_path / 'run'}", *FAST,
                     f"model.weights={text_file}", cwd=tmp_path)
    assert_user_error(result, f"model.weights={text_file}")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_help_and_quiet_lbfgs_run(images, tmp_path):
    """--help still works; a real run says the L-BFGS head ignores the LR it was given, and prints no
    Lightning advert ('💡 Tip: ... litlogger / litmodels')."""
    assert run_cli("finetune", "--help", cwd=tmp_path).returncode == 0
    result = run_cli("finetune", f"data.root={images}", f"run_dir={tmp_path / 'run'}", *FAST, "policy=linear_probe",
                     "optimizer.lr=0.5", "report=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "Tip:" not in output
    assert "optimizer.lr=0.5 ignored" in output and "policy.head_solver=optimizer" in output
