""""None of these" (issue 15, part 3) on real scikit-learn digits (conftest's digits_run: trained on 0-7, the
digits 8 and 9 never seen): after training, the knn score's threshold is fitted on validation and stored in the
scored checkpoint; finetune-predict unknown=auto|P labels the images below it 'unknown', load().predict does the
same, the ONNX / TorchScript exports output the score and carry the threshold, the Hugging Face folder the bank;
bad values and checkpoints without a threshold get one-paragraph errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, make_cfg, run_cli

from finetune.errors import FinetuneError
from finetune.inference import predict
from finetune.models.checkpoint import CHECKPOINT_KEY, load_classifier, read_checkpoint
from finetune.open_set import known_scores, parse_unknown, threshold_for


def test_score_kinds_and_thresholds():
    logits = torch.tensor([[4.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    msp = known_scores("msp", logits, features)
    assert msp[0] > 0.9 and msp[1] == pytest.approx(1 / 3)  # a confident image scores higher
    assert torch.allclose(known_scores("msp", logits, features, temperature=2.0)[1], torch.tensor(1 / 3))
    assert torch.allclose(known_scores("energy", logits, features), torch.logsumexp(logits, -1))
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # normalised training features
    assert torch.allclose(known_scores("knn", logits, features, bank=bank), torch.tensor([1.0, 0.8]))
    record = {"val_scores": list(np.linspace(0, 1, 101))}
    assert threshold_for(record, 0.05) == pytest.approx(0.05) and threshold_for(record, 0.2) == pytest.approx(0.2)
    assert parse_unknown("off") is None and parse_unknown(False) is None and parse_unknown("auto") == -1.0
    assert parse_unknown(0.1) == 0.1
    for bad in (0, 1, 1.5, "often"):
        with pytest.raises(FinetuneError, match="must be off, auto"):
            parse_unknown(bad)


def _predict(run: Path, images: Path, out: Path, *extra: str, cli: bool = False) -> list[dict[str, str]]:
    """finetune-predict's CSV rows: through the command (``cli``), or its function in this process."""
    args = [f"ckpt={run}", f"input={images}", f"output={out}", "overwrite=true", *extra]
    if cli:
        result = run_cli("finetune-predict", *args, cwd=out.parent)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "image(s) 'unknown'" in result.stdout  # how many were rejected, and by which rule
    else:
        predict(make_cfg(args, "predict"))
    return list(csv.DictReader(out.open()))


def test_threshold_is_fitted_stored_and_rejects_unseen_digits(tmp_path: Path, digits_run):
    root, unknown, run = digits_run["root"], digits_run["unknown"], digits_run["run"]
    metrics = json.loads((run / "metrics.json").read_text())
    o = metrics["open_set"]
    assert o["score"] == "knn" and o["reject"] == 0.05 and o["fitted_on"] == "val (240 images)", o
    assert o["bank_images"] == 240  # every training image
    assert o["val_rejected"] == pytest.approx(0.05, abs=0.01)
    record = read_checkpoint(o["checkpoint"])[CHECKPOINT_KEY]["open_set"]
    assert record["threshold"] == o["threshold"] and len(record["val_scores"]) == 240
    assert record["bank"].dtype == torch.float16 and record["bank"].shape[0] == 240
    assert "Images of none of the classes" in (run / "report.md").read_text()

    # Digits 8 and 9 (never trained on) fall below the threshold far more often than the known test digits
    unseen = _predict(run, unknown, tmp_path / "unseen.csv", "unknown=auto", cli=True)
    known = _predict(run, root / "test", tmp_path / "known.csv", "unknown=auto")
    rate = {name: np.mean([r["label"] == "unknown" for r in rows]) for name, rows in (("unseen", unseen),
                                                                                      ("known", known))}
    from sklearn.metrics import roc_auc_score

    auroc = roc_auc_score([0] * len(unseen) + [1] * len(known), [float(r["known_score"]) for r in unseen + known])
    assert auroc >= 0.75 and rate["unseen"] >= 0.1 and rate["unseen"] >= 3 * rate["known"], (rate, auroc)
    for r in unseen + known:  # the rule, row by row; the top-k columns still name the closest class
        assert (r["label"] == "unknown") == (float(r["known_score"]) < o["threshold"]), r
        assert r["label_1"] in [str(c) for c in range(8)]
    # unknown=P: another share of the known validation images, so a higher threshold rejects more
    stricter = _predict(run, unknown, tmp_path / "strict.csv", "unknown=0.3")
    assert sum(r["label"] == "unknown" for r in stricter) > sum(r["label"] == "unknown" for r in unseen)
    plain = _predict(run, unknown, tmp_path / "plain.csv")
    assert "known_score" not in plain[0] and not any(r["label"] == "unknown" for r in plain)

    # load().predict and known_scores give the CLI's scores and labels
    import finetune

    model = finetune.load(run)
    paths = sorted(str(p) for p in unknown.rglob("*.png"))[:12]
    rows = model.predict(paths, unknown="auto", as_frame=False)
    by_path = {r["path"]: r for r in unseen}
    for r in rows:
        assert r["label"] == by_path[r["path"]]["label"]
        assert r["known_score"] == pytest.approx(float(by_path[r["path"]]["known_score"]), abs=1e-5)
    assert np.allclose(model.known_scores(paths), [r["known_score"] for r in rows], atol=1e-6)


