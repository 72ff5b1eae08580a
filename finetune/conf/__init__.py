"""Hydra config tree (a package so Hydra finds it when finetune is installed).

The YAML files here are the one home of every default. ``preset`` reads one group option, for the library
functions that accept a partial mapping (tests, notebooks) and complete it from the YAML, never from a
default written again in code."""

from __future__ import annotations

import copy
import functools
from typing import Any


def preset(group: str, option: str) -> dict[str, Any]:
    """The keys of ``conf/<group>/<option>.yaml`` (its defaults list left out), as a fresh dict."""
    return copy.deepcopy(_load(group, option))


@functools.cache
def _load(group: str, option: str) -> dict[str, Any]:
    import importlib.resources

    import yaml

    text = (importlib.resources.files(__name__) / group / f"{option}.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    data.pop("defaults", None)
    return data
