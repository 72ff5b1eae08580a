"""Use a trained checkpoint on its own: score it on a labelled folder, or predict on new images.

The checkpoint carries the backbone name, classes and preprocessing, so nothing else is needed.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from torch.utils.data import DataLoader

from finetune.config import check_known_keys
from finetune.data.datamodule import ImageListDataset, decode_side
from finetune.data.datasets import IMAGE_EXTENSIONS, DatasetIndex, scan_dataset, scan_inputs
from finetune.data.images import BadImageError
from finetune.data.transforms import eval_transform
from finetune.data.tta import check_tta, tta_batches
from finetune.errors import FinetuneError, close_matches
from finetune.models.checkpoint import LoadedCheckpoint, load_classifier, read_checkpoint
from finetune.run_files import check_output, readable, resolve_run_dir, write_output

log = logging.getLogger(__name__)

# A run folder's list of member checkpoints (an ensemble or snapshot ensemble), relative to it.
ENSEMBLE_FILE = "ensemble.json"


def _split_to_score(index: DatasetIndex, split: str) -> str:
    if split == "auto":
        return next(s for s in ("test", "val", "train") if s in index.splits)
    if split not in index.splits:
        raise FinetuneError(f"split={split} does not exist under data.root={index.root}; it has {', '.join(index.splits)}.")
    return split


def resolve_members(ckpt: Any, key: str = "ckpt") -> list[str]:
    """Checkpoint paths from ``ckpt``: a .ckpt file, a list of them, or a run folder (its ensemble's
    members from ensemble.json, else the checkpoint its metrics.json says the run scored, else best.ckpt)."""
    if isinstance(ckpt, (list, tuple, ListConfig)):
        return [p for item in ckpt for p in resolve_members(item, key)]
    if ckpt in (None, "", "???"):
        read_checkpoint(None, key)  # the standard "not set" error
    path = Path(str(ckpt)).expanduser()
    if path.is_dir():
        listing = path / ENSEMBLE_FILE
        if listing.is_file():
            return [str(path / m) if not Path(m).is_absolute() else m for m in json.loads(listing.read_text())["members"]]
        return [str(_scored_checkpoint(path))]
    return [str(path)]


def _scored_checkpoint(run: Path) -> Path:
    """RUN/checkpoints/<the file the run scored> (best.ckpt or last.ckpt, see score_checkpoint), looked up
    by name inside ``run`` so a moved run folder still resolves; best.ckpt for runs without that record."""
    try:
        scored = json.loads((run / "metrics.json").read_text()).get("scored_checkpoint")
    except (OSError, ValueError):
        scored = None
    candidate = run / "checkpoints" / Path(str(scored)).name if scored else None
    if candidate is not None and candidate.is_file():
        return candidate
    best, last = run / "checkpoints" / "best.ckpt", run / "checkpoints" / "last.ckpt"
    if not best.is_file() and last.is_file():  # a run without the best-checkpoint callback, or still in epoch 1
        log.warning("%s has no checkpoints/best.ckpt; using %s.", run, last)
        return last
    if not best.is_file() and (run / "config.yaml").is_file():
        raise FinetuneError(
            f"{run} is a run folder without a checkpoint (no checkpoints/best.ckpt or last.ckpt): it is still in its "
            f"first epoch, stopped before saving one, or ran without the checkpoint callbacks. Wait for it to save one, "
            f"or pass ckpt=FILE.ckpt.")
    return best


def load_members(ckpt: Any, key: str = "ckpt") -> list[LoadedCheckpoint]:
    """Every member checkpoint, checked to agree on classes and preprocessing (so they can be averaged)."""
    members = [load_classifier(p, key) for p in resolve_members(ckpt, key)]
    first = members[0]
    for other in members[1:]:
        if other.classes != first.classes or other.preprocessing != first.preprocessing:
            raise FinetuneError(
                f"{key}: {other.path} and {first.path} cannot be averaged: their classes or preprocessing differ."
            )
    return members


def device_for(accelerator: str) -> torch.device:
    use_cuda = str(accelerator) in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")


class _SkippingImages(ImageListDataset):
    """(image, index, error): a file that cannot be decoded gives a blank image and its error instead of
    stopping the pass, so one bad file among thousands costs only its own row."""

    def __init__(self, *args: Any, image_size: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.image_size = image_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:  # type: ignore[override]
        try:
            return super().__getitem__(i)[0], i, ""
        except BadImageError as e:
            return torch.zeros(3, self.image_size, self.image_size), i, str(e) or "unreadable"


def member_probabilities(members: Sequence[LoadedCheckpoint], samples: Sequence[tuple[str, int]], tta: Sequence[str],
                         batch_size: int, device: torch.device, num_workers: int = 0,
                         skipped: dict[str, str] | None = None) -> torch.Tensor:
    """Softmax probabilities [members, images, classes], each averaged over the TTA views.

    With ``skipped`` (a dict), unreadable images do not stop the pass: their rows are meaningless and
    ``skipped`` maps each one's path to why (as training's data check words it)."""
    pp = members[0].preprocessing
    if skipped is None:
        dataset = ImageListDataset(samples, eval_transform(pp), max_side=decode_side(pp))
    else:
        dataset = _SkippingImages(samples, eval_transform(pp), max_side=decode_side(pp), image_size=pp.image_size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    per_member = []
    for member in members:
        module = member.module.to(device).eval()
        chunks = []
        with torch.inference_mode():
            for images, *rest in loader:
                if skipped is not None:
                    for i, error in zip(rest[0].tolist(), rest[1]):
                        if error and samples[i][0] not in skipped:
                            skipped[samples[i][0]] = _why_unreadable(samples[i][0], error)
                views = tta_batches(images.to(device), tta)
                chunks.append(torch.stack([module(v).softmax(dim=-1) for v in views]).mean(0).cpu())
        per_member.append(torch.cat(chunks))
    return torch.stack(per_member)


def _why_unreadable(path: str, error: str) -> str:
    """'kind: detail' as training's data check reports it (zero_byte, not_image, truncated, corrupt)."""
    from finetune.data.validate import check_file

    result = check_file(path)
    return f"{result['kind']}: {result.get('detail', '')}" if result.get("kind") else error


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FinetuneError(f"{key}={value} must be a positive integer.")
    return value


