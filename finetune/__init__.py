"""finetune: measure a small image dataset, pick what to fine-tune, and train it with Lightning.

From Python: ``finetune.fit``, ``finetune.load``, ``finetune.advise`` (``finetune/api.py``); imported on first
use, so the command-line tools start without them.
"""

__version__ = "0.1.0"
__all__ = ["FinetuneError", "Model", "Run", "advise", "fit", "load"]


def __getattr__(name: str):
    if name == "FinetuneError":
        from finetune.errors import FinetuneError

        return FinetuneError
    if name in ("Model", "Run", "advise", "fit", "load"):
        from finetune import api

        return getattr(api, name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
