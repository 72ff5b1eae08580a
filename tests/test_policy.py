"""The transfer policy: the 2x2 decision, what each policy freezes, policy.json, unfreezing + resume."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from finetune.data.transforms import Preprocessing
from finetune.models.backbone import BackboneSpec, attach_head, load_pretrained
from finetune.models.module import ImageClassifier
from finetune.models.stage_probe import StageProbeNet
from finetune.policy.decide import decide
from finetune.policy.measure import Measurements
from finetune.policy.plan import make_plan
from finetune.policy.stages import build_stage_map
from finetune.train import train

THRESHOLDS = {"small_max_per_class": 100, "similar_max_gap": 0.01}
ACTIONS = {"small_similar": "linear_probe", "small_different": "stage_probe", "large_similar": "partial",
           "large_different": "full", "small_different_last_stage": "partial",
           "large_different_earlier_stage": "stage_probe"}
PP = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)


def measurements(per_class: float, stage_acc: list[float], pre: float) -> Measurements:
    best = max(stage_acc + [pre])
    best_stage = None if pre >= max(stage_acc) else stage_acc.index(max(stage_acc))
    return Measurements(
        images_train=int(per_class * 10), num_classes=10,
        images_per_class={"min": per_class, "median": per_class, "max": per_class},
        probe_images=100, probe_folds=5, stage_probe_acc=stage_acc, stage_channels=[16, 24, 40, 112, 320],
        prelogits_probe_acc=pre, best_stage=best_stage, best_acc=best, depth_gap=round(best - pre, 4),
    )


@pytest.mark.parametrize(
    "per_class, stages, pre, quadrant, policy",
    [
        (40, [0.5, 0.6, 0.7, 0.8, 0.85], 0.90, "small_similar", "linear_probe"),
        (40, [0.5, 0.7, 0.74, 0.82, 0.78], 0.77, "small_different", "stage_probe"),
        (500, [0.5, 0.6, 0.7, 0.8, 0.89], 0.895, "large_similar", "partial"),
        (500, [0.5, 0.7, 0.74, 0.78, 0.82], 0.77, "large_different", "full"),
        # On the thresholds: exactly small_max_per_class is "a lot"; a gap equal to the margin is "similar".
        (100, [0.5, 0.6, 0.7, 0.8, 0.89], 0.88, "large_similar", "partial"),
    ],
)
def test_decision_covers_all_four_cells(per_class, stages, pre, quadrant, policy):
    d = decide(measurements(per_class, stages, pre), THRESHOLDS, ACTIONS)
    assert (d.quadrant, d.policy) == (quadrant, policy)
    assert any("small_max_per_class=100" in r for r in d.reasons)
    assert any("similar_max_gap=0.01" in r for r in d.reasons)


def test_little_similar_data_fine_tunes_the_top_stages_by_default_and_says_why():
    """The shipped actions depart from the table's linear classifier in this cell (measured: BENCHMARKS.md);
    policy.json names the departure and the key that restores the table's answer."""
    from conftest import make_cfg
    from omegaconf import OmegaConf

    actions = OmegaConf.to_container(make_cfg([]).policy.actions)
    d = decide(measurements(20, [0.5, 0.6, 0.7, 0.8, 0.85], 0.90), THRESHOLDS, actions)
    assert (d.quadrant, d.policy) == ("small_similar", "partial")
    assert any("linear classifier" in r and "policy.actions.small_similar=linear_probe" in r for r in d.reasons)
    table = decide(measurements(20, [0.5, 0.6, 0.7, 0.8, 0.85], 0.90), THRESHOLDS, {**actions,
                                                                                      "small_similar": "linear_probe"})
    assert table.policy == "linear_probe" and not any("linear classifier" in r for r in table.reasons)


def test_little_different_data_best_on_the_last_stage_gets_the_refined_action():
    """A stage_probe cut after the last stage would keep every stage: the cell's refinement (partial) applies,
    with its reason; the best probe on an earlier stage keeps stage_probe; the refinement is a config key."""
    last_best = measurements(20, [0.33, 0.52, 0.54, 0.65, 0.76], 0.73)  # stamps' evidence at 128 px
    d = decide(last_best, THRESHOLDS, ACTIONS)
    assert (d.quadrant, d.policy) == ("small_different", "partial")
    assert any("last stage (4)" in r and "small_different_last_stage=partial" in r for r in d.reasons)
    earlier_best = measurements(20, [0.5, 0.7, 0.74, 0.82, 0.78], 0.77)
    assert decide(earlier_best, THRESHOLDS, ACTIONS).policy == "stage_probe"
    plain = decide(last_best, THRESHOLDS, {**ACTIONS, "small_different_last_stage": "stage_probe"})
    assert plain.policy == "stage_probe" and not any("last stage" in r for r in plain.reasons)
    large = measurements(500, [0.33, 0.52, 0.54, 0.65, 0.76], 0.73)
    assert decide(large, THRESHOLDS, ACTIONS).policy == "full"


