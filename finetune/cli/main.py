"""Thin Hydra entry points; the work is in finetune.train / finetune.inference.

A :class:`FinetuneError` becomes one paragraph on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from finetune.errors import FinetuneError

CONFIG_PATH = "../conf"


def report_errors(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    def wrapped(cfg: DictConfig) -> Any:
        try:
            return fn(cfg)
        except FinetuneError as e:
            print("\nerror: " + textwrap.fill(str(e), width=100, subsequent_indent="  "), file=sys.stderr)
            sys.exit(e.exit_code)

    return wrapped


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@report_errors
def train_main(cfg: DictConfig) -> float | None:
    from finetune.train import train

    metrics = train(cfg)
    print(f"Run folder: {metrics['run_dir']}")
    value = metrics.get(cfg.monitor)
    return float(value) if value is not None else None  # what Hydra sweepers optimise


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
@report_errors
def eval_main(cfg: DictConfig) -> None:
    from finetune.inference import evaluate

    evaluate(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
@report_errors
def predict_main(cfg: DictConfig) -> None:
    from finetune.inference import predict

    predict(cfg)
