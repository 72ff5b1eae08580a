"""Regularization from ``conf/regularization``: what timm and torch provide, and the rest by hand.

From the libraries: dropout before the head (timm ``drop_rate``), stochastic depth (timm
``drop_path_rate``), label smoothing (``F.cross_entropy``), fractional max pooling
(``F.fractional_max_pool2d``), L2 weight decay (the optimizer's ``weight_decay``).
By hand, because neither library has them: the L1, L2 and L2-SP loss penalties (L2-SP, Li et al.
2018: ``alpha * ||w - w_pretrained||^2``, pulling toward the pretrained weights instead of toward
zero) and DropConnect on the head's weights (Wan et al. 2013; timm's "drop_connect" is drop path).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.errors import FinetuneError

POOLINGS = ("avg", "fractional_max")
BN_MODES = ("train", "eval")


@dataclass(frozen=True)
class Regularization:
    l1: float = 0.0
    l2: float = 0.0
    l2_sp: float = 0.0
    dropout: float = 0.0
    drop_connect: float = 0.0
    drop_path: float = 0.0
    label_smoothing: float = 0.0
    pooling: str = "avg"
    trainable_bn: str = "eval"  # conf/regularization/default.yaml

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> Regularization:
        values = dict(node or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise FinetuneError(f"regularization.{unknown[0]} is not a regularization key; "
                                f"the keys are {', '.join(sorted(known))}.")
        reg = cls(**values)
        for key in ("l1", "l2", "l2_sp"):
            if not float(getattr(reg, key)) >= 0:
                raise FinetuneError(f"regularization.{key}={getattr(reg, key)} must be >= 0 (0 turns it off).")
        for key in ("dropout", "drop_connect", "drop_path", "label_smoothing"):
            if not 0 <= float(getattr(reg, key)) < 1:
                raise FinetuneError(f"regularization.{key}={getattr(reg, key)} must be a probability in [0, 1).")
        if reg.pooling not in POOLINGS:
            raise FinetuneError(f"regularization.pooling={reg.pooling} must be one of {', '.join(POOLINGS)}.")
        if reg.trainable_bn not in BN_MODES:
            raise FinetuneError(f"regularization.trainable_bn={reg.trainable_bn} must be one of {', '.join(BN_MODES)}.")
        return reg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_kwargs(self, user_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """timm.create_model kwargs with dropout and stochastic depth set (never two values for one key)."""
        kwargs = dict(user_kwargs)
        for key, timm_key in (("dropout", "drop_rate"), ("drop_path", "drop_path_rate")):
            value = float(getattr(self, key))
            if value == 0:
                continue
            if timm_key in kwargs and float(kwargs[timm_key]) != value:
                raise FinetuneError(
                    f"regularization.{key}={value} and model.kwargs.{timm_key}={kwargs[timm_key]} set the same "
                    f"thing twice; keep one of them."
                )
            kwargs[timm_key] = value
        return kwargs

    @property
    def has_penalty(self) -> bool:
        return self.l1 > 0 or self.l2 > 0 or self.l2_sp > 0


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """The names (or fnmatch patterns) the model itself exempts from weight decay through timm's
    ``no_weight_decay()``, e.g. a ViT's ``pos_embed`` and ``cls_token``; empty when it has none."""
    method = getattr(model, "no_weight_decay", None)
    return set(method()) if callable(method) else set()


def is_weight(name: str, param: torch.Tensor, exempt: Collection[str] = ()) -> bool:
    """The one definition of a weight: what weight decay and the L1/L2/L2-SP penalties act on.

    timm's rule (``timm.optim.param_groups_weight_decay``): not biases, norms or other 1-d tensors, and
    not the names in ``exempt`` (pass :func:`no_weight_decay_names`), matched as timm matches them.
    """
    if param.ndim <= 1 or name.endswith(".bias"):
        return False
    return not any(fnmatchcase(name, pattern) for pattern in exempt)


class WeightPenalty(nn.Module):
    """``l1 * sum|w| + l2 * sum w^2 + l2_sp * sum (w - w0)^2`` over trainable weights, for the loss.

    L2-SP covers the weights that came pretrained (everything but the new head); its anchors are
    copied when this is built, i.e. from the pretrained weights, before any checkpoint is resumed.
    They are kept out of the state dict: they are the pretrained weights, rebuilt on every start.
    "Weights" are :func:`is_weight`'s, so what gets no weight decay (a ViT's pos_embed) gets no penalty.
    """

    def __init__(self, net: nn.Module, reg: Regularization, head_names: set[str]):
        super().__init__()
        self.l1, self.l2, self.l2_sp = float(reg.l1), float(reg.l2), float(reg.l2_sp)
        self.exempt = no_weight_decay_names(net)
        self.anchors: dict[str, torch.Tensor] = {}
        if self.l2_sp > 0:
            self.anchors = {n: p.detach().clone() for n, p in net.named_parameters()
                            if is_weight(n, p, self.exempt) and n not in head_names}

    def forward(self, net: nn.Module) -> torch.Tensor:
        total = None
        for name, p in net.named_parameters():
            if not p.requires_grad or not is_weight(name, p, self.exempt):
                continue
            term = 0.0
            if self.l1:
                term = term + self.l1 * p.abs().sum()
            if self.l2:
                term = term + self.l2 * p.pow(2).sum()
            if self.l2_sp and name in self.anchors:
                anchor = self.anchors[name]
                if anchor.device != p.device:
                    anchor = self.anchors[name] = anchor.to(p.device)
                term = term + self.l2_sp * (p - anchor).pow(2).sum()
            if not isinstance(term, float):
                total = term if total is None else total + term
        return total if total is not None else torch.zeros(())


def drop_connect_linear(x: torch.Tensor, head: nn.Module, p: float) -> torch.Tensor:
    """The head's output with each weight dropped with probability p (rescaled by 1/(1-p))."""
    if not isinstance(head, nn.Linear):
        raise FinetuneError("regularization.drop_connect needs a linear head; "
                            f"this model's head is {type(head).__name__}.")
    mask = torch.empty_like(head.weight).bernoulli_(1 - p) / (1 - p)
    return F.linear(x, head.weight * mask, head.bias)


class FractionalMaxPool(nn.Module):
    """Fractional max pooling (Graham 2014) before the global pooling: random pooling regions while
    training, fixed ones in evaluation (so eval and predict are deterministic)."""

    def __init__(self, global_pool: nn.Module, output_ratio: float = 0.7071):
        super().__init__()
        self.pool = global_pool
        self.output_ratio = output_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4 and min(x.shape[-2:]) >= 2:
            samples = None if self.training else x.new_full((x.shape[0], x.shape[1], 2), 0.5)
            x = F.fractional_max_pool2d(x, kernel_size=2, output_ratio=(self.output_ratio, self.output_ratio),
                                       _random_samples=samples)
        return self.pool(x)


def apply_head_pooling(net: nn.Module, pooling: str) -> nn.Module:
    """Swap the model's global pooling for ``pooling`` (avg = keep timm's own)."""
    if pooling == "avg":
        return net
    pool = getattr(net, "global_pool", None)
    if not isinstance(pool, nn.Module):
        raise FinetuneError(
            f"regularization.pooling={pooling} needs a CNN with a global pooling layer; {type(net).__name__} has "
            f"none (e.g. a ViT pools tokens). Use regularization.pooling=avg."
        )
    if not isinstance(pool, FractionalMaxPool):
        net.global_pool = FractionalMaxPool(pool)
    return net
