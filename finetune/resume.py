"""Resuming a run: the config it continues with (RUN/config.yaml plus only the safe overrides), the
checkpoint it continues from and whether that fits, and the policy decision it was trained with.
Separate from train.py so that what a resume may change is decided in one place, before any training."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.errors import FinetuneError
from finetune.run_folder import resolve_run_dir, run_folder_of

log = logging.getLogger(__name__)

# Overrides a resume may change: how long to train, how to show progress, the devices and the loading of
# data, and what the final scoring adds. Everything else (data, model, policy, recipe, seed) is what the
# checkpoint was trained with: changing it would silently train another run, or fail to load.
RESUME_SAFE_KEYS = (
    "trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "trainer.log_every_n_steps", "trainer.accelerator", "trainer.devices",
    "trainer.strategy", "trainer.num_nodes", "ddp_timeout_s",
    "data.num_workers", "data.pin_memory", "data.preload", "data.preload_max_gb", "data.eval_batch_size",
    "data.normalize_on_device",
    "report", "tta", "score_checkpoint", "calibrate", "open_set.fit", "open_set.score", "open_set.reject",
)
_ABSENT = object()


def run_config(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """The config this run uses, and its folder (created).

    A new run: ``cfg`` in run_dir. ``resume=RUN`` or ``resume=RUN/checkpoints/x.ckpt``: RUN's own
    config.yaml, in RUN (or in run_dir when one is given: a continued copy), with only the overrides
    in RESUME_SAFE_KEYS applied; others are refused, so nothing typed with a resume is dropped or
    silently changes the run. A checkpoint outside a run folder resumes with ``cfg`` as given."""
    resume = cfg.resume
    source = run_folder_of(resume)
    if not resume or source is None or not (source / "config.yaml").is_file():
        run_dir = Path(cfg.run_dir) if cfg.run_dir else source
        run_dir = resolve_run_dir(with_value(cfg, "run_dir", str(run_dir) if run_dir else None))
        return with_value(cfg, "run_dir", str(run_dir)), run_dir
    source = source.resolve()
    run_dir = resolve_run_dir(with_value(cfg, "run_dir", str(cfg.run_dir) if cfg.run_dir else str(source)))
    try:
        saved = OmegaConf.load(source / "config.yaml")
        saved_flat = _flatten(OmegaConf.to_container(saved, resolve=False))
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as e:
        raise FinetuneError(f"resume={resume}: {source / 'config.yaml'} could not be read ({str(e).splitlines()[0]}); "
                            f"it holds the run's config, which a resume continues with.") from None
    user = with_values(cfg, {"run_dir": str(run_dir), "resume": str(resume)})
    user_flat = _flatten(OmegaConf.to_container(user, resolve=True))
    typed = _typed_keys(cfg)
    changed = sorted(k for k in set(user_flat) | set(saved_flat)
                     if k not in ("run_dir", "resume") and typed(k)
                     and user_flat.get(k, _ABSENT) != saved_flat.get(k, _ABSENT))
    refused = [k for k in changed if k not in RESUME_SAFE_KEYS] + _length_bound_schedule(changed, saved)
    if refused:
        def show(flat, k):
            value = flat.get(k, _ABSENT)
            return "(not set)" if value is _ABSENT else value
        raise FinetuneError(
            f"resume={resume} continues the run in {source} with the config it was trained with "
            f"({source / 'config.yaml'}), and these overrides would change it: "
            + "; ".join(f"{k}={show(user_flat, k)} (the run has {show(saved_flat, k)})" for k in refused)
            + f". A resume may change only {', '.join(RESUME_SAFE_KEYS)}"
            + (f", and not the run's length with scheduler {saved.scheduler._target_.rsplit('.', 1)[-1]}, whose "
               "annealing was fitted to it and is restored from the checkpoint"
               if _length_bound_schedule(refused, saved) else "")
            + ". Drop the others, or train a new run "
            f"with them (another run_dir). Nothing in {source} was changed."
        )
    merged = OmegaConf.create(OmegaConf.to_container(saved, resolve=False))
    for key, interpolation in _explaining_interpolations(cfg, saved, saved_flat).items():
        OmegaConf.update(merged, key, interpolation, merge=False)  # ${run_dir}/...: follows run_dir (members, copies)
    for key in changed:
        if key in user_flat:
            OmegaConf.update(merged, key, user_flat[key], merge=False)
        else:  # removed with ~key
            parent, _, leaf = key.rpartition(".")
            (OmegaConf.select(merged, parent) if parent else merged).pop(leaf, None)
        log.info("Resume: %s=%s (the run had %s)", key, user_flat.get(key, "(removed)"), saved_flat.get(key))
    for key, value in _keys_the_run_predates(saved, OmegaConf.to_container(cfg, resolve=False)).items():
        OmegaConf.update(merged, key, value, merge=True, force_add=True)
        log.info("Resume: %s=%s (not in the run's config.yaml, written by an older finetune: today's default)",
                 key, value)
    OmegaConf.update(merged, "run_dir", str(run_dir), merge=False)
    OmegaConf.update(merged, "resume", str(resume), merge=False)
    OmegaConf.set_struct(merged, True)
    log.info("Resuming the run in %s with its config.yaml%s",
             source, f", continued in {run_dir}" if run_dir != source else "")
    return merged, run_dir


# Schedules fitted to the run's length when they are built (their state, T_max or total_steps, is restored
# from the checkpoint): a longer or shorter run would restart the cosine, or step past one-cycle's end.
LENGTH_BOUND_SCHEDULES = ("CosineAnnealingLR", "OneCycleLR")


def _length_bound_schedule(changed: list[str], saved: DictConfig) -> list[str]:
    """The run-length keys among ``changed`` when the run's schedule was fitted to its length."""
    target = str(OmegaConf.select(saved, "scheduler._target_", default="") or "")
    if not target.endswith(LENGTH_BOUND_SCHEDULES):
        return []
    return [k for k in changed if k in ("trainer.max_epochs", "trainer.max_steps")]