def test_a_lot_of_different_data_best_on_an_earlier_stage_trains_the_cut_network():
    """"A lot, different" fine-tunes everything; when a stage below the last probes best, the stages above it
    are cut (stage_probe) and the rest fine-tunes, with the reason; on the last stage it stays ``full``; the
    refinement is a config key and does not touch the little-data cells."""
    earlier_best = measurements(200, [0.45, 0.62, 0.71, 0.80, 0.76], 0.73)  # Fashion-MNIST's shape: stage 3
    d = decide(earlier_best, THRESHOLDS, ACTIONS)
    assert (d.quadrant, d.policy) == ("large_different", "stage_probe")
    assert any("stage 3, below the last stage (4)" in r and "large_different_earlier_stage=stage_probe" in r
               for r in d.reasons)
    last_best = measurements(200, [0.45, 0.62, 0.71, 0.76, 0.80], 0.73)
    assert decide(last_best, THRESHOLDS, ACTIONS).policy == "full"
    plain = decide(earlier_best, THRESHOLDS, {**ACTIONS, "large_different_earlier_stage": "full"})
    assert plain.policy == "full" and not any("below the last stage" in r for r in plain.reasons)
    similar = measurements(200, [0.45, 0.62, 0.71, 0.80, 0.76], 0.80)
    assert decide(similar, THRESHOLDS, ACTIONS).policy == "partial"


def test_thresholds_come_from_config():
    m = measurements(40, [0.5, 0.7, 0.74, 0.82, 0.78], 0.77)
    assert decide(m, {"small_max_per_class": 30, "similar_max_gap": 0.1}, ACTIONS).quadrant == "large_similar"


@pytest.fixture(scope="module")
def lite0():
    """Pretrained backbone (bundled offline weights); tests deep-copy it before changing it."""
    model, source, has_head = load_pretrained("tf_efficientnet_lite0", "offline")
    assert source == "offline" and has_head
    return model


def classifier_for(lite0, policy: str, **policy_cfg) -> tuple[ImageClassifier, object]:
    import copy

    stage_map_full = build_stage_map(lite0)
    plan = make_plan(policy, policy_cfg, stage_map_full.num_stages, best_stage=3, has_neck=True)
    spec = BackboneSpec("tf_efficientnet_lite0", 3, {}, plan.cut_after_stage)
    net = attach_head(copy.deepcopy(lite0), spec)
    module = ImageClassifier(net, spec, ["a", "b", "c"], PP, plan=plan, stage_map=build_stage_map(net))
    module.train()
    return module, plan


def trainable_groups(module: ImageClassifier) -> dict[str, int]:
    params = dict(module.net.named_parameters())
    return {g: sum(params[n].numel() for n in names if params[n].requires_grad)
            for g, names in module.stage_map.groups.items()}


