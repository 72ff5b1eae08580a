"""Which keys each command's config may have: the union of its YAML files' keys, read without importing
anything heavy. A key nothing reads (``+data.foo=1``: Hydra's own hint for a misspelled key is the '+') is
refused with a did-you-mean instead of being accepted and silently changing nothing.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

from omegaconf import DictConfig

from finetune.errors import FinetuneError, close_matches

# Where any key is valid: timm's keyword arguments, and groups whose entries are checked elsewhere (Trainer
# arguments against its signature, optimizer/scheduler keys against their _target_, callbacks and loggers are
# {name: {_target_: ...}} entries of the user's choosing).
FREE_FORM_KEYS = ("model.kwargs", "trainer", "optimizer", "scheduler", "callbacks", "logger", "hparams_search")
# The config groups each command composes (their options' YAML files give the keys finetune reads).
COMMAND_GROUPS = {"train": ("data", "policy", "model", "augment", "optimizer", "scheduler", "regularization",
                            "trainer", "logger", "callbacks", "recipe", "hparams_search"),
                  "preview": ("data", "model", "augment")}


def _conf_yaml(relative: str) -> dict[str, Any]:
    import importlib.resources

    import yaml

    text = (importlib.resources.files("finetune.conf") / relative).read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    data.pop("defaults", None)
    data.pop("hydra", None)
    return data


def _union(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _union(into[key], value)
        elif isinstance(value, dict) or key not in into:
            into[key] = dict(value) if isinstance(value, dict) else value
    return into


@functools.cache
def known_keys(command: str) -> dict[str, Any]:
    """The key tree a command's config may have: its own YAML's keys, and for each group the union of the keys
    of every option of that group (``data``: data/*.yaml; ``policy``: policy/*.yaml, with base.yaml's)."""
    import importlib.resources

    tree = _conf_yaml(f"{command}.yaml")
    for group in COMMAND_GROUPS.get(command, ()):
        merged: dict[str, Any] = {}
        for option in sorted((importlib.resources.files("finetune.conf") / group).iterdir(), key=lambda f: f.name):
            if option.name.endswith(".yaml"):
                _union(merged, _conf_yaml(f"{group}/{option.name}"))
        tree[group] = merged
    return tree


def check_known_keys(cfg: DictConfig, command: str = "train") -> None:
    """Refuse a key that nothing reads: ``+data.foo=1`` (or ``+policy.lr_decy=0.5``: Hydra's own advice for a
    misspelled key is the '+', which adds it) would otherwise be accepted and silently change nothing."""
    _check_keys(cfg, known_keys(command), "", command)


def _check_keys(node: DictConfig, known: dict[str, Any], prefix: str, command: str) -> None:
    for key in node:
        path = f"{prefix}{key}"
        if path in FREE_FORM_KEYS:
            continue
        if key not in known:
            where = f"under {prefix[:-1]}" if prefix else "at the top level"
            names = sorted(str(k) for k in known)
            closest = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            fix = (f"Set an existing key without '+', e.g. {prefix}{closest[0]}=..., or remove {path}." if closest
                   else f"Remove {path} (a '+' adds a key; an existing one is set without it).")
            raise FinetuneError(
                f"{path} is not a key that finetune{'-' + command if command != 'train' else ''} reads ({where}), so "
                f"setting it would change nothing.{close_matches(str(key), names, prefix=prefix)} The keys "
                f"{where} are: {', '.join(names)}. {fix}"
            )
        child = node._get_node(key)
        if isinstance(known[key], dict) and isinstance(child, DictConfig) and not child._is_none():
            _check_keys(child, known[key], f"{path}.", command)
