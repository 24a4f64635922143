"""Pieces every method shares: InfoNCE, EMA updates, cross-rank gathers and batch shuffles.

Plain torch; `torch.distributed` is used only when a process group is initialised, so each
function also works in a single process.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank along dim 0 (no gradient), as MoCo's helper does."""
    if not distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def info_nce_queue(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo v2 InfoNCE: one positive key per query against the queue's negatives.

    q, k: (B, D) L2-normalised; queue: (K, D) L2-normalised. The positive sits at logit 0.
    """
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue.t()
    logits = torch.cat([l_pos, l_neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def info_nce_in_batch(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """MoCo v3 contrastive loss: keys gathered from every rank are the negatives, the loss is
    scaled by 2T as in the official code."""
    k_all = concat_all_gather(k)
    rank, _ = rank_and_world()
    logits = q @ k_all.t() / temperature
    labels = torch.arange(len(q), device=q.device) + rank * len(q)
    return F.cross_entropy(logits, labels) * (2 * temperature)


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- m * target + (1 - m) * source, parameter by parameter."""
    t_params = list(target.parameters())
    s_params = list(source.parameters())
    if not t_params:  # e.g. an empty projector: nothing to average
        return
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def cosine_momentum(base: float, progress: float) -> float:
    """MoCo v3 / BYOL ramp: m goes from `base` to 1 along a half cosine over training."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0))) * (1.0 - base)


@contextlib.contextmanager
def frozen_bn_statistics(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of `module` keep normalising with batch statistics in train mode but do
    not update their running statistics (nor `num_batches_tracked`) inside the block.

    For passes over inputs that must not shape what evaluation normalises with (SDF's
    synthesized images): with `track_running_stats` off, torch's BatchNorm (and SyncBatchNorm)
    uses the batch's statistics and passes no running buffers to update. Setting momentum to 0
    instead would still count the batch, and one forward over real and synthetic images
    together would change the real images' batch statistics too.
    """
    layers = [m for m in module.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy for the momentum (key) encoder."""
    import copy

    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def batch_shuffle_ddp(x: Tensor) -> tuple[Tensor, Tensor]:
    """Shuffle-BN across ranks (MoCo `_batch_shuffle_ddp`): gather the batch from every rank,
    permute it with rank 0's permutation, and give each rank its slice of the permuted batch."""
    batch_this = x.shape[0]
    x_all = concat_all_gather(x)
    world = dist.get_world_size()
    idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(idx_shuffle, src=0)
    idx_unshuffle = torch.argsort(idx_shuffle)
    rank = dist.get_rank()
    mine = idx_shuffle.view(world, -1)[rank]
    assert len(mine) == batch_this
    return x_all[mine], idx_unshuffle


@torch.no_grad()
def batch_unshuffle_ddp(x: Tensor, idx_unshuffle: Tensor) -> Tensor:
    x_all = concat_all_gather(x)
    world, rank = dist.get_world_size(), dist.get_rank()
    return x_all[idx_unshuffle.view(world, -1)[rank]]


@torch.no_grad()
def shuffled_groups_forward(fn, x: Tensor, groups: int) -> Tensor:
    """Single-process shuffle-BN: run `fn` on `groups` random disjoint sub-batches so the key
    encoder's BatchNorm statistics cannot leak which query a key belongs to (MoCo's
    SplitBatchNorm idea), then restore the order."""
    if groups <= 1 or x.shape[0] < 2 * groups:
        return fn(x)
    perm = torch.randperm(x.shape[0], device=x.device)
    out = torch.cat([fn(chunk) for chunk in x[perm].chunk(groups)])
    return out[torch.argsort(perm)]