def bn_modes(module: ImageClassifier) -> tuple[int, int]:
    """(#BN layers in train mode, #BN layers in eval mode)."""
    bns = [m for m in module.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return sum(m.training for m in bns), sum(not m.training for m in bns)


def test_linear_probe_trains_only_the_head(lite0):
    module, _ = classifier_for(lite0, "linear_probe")
    counts = trainable_groups(module)
    assert counts["head"] == 1280 * 3 + 3
    assert sum(counts.values()) == counts["head"]
    assert bn_modes(module) == (0, 49)  # every BatchNorm frozen in eval mode


def test_stage_probe_cuts_the_network(lite0):
    module, plan = classifier_for(lite0, "stage_probe", stage=2, train_stages=False)
    assert isinstance(module.net, StageProbeNet) and plan.cut_after_stage == 2
    counts = trainable_groups(module)
    assert counts["head"] == 40 * 3 + 3 and sum(counts.values()) == counts["head"]
    assert "stage3" not in module.stage_map.groups  # stages above the cut are gone
    total = sum(p.numel() for p in module.net.parameters())
    assert total < 100_000  # 3.4M in the whole network
    x = torch.randn(2, 3, 32, 32)
    assert module.net(x).shape == (2, 3)


def test_stage_probe_can_finetune_kept_stages(lite0):
    module, plan = classifier_for(lite0, "stage_probe", stage=3, train_stages=True, lr_decay=0.5)
    counts = trainable_groups(module)
    assert all(counts[f"stage{i}"] > 0 for i in range(4)) and counts["head"] == 112 * 3 + 3
    assert plan.lr_scale["head"] == 1.0 and plan.lr_scale["stage0"] == 0.5**4


def test_partial_trains_top_stages(lite0):
    module, _ = classifier_for(lite0, "partial", top_stages=2)
    counts = trainable_groups(module)
    full = build_stage_map(module.net).parameter_counts(module.net)
    for g in ("stage3", "stage4", "neck", "head"):
        assert counts[g] == full[g]
    for g in ("stage0", "stage1", "stage2"):
        assert counts[g] == 0
    train_bn, eval_bn = bn_modes(module)
    assert train_bn > 0 and eval_bn > 0


def test_full_trains_everything_with_rates_growing_toward_the_head(lite0):
    module, plan = classifier_for(lite0, "full", lr_decay=0.7)
    assert all(p.requires_grad for p in module.net.parameters())
    assert bn_modes(module)[1] == 0
    scales = [plan.lr_scale[g] for g in plan.group_order]
    assert scales == sorted(scales) and scales[-1] == 1.0 and scales[0] < scales[-1]
    module.optimizer_factory = lambda groups: torch.optim.AdamW(groups, lr=1e-3)
    groups = module.configure_optimizers().param_groups
    assert {g["name"] for g in groups} >= {"stage0", "stage0_no_decay", "head", "head_no_decay"}
    assert all(g["weight_decay"] == 0 for g in groups if g["name"].endswith("_no_decay"))


def test_lp_ft_and_gradual_unfreeze_on_schedule(lite0):
    module, plan = classifier_for(lite0, "lp_ft", probe_epochs=2)
    assert plan.trainable_at(0) == plan.trainable_at(1) == ["head"]
    assert plan.trainable_at(2) == plan.group_order
    module.apply_plan(2)
    module.train()
    assert all(p.requires_grad for p in module.net.parameters()) and bn_modes(module)[1] == 0

    module, plan = classifier_for(lite0, "gradual", unfreeze_every=1)
    assert plan.trainable_at(0) == ["neck", "head"]
    assert plan.trainable_at(1) == ["stage4", "neck", "head"]
    assert plan.trainable_at(5) == plan.group_order


# --- end to end --------------------------------------------------------------------------------


def test_auto_writes_complete_policy_json(class_folders, fast_cfg, tmp_path):
    metrics = train(fast_cfg(class_folders, "policy=auto", "policy.measure.folds=3"))
    record = json.loads((tmp_path / "run" / "policy.json").read_text())
    assert record["policy_requested"] == "auto"
    assert record["quadrant"] in ("small_similar", "small_different", "large_similar", "large_different")
    shipped = {**ACTIONS, "small_similar": "partial"}  # conf/policy/base.yaml's departure from the table
    assert record["policy_applied"] == shipped[record["quadrant"]] == metrics["policy"]
    m = record["measurements"]
    assert len(m["stage_probe_acc"]) == 5 and 0 <= m["prelogits_probe_acc"] <= 1
    assert m["images_per_class"]["median"] < 100  # tiny data is "little"
    assert m["head_confidence"]["classes"] == 1000
    assert record["thresholds"] == THRESHOLDS
    p = record["parameters"]
    assert p["trainable"] + p["frozen"] == sum(p["per_group"].values())
    assert record["plan"]["unfreeze_at"] and record["reasons"]


def test_linear_probe_uses_feature_cache_and_matches_image_path(split_folders, fast_cfg, tmp_path):
    from conftest import make_cfg

    from finetune.inference import evaluate

    metrics = train(fast_cfg(split_folders, "policy=linear_probe", "trainer.max_epochs=3"))
    record = json.loads((tmp_path / "run" / "policy.json").read_text())
    assert record["feature_cache"]["used"] and "NOT applied" in record["feature_cache"]["why"]
    assert record["measurements"] is None  # a forced policy is not measured unless asked
    assert metrics["parameters"]["trainable"] == 1280 * 3 + 3
    # The checkpoint holds the whole network: scoring it on images gives the cached-feature numbers.
    cfg = make_cfg([f"ckpt={metrics['best_checkpoint']}", f"data.root={split_folders}", f"run_dir={tmp_path / 'ev'}",
                    "accelerator=cpu"], config_name="eval")
    scored = evaluate(cfg)
    assert scored["acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


def read_lrs(run_dir) -> list[dict[str, float]]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) for k, v in r.items() if k.startswith("lr-") and v} for r in rows if r.get("lr-AdamW/head")]


