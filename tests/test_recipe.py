"""The training recipe: every optimizer and scheduler config, LR decay by formula, regularization
doing what it claims, ensembles and TTA. Real Lite0 weights and real (tiny, generated) images."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, make_cfg
from omegaconf import OmegaConf

from finetune.config import build_optimizer_and_scheduler, validate_train_config
from finetune.data.transforms import Preprocessing
from finetune.data.tta import tta_batches
from finetune.errors import FinetuneError
from finetune.inference import evaluate
from finetune.models.backbone import BackboneSpec, attach_head, load_pretrained
from finetune.models.checkpoint import read_checkpoint
from finetune.models.module import ImageClassifier
from finetune.recipe.regularization import Regularization, WeightPenalty, is_weight
from finetune.recipe.schedulers import build_lr_schedulers, cycle_end_epochs
from finetune.train import train

CONF = Path(__file__).resolve().parents[1] / "finetune" / "conf"
OPTIMIZERS = sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))
SCHEDULERS = sorted(p.stem for p in (CONF / "scheduler").glob("*.yaml"))
PP = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0)


def test_every_issue_optimizer_and_scheduler_has_a_config():
    assert set(OPTIMIZERS) >= {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lbfgs"}
    assert set(SCHEDULERS) >= {"plateau", "step", "multistep", "exponential", "inverse_time", "cosine",
                               "cosine_restarts", "onecycle", "none"}


# ----------------------------------------------------------------------------- each config file


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_config_builds_its_torch_class_and_steps(name):
    cfg = make_cfg([f"optimizer={name}", "data.root=x"])
    factory, _, _ = build_optimizer_and_scheduler(cfg)
    expected = getattr(torch.optim, cfg.optimizer._target_.rsplit(".", 1)[1])
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = factory([w])
    assert type(opt) is expected

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    before = closure().item()
    for _ in range(3):
        opt.step(closure)
    assert closure().item() < before  # it descends on a convex bowl
    if name == "nesterov":
        assert opt.defaults["nesterov"] and opt.defaults["momentum"] > 0
    if name in ("momentum",):
        assert opt.defaults["momentum"] > 0 and not opt.defaults["nesterov"]
    if name == "sgd":
        assert opt.defaults["momentum"] == 0


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_config_builds_and_changes_lr_as_documented(name):
    cfg = make_cfg([f"scheduler={name}", "data.root=x", "trainer.max_epochs=10"])
    _, factory, options = build_optimizer_and_scheduler(cfg)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    configs = build_lr_schedulers(opt, factory, options, int(options.get("warmup_epochs", 0)),
                                  float(options.get("warmup_start_factor", 0.1)), steps_per_epoch=4, total_steps=40)
    if name == "none":
        assert configs == []
        return
    (config,) = configs
    sched = config["scheduler"]
    steps = 40 if config.get("interval") == "step" else 10
    lrs = []
    for _ in range(steps):
        opt.step()
        sched.step(1.0) if name == "plateau" else sched.step()  # a constant metric: no improvement
        lrs.append(opt.param_groups[0]["lr"])
    assert min(lrs) < 0.1  # every schedule decays at some point over the run
    if name == "cosine_restarts":  # restarts: the LR climbs back to its start after each 3-epoch cycle
        assert lrs[11] == pytest.approx(0.1) and lrs[10] < 0.01


def test_exponential_and_inverse_time_follow_their_formulas_step_by_step():
    for name, formula in (("exponential", lambda a0, k, t: a0 * math.exp(-k * t)),
                          ("inverse_time", lambda a0, k, t: a0 / (1 + k * t))):
        cfg = make_cfg([f"scheduler={name}", "data.root=x", "scheduler.k=0.3"])
        _, factory, options = build_optimizer_and_scheduler(cfg)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
        (config,) = build_lr_schedulers(opt, factory, options, 0, 0.1, 1, 20)
        for t in range(1, 21):
            opt.step()
            config["scheduler"].step()
            assert opt.param_groups[0]["lr"] == pytest.approx(formula(0.05, 0.3, t), rel=1e-9), (name, t)


def test_warmup_in_front_of_cosine_and_of_plateau():
    # cosine (SequentialLR): 0.1 * lr at epoch 0, full lr after 2 warmup epochs, then the cosine.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = make_cfg(["scheduler=cosine", "data.root=x", "scheduler.warmup_epochs=2", "trainer.max_epochs=5"])
    _, factory, options = build_optimizer_and_scheduler(cfg)
    (config,) = build_lr_schedulers(opt, factory, options, 2, 0.1, 1, 5)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(4):
        opt.step()
        config["scheduler"].step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(0.55) and lrs[2] == pytest.approx(1.0)
    assert lrs[3] < 1.0 and lrs[4] < lrs[3]
    # plateau: LinearLR beside it; a reduction during warmup still multiplies.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = make_cfg(["scheduler=plateau", "data.root=x", "scheduler.patience=0"])
    _, factory, options = build_optimizer_and_scheduler(cfg)
    warm, plateau = build_lr_schedulers(opt, factory, options, 2, 0.5, 1, 10)
    assert warm["interval"] == "epoch" and plateau["monitor"] == "val/loss"
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    for _ in range(3):
        opt.step()
        plateau["scheduler"].step(1.0)
        warm["scheduler"].step()
    # warmup x2 over two epochs; plateau (patience 0, constant metric) x0.1 at epochs 2 and 3
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0 * 0.1 * 0.1)


def test_onecycle_refuses_a_second_warmup():
    cfg = make_cfg(["scheduler=onecycle", "data.root=x"])
    _, factory, options = build_optimizer_and_scheduler(cfg)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(FinetuneError, match="pct_start"):
        build_lr_schedulers(opt, factory, options, 1, 0.1, 1, 10)


# ----------------------------------------------------------------------------- from the CLI


def _sweep(tmp_path: Path, root: Path, name: str, *overrides: str) -> list[dict]:
    sweep_dir = tmp_path / name
    result = subprocess.run(
        [str(Path(sys.executable).parent / "finetune"), "-m", f"data.root={root}", *FAST, "trainer.max_epochs=2",
         "trainer.limit_train_batches=2", "report=false", "policy=full", "~callbacks.early_stopping",
         f"hydra.sweep.dir={sweep_dir}", *overrides],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: int(p.parent.name))
    # The sweep summary: every job once, ranked by the monitored metric (val/acc, max), best named.
    with open(sweep_dir / "sweep_summary.csv") as f:
        ranked = list(csv.DictReader(f))
    assert sorted(r["job"] for r in ranked) == sorted(p.parent.name for p in runs)
    accs = [float(r["val/acc"]) for r in ranked]
    assert accs == sorted(accs, reverse=True)
    assert f"Best: job {ranked[0]['job']}" in result.stdout
    return [json.loads(p.read_text()) for p in runs]


@pytest.mark.slow  # 50 s: each one also builds and steps in test_optimizer_config_builds_... / test_scheduler_...
def test_every_optimizer_and_scheduler_runs_a_short_fit_from_the_cli(class_folders, tmp_path):
    # One Hydra multirun per group: the real CLI, one process start for all the fits.
    runs = _sweep(tmp_path, class_folders, "optimizers", "optimizer=" + ",".join(OPTIMIZERS), "scheduler=plateau")
    assert len(runs) == len(OPTIMIZERS)
    runs += _sweep(tmp_path, class_folders, "schedulers", "scheduler=" + ",".join(SCHEDULERS))
    assert len(runs) == len(OPTIMIZERS) + len(SCHEDULERS)
    for run in runs:
        assert run["epochs"] == 2 and math.isfinite(run["val/loss"])


# ----------------------------------------------------------------------------- plateau, end to end


def test_plateau_looks_after_every_validation_check_when_asked(class_folders, fast_cfg, caplog, tmp_path):
    """checks_per_epoch=2: validation twice per epoch and the rule steps after each check (patience in checks),
    so a flat val/loss is answered within an epoch; the epoch-wise rule gets one reduction in the same run."""
    flat = ["policy=linear_probe", "policy.head_solver=optimizer", "optimizer=sgd", "optimizer.lr=1e-6",
            "scheduler=plateau", "scheduler.patience=1", "trainer.max_epochs=3", "~callbacks.early_stopping"]
    per_epoch = train(fast_cfg(class_folders, *flat, run_dir=tmp_path / "per_epoch"))
    per_check = train(fast_cfg(class_folders, *flat, "scheduler.checks_per_epoch=2", run_dir=tmp_path / "per_check"))
    assert len(per_epoch["lr_reductions"]) == 1
    steps_per_epoch = per_check["images"]["train"] // 8 + bool(per_check["images"]["train"] % 8)
    reductions = per_check["lr_reductions"]
    assert len(reductions) >= 2 and any(r["step"] % steps_per_epoch for r in reductions)  # mid-epoch
    with open(Path(per_check["run_dir"]) / "logs" / "metrics.csv") as f:
        assert sum(1 for row in csv.DictReader(f) if row.get("val/loss")) >= 2 * 3  # two checks per epoch
    # Without a validation split there is nothing to check several times: said, and the rule looks per epoch
    caplog.clear()
    train(fast_cfg(class_folders, *flat, "scheduler.checks_per_epoch=2", "data.val_fraction=0",
                   "trainer.max_epochs=1", run_dir=tmp_path / "no_val"))
    assert "checks_per_epoch=2 is not applied: there is no validation split" in caplog.text


def test_final_anneal_ends_the_run_near_zero_from_where_the_plateau_left_it(class_folders, fast_cfg):
    metrics = train(fast_cfg(class_folders, "policy=full", "optimizer=sgd", "optimizer.lr=0.01", "scheduler=plateau",
                             "scheduler.patience=100", "scheduler.final_anneal=0.5", "trainer.max_epochs=4",
                             "~callbacks.early_stopping"))
    assert metrics["lr_reductions"] == []  # the anneal is the schedule's end, not a plateau reduction
    assert "annealed" in metrics["checkpoint_choice"], metrics["checkpoint_choice"]
    assert Path(metrics["scored_checkpoint"]).name == "last.ckpt"
    state = read_checkpoint(Path(metrics["run_dir"]) / "checkpoints" / "last.ckpt")
    head_lr = next(g["lr"] for g in state["optimizer_states"][0]["param_groups"] if g.get("name") == "head")
    assert head_lr < 0.01 * 0.01  # 0.1% of the LR the plateau rule left (plus one step's rounding)
    for bad, key in (("scheduler.checks_per_epoch=0", "scheduler.checks_per_epoch=0"),
                     ("scheduler.final_anneal=1.5", "scheduler.final_anneal=1.5")):
        with pytest.raises(FinetuneError, match=key):
            validate_train_config(fast_cfg(class_folders, "scheduler=plateau", bad))


def test_plateau_lowers_the_lr_after_patience_epochs_without_improvement_and_not_before(class_folders, fast_cfg):
    # A tiny LR: val/loss stays flat, so every epoch after the first is "no improvement".
    cfg = fast_cfg(class_folders, "policy=linear_probe", "policy.head_solver=optimizer", "optimizer=sgd",
                   "optimizer.lr=1e-6", "scheduler=plateau", "scheduler.patience=2", "trainer.max_epochs=6",
                   "~callbacks.early_stopping")
    metrics = train(cfg)
    # Epoch 1 sets the best; epochs 2, 3 are patience; after the 4th epoch torch's num_bad_epochs (3) > patience.
    assert [r["after_epoch"] for r in metrics["lr_reductions"]] == [4]
    assert metrics["lr_reductions"][0]["lr"]["head"] == pytest.approx(1e-7)
    # LearningRateMonitor logs every epoch's LR once, in order.
    with open(Path(metrics["run_dir"]) / "logs" / "metrics.csv") as f:
        lrs = [float(row["lr-SGD/head"]) for row in csv.DictReader(f) if row["lr-SGD/head"]]
    assert lrs == pytest.approx([1e-6] * 4 + [1e-7] * 2)


def test_monitored_scheduler_key_is_checked_before_training(class_folders, fast_cfg):
    cfg = fast_cfg(class_folders, "scheduler=plateau", "scheduler.monitor=val/los")
    with pytest.raises(FinetuneError, match="scheduler.monitor=val/los.*val/loss"):
        validate_train_config(cfg)


def test_lbfgs_refuses_mixed_precision_and_unfreezing_policies(class_folders, fast_cfg):
    with pytest.raises(FinetuneError, match="lbfgs.*precision"):
        validate_train_config(fast_cfg(class_folders, "optimizer=lbfgs", "trainer.precision=bf16-mixed"))
    with pytest.raises(FinetuneError, match="lbfgs.*gradual"):
        validate_train_config(fast_cfg(class_folders, "optimizer=lbfgs", "policy=gradual"))


# ----------------------------------------------------------------------------- regularization


def _backbone_distance(ckpt: str) -> float:
    """Sum of squared distances of the backbone's weights (not the new head) from the pretrained ones."""
    pretrained, _, _ = load_pretrained("tf_efficientnet_lite0", "offline")
    reference = dict(pretrained.named_parameters())
    state = read_checkpoint(ckpt)["state_dict"]
    total = 0.0
    for name, value in state.items():
        name = name.removeprefix("net.")
        if name in reference and is_weight(name, value) and not name.startswith("classifier"):
            total += float((value - reference[name].detach()).pow(2).sum())
    return total


