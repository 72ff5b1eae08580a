import json

from finetune.train import train


def test_train_writes_run_folder(class_folders, fast_cfg, tmp_path):
    metrics = train(fast_cfg(class_folders))
    run = tmp_path / "run"
    for name in ("config.yaml", "classes.json", "metrics.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["epochs"] == 1 and "val/acc" in saved and saved["fit_seconds"] > 0
    assert json.loads((run / "classes.json").read_text()) == ["circle", "square", "stripes"]
    assert metrics["val/acc"] == saved["val/acc"]


def test_tensorboard_logger_writes_events(class_folders, fast_cfg, tmp_path):
    train(fast_cfg(class_folders, "logger=tensorboard", "policy=linear_probe"))
    events = list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_mlflow_logger_uses_local_file_store(class_folders, fast_cfg, tmp_path):
    import pytest

    pytest.importorskip("mlflow", reason="optional extra: pip install -e .[mlflow]")
    train(fast_cfg(class_folders, "logger=mlflow", "policy=linear_probe"))
    assert any((tmp_path / "run" / "mlruns").rglob("meta.yaml"))


def test_missing_logger_package_is_a_clear_error(class_folders, fast_cfg):
    """Where mlflow is not installed (the default install), logger=mlflow names the package to install."""
    import importlib.util

    import pytest

    from finetune.errors import FinetuneError

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    with pytest.raises(FinetuneError, match=r"pip install mlflow"):
        train(fast_cfg(class_folders, "logger=mlflow", "policy=linear_probe"))