def _checked_device(accelerator: Any) -> torch.device:
    """device_for, refusing what it would otherwise quietly replace by the CPU."""
    name = str(accelerator)
    if name not in ("auto", "cpu", "cuda", "gpu"):
        raise FinetuneError(f"accelerator={name} is not one of auto, cpu, cuda, gpu.{close_matches(name, ('auto', 'cpu', 'cuda', 'gpu'))}")
    if name in ("cuda", "gpu") and not torch.cuda.is_available():
        raise FinetuneError(f"accelerator={name}, but torch sees no CUDA GPU here; use accelerator=cpu (or auto).")
    return device_for(name)


def _checkpoint_inputs(ckpt: Any, members: Sequence[str]) -> list[tuple[str, str]]:
    """The files a command reads for ``ckpt``: each member, and a run folder's ensemble/metrics records."""
    items = list(ckpt) if isinstance(ckpt, (list, tuple, ListConfig)) else [ckpt]
    reads = [("the checkpoint being read", m) for m in members]
    for item in items:
        folder = Path(str(item)).expanduser()
        if folder.is_dir():
            reads += [("the checkpoint's run folder", str(folder))]
            reads += [(f"the run's {name}", str(folder / name)) for name in (ENSEMBLE_FILE, "metrics.json")]
    return reads


def score_probabilities(probs: torch.Tensor, labels: Sequence[int]) -> dict[str, Any]:
    """Accuracy and NLL of the averaged probabilities, and of each member when there are several."""
    y = torch.as_tensor(list(labels))
    mean = probs.mean(0)
    scores: dict[str, Any] = {
        "acc": float((mean.argmax(-1) == y).float().mean()),
        "loss": float(-mean.gather(1, y[:, None]).clamp_min(1e-12).log().mean()),
    }
    if len(probs) > 1:
        members = [float((p.argmax(-1) == y).float().mean()) for p in probs]
        scores["member_acc"] = members
        scores["mean_member_acc"] = sum(members) / len(members)
    return scores


