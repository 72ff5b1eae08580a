"""What the CLI writes, and how it leaves: one error paragraph and an exit status, and streams that cannot
fail on a name that is not UTF-8 or on a pipe whose reader has gone (`finetune ... | head`)."""

from __future__ import annotations

import logging
import os
import sys
import textwrap
from collections.abc import Callable
from typing import Any


def lossless_text_output() -> None:
    """(Issue 14, non-UTF-8 names) A file name that is not valid UTF-8 (Python's surrogate escapes), printed or
    logged to a strict UTF-8 console or main.log, would fail inside logging ("--- Logging error ---" and a
    traceback): such streams write it as a backslash escape instead. (Under C.UTF-8 Python writes the raw bytes.)"""
    streams = [sys.stdout, sys.stderr, *(getattr(h, "stream", None) for h in logging.getLogger().handlers)]
    for stream in streams:
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", None) == "strict":
            stream.reconfigure(errors="backslashreplace")


def reader_gone() -> None:
    """(Issue 14) stdout (or stderr) is a pipe whose reader has closed it (`finetune --help | head -1`): exit
    quietly with the status a process killed by SIGPIPE gets (141), as `cat`/`yes` do, without Python's
    BrokenPipeError traceback. Both streams are pointed at /dev/null first, so the interpreter's final flush
    of what is still buffered cannot fail again ("Exception ignored ... BrokenPipeError")."""
    to_devnull(sys.stdout)
    to_devnull(sys.stderr)
    sys.exit(128 + 13)


def to_devnull(stream: Any) -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no file descriptor (a captured stream): nothing to flush
        pass


def log_to_closed_pipe(handler: logging.StreamHandler, record: logging.LogRecord,
                        original: Callable[[logging.StreamHandler, logging.LogRecord], None]) -> None:
    """A log line written to a pipe whose reader has gone (`finetune ... | head -3`, `--info | head`) would print
    logging's '--- Logging error ---' traceback for every later line: that stream is pointed at /dev/null instead
    and the command goes on (a training run is not lost because its console was closed; RUN/main.log has every
    line)."""
    if isinstance(sys.exc_info()[1], BrokenPipeError):
        to_devnull(handler.stream)
        return
    original(handler, record)


def exit_with(message: str, code: int = 2) -> None:
    """The user-error paragraph on stderr, then exit ``code`` (no traceback)."""
    text = textwrap.fill(message, width=100, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
    try:
        print("\nerror: " + text, file=sys.stderr)
    except BrokenPipeError:  # `finetune ... 2>&1 | head -1`: the status still says what happened
        to_devnull(sys.stderr)
    sys.exit(code)


def interrupted() -> None:
    print("\ninterrupted (Ctrl-C)", file=sys.stderr)
    sys.exit(130)  # 128 + SIGINT, as shells report it
