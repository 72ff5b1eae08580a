"""A checkpoint's members (one .ckpt, a list, or a run folder's ensemble), loaded and checked to agree, and
their softmax probabilities averaged over the TTA views; shared by eval, predict, export and training's scoring."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import ListConfig
from torch.utils.data import DataLoader

from finetune.calibration import calibrated, nll
from finetune.data.datamodule import ImageListDataset, decode_side
from finetune.data.images import BadImageError
from finetune.data.transforms import eval_transform
from finetune.data.tta import tta_batches
from finetune.errors import FinetuneError
from finetune.models.checkpoint import LoadedCheckpoint, load_classifier, read_checkpoint
from finetune.open_set import known_scores, logits_and_features

log = logging.getLogger(__name__)

# A run folder's list of member checkpoints (an ensemble or snapshot ensemble), relative to it.
ENSEMBLE_FILE = "ensemble.json"


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
            members = json.loads(listing.read_text())["members"]
            return [str(path / m) if not Path(m).is_absolute() else m for m in members]
        return [str(_scored_checkpoint(path))]
    return [str(path)]


def multilabel_thresholds(ckpt: Any, members: Sequence[LoadedCheckpoint]) -> list[float] | None:
    """The per-class thresholds for these members' averaged probabilities: a run folder's ensemble has its own
    (tuned on the averaged val probabilities, in ensemble.json), one checkpoint its own; else None (0.5)."""
    if len(members) == 1:
        return members[0].thresholds
    listing = Path(str(ckpt)).expanduser() / ENSEMBLE_FILE if not isinstance(ckpt, (list, tuple, ListConfig)) else None
    if listing is not None and listing.is_file():
        return json.loads(listing.read_text()).get("thresholds")
    return None


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
            f"first epoch, stopped before saving one, or ran without the checkpoint callbacks. Wait for it to save "
            f"one, or pass ckpt=FILE.ckpt.")
    return best


def load_members(ckpt: Any, key: str = "ckpt") -> list[LoadedCheckpoint]:
    """Every member checkpoint, checked to agree on classes and preprocessing (so they can be averaged)."""
    members = [load_classifier(p, key) for p in resolve_members(ckpt, key)]
    first = members[0]
    for other in members[1:]:
        if other.multilabel != first.multilabel:
            raise FinetuneError(f"{key}: {other.path} and {first.path} cannot be averaged: one has a sigmoid per class "
                                f"(task=multilabel), the other a softmax.")
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
                         skipped: dict[str, str] | None = None, known: list[torch.Tensor] | None = None
                         ) -> torch.Tensor:
    """Softmax probabilities [members, images, classes], each averaged over the TTA views and rescaled by the
    member's calibration temperature.

    With ``skipped`` (a dict), unreadable images do not stop the pass: their rows are meaningless and
    ``skipped`` maps each one's path to why (as training's data check words it). With ``known`` (a list; one
    member, no TTA: the open-set threshold was fitted that way), each batch's open-set scores are appended to it,
    from the same forward pass (finetune/open_set.py)."""
    pp = members[0].preprocessing
    unlabelled = [(path, -1) for path, _ in samples]  # the labels are not needed (and may be multi-label tuples)
    if skipped is None:
        dataset = ImageListDataset(unlabelled, eval_transform(pp), max_side=decode_side(pp))
    else:
        dataset = _SkippingImages(unlabelled, eval_transform(pp), max_side=decode_side(pp), image_size=pp.image_size)
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
                if known is not None:
                    record = member.open_set
                    logits, features = logits_and_features(module.net, images.to(device))
                    known.append(known_scores(record["score"], logits, features, member.temperature,
                                              record.get("bank")).cpu())
                    chunks.append(logits.softmax(dim=-1).cpu())
                    continue
                views = tta_batches(images.to(device), tta)
                chunks.append(torch.stack([output_probabilities(module, module(v)) for v in views]).mean(0).cpu())
        per_member.append(calibrated(torch.cat(chunks), member.temperature))
    return torch.stack(per_member)


def output_probabilities(module, logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the classes, or (task=multilabel) a sigmoid per class."""
    return logits.sigmoid() if module.multilabel else logits.softmax(dim=-1)


def _why_unreadable(path: str, error: str) -> str:
    """'kind: detail' as training's data check reports it (zero_byte, not_image, truncated, corrupt, too_large)."""
    from finetune.data.file_checks import check_file

    result = check_file(path)
    return f"{result['kind']}: {result.get('detail', '')}" if result.get("kind") else error


def checkpoint_inputs(ckpt: Any, members: Sequence[str]) -> list[tuple[str, str]]:
    """The files a command reads for ``ckpt``: each member, and a run folder's ensemble/metrics records."""
    items = list(ckpt) if isinstance(ckpt, (list, tuple, ListConfig)) else [ckpt]
    reads = [("the checkpoint being read", m) for m in members]
    for item in items:
        folder = Path(str(item)).expanduser()
        if folder.is_dir():
            reads += [("the checkpoint's run folder", str(folder))]
            reads += [(f"the run's {name}", str(folder / name)) for name in (ENSEMBLE_FILE, "metrics.json")]
    return reads


def imbalance_scores(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Balanced accuracy and macro F1, as the module logs them (torchmetrics, macro over classes present)."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    return {"balanced_acc": float(multiclass_accuracy(pred, y, num_classes, average="macro")),
            "macro_f1": float(multiclass_f1_score(pred, y, num_classes, average="macro"))}


def score_probabilities(probs: torch.Tensor, labels: Sequence[int], thresholds: Sequence[float] | None = None,
                        classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy and NLL of the averaged probabilities, and of each member when there are several; multi-label
    labels (tuples): mAP, micro / macro F1 and exact match at ``thresholds`` (finetune/multilabel.py)."""
    if labels and isinstance(labels[0], tuple):
        from finetune.multilabel import multi_hot_rows, multilabel_scores

        targets = multi_hot_rows(labels, probs.shape[-1])
        scores = multilabel_scores(probs.mean(0), targets, thresholds, classes)
        if len(probs) > 1:  # each member's threshold-free mAP
            scores["member_map"] = [multilabel_scores(p, targets)["map"] for p in probs]
        return scores
    y = torch.as_tensor(list(labels))
    mean = probs.mean(0)
    pred = mean.argmax(-1)
    scores: dict[str, Any] = {
        "acc": float((pred == y).float().mean()),
        "loss": nll(mean, y),
        **imbalance_scores(pred, y, mean.shape[-1]),
    }
    if len(probs) > 1:
        members = [float((p.argmax(-1) == y).float().mean()) for p in probs]
        scores["member_acc"] = members
        scores["mean_member_acc"] = sum(members) / len(members)
    return scores
