"""Batches of cached uint8 images moved to the training device, sharded across ranks.

A background thread gathers the next batch from the memory-mapped cache (a fancy-indexed
copy), pins it when the device is a GPU and starts a non-blocking copy, so the host work
overlaps the previous step. Every rank sees a disjoint shard of a per-epoch permutation that
depends only on (seed, epoch), as DistributedSampler does.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from fgray.data.cache import CachedSplit


class CachedBatches:
    def __init__(self, data: CachedSplit, batch_size: int, *, device: torch.device | str = "cpu",
                 shuffle: bool = True, drop_last: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, prefetch: int = 2, with_regions: bool = False) -> None:
        """`with_regions`: batches are (images, labels, regions) with the images' cache
        regions (`CachedSplit.regions`) as a host tensor -- the augmentation draws its crops
        on the host, so they never travel to the device and back."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.data, self.batch_size = data, batch_size
        self.device = torch.device(device)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self.with_regions = with_regions
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        n = len(self.data)
        order = (np.random.default_rng((self.seed, self.epoch)).permutation(n) if self.shuffle
                 else np.arange(n))
        per_rank = n // self.world_size if self.drop_last else -(-n // self.world_size)
        order = np.resize(order, per_rank * self.world_size)  # pad by wrapping, as DDP does
        return order[self.rank::self.world_size]

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _load(self, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        # Sorted reads are sequential on the memmap; the permutation is restored after.
        order = np.argsort(idx, kind="stable")
        images = np.empty((len(idx),) + self.data.images.shape[1:], dtype=np.uint8)
        images[order] = self.data.images[idx[order]]
        x = torch.from_numpy(images)
        y = torch.from_numpy(self.data.labels[idx])
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        batch = (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
        if self.with_regions:
            batch += (torch.from_numpy(np.ascontiguousarray(self.data.regions[idx])),)
        return batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        idx = self._indices()
        bounds = range(0, len(idx), self.batch_size)
        batches = [idx[i:i + self.batch_size] for i in bounds]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.prefetch <= 0:
            for b in batches:
                yield self._load(b)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work() -> None:
            try:
                for b in batches:
                    if stop.is_set():
                        return
                    q.put(self._load(b))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                q.put(exc)
                return
            q.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.01)


def iterate_eval(data: CachedSplit, batch_size: int, device) -> Iterator[tuple[torch.Tensor,
                                                                              torch.Tensor]]:
    """All images of a split in order, once (no sharding)."""
    yield from CachedBatches(data, batch_size, device=device, shuffle=False, drop_last=False)
