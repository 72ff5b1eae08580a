"""Load a finetune checkpoint safely and rebuild the classifier from it, with nothing else needed.

Loading uses ``torch.load(weights_only=True)``: a checkpoint is data, never code. Files from other
toolkits, tampered files and unreadable files are refused with an error that names the path.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.data.transforms import Preprocessing
from finetune.errors import FinetuneError
from finetune.models.backbone import BackboneSpec
from finetune.models.module import CHECKPOINT_FORMAT, CHECKPOINT_KEY, ImageClassifier, Recipe


@dataclass
class LoadedCheckpoint:
    module: ImageClassifier
    classes: list[str]
    preprocessing: Preprocessing
    path: str
    temperature: float = 1.0  # fitted on validation after training (finetune/calibration.py); 1: none
    # The "none of these" score and threshold fitted after training (finetune/open_set.py); None: not fitted
    open_set: dict[str, Any] | None = None
    # task=multilabel: the per-class probability thresholds tuned on validation after training (None: 0.5 each)
    thresholds: list[float] | None = None

    @property
    def multilabel(self) -> bool:
        return self.module.multilabel


def read_checkpoint(path: str | Path | None, key: str = "ckpt") -> dict[str, Any]:
    """The checkpoint's dict, loaded weights-only; a clear error for anything that is not ours."""
    if path in (None, "", "???"):
        raise FinetuneError(
            f"{key} is not set. Pass a checkpoint written by finetune, e.g. {key}=RUN/checkpoints/best.ckpt."
        )
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise FinetuneError(
            f"{key}={p} does not exist. Checkpoints are in RUN_FOLDER/checkpoints/ (best.ckpt, last.ckpt)."
        )
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None)
        if detail is None:  # not a pickle at all (a text file, random bytes)
            raise FinetuneError(
                f"{key}={p} is not a torch checkpoint (it could not be unpickled). "
                f"Use RUN_FOLDER/checkpoints/best.ckpt or last.ckpt written by finetune."
            ) from None
        raise FinetuneError(
            f"{key}={p} was refused: it holds Python objects that weights-only loading will not run ({detail}). "
            f"finetune checkpoints hold only tensors and plain data; this file is from another program or was "
            f"modified. Load only checkpoints you trust."
        ) from None
    # Garbage bytes make torch's weights-only unpickler raise almost anything: KeyError/IndexError
    # (unknown opcodes, an empty stack), struct.error (short reads), EOFError, RuntimeError (zip).
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, LookupError, struct.error) as e:
        raise FinetuneError(
            f"{key}={p} is not a readable checkpoint "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). "
            f"It may be truncated or not a torch file; use RUN_FOLDER/checkpoints/best.ckpt or last.ckpt."
        ) from None
    meta = data.get(CHECKPOINT_KEY) if isinstance(data, dict) else None
    if not isinstance(meta, dict) or "state_dict" not in data:
        found = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise FinetuneError(
            f"{key}={p} is not a finetune checkpoint (found {found}; no '{CHECKPOINT_KEY}' section). "
            f"Pass one written by `finetune` (RUN_FOLDER/checkpoints/best.ckpt). To start training from "
            f"another toolkit's weights, use model.weights=/path/to/file with `finetune` instead."
        )
    if meta.get("format", 0) > CHECKPOINT_FORMAT:
        raise FinetuneError(f"{key}={p} was written by a newer finetune (format {meta['format']}); upgrade finetune.")
    return data


def load_classifier(path: str | Path | None, key: str = "ckpt") -> LoadedCheckpoint:
    """Rebuild the trained network (no weight download) and put it in eval mode."""
    data = read_checkpoint(path, key)
    meta = data[CHECKPOINT_KEY]
    spec = BackboneSpec(
        meta["backbone"], int(meta["num_classes"]), dict(meta.get("model_kwargs") or {}), meta.get("cut_after_stage"),
        str(meta.get("pooling", "avg")),
    )
    preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    module = ImageClassifier(spec.build(), spec, list(meta["classes"]), preprocessing,
                             Recipe(task=str(meta.get("task", "multiclass"))))
    try:
        module.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as e:
        raise FinetuneError(f"{key}={path}: weights do not match {spec.name}: {str(e).splitlines()[0]}") from None
    module.eval()
    return LoadedCheckpoint(module, module.classes, preprocessing, str(path), float(meta.get("temperature", 1.0)),
                            meta.get("open_set"), meta.get("thresholds"))


def update_checkpoint(path: str | Path, **values: Any) -> None:
    """Add ``values`` to a checkpoint's finetune section (temp file + rename): what is fitted after training
    (the calibration temperature, the open-set record) travels with the weights."""
    from finetune.run_files import write_with

    data = torch.load(path, map_location="cpu", weights_only=True)
    data[CHECKPOINT_KEY].update(values)
    write_with(str(path), lambda f: torch.save(data, f))
