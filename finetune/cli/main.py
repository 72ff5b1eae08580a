"""Thin Hydra entry points; the work is in finetune.train / finetune.inference.

A :class:`FinetuneError` becomes one paragraph on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException

from finetune.errors import FinetuneError, close_matches

CONFIG_PATH = "../conf"

# `hydra.run.dir: ${finetune_or:${run_dir},outputs/...}`: with run_dir set, Hydra's own files
# (.hydra/, main.log, DDP ranks' logs) go into that run folder too, not into a second one.
if not OmegaConf.has_resolver("finetune_or"):
    OmegaConf.register_new_resolver("finetune_or", lambda value, default: value if value not in (None, "") else default)
# train.yaml's `hydra.run.dir: ${finetune_hydra_dir:${run_dir},${resume},outputs/...}`: like finetune_or, and
# `resume=RUN` (or RUN/checkpoints/x.ckpt) continues in RUN, so Hydra's files and main.log go there too.
if not OmegaConf.has_resolver("finetune_hydra_dir"):
    from finetune.run_files import hydra_run_dir

    OmegaConf.register_new_resolver("finetune_hydra_dir", hydra_run_dir)


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
    # Lightning's "💡 Tip: ... try installing litlogger / litmodels" adverts, logged on every Trainer.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        if _no_adverts not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_no_adverts)


def _no_adverts(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip:")


def _lossless_text_output() -> None:
    """(Issue 14, non-UTF-8 names) A file name that is not valid UTF-8 (Python's surrogate escapes), printed or
    logged to a strict UTF-8 console or main.log, would fail inside logging ("--- Logging error ---" and a
    traceback): such streams write it as a backslash escape instead. (Under C.UTF-8 Python writes the raw bytes.)"""
    streams = [sys.stdout, sys.stderr, *(getattr(h, "stream", None) for h in logging.getLogger().handlers)]
    for stream in streams:
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", None) == "strict":
            stream.reconfigure(errors="backslashreplace")


def _reader_gone() -> None:
    """(Issue 14) stdout (or stderr) is a pipe whose reader has closed it (`finetune --help | head -1`): exit
    quietly with the status a process killed by SIGPIPE gets (141), as `cat`/`yes` do, without Python's
    BrokenPipeError traceback. Both streams are pointed at /dev/null first, so the interpreter's final flush
    of what is still buffered cannot fail again ("Exception ignored ... BrokenPipeError")."""
    _to_devnull(sys.stdout)
    _to_devnull(sys.stderr)
    sys.exit(128 + 13)


def _to_devnull(stream: Any) -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no file descriptor (a captured stream): nothing to flush
        pass


def _log_to_closed_pipe(handler: logging.StreamHandler, record: logging.LogRecord,
                        original: Callable[[logging.StreamHandler, logging.LogRecord], None]) -> None:
    """A log line written to a pipe whose reader has gone (`finetune ... | head -3`, `--info | head`) would print
    logging's '--- Logging error ---' traceback for every later line: that stream is pointed at /dev/null instead
    and the command goes on (a training run is not lost because its console was closed; RUN/main.log has every
    line)."""
    if isinstance(sys.exc_info()[1], BrokenPipeError):
        _to_devnull(handler.stream)
        return
    original(handler, record)


def _exit_with(message: str, code: int = 2) -> None:
    """The user-error paragraph on stderr, then exit ``code`` (no traceback)."""
    text = textwrap.fill(message, width=100, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
    try:
        print("\nerror: " + text, file=sys.stderr)
    except BrokenPipeError:  # `finetune ... 2>&1 | head -1`: the status still says what happened
        _to_devnull(sys.stderr)
    sys.exit(code)


def _interrupted() -> None:
    print("\ninterrupted (Ctrl-C)", file=sys.stderr)
    sys.exit(130)  # 128 + SIGINT, as shells report it


def report_errors(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    def wrapped(cfg: DictConfig) -> Any:
        _quiet_library_logging()
        _lossless_text_output()
        try:
            return fn(cfg)
        except BrokenPipeError:
            _reader_gone()
        except FinetuneError as e:
            _exit_with(str(e), e.exit_code)
        except InterpolationResolutionError as e:  # a ${...} the user wrote (ours all resolve)
            _exit_with(f"{e.full_key or 'a value'}: its ${{...}} interpolation could not be resolved: "
                       f"{str(e).splitlines()[0]} Fix the reference (`--cfg job` prints the config).")
        except KeyboardInterrupt:
            _interrupted()
        finally:
            _remove_hydra_fallback()

    return wrapped


def _remove_hydra_fallback() -> None:
    """The temp folder hydra_run_dir gave Hydra in place of a run_dir it could not write (a file in the way, a
    read-only folder): it holds only Hydra's startup files, and one would be left per failed command."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    from finetune.run_files import is_hydra_fallback

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
        return (f"'{error.override}' is not an override (KEY=VALUE). If your shell expanded a wildcard (input=*.jpg) or "
                f"split a path with spaces, quote it: input='photos/*.jpg' or data.root='my photos'; several "
                f"files are a list: input=[a.jpg,b.jpg].")
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
        return (f"{full_key} is not a key of the config ({where}).{close_matches(leaf, keys, prefix=parent + '.' if parent else '')} "
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
                _exit_with(_hydra_error_message(e))
            except KeyboardInterrupt:
                _interrupted()
            except BrokenPipeError:  # --cfg job, --info, a sweep's summary
                _reader_gone()

        hydra_utils.run_and_report = lambda func: original(lambda: guarded(func))
        handle_error = logging.StreamHandler.handleError
        logging.StreamHandler.handleError = functools.partialmethod(  # type: ignore[method-assign]
            _log_to_closed_pipe, original=handle_error)
        try:
            return main(*args, **kwargs)
        except BrokenPipeError:  # --help, --hydra-help: printed before run_and_report
            _reader_gone()
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
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from finetune.train import train

    try:
        metrics = train(cfg)
    except FinetuneError as e:
        if not _in_multirun():
            raise
        # One bad job of a sweep (`-m optimizer.lr=1e-3,bad`) must not stop the others: it is logged, marked
        # failed in sweep_summary.csv, and scored NaN (sweepers such as Optuna record a failed trial).
        logging.getLogger("finetune").error("This sweep job failed; the sweep goes on: %s", e)
        return float("nan")
    if rank_zero_only.rank == 0:  # under DDP every rank runs this; the run folder is one
        print(f"Run folder: {metrics['run_dir']}")
    value = metrics.get(cfg.monitor)
    return float(value) if value is not None else None  # what Hydra sweepers optimise


@_config_errors_exit_2
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
@report_errors
def eval_main(cfg: DictConfig) -> None:
    from finetune.inference import evaluate

    evaluate(cfg)


@_config_errors_exit_2
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
@report_errors
def predict_main(cfg: DictConfig) -> None:
    from finetune.inference import predict

    predict(cfg)


@_config_errors_exit_2
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@report_errors
def advise_main(cfg: DictConfig) -> None:
    from finetune.advise import advise

    advise(cfg)


@_config_errors_exit_2
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="preview")
@report_errors
def preview_main(cfg: DictConfig) -> None:
    from finetune.preview import preview

    preview(cfg)


@_config_errors_exit_2
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
@report_errors
def export_main(cfg: DictConfig) -> None:
    from finetune.export import run_export

    run_export(cfg)