def test_exports_output_the_score_and_carry_the_threshold(tmp_path: Path, digits_run):
    import onnx

    from finetune.data.images import load_image
    from finetune.export import export, onnx_outputs, sample_inputs

    run, unknown = digits_run["run"], digits_run["unknown"]
    scored = json.loads((run / "metrics.json").read_text())["open_set"]["checkpoint"]
    loaded = load_classifier(scored)
    paths = sorted(unknown.rglob("*.png"))[:6]
    images = sample_inputs(loaded, [load_image(str(p)) for p in paths], "uint8")
    out = tmp_path / "model.onnx"
    export(scored, "onnx", out, known_score=True)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    rule = json.loads(meta["finetune.unknown"])
    assert rule["score"] == "knn" and rule["threshold"] == loaded.open_set["threshold"]
    assert rule["thresholds"]["0.05"] == pytest.approx(rule["threshold"], abs=1e-6)
    probs, score = onnx_outputs(out, images.numpy())
    plain = tmp_path / "plain.onnx"  # by default one output, the threshold still in the metadata
    export(scored, "onnx", plain)
    assert len(onnx_outputs(plain, images.numpy())) == 1
    assert "finetune.unknown" in {p.key for p in onnx.load(str(plain)).metadata_props}
    import finetune

    expected = finetune.load(scored).known_scores([str(p) for p in paths])
    assert np.allclose(score, expected, atol=1e-4) and probs.shape == (6, 8)

    hf = tmp_path / "hf"
    result = export(scored, "hf", hf)
    assert "open_set_bank.safetensors" in result["files"]
    config = json.loads((hf / "config.json").read_text())
    assert config["finetune_unknown"]["threshold"] == loaded.open_set["threshold"]
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(hf / "open_set_bank.safetensors"))["bank"], loaded.open_set["bank"])


def test_bad_unknown_values_and_checkpoints_without_a_threshold(tmp_path: Path, digits_run):
    run, unknown = digits_run["run"], digits_run["unknown"]
    out = tmp_path / "p.csv"
    result = run_cli("finetune-predict", f"ckpt={run}", f"input={unknown}", f"output={out}", "unknown=1.5",
                     cwd=tmp_path)
    assert_user_error(result, "unknown=1.5 must be off, auto")
    with pytest.raises(FinetuneError, match="cannot be combined with tta"):
        _predict(run, unknown, out, "unknown=auto", "tta=[hflip]")
    with pytest.raises(FinetuneError, match="works with one checkpoint"):
        _predict(f"[{run},{run}]", unknown, out, "unknown=auto")
    # A checkpoint without a record (trained before, or without validation): says why and how to get one
    scored = json.loads((run / "metrics.json").read_text())["open_set"]["checkpoint"]
    data = torch.load(scored, weights_only=True)
    del data[CHECKPOINT_KEY]["open_set"]
    bare = tmp_path / "bare.ckpt"
    torch.save(data, bare)
    with pytest.raises(FinetuneError, match=r"has none: .*data.val_fraction=0.2"):
        _predict(bare, unknown, out, "unknown=auto")
    assert not out.exists()