def test_l2_sp_keeps_the_backbone_closer_to_pretrained_than_l2_at_the_same_strength(class_folders, fast_cfg, tmp_path):
    common = ["policy=full", "optimizer=sgd", "optimizer.lr=0.05", "optimizer.weight_decay=0", "scheduler=none",
              "trainer.max_epochs=2", "~callbacks.early_stopping"]
    distances = {}
    for kind in ("l2", "l2_sp"):
        metrics = train(fast_cfg(class_folders, *common, f"regularization.{kind}=0.2", run_dir=tmp_path / kind))
        distances[kind] = _backbone_distance(str(Path(metrics["run_dir"]) / "checkpoints" / "last.ckpt"))
    assert distances["l2_sp"] < 0.8 * distances["l2"], distances


def test_penalties_match_their_formulas():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    reg = Regularization(l1=0.1, l2=0.2, l2_sp=0.3)
    penalty = WeightPenalty(net, reg, head_names={"2.weight", "2.bias"})
    with torch.no_grad():
        net[0].weight.add_(1.0)
    w0, w2 = net[0].weight, net[2].weight
    anchor = w0 - 1.0
    expected = (0.1 * (w0.abs().sum() + w2.abs().sum()) + 0.2 * (w0.pow(2).sum() + w2.pow(2).sum())
                + 0.3 * (w0 - anchor).pow(2).sum())  # L2-SP on the pretrained layer only; no norms or biases
    assert float(penalty(net)) == pytest.approx(float(expected), rel=1e-6)


