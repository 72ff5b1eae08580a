"""format=hf: a Hugging Face model folder that plain timm loads (no finetune import) and that predicts the
classes finetune-predict predicts; the model card carries the run; what cannot be exported is refused."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.errors import FinetuneError
from finetune.export import export
from finetune.train import train
from tests.conftest import run_cli

# Plain timm, in a fresh interpreter: load the folder, preprocess with timm's own transforms, predict.
TIMM_ONLY = """
import json, sys
import timm, torch
from PIL import Image
assert 'finetune' not in sys.modules
model = timm.create_model('local-dir:' + sys.argv[1], pretrained=True).eval()
config = timm.data.resolve_data_config({}, model=model)
transform = timm.data.create_transform(**config)
names = model.pretrained_cfg['label_names']
out = {}
with torch.no_grad():
    for path in sys.argv[2:]:
        probs = model(transform(Image.open(path).convert('RGB')).unsqueeze(0)).softmax(-1)[0]
        out[path] = [names[int(probs.argmax())], float(probs.max())]
print(json.dumps({'predictions': out, 'config': {k: config[k] for k in ('input_size', 'crop_pct', 'mean')}}))
assert 'finetune' not in sys.modules
"""


def test_hf_folder_loads_in_plain_timm_and_predicts_like_finetune_predict(split_folders, fast_cfg, tmp_path):
    metrics = train(fast_cfg(split_folders, "policy=partial", "trainer.max_epochs=2", "data.image_size=48",
                             "data.crop_pct=1.0"))
    out = tmp_path / "hf"
    result = export(metrics["run_dir"], "hf", out)
    # the open-set bank too: the run had a validation split (test_open_set.py checks its use)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                     "open_set_bank.safetensors"]
    assert result["max_abs_diff_vs_torch"] < 1e-4
    config = json.loads((out / "config.json").read_text())
    classes = json.loads((Path(metrics["run_dir"]) / "classes.json").read_text())
    assert config["architecture"] == "tf_efficientnet_lite0" and config["num_classes"] == 3
    assert config["label_names"] == classes and config["pretrained_cfg"]["input_size"] == [3, 48, 48]
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card and "pipeline_tag: image-classification" in card
    assert "partial" in card and f"{metrics['test/acc']:.4f}" in card and "Intended use" in card

    images = sorted(str(p) for p in (split_folders / "test").rglob("*.png"))
    plain = subprocess.run([sys.executable, "-c", TIMM_ONLY, str(out), *images], capture_output=True, text=True,
                           check=False, timeout=300, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]
    timm_pred = json.loads(plain.stdout.strip().splitlines()[-1])["predictions"]
    predicted = run_cli("finetune-predict", f"ckpt={metrics['run_dir']}", f"input={split_folders / 'test'}",
                        f"output={tmp_path / 'pred.csv'}", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    with (tmp_path / "pred.csv").open() as f:
        finetune_pred = {row["path"]: row["label"] for row in csv.DictReader(f)}
    assert {p: timm_pred[p][0] for p in images} == {p: finetune_pred[p] for p in images}

    # Refusals: a non-empty folder without overwrite; a cut network (stage_probe) timm cannot rebuild.
    with pytest.raises(FinetuneError, match="is not empty.*overwrite=true"):
        export(metrics["run_dir"], "hf", out)
    assert export(metrics["run_dir"], "hf", out, overwrite=True)["output"] == str(out)
    cut = train(fast_cfg(split_folders, "policy=stage_probe", run_dir=tmp_path / "cut"))
    with pytest.raises(FinetuneError, match="cut after stage .*format=onnx"):
        export(cut["run_dir"], "hf", tmp_path / "hf-cut")
    assert not (tmp_path / "hf-cut").exists()