def _split_samples(index: DatasetIndex, split: str, classes: list[str], root: Any) -> list[tuple[str, int]]:
    unknown = [c for c in index.classes if c not in classes]
    if unknown:
        raise FinetuneError(
            f"data.root={root} has classes the checkpoint does not know: {', '.join(unknown)}. "
            f"The checkpoint's classes: {', '.join(classes)}."
        )
    to_ckpt = [classes.index(c) for c in index.classes]
    return [(path, to_ckpt[label]) for path, label in index.splits[split]]


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Accuracy and loss of ``cfg.ckpt`` (one checkpoint, or an ensemble averaged) on ``cfg.data.root``,
    with optional test-time augmentation; written to RUN/eval_metrics.json (an earlier one is kept unless
    ``overwrite=true``). Unreadable images are left out of the scores and listed under "skipped".
    A failed evaluation without run_dir leaves no empty outputs/eval/<date>/<time>/ behind."""
    try:
        return _evaluate(cfg)
    except BaseException:
        if not cfg.run_dir:
            _remove_empty_default_folder()
        raise


def _remove_empty_default_folder() -> None:
    """Hydra's outputs/eval/<date>/<time>/ (created before the command starts) and its parents up to the working
    directory, as long as they are empty: the command failed before writing anything there."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    folder, cwd = Path(HydraConfig.get().runtime.output_dir).absolute(), Path.cwd().absolute()
    while folder != cwd and cwd in folder.parents:
        try:
            folder.rmdir()  # only an empty folder
        except OSError:
            return
        folder = folder.parent


def _evaluate(cfg: DictConfig) -> dict[str, Any]:
    check_known_keys(cfg, "eval")
    tta = check_tta(cfg.tta)
    batch_size = _positive_int(cfg.data.batch_size, "data.batch_size")
    if isinstance(cfg.data.num_workers, bool) or not isinstance(cfg.data.num_workers, int) or cfg.data.num_workers < 0:
        raise FinetuneError(f"data.num_workers={cfg.data.num_workers} must be 0 (load in this process) or a positive integer.")
    device = _checked_device(cfg.accelerator)
    # The run folder first (it is created here): a bad run_dir fails before the checkpoint is loaded.
    try:
        run_dir = resolve_run_dir(cfg, purpose="finetune-eval writes eval_metrics.json there")
    except OSError as e:
        raise FinetuneError(f"run_dir={cfg.run_dir} cannot be created: {e.strerror or e} ({e.filename}). "
                            f"Choose another run_dir.") from None
    output = run_dir / "eval_metrics.json"
    if output.is_file() and not cfg.overwrite:
        raise FinetuneError(f"run_dir={cfg.run_dir or run_dir} already holds an eval_metrics.json (an earlier evaluation); pass "
                            f"overwrite=true to replace it, or choose another run_dir.")
    output = check_output(output, _checkpoint_inputs(cfg.ckpt, resolve_members(cfg.ckpt)), overwrite=True,
                          key="run_dir")
    members = load_members(cfg.ckpt)
    # One class is fine here: scoring a checkpoint on a folder of a single class is a real use.
    index = scan_dataset(cfg.data.root, val_fraction=0.0, test_fraction=0.0, min_classes=1)
    split = _split_to_score(index, cfg.split)
    samples = _split_samples(index, split, members[0].classes, cfg.data.root)
    skipped: dict[str, str] = {}
    probs = member_probabilities(members, samples, tta, batch_size, device, cfg.data.num_workers, skipped=skipped)
    if skipped:
        _report_skipped(skipped, f"data.root={cfg.data.root}", len(samples))
        if len(skipped) == len(samples):
            raise FinetuneError(f"none of the {len(samples)} images of data.root={cfg.data.root} ({split}) could be "
                                f"read (e.g. {': '.join(next(iter(skipped.items())))}); nothing was scored.")
        keep = [i for i, (path, _) in enumerate(samples) if path not in skipped]
        probs, samples = probs[:, keep], [samples[i] for i in keep]
    scores = score_probabilities(probs, [label for _, label in samples])
    metrics = {
        "ckpt": [str(Path(m.path).resolve()) for m in members] if len(members) > 1 else str(Path(members[0].path).resolve()),
        "data_root": index.root,
        "split": "all" if index.layout == "class_folders" else split,
        "images": len(samples),
        "tta": tta,
        **scores,
        "skipped": [{"path": path, "error": why} for path, why in skipped.items()],
    }
    write_output(output, json.dumps(metrics, indent=2) + "\n", key="run_dir", overwrite=bool(cfg.overwrite))
    what = f"ensemble of {len(members)}" if len(members) > 1 else "checkpoint"
    extra = f" (members {', '.join(f'{a:.4f}' for a in scores['member_acc'])})" if len(members) > 1 else ""
    print(f"Accuracy {metrics['acc']:.4f}, loss {metrics['loss']:.4f} on {len(samples)} images "
          f"({metrics['split']} of {index.root}; {what}{', TTA ' + '+'.join(tta) if tta else ''}){extra}")
    print(f"Written: {run_dir / 'eval_metrics.json'}")
    return metrics


