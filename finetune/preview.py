"""A PNG grid of what the model sees: each row one training image, first as evaluated (resize +
centre crop), then several draws of the training pipeline, then the batch-level MixUp/CutMix result
where configured. ``finetune-preview`` writes it on its own; every training run writes it too.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.conf import preset
from finetune.data.datamodule import decode_side
from finetune.data.datasets import DatasetIndex, label_list, stratum
from finetune.data.images import BadImageError, load_image
from finetune.data.mixing import build_batch_mixer
from finetune.data.transforms import Preprocessing, eval_transform, train_transform
from finetune.errors import FinetuneError
from finetune.outputs import write_output

log = logging.getLogger(__name__)


def _pick(index: DatasetIndex, rows: int, seed: int) -> list[tuple[str, int]]:
    """Up to ``rows`` training images, cycling through the classes so each one shows."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[tuple[str, int]]] = {}
    frequency = Counter(c for _, label in index.splits["train"] for c in label_list(label))
    for sample in index.splits["train"]:
        by_class.setdefault(stratum(sample[1], frequency), []).append(sample)
    for samples in by_class.values():
        rng.shuffle(samples)
    picked, depth = [], 0
    while len(picked) < rows and any(depth < len(v) for v in by_class.values()):
        for label in sorted(by_class):
            if depth < len(by_class[label]) and len(picked) < rows:
                picked.append(by_class[label][depth])
        depth += 1
    return picked


