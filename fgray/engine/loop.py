"""One worker's pretraining loop: plain torch, no Ray.

`Pretrainer` owns the method, the optimiser, the batch stream and the augmentation. It trains
epoch by epoch; after each it checks the loss and the weights are finite, evaluates kNN on
the validation split (rank 0), writes a checkpoint holding everything needed to continue
exactly (model, momentum encoders and queue, optimiser, epoch, and every rank's own RNG and
augmentation generator states, gathered to rank 0) and calls the epoch hook. Loss terms
are accumulated on the device and read once per epoch, so the step never waits on the host.
Every `visual_every` epochs, a visuals hook gets the methods' spatial maps and image pairs of
a fixed set of validation images (for TensorBoard); the engine never writes them itself.
"""

from __future__ import annotations

import math
import pickle
import re
import resource
import shutil
import time
import warnings
import zipfile
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from fgray.data.augment import AugmentConfig, TwoViewAugment, eval_transform
from fgray.data.cache import CachedSplit
from fgray.data.loader import CachedBatches
from fgray.engine.features import embed_split
from fgray.engine.optim import OptimConfig, build_optimizer, clip_gradients, lr_factor, set_lr
from fgray.engine.selection import SELECTION_METRIC
from fgray.engine.spec import TrainConfig
from fgray.engine.stepclock import StepClock, process_facts
from fgray.errors import UserError
from fgray.eval.knn import knn_classify
from fgray.eval_mode import eval_mode
from fgray.methods.base import Method, StepInfo
from fgray.storage import atomic_path

