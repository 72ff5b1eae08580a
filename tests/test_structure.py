"""The structure stays easy to see and hard to break: one definition of "a weight", no import loop."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.optim import param_groups_weight_decay

from finetune.policy.freeze import param_groups
from finetune.policy.plan import Plan
from finetune.policy.stages import build_stage_map
from finetune.recipe.regularization import Regularization, WeightPenalty, is_weight, no_weight_decay_names

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"


@pytest.fixture
def vit():
    """The smallest ViT, random weights (no download): it has ``no_weight_decay()`` names."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3)


def test_vit_position_embedding_gets_no_penalty_as_it_gets_no_weight_decay(vit):
    assert {"pos_embed", "cls_token"} <= no_weight_decay_names(vit)
    penalty = WeightPenalty(vit, Regularization(l2=0.1, l2_sp=0.1), head_names={"head.weight", "head.bias"})
    assert "pos_embed" not in penalty.anchors and "cls_token" not in penalty.anchors
    assert "patch_embed.proj.weight" in penalty.anchors
    with torch.no_grad():
        for p in vit.parameters():  # away from the L2-SP anchors, so both terms are non-zero
            p.add_(0.01)
        before = penalty(vit)
        vit.pos_embed.add_(1.0)
        vit.cls_token.add_(1.0)
        assert torch.equal(penalty(vit), before)
        vit.patch_embed.proj.weight.add_(1.0)
        assert penalty(vit) > before


def test_penalty_weight_decay_and_stage_groups_agree_on_which_parameters_are_weights(vit):
    names = {id(p): n for n, p in vit.named_parameters()}
    exempt = no_weight_decay_names(vit)
    weights = {n for n, p in vit.named_parameters() if is_weight(n, p, exempt)}
    assert "pos_embed" not in weights and "blocks.0.attn.qkv.weight" in weights

    def decayed(groups):
        return {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}

    # timm's own helper, given the model's no_weight_decay() as timm's optimizer factory gives it
    assert decayed(param_groups_weight_decay(vit, weight_decay=0.05, no_weight_decay_list=exempt)) == weights
    stage_map = build_stage_map(vit)
    plan = Plan("full", list(stage_map.groups), {g: 0 for g in stage_map.groups}, {})
    assert decayed(param_groups(vit, stage_map, plan, lr=1e-3, weight_decay=0.05)) == weights


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name, with its file."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(path: Path, modules: set[str]) -> set[str]:
    """The finetune modules a file imports, at the top or inside functions (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(child) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for stmt in node.body for child in ast.walk(stmt)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found & modules


def test_no_import_loop_between_finetune_modules():
    """Lazy (in-function) imports count too: a loop hidden in a function is still a loop to read."""
    modules = _modules()
    graph = {name: sorted(_imported(path, set(modules)) - {name}) for name, path in modules.items()}
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in graph[name]:
            if state.get(dep) == "open":
                loop = [*path[path.index(dep):], dep]
                pytest.fail("import loop: " + " -> ".join(loop))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported before any other finetune module (sys.modules cleared of finetune between them):
    an import that needs a partly initialised module fails here, whichever module a command starts from."""
    script = (
        "import importlib, sys\n"
        f"for name in {sorted(_modules())!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'finetune' or m.startswith('finetune.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
