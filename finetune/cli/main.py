"""Thin Hydra entry points; the work is in finetune.train / finetune.inference.

A :class:`FinetuneError` becomes one paragraph on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException

from finetune.cli.streams import exit_with, interrupted, log_to_closed_pipe, lossless_text_output, reader_gone
from finetune.config_checks import check_data_root, check_run_dir_outside_data, check_train_config
from finetune.config_keys import check_known_keys
from finetune.errors import FinetuneError, close_matches
from finetune.task import task_monitor

CONFIG_PATH = "../conf"

# `hydra.run.dir: ${finetune_or:${run_dir},outputs/...}`: with run_dir set, Hydra's own files
# (.hydra/, main.log, DDP ranks' logs) go into that run folder too, not into a second one.
if not OmegaConf.has_resolver("finetune_or"):
    OmegaConf.register_new_resolver("finetune_or", lambda value, default: value if value not in (None, "") else default)
# train.yaml's `hydra.run.dir: ${finetune_hydra_dir:${run_dir},${resume},outputs/...}`: like finetune_or, and
# `resume=RUN` (or RUN/checkpoints/x.ckpt) continues in RUN, so Hydra's files and main.log go there too.
if not OmegaConf.has_resolver("finetune_hydra_dir"):
    from finetune.run_folder import hydra_run_dir

    OmegaConf.register_new_resolver("finetune_hydra_dir", hydra_run_dir)


def _quiet_library_logging() -> None:
    """Lightning's warnings and adverts we do not want, filtered before Lightning is imported (the filters
    sit on loggers by name and on the warnings module, so nothing needs importing yet)."""
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*litlogger.*")
    # Frozen parts are put in eval mode on purpose (frozen BatchNorm statistics); the policy block says so.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # Lightning's "💡 Tip: ... try installing litlogger / litmodels" adverts, logged on every Trainer.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        if _no_adverts not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_no_adverts)


def _no_adverts(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip:")


def _load_lightning() -> None:
    """Import Lightning, once the checks that need no library have passed, and drop the console handlers its
    packages install on import: Hydra already logs to the console and RUN/*.log (every line printed twice
    otherwise). Every command's work imports Lightning anyway, so this costs nothing extra."""
    import lightning.pytorch  # noqa: F401  (installs its handlers on import)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()


def report_errors(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    def wrapped(cfg: DictConfig) -> Any:
        _quiet_library_logging()
        lossless_text_output()
        try:
            return fn(cfg)
        except BrokenPipeError:
            reader_gone()
        except FinetuneError as e:
            exit_with(str(e), e.exit_code)
        except InterpolationResolutionError as e:  # a ${...} the user wrote (ours all resolve)
            exit_with(f"{e.full_key or 'a value'}: its ${{...}} interpolation could not be resolved: "
                      f"{str(e).splitlines()[0]} Fix the reference (`--cfg job` prints the config).")
        except KeyboardInterrupt:
            interrupted()
        finally:
            _remove_hydra_fallback()

    return wrapped


def _remove_hydra_fallback() -> None:
    """The temp folder hydra_run_dir gave Hydra in place of a run_dir it could not write (a file in the way, a
    read-only folder): it holds only Hydra's startup files, and one would be left per failed command."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    from finetune.run_folder import is_hydra_fallback

    if HydraConfig.initialized():
        path = Path(HydraConfig.get().runtime.output_dir)
        if is_hydra_fallback(path):
            shutil.rmtree(path, ignore_errors=True)


_TASK_CODE = report_errors(print).__code__  # the frame every task runs in (see _raised_in_task)


def _raised_in_task(error: BaseException) -> bool:
    """Whether ``error`` came out of a task (bugs in our code keep Hydra's report), not out of composing the config."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is _TASK_CODE:
            return True
        tb = tb.tb_next
    return False


def _hydra_error_message(error: Exception) -> str:
    """Hydra's composition errors as our paragraph: the key, close matches among the config's keys or group
    options, and the fix (Hydra's own hint for a mistyped key is a '+', which adds a key nothing reads)."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, name = str(error.missing_cfg_file).rpartition("/")
        options = list(error.options or [])
        if group and options:
            return (f"{group}={name} is not one of the {group} configs: {', '.join(options)}."
                    f"{close_matches(name, options)}")
        return f"{' '.join(str(error).split('Config search path')[0].split())} Check the config name."
    if isinstance(error, OverrideParseException) and "=" not in str(error.override) and not str(
            error.override).startswith("~"):
        return (f"'{error.override}' is not an override (KEY=VALUE). If your shell expanded a wildcard "
                f"(input=*.jpg) or split a path with spaces, quote it: input='photos/*.jpg' or data.root='my photos'; "
                f"several files are a list: input=[a.jpg,b.jpg].")
    if isinstance(error, OverrideParseException) and "~" in str(error.override).partition("=")[2]:
        return (f"The override '{error.override}' could not be parsed: Hydra does not accept an unquoted ~ in a value. "
                f"Write it quoted, e.g. 'data.root=\"~/photos\"' (finetune expands ~), or let the shell expand it: "
                f"data.root=$HOME/photos.")
    if isinstance(error, OverrideParseException):
        return (f"The override '{error.override}' could not be parsed: {error.message.splitlines()[0]}. Quote a value "
                f"with spaces or special characters, e.g. 'data.root=\"my photos\"' (inside single quotes).")
    cause = error.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        full_key = str(cause.full_key)
        parent, _, leaf = full_key.rpartition(".")
        node = cause.parent_node
        keys = [str(k) for k in node] if isinstance(node, DictConfig) else []
        where = f"under {parent}" if parent else "at the top level"
        hint = close_matches(leaf, keys, prefix=parent + "." if parent else "")
        return (f"{full_key} is not a key of the config ({where}).{hint} "
                f"Check the spelling: `--cfg job` prints every key. (Hydra's hint '+{full_key}=...' would add a key "
                f"that nothing reads.)")
    return f"The command line could not be applied to the config: {' '.join(str(error).split())}"


def _config_errors_exit_2(main: Callable[..., Any]) -> Callable[..., Any]:
    """Hydra's own errors (a mistyped key or group option, a malformed override) get our paragraph and exit 2.

    ``@hydra.main`` reports them itself (message, exit 1) in ``hydra._internal.utils.run_and_report``, before our
    task runs; that is the one hook there is, so it is wrapped for the duration of the command."""

    @functools.wraps(main)
    def entry(*args: Any, **kwargs: Any) -> Any:
        from hydra._internal import utils as hydra_utils

        original = hydra_utils.run_and_report

        def guarded(func: Callable[[], Any]) -> Any:
            try:
                return func()
            except (CompactHydraException, OmegaConfBaseException) as e:
                if _raised_in_task(e):
                    raise
                exit_with(_hydra_error_message(e))
            except KeyboardInterrupt:
                interrupted()
            except BrokenPipeError:  # --cfg job, --info, a sweep's summary
                reader_gone()

        hydra_utils.run_and_report = lambda func: original(lambda: guarded(func))
        handle_error = logging.StreamHandler.handleError
        logging.StreamHandler.handleError = functools.partialmethod(  # type: ignore[method-assign]
            log_to_closed_pipe, original=handle_error)
        try:
            return main(*args, **kwargs)
        except BrokenPipeError:  # --help, --hydra-help: printed before run_and_report
            reader_gone()
        finally:
            hydra_utils.run_and_report = original
            logging.StreamHandler.handleError = handle_error  # type: ignore[method-assign]

    return entry


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@_config_errors_exit_2
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@report_errors
def train_main(cfg: DictConfig) -> float | None:
    try:
        metrics = _train(cfg)
    except FinetuneError as e:
        if not _in_multirun():
            raise
        # One bad job of a sweep (`-m optimizer.lr=1e-3,bad`) must not stop the others: it is logged, marked
        # failed in sweep_summary.csv, and scored NaN (sweepers such as Optuna record a failed trial).
        logging.getLogger("finetune").error("This sweep job failed; the sweep goes on: %s", e)
        return float("nan")
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:  # under DDP every rank runs this; the run folder is one
        print(f"Run folder: {metrics['run_dir']}")
    value = metrics.get(task_monitor(cfg))  # val/map for task=multilabel's default
    return float(value) if value is not None else None  # what Hydra sweepers optimise


def _train(cfg: DictConfig) -> dict[str, Any]:
    """The checks that need no library first (a typo or a missing data.root answers before torch is imported),
    then the run. A resumed run is checked with its own config.yaml, which ``train`` reads."""
    if not cfg.resume:
        _check_train_start(cfg)
    _load_lightning()
    from finetune.train import train

    return train(cfg)


def _check_train_start(cfg: DictConfig) -> None:
    check_train_config(cfg)
    root = OmegaConf.select(cfg, "data.root", throw_on_missing=False)
    check_data_root(root)
    check_run_dir_outside_data(cfg.run_dir, root)


@_config_errors_exit_2
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
@report_errors
def eval_main(cfg: DictConfig) -> None:
    check_known_keys(cfg, "eval")
    _load_lightning()
    from finetune.inference import evaluate

    evaluate(cfg)


@_config_errors_exit_2
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
@report_errors
def predict_main(cfg: DictConfig) -> None:
    check_known_keys(cfg, "predict")
    _load_lightning()
    from finetune.inference import predict

    predict(cfg)


@_config_errors_exit_2
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@report_errors
def advise_main(cfg: DictConfig) -> None:
    _check_train_start(cfg)
    _load_lightning()
    from finetune.advice import advise

    advise(cfg)


@_config_errors_exit_2
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="preview")
@report_errors
def preview_main(cfg: DictConfig) -> None:
    check_known_keys(cfg, "preview")
    _load_lightning()
    from finetune.preview import preview

    preview(cfg)


@_config_errors_exit_2
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
@report_errors
def export_main(cfg: DictConfig) -> None:
    check_known_keys(cfg, "export")
    _load_lightning()
    from finetune.export import run_export

    run_export(cfg)