def _classifier(reg: Regularization, kwargs: dict | None = None) -> ImageClassifier:
    backbone, _, _ = load_pretrained("tf_efficientnet_lite0", "offline", **(kwargs or {}))
    spec = BackboneSpec("tf_efficientnet_lite0", 3, kwargs or {}, None, reg.pooling)
    return ImageClassifier(attach_head(backbone, spec), spec, ["a", "b", "c"], PP, regularization=reg)


@pytest.mark.parametrize("key, kwargs", [("dropout", {"drop_rate": 0.5}), ("drop_connect", {}),
                                         ("drop_path", {"drop_path_rate": 0.5})])
def test_stochastic_regularizers_change_training_but_not_evaluation(key, kwargs):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    plain = _classifier(Regularization(trainable_bn="eval"))
    regular = _classifier(Regularization(**{key: 0.5}, trainable_bn="eval"), kwargs)
    regular.load_state_dict(plain.state_dict())
    with torch.no_grad():
        reference = plain.eval()(x)
        assert torch.equal(regular.eval()(x), reference)  # evaluation: untouched
        assert torch.allclose(plain.train()(x), reference, atol=1e-5)  # control: BN frozen, no other noise
        a, b = regular.train()(x), regular(x)
    assert not torch.allclose(a, reference, atol=1e-3) and not torch.allclose(a, b, atol=1e-3)