def _explaining_interpolations(cfg: DictConfig, saved: DictConfig, saved_flat: dict[str, Any]) -> dict[str, str]:
    """The composed config's interpolations (``${run_dir}/checkpoints``) that give the saved config's values
    when resolved against it: config.yaml is written resolved, but these must follow a new run_dir."""
    raw = _flatten(OmegaConf.to_container(cfg, resolve=False))
    found = {k: v for k, v in raw.items() if isinstance(v, str) and "${" in v and k in saved_flat}
    probe = OmegaConf.create(OmegaConf.to_container(saved, resolve=False))
    for key, value in found.items():
        OmegaConf.update(probe, key, value, merge=False)
    explaining = {}
    for key, value in found.items():
        try:
            if OmegaConf.select(probe, key) == saved_flat[key]:
                explaining[key] = value
        except OmegaConfBaseException:
            pass
    return explaining


def _keys_the_run_predates(saved: DictConfig, current: dict[str, Any]) -> dict[str, Any]:
    """Keys today's config has and the run's config.yaml lacks (an older finetune wrote it), with today's
    defaults, so the run can be resumed. Not inside a node that names a class (``_target_``: its keys are that
    class's arguments, fixed by the option the run chose) nor under ``hydra``."""
    saved_tree = OmegaConf.to_container(saved, resolve=False)
    added = {}
    for key, value in _flatten(current).items():
        node, parts = saved_tree, key.split(".")
        if parts[0] == "hydra":
            continue
        for part in parts:
            if not isinstance(node, dict) or "_target_" in node:
                break  # a value where today has a node, or a class's arguments: left as the run had them
            if part not in node:
                added[key] = value
                break
            node = node[part]
    return added


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and empty mappings are values."""
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _typed_keys(cfg: DictConfig):
    """Whether the user gave a dotted key (or a group or node above it): see ``typed_paths``."""
    paths = typed_paths(cfg)
    return lambda key: any(key == p or key.startswith(p + ".") for p in paths)


def typed_paths(cfg: DictConfig) -> list[str]:
    """The dotted keys (or groups) the user gave: the CLI's overrides as Hydra parsed them; for a library
    call, the keys whose value differs from the composed defaults (every key when another app's Hydra
    composed ``cfg``: then nothing can be told apart)."""
    if HydraConfig.initialized():
        from hydra.core.override_parser.overrides_parser import OverridesParser

        paths = [o.key_or_group.replace("/", ".") for o in
                 OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))]
        return [p for p in paths if p != "hydra" and not p.startswith("hydra.")]
    try:
        defaults = _flatten(OmegaConf.to_container(_composed_defaults(), resolve=False))
    except (HydraException, OmegaConfBaseException, ValueError):  # another app's Hydra: all given counts as typed
        return list(cfg.keys())
    given = _flatten(OmegaConf.to_container(cfg, resolve=False))
    return sorted(k for k in set(given) | set(defaults) if given.get(k, _ABSENT) != defaults.get(k, _ABSENT))


def _composed_defaults() -> DictConfig:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train")
    with initialize_config_module(config_module="finetune.conf", version_base="1.3"):
        return compose(config_name="train")



def with_value(cfg: DictConfig, key: str, value: Any) -> DictConfig:
    return with_values(cfg, {key: value})


def with_values(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with (dotted) keys set (the composed config is in struct mode)."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    OmegaConf.set_struct(cfg, True)
    return cfg


def choice_from_record(record: dict[str, Any], policy_cfg: dict[str, Any]):
    """The decision a policy.json holds, as a PolicyChoice (the plan as it was; nothing measured again)."""
    from finetune.policy.choose import PolicyChoice
    from finetune.policy.plan import Plan

    return PolicyChoice(record["policy_requested"], Plan(**record["plan"]), None, None, dict(policy_cfg["thresholds"]))


def resume_checkpoint(resume: str | None) -> str | None:
    """The checkpoint to resume from: a .ckpt file, or RUN_DIR/checkpoints/last.ckpt (read by ResumePoint).
    None also for a run folder stopped during its first epoch (no last.ckpt, not finished): it starts again
    in place from its config."""
    if not resume:
        return None
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        folder, path = path, path / "checkpoints" / "last.ckpt"
        if not path.exists() and (folder / "config.yaml").is_file() and not (folder / "metrics.json").exists():
            log.warning("resume=%s: the run stopped before its first epoch ended (no %s); starting it again in %s "
                        "with its config.yaml", resume, path, folder)
            return None
        if not path.exists():
            raise FinetuneError(
                f"resume={resume}: the run has no {path.relative_to(folder)} to continue from (the last_checkpoint "
                f"callback was removed, or the run was not started by finetune). Train it again with "
                f"run_dir=ANOTHER_FOLDER, or resume from one of its checkpoints: resume={folder}/checkpoints/FILE.ckpt."
            )
    return str(path)


class ResumePoint:
    """What a resume needs from its checkpoint, read once before any heavy work: where the run stood,
    and what the model must look like to load it."""

    def __init__(self, path: Path, data: dict[str, Any]):
        from finetune.models.module import CHECKPOINT_KEY

        self.path = path
        self.epoch, self.global_step = int(data.get("epoch", 0)), int(data.get("global_step", 0))
        self.classes = list(data[CHECKPOINT_KEY].get("classes") or [])
        self.shapes = {k: tuple(v.shape) for k, v in data["state_dict"].items() if hasattr(v, "shape")}
        self.policy_file = path.parent.parent / "policy.json"  # RUN/checkpoints/x.ckpt -> RUN/policy.json

    @classmethod
    def read(cls, path: str) -> ResumePoint:
        from finetune.models.checkpoint import read_checkpoint

        # a clear error for a missing, foreign or unsafe file
        return cls(Path(path), read_checkpoint(path, key="resume"))

    def policy_record(self) -> dict[str, Any] | None:
        """The run's policy.json next to the checkpoint's folder, or None (a checkpoint outside a run folder)."""
        try:
            record = json.loads(self.policy_file.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and isinstance(record.get("plan"), dict) else None

    def check_fits(self, classes: list[str], module: torch.nn.Module) -> None:
        """Refuse, before any run file is written, a checkpoint that cannot continue this data and model."""
        if self.classes and self.classes != list(classes):
            gone, new = sorted(set(self.classes) - set(classes)), sorted(set(classes) - set(self.classes))
            raise FinetuneError(
                f"resume={self.path} was trained on {len(self.classes)} classes, but the data now has {len(classes)}"
                + (f"; missing: {', '.join(gone[:8])}" if gone else "")
                + (f"; new: {', '.join(new[:8])}" if new else "")
                + ("" if gone or new else " in another order") + ". The data changed since the run was trained: "
                "restore it, or train a new run (another run_dir) on the data as it is."
            )
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        wrong = sorted(set(expected) ^ set(self.shapes)) + sorted(
            k for k in set(expected) & set(self.shapes) if expected[k] != self.shapes[k])
        if wrong:
            raise FinetuneError(
                f"resume={self.path} does not fit the model this config builds ({len(wrong)} tensors differ, e.g. "
                f"{', '.join(wrong[:3])}): it was trained with another model, head or policy. Resume it with its "
                f"own run folder's config (resume=RUN, without model or policy overrides), or train a new run."
            )
