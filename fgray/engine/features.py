"""Embedding a cached split with the eval transform (resize + centre crop), in eval mode."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fgray.data.augment import eval_transform
from fgray.data.cache import CachedSplit
from fgray.data.loader import iterate_eval
from fgray.eval_mode import eval_mode


@torch.no_grad()
def embed_split(module: nn.Module, embed: Callable[[Tensor], Tensor], data: CachedSplit,
                image_size: int, batch_size: int, device: torch.device, *,
                mean: tuple[float, ...], std: tuple[float, ...], channels_last: bool = False,
                ) -> tuple[Tensor, Tensor]:
    """Features and labels of every image of `data`, in cache order, each view normalised
    with the backbone's `mean` / `std` (and channels-last for a channels-last `module`);
    `module` is put in eval mode for the pass and restored after."""
    feats, labels = [], []
    with eval_mode(module):
        start = 0  # iterate_eval keeps cache order, so the regions follow by offset
        for images, y in iterate_eval(data, batch_size, device):
            regions = data.regions[start:start + len(y)]
            start += len(y)
            view = eval_transform(images, image_size, mean=mean, std=std, regions=regions)
            if channels_last:
                view = view.contiguous(memory_format=torch.channels_last)
            feats.append(embed(view).float())
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)
