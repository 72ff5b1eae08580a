"""Temperature scaling (Guo et al. 2017): one scalar T fitted on the validation split after training, so that
the probabilities a model reports match how often it is right.

A fine-tuned network is usually over-confident (label smoothing pulls the other way); dividing its logits by T
changes no prediction, only the probabilities, which is what a threshold, an "unknown" rejection or a human
reading the scores relies on. The fit works on log-probabilities (the log of the possibly TTA-averaged softmax):
softmax(log p / T) = softmax(z / T) for a single view, since log p = z - logsumexp(z).

Expected calibration error (ECE): the confidence (top probability) split into equal-width bins; the weighted
mean of |accuracy - mean confidence| over the bins. The bins go to metrics.json for the report's reliability
diagram.
"""

from __future__ import annotations

import math
from typing import Any

import torch

BINS = 15


def calibrated(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``probs`` [..., classes] rescaled by ``temperature`` (1: unchanged)."""
    if temperature == 1.0:
        return probs
    return (probs.clamp_min(1e-12).log() / temperature).softmax(dim=-1)


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the negative log-likelihood of ``labels`` under softmax(log probs / T)."""
    log_p = probs.double().clamp_min(1e-12).log()
    y = labels.long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(log_p / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(nll)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) else 1.0


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> dict[str, Any]:
    """ECE and the per-bin counts, mean confidence and accuracy (bins by top probability, equal width)."""
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence.double(), edges[1:-1], right=True)  # 0..bins-1
    counts, conf, acc = [], [], []
    ece = 0.0
    for b in range(bins):
        members = index == b
        n = int(members.sum())
        counts.append(n)
        conf.append(float(confidence[members].double().mean()) if n else None)
        acc.append(float(correct[members].mean()) if n else None)
        if n:
            ece += n / len(labels) * abs(acc[-1] - conf[-1])
    return {"ece": round(ece, 5), "counts": counts, "confidence": conf, "accuracy": acc}


def calibrate_checkpoint(mode: str, scored: str | None, index, cfg, no_validation: str | None) -> dict[str, Any]:
    """``calibrate`` after training: T fitted on the val split's probabilities of the scored checkpoint, stored
    in that checkpoint (finetune-eval, -predict, -export and load() then give calibrated probabilities), with
    ECE and NLL before/after on val and, when there is one, on the test split. ``mode``: auto (when there is a
    validation split) | true | false."""
    if mode == "false" or mode is False:
        return {"skipped": "calibrate=false"}
    if no_validation or not index.splits.get("val"):
        return {"skipped": f"no validation split to fit the temperature on ({no_validation or 'empty'})"}
    if scored is None:
        return {"skipped": "no checkpoint was kept"}
    from finetune.models.checkpoint import CHECKPOINT_KEY, read_checkpoint
    from finetune.scoring import split_probabilities

    # The network's own probabilities: a checkpoint calibrated before (a run resumed after it finished) is
    # read through its temperature, which T' = 1/T undoes (softmax(log softmax(z/T) * T) = softmax(z))
    earlier = float(read_checkpoint(scored)[CHECKPOINT_KEY].get("temperature", 1.0))
    probs = {split: calibrated(p.mean(0), 1 / earlier)
             for split, p in split_probabilities([scored], index, [], cfg).items()}
    labels = {split: torch.tensor([y for _, y in index.splits[split]]) for split in probs}
    temperature = round(fit_temperature(probs["val"], labels["val"]), 4)  # as stored and reported
    result: dict[str, Any] = {"temperature": temperature, "fitted_on": f"val ({len(labels['val'])} images)",
                              "checkpoint": scored}
    for split, p in probs.items():
        before, after = reliability(p, labels[split]), reliability(calibrated(p, temperature), labels[split])
        result[split] = {"ece_before": before["ece"], "ece_after": after["ece"],
                         "nll_before": _nll(p, labels[split]), "nll_after": _nll(calibrated(p, temperature),
                                                                                   labels[split])}
        result.setdefault("reliability", {})[split] = {"before": before, "after": after}
    store_temperature(scored, temperature)
    return result


def _nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return round(float(-probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean()), 5)


def store_temperature(path: str, temperature: float) -> None:
    """Write ``temperature`` into the checkpoint's finetune record (temp file + rename)."""
    import os
    import tempfile
    from pathlib import Path

    from finetune.models.checkpoint import CHECKPOINT_KEY
    from finetune.run_files import file_mode

    data = torch.load(path, map_location="cpu", weights_only=True)
    data[CHECKPOINT_KEY]["temperature"] = float(temperature)
    folder = Path(path).parent
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{Path(path).name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