def test_drop_path_on_a_backbone_without_it_is_a_clear_error(class_folders, fast_cfg):
    cfg = fast_cfg(class_folders, "model.backbone=vgg11", "model.weights=none", "regularization.drop_path=0.1",
                   "policy=full")
    with pytest.raises(FinetuneError, match=r"regularization.drop_path=0.1.*vgg11"):
        train(cfg)


def test_fractional_max_pooling_is_random_in_training_fixed_in_eval_and_kept_in_the_checkpoint(class_folders, fast_cfg):
    module = _classifier(Regularization(pooling="fractional_max", trainable_bn="eval"))
    # 160 px: a 5x5 last feature map pooled to 3x3 (at 2x2 or 4x4 the regions cannot vary)
    assert type(module.net.global_pool).__name__ == "FractionalMaxPool"
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(module.eval()(x), module(x))
        assert not torch.allclose(module.train()(x), module(x))
    metrics = train(fast_cfg(class_folders, "policy=linear_probe", "regularization.pooling=fractional_max"))
    meta = read_checkpoint(metrics["best_checkpoint"])["finetune"]
    assert meta["pooling"] == "fractional_max"
    assert json.loads((Path(metrics["run_dir"]) / "policy.json").read_text())["feature_cache"]["used"] is False


def test_bad_regularization_values_name_the_key(class_folders, fast_cfg):
    for override, pattern in (("regularization.dropout=1.5", "regularization.dropout=1.5"),
                              ("regularization.pooling=max", "regularization.pooling=max.*fractional_max"),
                              ("regularization.l2_sp=-1", "regularization.l2_sp=-1")):
        with pytest.raises(FinetuneError, match=pattern):
            validate_train_config(fast_cfg(class_folders, override))