def _scan_input_list(value: Any) -> tuple[list[str], list[tuple[str, str]]]:
    """Images under ``input`` (a file, a folder, or a list of them; each image once, in order), and the
    (description, path) pairs an output must never replace."""
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not items or any(item in (None, "", "???") for item in items):
        raise FinetuneError("input is not set: pass input=IMAGE_OR_FOLDER, or a list: input=[a.jpg,b.jpg,DIR].")
    paths = list(dict.fromkeys(p for item in items for p in scan_inputs(item)))
    reads = [("the input " + ("folder" if Path(str(i)).expanduser().is_dir() else "image"), str(i)) for i in items]
    return paths, reads + [("an input image", p) for p in paths]


def predict(cfg: DictConfig) -> Path:
    """Top-k labels and probabilities for every image under ``cfg.input``, as a CSV (an ensemble's
    and the TTA views' probabilities averaged). An unreadable image gets a row with an empty label and
    its ``error``, and is listed on the console; the rest are predicted. Everything that can be checked
    without the model (options, inputs, the output's location) is checked before it is loaded."""
    check_known_keys(cfg, "predict")
    tta = check_tta(cfg.tta)
    topk = _positive_int(cfg.topk, "topk")
    batch_size = _positive_int(cfg.batch_size, "batch_size")
    device = _checked_device(cfg.accelerator)
    paths, reads = _scan_input_list(cfg.input)
    output = check_output(cfg.output, _checkpoint_inputs(cfg.ckpt, resolve_members(cfg.ckpt)) + reads,
                          overwrite=bool(cfg.overwrite))
    if output.suffix.lower() in IMAGE_EXTENSIONS | {".ckpt"}:
        raise FinetuneError(f"output={cfg.output} names an image or checkpoint file, but predictions are a CSV "
                            f"file; name it e.g. output=predictions.csv.")
    members = load_members(cfg.ckpt)
    classes = members[0].classes
    k = min(topk, len(classes))
    skipped: dict[str, str] = {}
    probs = member_probabilities(members, [(p, -1) for p in paths], tta, batch_size, device, skipped=skipped).mean(0)
    if len(skipped) == len(paths):
        first = next(iter(skipped.items()))
        raise FinetuneError(f"none of the {len(paths)} images under input={cfg.input} could be read (e.g. {first[0]}: "
                            f"{first[1]}); nothing was written. Check that input= points at your images.")
    header = ["path", "label", "probability"] + [f"{name}_{i}" for i in range(1, k + 1) for name in ("label", "prob")]
    rows = [header + ["error"]]
    top = probs.topk(k, dim=-1)
    for path, values, indices in zip(paths, top.values.tolist(), top.indices.tolist()):
        if path in skipped:
            rows.append([path] + [""] * (len(header) - 1) + [skipped[path]])
            continue
        ranked = [x for i, v in zip(indices, values) for x in (classes[i], f"{v:.6f}")]
        rows.append([path, ranked[0], ranked[1], *ranked, ""])
    write_output(output, _to_csv(rows), overwrite=bool(cfg.overwrite))
    if skipped:
        _report_skipped(skipped, f"input={cfg.input}", len(paths))
    print(f"Predicted {len(paths) - len(skipped)} image(s) -> {output.resolve()}"
          f"{f' ({len(skipped)} unreadable, listed with their error)' if skipped else ''}")
    return output


def _report_skipped(skipped: dict[str, str], where: str, total: int, show: int = 20) -> None:
    """Printed (not only logged) so it is seen next to the result line whatever the logging setup."""
    lines = [f"  {path}: {why}" for path, why in list(skipped.items())[:show]]
    more = [f"  ... and {len(skipped) - show} more"] if len(skipped) > show else []
    print(readable("\n".join([f"Skipped {len(skipped)} of {total} image(s) under {where} that could not be read:",
                               *lines, *more])))


def _to_csv(rows: list[list[Any]]) -> str:
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()