@pytest.mark.parametrize("policy", ["gradual", "lp_ft"])
def test_unfreezing_survives_plateau_reduction_and_resume(policy, class_folders, fast_cfg, tmp_path):
    # threshold=0.99: no epoch counts as an improvement, so with patience 0 the LR halves every epoch.
    plateau = ["scheduler.patience=0", "scheduler.factor=0.5", "scheduler.threshold=0.99", "policy.probe_epochs=1",
               "policy.unfreeze_every=1", "data.batch_size=12"]
    first = tmp_path / "first"
    train(fast_cfg(class_folders, f"policy={policy}", "trainer.max_epochs=2", *plateau, run_dir=first))
    assert read_lrs(first)[0]["lr-AdamW/head"] == pytest.approx(1e-3)

    resumed = tmp_path / "resumed"
    metrics = train(fast_cfg(class_folders, f"policy={policy}", "trainer.max_epochs=5", *plateau,
                             f"resume={first / 'checkpoints' / 'last.ckpt'}", run_dir=resumed))
    assert metrics["epochs"] == 5
    lrs = read_lrs(resumed)
    # Resumed with the optimizer's saved LR, and reduced by the plateau scheduler after the later unfreezing.
    # (Lightning saves checkpoints before the epoch's scheduler step, so the saved LR is the pre-step one.)
    saved = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    head_lr = next(g["lr"] for g in saved["optimizer_states"][0]["param_groups"] if g["name"] == "head")
    assert lrs[0]["lr-AdamW/head"] == pytest.approx(head_lr)
    assert lrs[-1]["lr-AdamW/head"] < lrs[0]["lr-AdamW/head"]
    assert set(lrs[0]) == set(lrs[-1])  # same param groups throughout
    last = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    # last.ckpt is the final epoch even when val/acc stopped improving (tiny data: it sits at 1.0);
    # Lightning's own save_last only refreshes it together with a new best checkpoint.
    assert last["epoch"] == 4
    end = last["state_dict"]
    start = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    # Groups unfrozen during the resumed epochs moved; lp_ft unfreezes all at epoch 1, gradual stage3 at 2.
    moved = "net.conv_stem.weight" if policy == "lp_ft" else "net.blocks.3.0.conv_pw.weight"
    assert not torch.equal(end[moved], start[moved])
    # stage 0 is still frozen at epoch 4 (unfreezes at 5): weights and BatchNorm statistics untouched
    if policy == "gradual":
        assert torch.equal(end["net.conv_stem.weight"], start["net.conv_stem.weight"])
        assert torch.equal(end["net.bn1.running_mean"], start["net.bn1.running_mean"])


def test_bad_policy_values_are_clear_errors(lite0):
    from conftest import make_cfg
    from omegaconf import OmegaConf

    from finetune.errors import FinetuneError
    from finetune.policy.choose import choose_policy

    cfg = OmegaConf.to_container(make_cfg(["policy.actions.small_similar=bogus"]).policy)
    with pytest.raises(FinetuneError, match="policy.actions.small_similar=bogus"):
        choose_policy(cfg, lite0, index=None, pp=PP, pretrained_head=True, seed=0)  # fails before measuring
    with pytest.raises(FinetuneError, match="policy.stage=9"):
        make_plan("stage_probe", {"stage": 9}, num_stages=5, best_stage=None)
    with pytest.raises(FinetuneError, match="policy.top_stages=7"):
        make_plan("partial", {"top_stages": 7}, num_stages=5, best_stage=None)
    with pytest.raises(FinetuneError, match="policy.name=nope"):
        make_plan("nope", {}, num_stages=5, best_stage=None)


def test_measuring_leaves_the_network_in_training_mode(lite0, class_folders):
    """The measurement runs the network in eval mode; it must hand it back in training mode, or
    Lightning (which keeps the mode it finds) fine-tunes with every BatchNorm frozen."""
    import copy

    from finetune.data.datasets import scan_dataset
    from finetune.policy.measure import extract_features

    net = copy.deepcopy(lite0).train()
    index = scan_dataset(class_folders, 0.2, 0.0, 0)
    extract_features(net, index.splits["train"][:6], Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0))
    assert all(m.training for m in net.modules())


def test_the_probes_run_on_one_blas_thread_with_the_same_accuracy():
    """The probes' small matrices ran 10-17x slower on OpenBLAS's threads (BENCHMARKS.md): measure() limits BLAS to
    one thread around them, which changes no accuracy (real digits pixels as features)."""
    from sklearn.datasets import load_digits
    from threadpoolctl import threadpool_info

    from finetune.policy.measure import one_blas_thread, probe_accuracy

    digits = load_digits()
    x, y = digits.data[:400], digits.target[:400]
    threaded = probe_accuracy(x, y, 5, 0)
    with one_blas_thread():
        assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas")
        assert probe_accuracy(x, y, 5, 0) == pytest.approx(threaded, abs=1e-3)