def _to_image(x: torch.Tensor, pp: Preprocessing) -> np.ndarray:
    mean, std = torch.tensor(pp.mean)[:, None, None], torch.tensor(pp.std)[:, None, None]
    return (x.float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def write_preview(index: DatasetIndex, pp: Preprocessing, augment: Mapping[str, Any] | None, path: str | Path,
                  rows: int = 6, draws: int = 5, seed: int = 0, overwrite: bool = True) -> Path:
    # Its own generators: drawing the preview must not move the training run's random state.
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            grid = _draw_grid(index, pp, augment, rows, draws, seed)
        finally:
            np.random.set_state(numpy_state)
    _save_grid(grid, augment, pp, Path(path), overwrite)
    return Path(path)


def write_preview_or_warn(index: DatasetIndex, pp: Preprocessing, augment: Mapping[str, Any] | None, path: str | Path,
                          seed: int = 0) -> Path | None:
    """The training run's preview: it only illustrates, so a failure is a warning, never a stopped run."""
    try:
        return write_preview(index, pp, augment, path, seed=seed)
    except Exception as e:  # noqa: BLE001 - an odd image or a plotting bug must not cost the training run
        log.warning("The augmentation preview could not be drawn (%s: %s); %s was not written. Training goes on.",
                    type(e).__name__, e, path)
        return None


def _draw_grid(index: DatasetIndex, pp: Preprocessing, augment: Mapping[str, Any] | None, rows: int, draws: int,
               seed: int) -> list[list[tuple[np.ndarray, str]]]:
    evaluate, augmented = eval_transform(pp), train_transform(pp, augment, seed=seed)
    mixer = None if index.multilabel else build_batch_mixer(augment, len(index.classes))  # mixes class weights
    grid: list[list[tuple[np.ndarray, str]]] = []
    first_draws, samples, skipped = [], [], []
    for path_, label in _pick(index, len(index.splits["train"]), seed):  # all, in order: a bad file's turn passes on
        if len(samples) == rows:
            break
        try:
            image = load_image(path_, decode_side(pp))
        except BadImageError as e:  # as training does (data.on_bad_file=skip): the preview shows the next image
            skipped.append(str(e))
            continue
        samples.append((path_, label))
        name = "+".join(index.classes[c] for c in label_list(label)) or "(no label)"
        row = [(_to_image(evaluate(image=image)["image"], pp), f"{name}\n(evaluation)")]
        for d in range(draws):
            x = augmented(image=image)["image"]
            if d == 0:
                first_draws.append(x)
            row.append((_to_image(x, pp), f"draw {d + 1}"))
        grid.append(row)
    if skipped:
        log.warning("Preview: skipped %d image(s) that could not be read: %s", len(skipped), "; ".join(skipped[:5]))
    if not grid:
        raise FinetuneError(f"None of the {len(skipped)} training images could be read for the preview: {skipped[0]}")
    if mixer is not None and len(first_draws) > 1:
        mixed, soft = mixer(torch.stack(first_draws), torch.tensor([label for _, label in samples]))
        for row, x, weights in zip(grid, mixed, soft):
            top = weights.topk(min(2, len(weights)))
            text = " / ".join(
                f"{index.classes[i][:10]} {v:.2f}" for v, i in zip(top.values.tolist(), top.indices.tolist()) if v > 0
            )
            row.append((_to_image(x, pp), f"mixed: {text}"))
    return grid


def _save_grid(grid: list[list[tuple[np.ndarray, str]]], augment: Mapping[str, Any] | None, pp: Preprocessing,
               path: Path, overwrite: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(r) for r in grid)
    fig, axes = plt.subplots(len(grid), cols, figsize=(1.9 * cols, 2.0 * len(grid)), squeeze=False)
    for r, row in enumerate(grid):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                ax.imshow(row[c][0], interpolation="nearest")
                ax.set_title(row[c][1], fontsize=7)
    name = ", ".join(_describe(augment))
    fig.suptitle(f"Training inputs at {pp.image_size} px: {name}", fontsize=9)
    fig.tight_layout()
    image = io.BytesIO()
    try:
        fig.savefig(image, dpi=90, format=image_format(path))
    finally:
        plt.close(fig)
    write_output(path, image.getvalue(), overwrite=overwrite)  # whole or not at all (temp file + rename)


# What matplotlib writes, by the output's suffix (anything else: PNG, as before).
IMAGE_FORMATS = ("png", "jpg", "jpeg", "pdf", "svg", "webp", "tif", "tiff")


def image_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    return suffix if suffix in IMAGE_FORMATS else "png"


def _describe(augment: Mapping[str, Any] | None) -> Sequence[str]:
    augment = {**preset("augment", "none"), **(augment or {})}  # None: no augmentation
    parts = [f"crop={augment['crop']}"]
    for item in augment["transforms"] or []:
        parts.append(next(iter(item)) if isinstance(item, Mapping) else str(item))
    for key in ("mixup_alpha", "cutmix_alpha"):
        if float(augment[key] or 0) > 0:
            parts.append(f"{key.split('_')[0]}={augment[key]}")
    return parts


def preview_path(cfg) -> Path:
    """``output``; a relative one is inside the Hydra run dir (``hydra.run.dir``, the working directory
    unless set), as every command's files are. Library calls without Hydra: the working directory."""
    from hydra.core.hydra_config import HydraConfig

    out = Path(str(cfg.output)).expanduser()
    if not out.is_absolute() and HydraConfig.initialized():
        out = Path(HydraConfig.get().runtime.output_dir) / out
    return out


def preview(cfg) -> Path:
    """``finetune-preview``: the grid for ``data.root`` and ``augment``, without any training."""
    from omegaconf import OmegaConf

    from finetune.config import check_known_keys
    from finetune.data.datasets import scan_configured
    from finetune.data.transforms import resolve_preprocessing
    from finetune.models.backbone import check_backbone_name
    from finetune.outputs import check_output

    check_known_keys(cfg, "preview")
    for key in ("rows", "draws"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or not 1 <= cfg[key] <= 100:
            raise FinetuneError(f"{key}={cfg[key]} must be a whole number from 1 to 100.")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**32:
        raise FinetuneError(f"seed={cfg.seed} must be a whole number in [0, 4294967295].")
    check_backbone_name(cfg.model.backbone)
    index = scan_configured(cfg)
    # Never an input (data.root, its CSV, an image), an existing file only with overwrite=true; checked before drawing.
    inputs = [("data.root", str(cfg.data.root))] + [
        ("an input image", path) for samples in index.splits.values() for path, _ in samples]
    path = check_output(preview_path(cfg), inputs, overwrite=bool(cfg.overwrite))
    if path.suffix and path.suffix.lower().lstrip(".") not in IMAGE_FORMATS:
        raise FinetuneError(f"output={cfg.output}: the preview cannot be written as {path.suffix}; name it .png "
                            f"(or {', '.join('.' + f for f in IMAGE_FORMATS[1:])}).")
    import timm

    model = timm.create_model(cfg.model.backbone, pretrained=False)  # its pretrained config only: size, mean, std
    pp = resolve_preprocessing(model, cfg.data)
    out = write_preview(index, pp, OmegaConf.to_container(cfg.augment, resolve=True), path,
                        rows=int(cfg.rows), draws=int(cfg.draws), seed=int(cfg.seed),
                        overwrite=bool(cfg.overwrite))
    print(f"Preview of {len(index.splits['train'])} training images' pipeline -> {out.resolve()}")
    return out
