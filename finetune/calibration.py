"""Temperature scaling (Guo et al. 2017): one scalar T fitted on the validation split after training, so that
the probabilities a model reports match how often it is right.

A fine-tuned network is usually over-confident (label smoothing pulls the other way); dividing its logits by T
changes no prediction, only the probabilities, which is what a threshold, an "unknown" rejection or a human
reading the scores relies on. The fit works on log-probabilities (the log of the possibly TTA-averaged softmax):
softmax(log p / T) = softmax(z / T) for a single view, since log p = z - logsumexp(z).

Expected calibration error (ECE): the confidence (top probability) split into equal-width bins; the weighted
mean of |accuracy - mean confidence| over the bins. The bins go to metrics.json for the report's reliability
diagram. Fitting it on a run's scored checkpoint and storing it there: ``scoring.calibrate_checkpoint``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

BINS = 15
# T is kept in this range. When every validation image is right, the likelihood keeps rising as T -> 0 (all
# probabilities -> 1): digits, 176 validation images, no error: T fell to 0.05 before L-BFGS stopped. The NLL is
# convex in 1/T, so the clamped value is the best T within the range.
T_RANGE = (0.1, 10.0)


def calibrated(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``probs`` [..., classes] rescaled by ``temperature`` (1: unchanged)."""
    if temperature == 1.0:
        return probs
    return (probs.clamp_min(1e-12).log() / temperature).softmax(dim=-1)


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of ``labels`` under ``probs`` [images, classes]."""
    return float(-probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean())


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in ``T_RANGE`` that minimises the negative log-likelihood of ``labels`` under softmax(log probs / T)."""
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
    return min(max(t, T_RANGE[0]), T_RANGE[1]) if math.isfinite(t) else 1.0


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

