"""Thin Hydra entry points; the work is in finetune.train / finetune.inference.

A :class:`FinetuneError` becomes one paragraph on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import logging
import sys
import textwrap
import warnings
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from finetune.errors import FinetuneError

CONFIG_PATH = "../conf"

# `hydra.run.dir: ${finetune_or:${run_dir},outputs/...}`: with run_dir set, Hydra's own files
# (.hydra/, main.log, DDP ranks' logs) go into that run folder too, not into a second one.
if not OmegaConf.has_resolver("finetune_or"):
    OmegaConf.register_new_resolver("finetune_or", lambda value, default: value if value not in (None, "") else default)


def _quiet_library_logging() -> None:
    """Hydra already logs to the console and RUN/*.log: drop Lightning's second console handler
    (every line printed twice otherwise) and a deprecation warning Lightning raises on new torch."""
    import lightning.pytorch  # noqa: F401  (installs its handler on import)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*litlogger.*")
    # Frozen parts are put in eval mode on purpose (frozen BatchNorm statistics); the policy block says so.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def report_errors(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    def wrapped(cfg: DictConfig) -> Any:
        _quiet_library_logging()
        try:
            return fn(cfg)
        except FinetuneError as e:
            print("\nerror: " + textwrap.fill(str(e), width=100, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False), file=sys.stderr)
            sys.exit(e.exit_code)

    return wrapped


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@report_errors
def train_main(cfg: DictConfig) -> float | None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from finetune.train import train

    metrics = train(cfg)
    if rank_zero_only.rank == 0:  # under DDP every rank runs this; the run folder is one
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


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@report_errors
def advise_main(cfg: DictConfig) -> None:
    from finetune.advise import advise

    advise(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="preview")
@report_errors
def preview_main(cfg: DictConfig) -> None:
    from finetune.preview import preview

    preview(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
@report_errors
def export_main(cfg: DictConfig) -> None:
    from finetune.export import run_export

    run_export(cfg)
