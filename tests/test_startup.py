"""Fail fast, start fast (#17): what can be checked from the config and the file system is checked before
torch, Lightning, timm, albumentations or OpenCV is imported. Pinned by what a fresh interpreter has imported,
not by timing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HEAVY = ("torch", "lightning", "timm", "albumentations", "cv2")


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter; it ends by printing the heavy modules it imported."""
    tail = f"\nimport sys\nprint('HEAVY:', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code) + tail], cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)


def _heavy(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def test_cli_module_imports_no_heavy_library(tmp_path):
    assert _heavy(_run("import finetune.cli.main", tmp_path)) == "HEAVY: []"


BAD = [
    ("trainer.max_epochs=ten", "trainer.max_epochs=ten"),
    ("+data.foo=1", "data.foo is not a key that finetune reads"),
    ("monitor=val/accuracy", "monitor=val/accuracy is not a metric"),
    ("lr_scaling=cubic", "lr_scaling=cubic must be none, linear or sqrt"),
    ("optimizer=lbfgs policy=lp_ft", "optimizer=lbfgs does not fit policy=lp_ft"),
    ("data.root=/no/such/folder", "data.root=/no/such/folder does not exist"),
    ("trainer.max_epochs=1", "data.root is not set"),
]


@pytest.mark.parametrize(("override", "expected"), BAD, ids=[b[0] for b in BAD])
def test_light_checks_refuse_bad_values_without_heavy_imports(tmp_path, override, expected):
    """The checks train and advise run first, on a composed config: each refusal comes before any heavy import."""
    result = _run(f"""
        from hydra import compose, initialize_config_module
        from omegaconf import OmegaConf

        from finetune.config_checks import check_data_root, check_train_config
        from finetune.errors import FinetuneError

        with initialize_config_module(config_module="finetune.conf", version_base="1.3"):
            cfg = compose(config_name="train", overrides={override.split()!r})
        try:
            check_train_config(cfg)
            check_data_root(OmegaConf.select(cfg, "data.root", throw_on_missing=False))
        except FinetuneError as e:
            print("REFUSED:", " ".join(str(e).split()))
        """, tmp_path)
    heavy = _heavy(result)
    assert "REFUSED: " in result.stdout and expected in result.stdout, result.stdout
    assert heavy == "HEAVY: []"


def test_cli_missing_data_root_answers_before_heavy_imports(tmp_path):
    """The real entry point, end to end in one interpreter: exit 2 with the message, and torch never imported."""
    result = _run(f"""
        import sys

        from finetune.cli.main import train_main

        sys.argv = ["finetune", "trainer.max_epochs=1", "run_dir={tmp_path / 'run'}"]
        try:
            train_main()
        except SystemExit as e:
            print("EXIT:", e.code)
        """, tmp_path)
    heavy = _heavy(result)
    assert "EXIT: 2" in result.stdout and "data.root is not set" in result.stderr, (result.stdout, result.stderr)
    assert heavy == "HEAVY: []"
