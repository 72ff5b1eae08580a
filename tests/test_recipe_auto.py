"""recipe=auto (#13): each rule on constructed inputs (tiny vs large images, few vs many images, CPU vs GPU),
the flip probe on real digits, and a run that writes every choice with its reason (recipe.json, config.yaml,
the log and the report) while keeping what the user set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import FAST, image_folders, make_cfg, run_cli
from omegaconf import OmegaConf
from PIL import Image

from finetune.conf import preset
from finetune.data.datasets import scan_dataset
from finetune.recipe.auto import (
    after_measurement,
    before_measurement,
    device_kind,
    epochs_rule,
    fit_size_to_budget,
    holdout_rule,
    input_size_rule,
    median_shorter_side,
    step_budget_rule,
)

RULES = preset("recipe", "auto")
# FAST without recipe=off and the keys whose choice a test checks.
AUTO_FAST = [o for o in FAST if not o.startswith(("recipe=", "data.image_size", "trainer.max_epochs"))]


def test_input_size_follows_the_images_and_the_device():
    # Tiny images (Fashion-MNIST 28 px, digits 8 px) are upsampled 2x on a CPU, never below 64 px ...
    assert input_size_rule(28, 224, "cpu", RULES)[0] == 64
    assert input_size_rule(8, 224, "cpu", RULES)[0] == 64
    assert input_size_rule(64, 224, "cpu", RULES)[0] == 128
    # ... and further on a GPU (BiT: images under 96 px to 128), never above the backbone's input
    assert input_size_rule(28, 224, "gpu", RULES)[0] == 128
    assert input_size_rule(100, 224, "gpu", RULES)[0] == 224
    # Photos keep the backbone's size on both
    for device in ("cpu", "gpu"):
        size, why = input_size_rule(500, 224, device, RULES)
        assert size == 224 and "pretrained size" in why
    assert input_size_rule(500, 384, "cpu", RULES)[0] == 384
    assert input_size_rule(None, 224, "cpu", RULES)[0] == 224


def test_training_length_follows_the_data_size_the_input_and_the_device():
    epochs = {n: epochs_rule(n, "cpu", RULES, 64)[0] for n in (50, 500, 2000, 60000)}
    assert epochs == {50: 30, 500: 20, 2000: 5, 60000: 3}  # few images: more passes; capped both ways
    assert epochs_rule(500, "cpu", RULES, 128)[0] == 5  # 4x the pixels: a quarter of the images
    assert epochs_rule(2000, "gpu", RULES, 64)[0] > epochs_rule(2000, "cpu", RULES, 64)[0]
    assert epochs_rule(2000, "cpu", {**RULES, "budget": "best"}, 64)[0] > epochs[2000]
    assert epochs_rule(400, "cpu", {**RULES, "budget": 2000}, 64)[0] == 5  # a number of images
    assert "400 training images" in epochs_rule(400, "cpu", RULES, 64)[1]


def test_large_data_trains_for_a_step_budget_not_whole_epochs():
    # 60k images: 3 passes would be 18x the CPU budget; the run sees 3 budgets (30k images) as steps
    epochs, steps, why = step_budget_rule(60000, "cpu", RULES, 64, 32)
    assert (epochs, steps) == (1, 940) and "0.50 epochs" in why and "940 steps of 32 images" in why
    # Up to 3 budgets the floor of 3 whole passes holds (every benchmark set, fmnist-1000's 10k images included)
    assert step_budget_rule(10000, "cpu", RULES, 64, 32) is None
    assert step_budget_rule(12000, "cpu", RULES, 64, 32)[:2] == (3, 940)  # 2.5 epochs: the bound is 3
    # A larger input costs its area; a GPU's budget is larger; a larger global batch takes fewer steps
    assert step_budget_rule(60000, "cpu", RULES, 128, 32)[1] == 240
    assert step_budget_rule(60000, "gpu", RULES, 64, 32) is None  # 1.5M images: 3 passes fit the GPU's
    assert step_budget_rule(1_000_000, "gpu", RULES, 224, 256)[1] == 480
    assert step_budget_rule(60000, "cpu", RULES, 64, 64)[1] == 470


def test_a_step_budget_run_ends_at_its_step_annealed_and_validated_there(tmp_path: Path):
    """The budget rule on a folder too large for its (tiny) budget: the run stops at the chosen step inside the
    first epoch, one-cycle reaches its end there, and the one validation check comes at that step."""
    import torch

    root, run = image_folders(tmp_path / "imgs", 60), tmp_path / "run"  # 180 images: 144 train after holdout
    result = run_cli("finetune", f"data.root={root}", f"run_dir={run}", "recipe=auto", "recipe.budget=5",
                     "policy=full", *AUTO_FAST, "data.image_size=32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = {c["key"]: c for c in json.loads((run / "recipe.json").read_text())["choices"]}
    # 5 images at 64 px = 20 at 32 px; 3 passes over 144 images is over 3 budgets: 60 images = 7.5 steps of 8,
    # rounded up to a multiple of the 10 saves of last.ckpt
    assert chosen["trainer.max_steps"]["value"] == 10 and chosen["trainer.max_epochs"]["value"] == 1
    assert "trainer.val_check_interval" not in chosen  # annealed: validated at the last step (ValidateAtLastStep)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 10 and ckpt["epoch"] == 0  # stopped inside the first epoch (18 batches)
    scheduler = ckpt["lr_schedulers"][0]
    assert scheduler["last_epoch"] == 10 and scheduler["total_steps"] == 10  # the cycle spans exactly the run
    import csv

    rows = list(csv.DictReader(next((run / "logs").rglob("metrics.csv")).open()))
    fit_checks = [r["step"] for r in rows if r["val/acc"] and r["epoch"] == "0"]
    assert fit_checks == ["9"]  # one check, after the 10th (last) step; then the scoring pass
    assert json.loads((run / "metrics.json").read_text())["val/acc"] >= 0


def test_a_plateau_rule_on_a_step_budget_gets_checks_counted_in_steps(tmp_path: Path):
    root = image_folders(tmp_path / "imgs", 60)
    cfg, decision = _auto(root, "scheduler.patience=3", "recipe.budget=5", "data.image_size=32", "data.batch_size=8")
    chosen = {c.key: c.value for c in decision.choices}
    assert chosen["trainer.max_steps"] == 10 and chosen["trainer.val_check_interval"] == 1  # 8 checks: every step
    assert cfg.trainer.check_val_every_n_epoch is None and "early_stopping" in cfg.callbacks


def test_a_run_cut_by_max_steps_inside_an_epoch_is_validated_at_its_end(class_folders: Path, tmp_path: Path):
    """recipe=off with trainer.max_steps shorter than an epoch: Lightning alone ends without validating, and
    early stopping then failed on the missing val/acc; the run is now validated at its last step."""
    run = tmp_path / "run"
    result = run_cli("finetune", f"data.root={class_folders}", f"run_dir={run}", "policy=full", *FAST,
                     "trainer.max_steps=2", cwd=tmp_path)  # 3 batches per epoch
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert "val/acc" in metrics and (run / "checkpoints" / "best.ckpt").is_file()


def test_input_gives_way_to_enough_passes_on_a_cpu_budget():
    # 1000 photos: 3 epochs at 224 px on the CPU budget; lowered to 128 (not below half of 224)
    assert fit_size_to_budget(224, 1000, "cpu", RULES)[0] == 128
    assert fit_size_to_budget(224, 100, "cpu", RULES)[0] == 192  # 8 epochs at 224 -> 11 at 192
    assert fit_size_to_budget(64, 2000, "cpu", RULES) == (64, "")  # never below min_size
    assert fit_size_to_budget(224, 1000, "gpu", RULES) == (224, "")  # the GPU budget affords it


def test_device_is_read_from_the_trainer_config():
    assert device_kind(make_cfg(["trainer.accelerator=gpu"])) == "gpu"
    assert device_kind(make_cfg(["trainer.accelerator=cpu"])) == "cpu"


def test_no_holdout_only_on_small_data(tmp_path: Path):
    limit = RULES["no_holdout_max_per_class"]
    small = scan_dataset(image_folders(tmp_path / "small", limit), 0.0)
    fraction, why = holdout_rule(small, RULES)
    assert fraction == 0.0 and "cross-validated" in why and f"<= {limit}" in why
    assert holdout_rule(scan_dataset(image_folders(tmp_path / "more", limit + 1), 0.0), RULES)[0] is None


def test_a_schedule_that_follows_validation_keeps_the_holdout(tmp_path: Path):
    """No holdout only under a schedule that anneals to a fixed end: a plateau or step rule set by the user
    (here a library call: step differs from the default) watches validation, so the holdout stays."""
    root = image_folders(tmp_path / "imgs", 10)
    _, decision = _auto(root, "scheduler=step")
    assert "data.val_fraction" not in {c.key for c in decision.choices}
    _, decision = _auto(root, "scheduler=cosine")
    assert {c.key: c.value for c in decision.choices}["data.val_fraction"] == 0.0
    # A plateau rule with a final anneal keeps its holdout, and like any schedule that ends annealed, loses
    # early stopping (it would cut the anneal); a plain step schedule keeps early stopping.
    cfg, decision = _auto(root, "scheduler.final_anneal=0.3")
    chosen = {c.key: c.value for c in decision.choices}
    assert "data.val_fraction" not in chosen and chosen["callbacks.early_stopping"] is None
    assert "early_stopping" not in cfg.callbacks and cfg.scheduler.final_anneal == 0.3
    cfg, _ = _auto(root, "scheduler=step")
    assert "early_stopping" in cfg.callbacks


def test_median_shorter_side_reads_headers(tmp_path: Path):
    paths = []
    for i, (w, h) in enumerate([(30, 20), (50, 40), (80, 60)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (w, h)).save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert median_shorter_side([*paths, str(tmp_path / "bad.png")], 10) == 40


def _auto(root: Path, *extra: str):
    cfg = make_cfg([f"data.root={root}", "recipe=auto", *extra])
    return before_measurement(cfg, scan_dataset(root, 0.0), 224)


def test_first_step_chooses_size_crop_length_schedule_and_holdout(tmp_path: Path):
    cfg, decision = _auto(image_folders(tmp_path / "imgs", 10), "trainer.accelerator=cpu")  # 40 px images
    chosen = {c.key: c.value for c in decision.choices}
    assert chosen["data.image_size"] == 96 and cfg.data.image_size == 96  # 2x 40 px, rounded up to 32
    assert chosen["data.crop_pct"] == 1.0 and cfg.data.crop_pct == 1.0
    assert chosen["data.val_fraction"] == 0.0 and cfg.data.val_fraction == 0.0
    assert cfg.trainer.max_epochs == chosen["trainer.max_epochs"] == 30  # 10000 images x (64/96)^2 / 30, capped
    assert cfg.scheduler._target_.endswith("OneCycleLR") and "early_stopping" not in cfg.callbacks
    assert all(c.reason for c in decision.choices)
    assert decision.facts["median_shorter_side"] == 40 and decision.facts["val_split_on_disk"] is False


def test_what_the_user_set_is_kept_and_listed(tmp_path: Path):
    # (A library call sees the keys that differ from the defaults; the CLI sees what was typed: see the run below.)
    cfg, decision = _auto(image_folders(tmp_path / "imgs", 10), "data.image_size=32", "scheduler=step",
                          "trainer.max_epochs=2", "trainer.accelerator=cpu")
    chosen = {c.key for c in decision.choices}
    assert {"data.image_size", "scheduler", "trainer.max_epochs", "callbacks.early_stopping"}.isdisjoint(chosen)
    assert decision.kept["data.image_size"] == 32 and decision.kept["trainer.max_epochs"] == 2
    assert cfg.data.image_size == 32 and cfg.scheduler._target_.endswith("StepLR")
    assert "early_stopping" in cfg.callbacks  # step decay does not anneal to a fixed end
    assert cfg.data.crop_pct == 1.0 and "data.crop_pct" in chosen  # the whole frame, shrunk (40 px -> 32) too
    # A key typed under a group keeps the whole group
    cfg, decision = _auto(image_folders(tmp_path / "imgs2", 10), "scheduler.patience=3")
    assert "scheduler" not in {c.key for c in decision.choices} and cfg.scheduler.patience == 3


def test_recipe_off_changes_nothing(tmp_path: Path):
    root = image_folders(tmp_path / "imgs", 10)
    cfg = make_cfg([f"data.root={root}", "recipe=off"])
    out, decision = before_measurement(cfg, scan_dataset(root, 0.0), 224)
    assert decision.choices == [] and OmegaConf.to_container(out) == OmegaConf.to_container(cfg)


def _digits_folders(root: Path, per_class: int) -> Path:
    """Real handwritten digits (scikit-learn's 8x8 scans), classes 2, 3, 4 and 7: a mirrored 3 is no 3."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in (2, 3, 4, 7):
        folder = root / str(label)
        folder.mkdir(parents=True)
        for i in np.flatnonzero(digits.target == label)[:per_class]:
            Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def lite0():
    from finetune.models.backbone import load_pretrained

    return load_pretrained("tf_efficientnet_lite0", "auto")[0]


def test_flip_probe_tells_mirror_sensitive_classes_from_symmetric_ones(tmp_path: Path, lite0):
    from finetune.data.transforms import resolve_preprocessing
    from finetune.policy.measure import measure

    pp = resolve_preprocessing(lite0, {"image_size": 64, "crop_pct": 1.0})
    drops = {}
    for name, root in (("digits", _digits_folders(tmp_path / "digits", 40)),
                       ("shapes", image_folders(tmp_path / "shapes", 30))):  # discs, squares, horizontal stripes
        m = measure(lite0, scan_dataset(root, 0.0), pp, True, flip=True)
        drops[name] = m.best_acc - m.flip_probe_acc
    assert drops["digits"] > RULES["flip_max_drop"] >= drops["shapes"], drops


def test_auto_run_writes_every_choice_with_its_reason(tmp_path: Path):
    root, run = image_folders(tmp_path / "imgs", 10), tmp_path / "run"
    result = run_cli("finetune", f"data.root={root}", f"run_dir={run}", "recipe=auto", "recipe.budget=20",
                     *AUTO_FAST, "data.image_size=32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    decision = json.loads((run / "recipe.json").read_text())
    chosen = {c["key"]: c for c in decision["choices"]}
    assert decision["recipe"] == "auto" and decision["kept_as_given"]["data.image_size"] == 32
    assert {"trainer.max_epochs", "scheduler", "data.val_fraction", "augment"} <= set(chosen)
    assert chosen["trainer.max_epochs"]["value"] == 3  # 20 images at 64 px = 80 at 32 px, / 30 = 2.7: 3
    config = yaml.safe_load((run / "config.yaml").read_text())  # what resume continues with
    assert config["trainer"]["max_epochs"] == 3 and config["data"]["image_size"] == 32
    head_only = json.loads((run / "policy.json").read_text())["policy_applied"] == "linear_probe"
    assert ("optimizer.lr" in chosen) != head_only  # the LR rule is for layers below the head
    assert ("cached features" if head_only else "flip") in chosen["augment"]["reason"]
    assert config["scheduler"]["_target_"].endswith("OneCycleLR") and "early_stopping" not in config["callbacks"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and "train_eval/acc" in metrics  # no holdout: scored on training images
    # The second step's choices are what trained, not only what was written down
    smoothing = chosen["regularization.label_smoothing"]["value"] if not head_only else 0.0
    assert metrics["regularization"]["label_smoothing"] == config["regularization"]["label_smoothing"] == smoothing
    report = (run / "report.md").read_text()
    assert "Chosen from the data by recipe=auto" in report and chosen["scheduler"]["reason"] in report
    assert "Recipe (auto)" in result.stdout + result.stderr  # the log block


def test_bad_recipe_values_are_refused_by_name(tmp_path: Path):
    from conftest import assert_user_error

    result = run_cli("finetune", f"data.root={tmp_path}", "recipe.budget=lots", cwd=tmp_path)
    assert_user_error(result, "recipe.budget=lots", "fast, best")


def _choice(policy: str, gap: float, best: float, flipped: float):
    """A real PolicyChoice as the measurement would give it (the numbers are the rule's inputs)."""
    from finetune.policy.choose import PolicyChoice
    from finetune.policy.measure import Measurements
    from finetune.policy.plan import make_plan

    m = Measurements(images_train=30, num_classes=3, images_per_class={"min": 10, "median": 10, "max": 10},
                     probe_images=30, probe_folds=5, stage_probe_acc=[best] * 5, stage_channels=[8] * 5,
                     prelogits_probe_acc=best - gap, best_stage=3, best_acc=best, depth_gap=gap,
                     flip_probe_acc=flipped)
    return PolicyChoice("auto", make_plan(policy, {}, 5, 3), m, None, {})


def test_second_step_lr_and_flip_from_the_measurement_in_a_library_call(tmp_path: Path):
    root = image_folders(tmp_path / "imgs", 10)
    cfg, decision = _auto(root, "trainer.max_epochs=20")  # a library call: given = differs from the defaults
    out = after_measurement(cfg, decision, _choice("stage_probe", gap=0.08, best=0.8, flipped=0.79))
    chosen = {c.key: c.value for c in decision.choices}
    assert chosen["optimizer.lr"] == RULES["lr"]["far"] == out.optimizer.lr
    assert chosen["augment"] == "flip" and list(out.augment.transforms[0]) == ["HorizontalFlip"]
    smoothing = RULES["label_smoothing"]
    assert chosen["regularization.label_smoothing"] == smoothing == out.regularization.label_smoothing > 0
    json.dumps(decision.to_dict())  # what recipe.json holds is plain data
    # A flip that changes the class (a mirrored 3) is never used; a near domain gets the usual LR
    cfg, decision = _auto(root, "trainer.max_epochs=20")
    out = after_measurement(cfg, decision, _choice("full", gap=0.0, best=0.8, flipped=0.5))
    chosen = {c.key: c.value for c in decision.choices}
    assert chosen["augment"] == "none" and "changes what the image shows" in decision.choices[-1].reason
    assert out.optimizer.lr == RULES["lr"]["near"]
    # Too short a run for extra views: its flip probe is not even run; a head-only plan trains on cached features
    cfg, decision = _auto(root, "trainer.max_epochs=5")
    assert not decision.wants_flip_probe and _auto(root, "trainer.max_epochs=20")[1].wants_flip_probe
    after_measurement(cfg, decision, _choice("stage_probe", gap=0.08, best=0.8, flipped=None))
    assert "too few" in next(c.reason for c in decision.choices if c.key == "augment")
    cfg, decision = _auto(root)
    after_measurement(cfg, decision, _choice("linear_probe", gap=0.0, best=0.8, flipped=0.79))
    assert not {"optimizer.lr", "regularization.label_smoothing"} & {c.key for c in decision.choices}
    assert "cached features" in next(c.reason for c in decision.choices if c.key == "augment")
    # A smoothing the user set is kept as given
    cfg, decision = _auto(root, "regularization.label_smoothing=0.2")
    out = after_measurement(cfg, decision, _choice("stage_probe", gap=0.08, best=0.8, flipped=0.79))
    assert out.regularization.label_smoothing == 0.2
    assert "regularization.label_smoothing" not in {c.key for c in decision.choices}


def test_advise_measures_at_the_size_training_will_use_and_shows_the_recipe(tmp_path: Path, capsys):
    from finetune.advice import advise

    root = image_folders(tmp_path / "imgs", 10)  # 40 px images: recipe=auto trains (and so measures) at 96 px
    record = advise(make_cfg([f"data.root={root}", "recipe=auto", "trainer.accelerator=cpu"]))
    chosen = {c["key"]: c["value"] for c in record["recipe"]["choices"]}
    assert chosen["data.image_size"] == 96 and "augment" in chosen
    assert record["measurements"]["flip_probe_acc"] is not None  # the flip rule's evidence was measured
    out = capsys.readouterr().out
    assert "Recipe (auto)" in out and "Train with it: finetune data.root=" in out
