"""Defaults live in one place, the YAML in finetune/conf (#17): code reads only keys the composed config defines,
and reads them without a fallback value, so a default written in code cannot drift from the YAML again.

An AST scan of finetune/**/*.py collects every key path read from a name that holds a config node (``cfg.data.root``,
``policy_cfg["head_l2"]``, ``cfg.trainer.get("precision")``) and resolves it against the configs the commands
compose, with every option of every config group composed in turn (a key only some options define counts)."""

from __future__ import annotations

import ast
import functools
import importlib.resources
from pathlib import Path

import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"
CONF = importlib.resources.files("finetune.conf")

# Names that hold a config node in finetune/, and the node they hold ("" = the command's whole config).
ROOTS = {"cfg": "", "policy_cfg": "policy", "m_cfg": "policy.measure", "data_cfg": "data", "augment": "augment",
         "sched_cfg": "scheduler", "ensemble": "ensemble"}
FILE_ROOTS = {"sweep.py": {"config": ""}}  # Hydra's Callback.on_multirun_end(config): the train config
# The commands whose config a file reads (any other file: train's).
FILE_COMMANDS = {"inference.py": ("eval", "predict"), "export.py": ("export",), "preview.py": ("preview", "train")}
# Nodes whose keys the user chooses (timm's kwargs; callbacks and loggers are {name: {_target_: ...}} entries),
# and Hydra's own config (hydra.sweep.dir), which Hydra checks.
FREE_FORM = ("model.kwargs", "callbacks", "logger", "hydra")
# DictConfig / dict methods: a call of one is not a key read.
METHODS = {"get", "items", "keys", "values", "pop", "copy", "setdefault", "update", "_get_node", "_is_none"}

# Fallbacks that remain, as (file name, key path read with a default value); each needs a comment saying why.
# None is left (#17); the set only shrinks.
REMAINING_FALLBACKS: set[tuple[str, str]] = set()


def _flatten(node, prefix: str = "") -> set[str]:
    paths = {prefix[:-1]} if prefix else set()
    if isinstance(node, dict):
        for key, value in node.items():
            paths |= _flatten(value, f"{prefix}{key}.")
    return paths


@functools.cache
def known_paths(command: str) -> frozenset[str]:
    """Every key path of ``command``'s config, composed once per option of each of its config groups."""
    defaults = yaml.safe_load((CONF / f"{command}.yaml").read_text()).get("defaults", [])
    groups = [next(iter(d)) for d in defaults if isinstance(d, dict) and "/" not in next(iter(d))
              and not next(iter(d)).startswith("override") and d[next(iter(d))] is not None]
    options = [sorted(f"{g}={f.name[:-5]}" for f in (CONF / g).iterdir() if f.name.endswith(".yaml")) for g in groups]
    # The k-th option of every group in one composition: each option is composed once, in few compositions.
    overrides = [[o[k] for o in options if k < len(o)] for k in range(max(map(len, options), default=0))] or [[]]
    paths: set[str] = set()
    with initialize_config_module(config_module="finetune.conf", version_base="1.3"):
        for override in overrides:
            cfg = compose(config_name=command, overrides=override)
            paths |= _flatten(OmegaConf.to_container(cfg, resolve=False))
    return frozenset(paths)


def _key(node: ast.AST) -> str | None:
    """The key a subscript or ``.get("key", ...)`` call reads, when it is a literal."""
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
        return node.slice.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def _path(node: ast.AST, roots: dict[str, str]) -> str | None:
    """``cfg.data.get("root")`` -> "data.root"; None when the chain is not rooted at a config name."""
    parts: list[str] = []
    while True:
        if isinstance(node, ast.Name):
            if node.id not in roots:
                return None
            return ".".join(p for p in (roots[node.id], *reversed(parts)) if p)
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif _key(node) is not None:
            parts.append(_key(node))
            node = node.func.value if isinstance(node, ast.Call) else node.value
        else:
            return None


def scan() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """({file: key paths read}, [(file, line, key) of each ``.get(key, <not None>)`` on a config name])."""
    reads: dict[str, set[str]] = {}
    fallbacks = []
    for file in sorted(PACKAGE.rglob("*.py")):
        name = file.relative_to(PACKAGE).as_posix()
        roots = ROOTS | FILE_ROOTS.get(name, {})
        tree = ast.parse(file.read_text(encoding="utf-8"))
        calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and (id(node) in calls or node.attr in METHODS):
                continue  # a method, not a key; cfg.x.get("k") is read through its Call
            if not isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
                continue
            path = _path(node, roots)
            if not path:
                continue
            reads.setdefault(name, set()).add(path)
            default = node.args[1] if isinstance(node, ast.Call) and len(node.args) > 1 else None
            if default is not None and not (isinstance(default, ast.Constant) and default.value is None):
                fallbacks.append((name, node.lineno, path))
    return reads, fallbacks


def _known(path: str, known: frozenset[str]) -> bool:
    return path in known or any(path == free or path.startswith(f"{free}.") for free in FREE_FORM)


def test_code_reads_only_keys_the_config_defines():
    reads, _ = scan()
    assert {"policy.measure.folds", "policy.head_solver"} <= reads["policy/choose.py"] | reads["prepare.py"]
    unknown = []
    for name, paths in sorted(reads.items()):
        commands = FILE_COMMANDS.get(Path(name).name, ("train",))
        known = frozenset().union(*(known_paths(c) for c in commands))
        unknown += [f"{name}: {p}" for p in sorted(paths) if not _known(p, known)]
    assert not unknown, "Keys read in code that no composed config defines (add them to finetune/conf):\n" + \
        "\n".join(unknown)


def test_no_default_is_written_again_in_code():
    _, fallbacks = scan()
    found = {(Path(name).name, path): f"{name}:{line} {path}" for name, line, path in fallbacks}
    new = sorted(where for key, where in found.items() if key not in REMAINING_FALLBACKS)
    assert not new, ("A config key read with a fallback value: the YAML is the one home of a default, so read the key "
                     "without one (cfg.key / cfg['key']):\n" + "\n".join(new))