# ----------------------------------------------------------------------------- ensembles and TTA


def test_seed_ensemble_trains_members_and_eval_averages_them(split_folders, fast_cfg, tmp_path):
    run = tmp_path / "ens"
    metrics = train(fast_cfg(split_folders, "policy=full", "trainer.max_epochs=2", "ensemble.size=2", run_dir=run))
    members = metrics["ensemble"]["members"]
    assert [m["seed"] for m in members] == [0, 1] and all(Path(m["checkpoint"]).is_file() for m in members)
    assert len(metrics["test/member_acc"]) == 2
    assert metrics["test/member_acc"] == pytest.approx([m["test/acc"] for m in members], abs=1e-6)
    a, b = (read_checkpoint(m["checkpoint"])["state_dict"]["net.classifier.weight"] for m in members)
    assert not torch.equal(a, b)  # different seeds, different members
    listed = json.loads((run / "ensemble.json").read_text())["members"]
    assert listed == ["members/0/checkpoints/best.ckpt", "members/1/checkpoints/best.ckpt"]
    scored = evaluate(make_cfg([f"ckpt={run}", f"data.root={split_folders}", f"run_dir={tmp_path / 'eval'}"], "eval"))
    assert scored["acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert scored["member_acc"] == pytest.approx(metrics["test/member_acc"], abs=1e-6)


def test_snapshot_ensemble_keeps_one_checkpoint_per_cycle(split_folders, fast_cfg, tmp_path):
    run = tmp_path / "snap"
    metrics = train(fast_cfg(split_folders, "policy=full", "scheduler=cosine_restarts", "scheduler.cycle_epochs=1",
                             "trainer.max_epochs=3", "ensemble.snapshots=true", "~callbacks.early_stopping",
                             run_dir=run))
    snaps = metrics["snapshot_ensemble"]["snapshots"]
    assert [Path(p).name for p in snaps] == ["snapshot_0.ckpt", "snapshot_1.ckpt", "snapshot_2.ckpt"]
    assert len(metrics["snapshot_ensemble"]["test/member_acc"]) == 3
    assert json.loads((run / "ensemble.json").read_text())["kind"] == "snapshot"
    assert cycle_end_epochs(2, 2, 10) == [1, 5]  # cycles of 2 then 4 epochs; the next (8) does not fit


def test_snapshots_need_the_restarting_schedule(class_folders, fast_cfg):
    with pytest.raises(FinetuneError, match="cosine_restarts"):
        validate_train_config(fast_cfg(class_folders, "ensemble.snapshots=true"))


def test_tta_views_and_eval_with_tta(split_folders, fast_cfg, tmp_path):
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    views = tta_batches(x, ["hflip", "vflip", "five_crop"])
    assert len(views) == 1 + 1 + 1 + 5 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[1], x.flip(-1)) and torch.equal(views[2], x.flip(-2))
    metrics = train(fast_cfg(split_folders, "policy=linear_probe", "tta=[hflip]"))
    assert metrics["tta"]["views"] == ["hflip"] and 0 <= metrics["tta"]["test/acc"] <= 1
    scored = evaluate(make_cfg([f"ckpt={metrics['best_checkpoint']}", f"data.root={split_folders}", "tta=[hflip]",
                                f"run_dir={tmp_path / 'eval'}"], "eval"))
    assert scored["acc"] == pytest.approx(metrics["tta"]["test/acc"], abs=1e-6)
    with pytest.raises(FinetuneError, match="hflp.*hflip"):
        evaluate(make_cfg([f"ckpt={metrics['best_checkpoint']}", f"data.root={split_folders}", "tta=[hflp]"], "eval"))


