"""Temperature scaling after training (issue 15, part 4) on real scikit-learn digits (conftest's digits_run): T
fitted on validation lowers the validation NLL and ECE, is stored in the scored checkpoint, and every consumer
(finetune-predict, load(), the ONNX and Hugging Face exports) gives the calibrated probabilities; the report shows
the reliability diagram."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from conftest import FAST, digit_folders, run_cli

from finetune.calibration import calibrated, fit_temperature, reliability
from finetune.models.checkpoint import CHECKPOINT_KEY, load_classifier, read_checkpoint


def test_temperature_recovers_how_over_confident_logits_are():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 5, generator=g) * 2
    labels = torch.distributions.Categorical(logits=logits).sample()
    sharp = (logits * 3).softmax(-1)  # three times too confident
    t = fit_temperature(sharp, labels)
    assert abs(t - 3) < 0.3
    assert reliability(calibrated(sharp, t), labels)["ece"] < reliability(sharp, labels)["ece"] / 3
    assert torch.equal(calibrated(sharp, 1.0), sharp)
    # every label right: the likelihood keeps rising as T -> 0; T stops at the range's end
    assert fit_temperature(sharp, sharp.argmax(-1)) == 0.1


def test_calibration_is_fitted_stored_and_used_by_predict_load_and_export(tmp_path: Path, digits_run):
    root, run = digits_run["root"], digits_run["run"]
    c = json.loads((run / "metrics.json").read_text())["calibration"]
    t = c["temperature"]
    assert t > 0 and abs(t - 1) > 0.05, c
    assert c["val"]["nll_after"] <= c["val"]["nll_before"] and c["val"]["ece_after"] < c["val"]["ece_before"], c
    assert "test" in c and sum(c["reliability"]["test"]["after"]["counts"]) == 240
    scored = c["checkpoint"]
    assert read_checkpoint(scored)[CHECKPOINT_KEY]["temperature"] == t
    report = (run / "report.md").read_text()
    assert "Calibration" in report and (run / "reliability.png").is_file()

    # The raw network's softmax, rescaled by T, is what predict and load() report
    loaded = load_classifier(scored)
    image = min((root / "test" / "3").iterdir())
    from finetune.data.datamodule import ImageListDataset, decode_side
    from finetune.data.transforms import eval_transform

    pp = loaded.preprocessing
    x = ImageListDataset([(str(image), 3)], eval_transform(pp), max_side=decode_side(pp))[0][0][None]
    with torch.no_grad():
        raw = loaded.module(x).softmax(-1)[0]
    expected = calibrated(raw[None], t)[0]
    out = tmp_path / "pred.csv"
    result = run_cli("finetune-predict", f"ckpt={run}", f"input={image}", f"output={out}", "topk=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    row = next(csv.DictReader(out.open()))
    top = int(expected.argmax())
    assert row["label"] == loaded.classes[top]
    assert abs(float(row["probability"]) - float(expected[top])) < 1e-4
    assert abs(float(raw[top]) - float(expected[top])) > 1e-3  # the calibrated value differs from the raw one

    import finetune

    model = finetune.load(run)
    probs = model.predict([str(image)], as_frame=False)[0]
    assert abs(float(probs["probability"]) - float(expected[top])) < 1e-4

    # ONNX: the exported graph divides the logits by T (export checks it against torch with onnxruntime)
    onnx_path = tmp_path / "model.onnx"
    model.export("onnx", onnx_path)  # finetune-export's own function, in this process
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(meta["finetune.temperature"]) == t

    # Hugging Face folder: T folded into the head, so plain timm's logits are the calibrated ones
    hf = tmp_path / "hf"
    model.export("hf", hf)
    import timm

    rebuilt = timm.create_model(f"local-dir:{hf}", pretrained=True).eval()
    with torch.no_grad():
        logits = loaded.module.net(x)
        assert torch.allclose(rebuilt(x), logits / t, atol=1e-4)
    assert json.loads((hf / "config.json").read_text())["finetune_temperature"] == t


def test_calibration_is_skipped_without_validation_or_when_off(tmp_path: Path):
    root = digit_folders(tmp_path / "digits", per_split=8, splits=("train",))
    run = tmp_path / "run"
    from conftest import make_cfg

    from finetune.train import train

    train(make_cfg([f"data.root={root}", f"run_dir={run}", "policy=linear_probe", *FAST, "data.val_fraction=0"]))
    assert "no validation split" in json.loads((run / "metrics.json").read_text())["calibration"]["skipped"]
    run2 = tmp_path / "run2"
    train(make_cfg([f"data.root={root}", f"run_dir={run2}", "policy=linear_probe", *FAST, "calibrate=false"]))
    metrics = json.loads((run2 / "metrics.json").read_text())
    assert metrics["calibration"] == {"skipped": "calibrate=false"}
    assert "temperature" not in read_checkpoint(metrics["scored_checkpoint"])[CHECKPOINT_KEY]
    # nor is there an open-set threshold without validation images (test_open_set.py: what predict then says)
    assert "no validation split" in json.loads((run / "metrics.json").read_text())["open_set"]["skipped"]