EpochHook = Callable[[dict[str, Any], Path | None], None]
# (epoch, images uint8 (N,3,S,S), {name: map (N,h,w)}, {name: (a, b) images in [0, 1]})
Visuals = tuple[Tensor, dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]
VisualsHook = Callable[[int, Tensor, dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]], None]
CHECKPOINT_FILE = "checkpoint.pt"


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """An fgray checkpoint file's contents, loaded with `weights_only=True`: tensors and plain
    Python types only, so a file that pickles code (an object whose `__reduce__` runs
    something) is refused before anything in it runs. Anyone who can write a shared study
    bucket could otherwise run code on everyone who evaluates or resumes from it."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # torch.save's format is a zip archive
        raise UserError(f"{path}: not an fgray checkpoint (not a torch.save file)")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f"it pickles {found.group(1)}" if found else "it holds more than tensors"
        raise UserError(f"{path}: refused: not a plain fgray checkpoint ({what}; nothing in "
                        "it was run)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not an fgray checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not {"model", "meta", "epoch"} <= set(state):
        raise UserError(f"{path}: not an fgray checkpoint (expected model, meta and epoch)")
    return state


def to_channels_last(method: Method, cfg: TrainConfig) -> bool:
    """Move a CNN method to channels-last when `cfg.channels_last`; returns whether it did
    (its inputs should then be channels-last too). Faster on GPUs, and on CPUs too (oneDNN):
    measured 1.5x for tf_efficientnet_lite0's forward + backward at 96 px on one core
    (benchmarks/datapath.py), 1.5-2x for its forward alone. ViTs have no convolutions to
    speed up."""
    use = cfg.channels_last and not method.backbone.is_vit
    if use:
        method.to(memory_format=torch.channels_last)
    return use


def autocast_for(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Pretrainer:
    def __init__(self, method: Method, train_data: CachedSplit, val_data: CachedSplit | None,
                 cfg: TrainConfig, optim_cfg: OptimConfig, aug_cfg: AugmentConfig, *,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                 checkpoint_dir: str | Path | None = None, meta: dict | None = None,
                 on_epoch: EpochHook | None = None,
                 on_visuals: VisualsHook | None = None) -> None:
        """`on_visuals` is called on rank 0 only, but with several workers every rank must be
        given one: the maps are computed on all ranks, as a method may all-gather inside."""
        self.device = torch.device(device)
        self.cfg, self.optim_cfg = cfg, optim_cfg
        self.rank, self.world_size = rank, world_size
        self.meta = meta or {}
        self.on_epoch = on_epoch
        self.on_visuals = on_visuals
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.train_data, self.val_data = train_data, val_data
        if cfg.batch_size % world_size:
            raise UserError(f"batch size {cfg.batch_size} is not divisible by {world_size}"
                            " workers: expected a multiple of the worker count")
        per_rank = cfg.batch_size // world_size
        if len(train_data) < cfg.batch_size:
            raise UserError(f"batch size {cfg.batch_size} exceeds the train split"
                            f" ({len(train_data)} images): expected at most {len(train_data)}")

        self.method = method.to(self.device)
        self.channels_last = to_channels_last(self.method, cfg)
        self.model: nn.Module = self.method
        if world_size > 1:
            if method.sync_bn:
                self.method = nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
            ids = [self.device.index] if self.device.type == "cuda" else None
            # The MoCo queue is identical on every rank (keys are all-gathered), and
            # re-broadcasting it each step would cost more than the gradients.
            self.model = nn.parallel.DistributedDataParallel(
                self.method, device_ids=ids, broadcast_buffers=False)
        self.optimizer = build_optimizer(self.method.param_groups(), optim_cfg, cfg.batch_size,
                                         fused=self.device.type == "cuda"
                                         and cfg.fused_optimizer and optim_cfg.optimizer != "lars")
        self.loader = CachedBatches(train_data, per_rank, device=self.device, seed=cfg.seed,
                                    rank=rank, world_size=world_size, with_regions=True)
        self.augment = TwoViewAugment(aug_cfg, seed=cfg.seed * 1000 + rank)
        self.norm = {"mean": aug_cfg.mean, "std": aug_cfg.std}  # the backbone's, for eval views
        self.steps_per_epoch = len(self.loader)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = int(round(optim_cfg.warmup_epochs * self.steps_per_epoch))
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, Any]] = []
        self.step_clock = StepClock(self.device)  # off unless FGRAY_STEP_CLOCK=1 (stepclock)

    # -- checkpoints --------------------------------------------------------------------------

    def rank_state(self) -> dict[str, Any]:
        """This rank's own random state: torch (and CUDA) RNG and the augmentation generator,
        as CPU tensors in plain dicts (what `weights_only` loading accepts)."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"rng": rng, "augment": self.augment.state_dict()}

    def gather_rank_states(self) -> list[dict[str, Any]]:
        """Every rank's `rank_state`, in rank order, on every rank (a collective: all ranks
        must call it together)."""
        own = self.rank_state()
        if self.world_size == 1:
            return [own]
        states: list[Any] = [None] * self.world_size
        device = torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()
        with device:  # NCCL's object collectives use the current CUDA device
            dist.all_gather_object(states, own)
        return states

    def state_dict(self, rank_states: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The checkpoint. `rank_states` (`gather_rank_states`) are stored per rank, so each
        rank of a resumed run continues with its own random streams; without them this rank's
        own. "rng"/"augment" hold rank 0's, as checkpoints before format 2 did."""
        rank_states = rank_states or [self.rank_state()]
        return {"format": 2, "meta": self.meta, "epoch": self.epoch,
                "model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "augment": rank_states[0]["augment"], "rng": rank_states[0]["rng"],
                "world_size": len(rank_states),
                "rng_per_rank": [r["rng"] for r in rank_states],
                "augment_per_rank": [r["augment"] for r in rank_states],
                "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint; each rank takes its own RNG and augmentation state.

        A checkpoint written by a different number of workers (or before per-rank states were
        kept, by more than one) cannot continue exactly: with a warning, every rank takes rank
        0's torch/CUDA RNG, rank 0 its augmentation generator, and every other rank reseeds
        its generator from (seed, rank, epoch), so ranks still draw different augmentations."""
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        per_rng, per_aug = state.get("rng_per_rank"), state.get("augment_per_rank")
        saved = len(per_rng) if per_rng else None
        if per_rng and per_aug and saved == len(per_aug) == self.world_size:
            rng, augment = per_rng[self.rank], per_aug[self.rank]
        else:
            if saved != self.world_size and (saved is not None or self.world_size > 1) \
                    and self.rank == 0:
                written = f"{saved} workers" if saved else "an unknown number of workers"
                warnings.warn(f"checkpoint written by {written}, resumed with "
                              f"{self.world_size}: the run continues, but not exactly as an "
                              "uninterrupted one (random streams restored from rank 0's)",
                              RuntimeWarning, stacklevel=3)
            rng, augment = state["rng"], state["augment"]
            if self.rank != 0:
                augment = None
        if augment is not None:
            self.augment.load_state_dict(augment)
        else:
            self.augment.gen.manual_seed(
                (self.cfg.seed * 1000 + self.rank) * 1_000_003 + self.epoch)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def resume(self, path: str | Path) -> None:
        self.load_state_dict(read_checkpoint(path, self.device))

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes the epoch's checkpoint; every rank must call it (the ranks' random
        states are gathered first)."""
        rank_states = self.gather_rank_states()
        if self.rank != 0 or self.checkpoint_dir is None:
            return None
        out = self.checkpoint_dir / f"epoch-{self.epoch:04d}"
        with atomic_path(out) as tmp:  # a reader sees no checkpoint or a whole one
            tmp.mkdir()
            torch.save(self.state_dict(rank_states), tmp / CHECKPOINT_FILE)
        kept = sorted(p for p in self.checkpoint_dir.glob("epoch-*") if not p.name.endswith(".tmp"))
        for old in kept[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return out

    # -- training -----------------------------------------------------------------------------

    def train_epoch(self) -> dict[str, float]:
        self.model.train()
        self.loader.set_epoch(self.epoch)
        sums: dict[str, torch.Tensor] = {}
        steps, lr = 0, 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        clock = self.step_clock
        start = time.perf_counter()
        clock.start()
        for images, _, regions in self.loader:
            clock.lap("data")
            step = self.epoch * self.steps_per_epoch + steps
            lr = set_lr(self.optimizer, lr_factor(step, self.total_steps, self.warmup_steps,
                                                  self.optim_cfg.min_lr_ratio))
            info = StepInfo(epoch=self.epoch, step=step, progress=step / self.total_steps,
                            epochs=self.cfg.epochs)
            view1, view2 = self.augment(images, regions)  # crops anywhere in each image
            if self.channels_last:
                view1 = view1.contiguous(memory_format=torch.channels_last)
                view2 = view2.contiguous(memory_format=torch.channels_last)
            clock.lap("augment")
            with autocast_for(self.device, self.cfg.precision):
                terms = self.model(view1, view2, info)
            self.optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            clock.lap("compute")
            clip_gradients(self.method, self.optim_cfg.grad_clip)
            self.optimizer.step()
            self.method.momentum_update((step + 1) / self.total_steps)
            clock.lap("optimizer")
            for name, value in terms.items():
                value = value.detach().float()
                sums[name] = sums[name] + value if name in sums else value
            steps += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        names = sorted(sums)
        stacked = torch.stack([sums[n] for n in names]) / max(steps, 1)
        if self.world_size > 1:
            dist.all_reduce(stacked)
            stacked /= self.world_size
        values = dict(zip(names, stacked.tolist()))
        if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(f"non-finite loss at epoch {self.epoch + 1}: {values}")
        out = {("loss" if n == "loss" else f"loss_{n}"): v for n, v in values.items()}
        out.update(lr=lr, epoch_time_s=seconds,
                   images_per_s=steps * self.cfg.batch_size / max(seconds, 1e-9),
                   peak_mem_mb=peak_memory_mb(self.device), **process_facts(), **clock.report())
        return out

    @torch.no_grad()
    def check_finite_weights(self) -> None:
        """Raise FloatingPointError naming the epoch when a parameter or buffer (BN statistics,
        queue) is no longer finite: a step can diverge after its loss was read (the last step
        of an epoch) and leave NaN weights behind. One host sync per epoch; with several
        ranks the verdict is all-reduced, so every rank stops at the same point."""
        named = [(n, t) for n, t in (*self.method.named_parameters(),
                                     *self.method.named_buffers()) if t.is_floating_point()]
        if not named:
            return
        bad = torch.stack([~torch.isfinite(t).all() for _, t in named]).float()
        if self.world_size > 1:
            dist.all_reduce(bad)
        flags = bad.cpu()
        if flags.any():
            names = [n for (n, _), f in zip(named, flags.tolist()) if f]
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise FloatingPointError(f"non-finite weights after epoch {self.epoch}: {shown}")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """kNN top-1/top-5 on the validation split, the train split as the memory bank."""
        if self.val_data is None or self.rank != 0:
            return {}
        size, bs, m = self.cfg.image_size, self.cfg.eval_batch_for(self.device), self.method
        layout = {"channels_last": self.channels_last, **self.norm}
        with autocast_for(self.device, self.cfg.precision):
            bank, bank_labels = embed_split(m, m.embed, self.train_data, size, bs, self.device,
                                            **layout)
            feats, labels = embed_split(m, m.embed, self.val_data, size, bs, self.device,
                                        **layout)
        if not (torch.isfinite(bank).all() and torch.isfinite(feats).all()):  # not the data's
            raise FloatingPointError(f"non-finite embeddings at epoch {self.epoch} (val kNN): "
                                     "the model overflows")
        knn = knn_classify(bank.float(), bank_labels, feats.float(), labels, k=self.cfg.knn_k,
                           temperature=self.cfg.knn_temperature,
                           num_classes=self.train_data.num_classes)
        return {SELECTION_METRIC: knn["top1"], "val_knn_top5": knn["top5"]}

    def visuals(self, count: int = 8) -> Visuals | None:
        """The first `count` validation images (the same every epoch) as uint8 at image_size,
        cropped like the eval transform, with the method's spatial maps and image pairs of
        them, all on the CPU; None without a validation split.

        Runs in eval mode on every rank that calls it (shuffle-BN may all-gather); the RNG
        state is restored afterwards, so visuals never change the training that follows."""
        if self.val_data is None or len(self.val_data) == 0:
            return None
        raw = torch.from_numpy(np.array(self.val_data.images[:count])).to(self.device)
        view = eval_transform(raw, self.cfg.image_size, **self.norm,
                              regions=self.val_data.regions[:count])
        mean = torch.tensor(self.norm["mean"], device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.norm["std"], device=self.device).view(1, 3, 1, 1)
        shown = ((view * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        devices = [self.device] if self.device.type == "cuda" else []
        # no_grad outside; a method that needs input gradients enables them itself
        with eval_mode(self.method), torch.random.fork_rng(devices=devices), torch.no_grad():
            maps = self.method.spatial_maps(view)
            pairs = self.method.pair_images(view)
        maps = {k: v.detach().float().cpu() for k, v in maps.items()}
        pairs = {k: (a.detach().float().cpu(), b.detach().float().cpu())
                 for k, (a, b) in pairs.items()}
        return shown.cpu(), maps, pairs

    def run(self) -> list[dict[str, Any]]:
        """Train the remaining epochs; returns the metrics of every epoch of the run."""
        while self.epoch < self.cfg.epochs:
            metrics = self.train_epoch()
            self.epoch += 1
            self.check_finite_weights()  # before evaluating: NaN features would blame the data
            if self.epoch % self.cfg.eval_every == 0 or self.epoch == self.cfg.epochs:
                metrics.update(self.evaluate())
            metrics["epoch"] = self.epoch
            self.history.append(metrics)
            every = self.cfg.visual_every
            if self.on_visuals is not None and every and self.epoch % every == 0:
                shown = self.visuals()
                if shown is not None and self.rank == 0:
                    self.on_visuals(self.epoch, *shown)
            path = self.save_checkpoint()
            if self.on_epoch is not None:
                self.on_epoch(metrics, path)
        return self.history
