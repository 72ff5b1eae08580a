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
