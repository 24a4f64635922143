"""Optimisers (SGD, AdamW, LARS), the linear-scaling rule and the warm-up + cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fgray.config import check_range


@dataclass
class OptimConfig:
    optimizer: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = 0.03  # per 256 images; scaled by global batch / 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr
    grad_clip: float = 0.0  # max global grad norm; 0 turns clipping off
    # Biases and norm weights (the 1-d parameters) get no weight decay and, under LARS, no
    # trust-ratio adaptation. None: on for LARS (moco-v3's LARS), off for SGD and AdamW (MoCo
    # v2's SGD and moco-v3's AdamW decay every parameter).
    exclude_bias_norm_wd: bool | None = None

    @property
    def excludes_bias_norm(self) -> bool:
        if self.exclude_bias_norm_wd is None:
            return self.optimizer == "lars"
        return self.exclude_bias_norm_wd

    def validate(self) -> None:
        check_range("lr", self.lr, 0.0, lo_open=True)
        check_range("momentum", self.momentum, 0.0, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("warmup_epochs", self.warmup_epochs, 0.0)
        check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_range("grad_clip", self.grad_clip, 0.0)


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in MoCo v3's code: SGD with momentum whose update is scaled
    by the trust ratio ||w|| / ||g + wd*w||. Groups marked `lars_exclude` skip weight decay and
    the trust ratio: `build_optimizer` puts biases and norm weights there, which is what
    moco-v3's LARS does for every parameter of one dimension or less."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(g)
                    ratio = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    g = g.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"].mul_(group["momentum"]).add_(g)
                p.add_(mu, alpha=-group["lr"])


def split_bias_norm(groups: list[dict]) -> list[dict]:
    """Each group split in two: its weights (ndim > 1) as they are, and its biases and norm
    weights (ndim <= 1) with no weight decay and `lars_exclude`. Empty groups are dropped."""
    out = []
    for g in groups:
        params = list(g["params"])
        decay = [p for p in params if p.ndim > 1]
        skip = [p for p in params if p.ndim <= 1]
        if decay:
            out.append({**g, "params": decay})
        if skip:
            out.append({**g, "params": skip, "weight_decay": 0.0, "lars_exclude": True})
    return out


def build_optimizer(groups: list[dict], cfg: OptimConfig, global_batch: int,
                    fused: bool = False) -> torch.optim.Optimizer:
    """The optimiser of `cfg` over a method's `param_groups()`, at the peak lr
    `cfg.lr x global_batch / 256` (each group's `peak_lr`, which `set_lr` schedules)."""
    lr = cfg.lr * global_batch / 256
    groups = [{**g, "params": list(g["params"])} for g in groups]
    if cfg.excludes_bias_norm:
        groups = split_bias_norm(groups)
    for g in groups:
        g.setdefault("weight_decay", cfg.weight_decay)
    extra = {"fused": True} if fused else {}
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, **extra)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, **extra)
    else:
        opt = LARS(groups, lr=lr, momentum=cfg.momentum)
    for g in opt.param_groups:
        g["peak_lr"] = lr
    return opt


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then half-cosine down to `min_ratio` at the last step."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def set_lr(opt: torch.optim.Optimizer, factor: float) -> float:
    for g in opt.param_groups:
        g["lr"] = g["peak_lr"] * factor
    return opt.param_groups[0]["lr"]


def clip_gradients(model: nn.Module, max_norm: float) -> None:
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