def test_auto_scores_the_last_epoch_after_an_annealed_schedule_and_the_best_one_otherwise(split_folders, fast_cfg,
                                                                                            tmp_path):
    annealed = train(fast_cfg(split_folders, "policy=full", "scheduler=onecycle", "trainer.max_epochs=2",
                              run_dir=tmp_path / "onecycle"))
    assert Path(annealed["scored_checkpoint"]).name == "last.ckpt"
    assert "annealed" in annealed["checkpoint_choice"]
    # The reported scores are last.ckpt's, and `ckpt=RUN` resolves to the checkpoint the run scored.
    scored = evaluate(make_cfg([f"ckpt={tmp_path / 'onecycle'}", f"data.root={split_folders}",
                                f"run_dir={tmp_path / 'eval'}"], "eval"))
    assert scored["acc"] == pytest.approx(annealed["test/acc"], abs=1e-6)
    # the NLL of the calibrated probabilities that eval reports (training's test/loss is the raw softmax's)
    assert scored["loss"] == pytest.approx(annealed["calibration"]["test"]["nll_after"], abs=2e-5)

    constant = train(fast_cfg(split_folders, "policy=full", "scheduler=none", "trainer.max_epochs=2",
                              run_dir=tmp_path / "constant"))
    assert Path(constant["scored_checkpoint"]).name == "best.ckpt"
    assert "above 0.1 x its peak" in constant["checkpoint_choice"]
    # ReduceLROnPlateau (the default) lowers the LR because validation stalled: the best epoch, even
    # after the LR fell below 10% of its peak (two reductions here).
    plateau = train(fast_cfg(split_folders, "policy=full", "scheduler=plateau", "scheduler.patience=0",
                             "optimizer=sgd", "optimizer.lr=1e-6", "trainer.max_epochs=3", "~callbacks.early_stopping",
                             run_dir=tmp_path / "plateau"))
    assert len(plateau["lr_reductions"]) == 2
    assert (
        Path(plateau["scored_checkpoint"]).name == "best.ckpt" and "ReduceLROnPlateau" in plateau["checkpoint_choice"]
    )
    forced = train(fast_cfg(split_folders, "policy=full", "scheduler=none", "trainer.max_epochs=2",
                            "score_checkpoint=last", run_dir=tmp_path / "forced"))
    assert Path(forced["scored_checkpoint"]).name == "last.ckpt"
    with pytest.raises(FinetuneError, match="score_checkpoint=newest must be auto, best or last"):
        validate_train_config(fast_cfg(split_folders, "score_checkpoint=newest"))


def test_configured_regularization_reaches_the_module(class_folders, fast_cfg):
    cfg = fast_cfg(class_folders, "regularization=strong")
    reg = Regularization.from_config(OmegaConf.to_container(cfg.regularization))
    assert reg.label_smoothing == 0.1 and reg.l2_sp > 0 and reg.model_kwargs({}) == {
        "drop_rate": 0.2, "drop_path_rate": 0.1
    }
    metrics = train(cfg)
    assert metrics["regularization"]["label_smoothing"] == 0.1
    assert read_checkpoint(metrics["best_checkpoint"])["finetune"]["model_kwargs"] == {
        "drop_rate": 0.2, "drop_path_rate": 0.1
    }
