"""User-facing errors: one paragraph that names the key or path and says how to fix it.

The CLI turns a :class:`FinetuneError` into that paragraph on stderr and exit status 2, never a
traceback. Everything else that escapes is a bug in finetune, and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path


class FinetuneError(Exception):
    """An error caused by the user's input (config, files, checkpoint), with a fix in its text."""

    exit_code = 2


class TrainingInterrupted(FinetuneError):
    """Ctrl-C during training: the message says how to continue; exit status 130, as for SIGINT."""

    exit_code = 130

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        super().__init__(f"Interrupted; continue with: finetune resume={run_dir}")


class ProcessLost(FinetuneError):
    """Another DDP process died or stopped answering: the message says which checkpoint is intact and how to
    resume; exit status 75 (EX_TEMPFAIL: try again), not 2, as the input was not at fault."""

    exit_code = 75


def close_matches(word: str, choices: Iterable[str], n: int = 5, prefix: str = "") -> str:
    """'did you mean ...' text for an unknown name, or '' when nothing is close (``prefix``: shown before each
    match, e.g. the parent key ``optimizer.`` when matching ``lrr`` against that node's keys)."""
    matches = difflib.get_close_matches(word, [str(c) for c in choices], n=n, cutoff=0.6)
    return f" Did you mean: {', '.join(prefix + m for m in matches)}?" if matches else ""
