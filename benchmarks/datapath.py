"""Data path vs ceiling: pretraining steps per second of `Pretrainer.train_epoch` fed three ways.

- full: the engine as it trains -- `CachedBatches` (memory-mapped uint8 cache, background
  gather, pinned non-blocking copy) -> `TwoViewAugment` on the device -> the method step.
- ceiling: the same `train_epoch` whose loader yields one pre-made batch already on the
  device and whose augmentation returns two pre-made views: only the step is left, so this
  is the compute ceiling of the same model and the same step code.
- pil: the same `train_epoch` fed by the reference PIL + DataLoader pipeline
  (`fgray.data.pil_reference.pil_loader`, JPEG decode and per-image transforms in worker
  processes on all cores), its two views copied to the device.

The three alternate epoch by epoch, round after round, so load from other processes falls
on all of them alike; steps/s is steps over the median epoch time, and each round's ratios
are kept to show the spread. The PIL workers are persistent and refill their queue while
the other two run, so that queue is drained before each PIL epoch: the epoch then sees the
pipeline's steady state, not a head start. Each side has one warm-up epoch first.
`data_only` times the two input pipelines without the model: what each can feed at most.
With `compile`, the ceiling is measured again, eager and with the backbones'
`forward_features` under `torch.compile` (static shapes) alternating epoch by epoch, after
two warm-up epochs that compile (reported apart).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    Case,
    Preset,
    effective_precision,
    make_pretrainer,
    make_spec,
    median,
    sync,
)
from fgray.data.loader import CachedBatches
from fgray.data.pil_reference import pil_loader
from fgray.engine.loop import Pretrainer
from fgray.models.backbone import Backbone

TARGET_OF_CEILING = 0.90
TARGET_OVER_PIL = 2.0
PIL_PREFETCH = 2  # DataLoader's default prefetch_factor: batches queued per worker


class PremadeBatches:
    """Loader stand-in: the same device batch, `steps` times per epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
        self.images, self.labels, self.steps = images, labels, steps

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.steps):
            yield self.images, self.labels, None  # (images, labels, regions): whole canvas


class PremadeViews:
    """Augmentation stand-in: two fixed views, whatever the batch."""

    def __init__(self, view1: torch.Tensor, view2: torch.Tensor) -> None:
        self.views = (view1, view2)

    def __call__(self, images: torch.Tensor, regions=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.views


class PILBatches:
    """Loader stand-in over the PIL DataLoader: `steps` batches per epoch drawn from one
    long-lived iterator (so no epoch pays the worker start-up again), each a pair of views
    moved to the device; `PassViews` hands the pair to the step unchanged."""

    def __init__(self, loader, steps: int, device: torch.device) -> None:
        self.loader, self.steps, self.device = loader, steps, device
        self._it: Iterator | None = None

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.steps

    def drain(self, batches: int) -> None:
        """Take `batches` batches without using them (empties the prefetch queue)."""
        for _ in range(batches):
            self._next()

    def _next(self):
        if self._it is None:
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)

    def __iter__(self):
        for _ in range(self.steps):
            v1, v2, y = self._next()
            yield ((v1.to(self.device, non_blocking=True), v2.to(self.device, non_blocking=True)),
                   y.to(self.device, non_blocking=True), None)

    def close(self) -> None:
        # Dropping the iterator shuts its persistent worker processes down.
        self._it = None
        self.loader = None


def pass_views(pair, regions=None):
    return pair


def timed_epoch(trainer: Pretrainer) -> float:
    """Seconds of one `train_epoch` (the engine's own clock, which syncs the device)."""
    metrics = trainer.train_epoch()
    trainer.epoch += 1  # a new permutation and schedule step next time, as in training
    return float(metrics["epoch_time_s"])


class CompiledBackbones:
    """The timm `forward_features` of every backbone (query and momentum encoders) under
    torch.compile, switchable back to eager so the two can alternate epoch by epoch."""

    def __init__(self, trainer: Pretrainer) -> None:
        self.models = [m.model for m in trainer.method.modules() if isinstance(m, Backbone)]
        self.eager = [m.forward_features for m in self.models]
        # Static shapes: the query and key encoders each see one batch shape, and automatic
        # dynamic shapes would recompile for the second one.
        self.compiled = [torch.compile(f, dynamic=False) for f in self.eager]

    def use(self, compiled: bool) -> None:
        for model, eager, fast in zip(self.models, self.eager, self.compiled):
            model.forward_features = fast if compiled else eager


def data_only(trainer: Pretrainer, pil: PILBatches, steps: int, batch: int,
              rounds: int, queued: int) -> dict[str, Any]:
    """Images per second each input pipeline delivers on the device, no model: `rounds`
    alternating runs of `steps` batches each (the PIL queue drained before each)."""
    device = trainer.device

    def cached_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = CachedBatches(trainer.train_data, batch, device=device, seed=1)
        while True:
            for images, _ in loader:
                yield trainer.augment(images)  # square synthetic canvas: no regions needed

    def pil_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            for views, _, _ in pil:
                yield views

    streams = {"cached": cached_batches(), "pil": pil_batches()}
    rates: dict[str, list[float]] = {"cached": [], "pil": []}
    for _ in range(rounds):
        for name, stream in streams.items():
            if name == "pil":
                pil.drain(queued)
            start = time.perf_counter()
            for _ in range(steps):
                next(stream)
            sync(device)
            rates[name].append(steps * batch / (time.perf_counter() - start))
    for stream in streams.values():
        stream.close()
    out: dict[str, Any] = {}
    for name, values in rates.items():
        out[f"{name}_images_per_s"] = median(values)
        out[f"{name}_images_per_s_best"] = max(values)
        out[f"{name}_images_per_s_rounds"] = values
    return out


def summarise(times: dict[str, list[float]], steps: int) -> dict[str, Any]:
    """steps/s from the median epoch and from the best (shortest) one. Other processes
    only ever add time, so on a shared machine the best epoch is the closer estimate of
    the undisturbed cost; on a dedicated one the two agree."""
    sps = {k: steps / median(v) for k, v in times.items()}
    best = {k: steps / min(v) for k, v in times.items()}

    def ratios(a: str, b: str) -> dict[str, Any]:
        return {f"{a}_over_{b}": sps[a] / sps[b], f"{a}_over_{b}_best": best[a] / best[b],
                f"{a}_over_{b}_per_round": [tb / ta for ta, tb in zip(times[a], times[b])]}

    return {"steps_per_s": sps, "steps_per_s_best": best,
            "ratios": {**ratios("full", "ceiling"), **ratios("full", "pil")}}


def measure_case(case: Case, preset: Preset, data_root: Path, cache_dir: Path,
                 device: torch.device, compile_: bool) -> dict[str, Any]:
    spec = make_spec(case, data_root, cache_dir)
    trainer = make_pretrainer(spec, device)
    steps = trainer.steps_per_epoch
    real_loader, real_augment = trainer.loader, trainer.augment

    images, labels, regions = next(iter(real_loader))
    view1, view2 = real_augment(images, regions)
    premade = (PremadeBatches(images, labels, steps), PremadeViews(view1, view2))
    pil = PILBatches(_pil_loader_for(spec, case, preset, device), steps, device)
    queued = PIL_PREFETCH * max(preset.pil_workers, 1)

    def use(loader, augment) -> None:
        trainer.loader, trainer.augment = loader, augment

    use(real_loader, real_augment)
    warm = {"full": timed_epoch(trainer)}
    use(*premade)
    warm["ceiling"] = timed_epoch(trainer)
    use(pil, pass_views)
    warm["pil"] = timed_epoch(trainer)  # starts the workers
    times: dict[str, list[float]] = {"full": [], "ceiling": [], "pil": []}
    for _ in range(preset.epochs):
        use(real_loader, real_augment)
        times["full"].append(timed_epoch(trainer))
        use(*premade)
        times["ceiling"].append(timed_epoch(trainer))
        # The idle workers filled their queue meanwhile: take those batches first, so the
        # timed epoch sees the pipeline's steady state rather than a head start.
        pil.drain(queued)
        use(pil, pass_views)
        times["pil"].append(timed_epoch(trainer))
    use(real_loader, real_augment)
    feed = data_only(trainer, pil, steps, case.batch_size, preset.epochs, queued)
    pil.close()

    summary = summarise(times, steps)
    result: dict[str, Any] = {
        "case": case.describe(),
        "precision": effective_precision(spec.train.precision, device),
        "channels_last": spec.train.channels_last and device.type == "cuda",
        "steps_per_epoch": steps, "measured_epochs": preset.epochs,
        "pil_workers": preset.pil_workers,
        **{k: {"steps_per_s": summary["steps_per_s"][k],
               "steps_per_s_best": summary["steps_per_s_best"][k], "epoch_s": times[k],
               "warmup_epoch_s": warm[k]} for k in times},
        "data_only": feed,
        "ratios": summary["ratios"],
        "targets": {"full_over_ceiling": TARGET_OF_CEILING, "full_over_pil": TARGET_OVER_PIL,
                    "apply_to": "cuda"},
    }
    if device.type == "cuda":
        use(real_loader, real_augment)
        result["host_syncs_per_step"] = count_syncs_per_step(trainer, images, labels)
    if compile_:
        result["compile"] = _measure_compiled(trainer, premade, preset.epochs)
    return result


def count_syncs_per_step(trainer: Pretrainer, images: torch.Tensor,
                         labels: torch.Tensor) -> int:
    """Host-device synchronisations one training step makes (augmentation included), from
    CUDA's sync debug mode: an epoch of two steps minus an epoch of one step, so the
    once-per-epoch read of the losses cancels out."""
    import warnings

    counts = []
    for steps in (1, 2):
        trainer.loader = PremadeBatches(images, labels, steps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.train_epoch()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return counts[1] - counts[0]


def _pil_loader_for(spec, case: Case, preset: Preset, device: torch.device):
    from fgray.data.formats import load_dataset

    ds = load_dataset(spec.data.format, spec.data.root, val_fraction=spec.data.val_fraction,
                      seed=spec.data.split_seed)
    return pil_loader(ds.split("train"), spec.augment, case.batch_size, preset.pil_workers,
                      pin_memory=device.type == "cuda")


def _measure_compiled(trainer: Pretrainer, premade, epochs: int) -> dict[str, Any]:
    """The ceiling with and without torch.compile, alternating epoch by epoch."""
    trainer.loader, trainer.augment = premade
    backbones = CompiledBackbones(trainer)
    try:
        backbones.use(True)
        start = time.perf_counter()
        warm = [timed_epoch(trainer), timed_epoch(trainer)]  # compile, and any recompile
        compile_s = time.perf_counter() - start
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(epochs):
            for name in times:
                backbones.use(name == "compiled")
                times[name].append(timed_epoch(trainer))
    except Exception as exc:  # noqa: BLE001 - a backend that cannot compile is a finding
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    finally:
        backbones.use(False)
    steps = trainer.steps_per_epoch
    return {"backbones_compiled": len(backbones.models), "warmup_epochs_s": warm,
            "warmup_s": compile_s, "epoch_s": times,
            "ceiling_steps_per_s": steps / median(times["compiled"]),
            "eager_ceiling_steps_per_s": steps / median(times["eager"]),
            "speedup_over_eager": median(times["eager"]) / median(times["compiled"]),
            "speedup_over_eager_best": min(times["eager"]) / min(times["compiled"])}


def run(preset: Preset, workdir: Path, data_root: Path, device: torch.device, *,
        compile_: bool = False) -> dict[str, Any]:
    cache_dir = workdir / "cache"
    cases = []
    for case in preset.datapath:
        print(f"[datapath] {case.name} on {device} ...", flush=True)
        r = measure_case(case, preset, data_root, cache_dir, device, compile_)
        ratios = r["ratios"]
        print(f"[datapath] {case.name}: full {r['full']['steps_per_s']:.2f} steps/s, ceiling"
              f" {r['ceiling']['steps_per_s']:.2f}, PIL {r['pil']['steps_per_s']:.2f};"
              f" full/ceiling {ratios['full_over_ceiling']:.3f}"
              f" (best epochs {ratios['full_over_ceiling_best']:.3f}),"
              f" full/PIL {ratios['full_over_pil']:.2f}"
              f" (best {ratios['full_over_pil_best']:.2f})", flush=True)
        if "compile" in r:
            c = r["compile"]
            line = (f"failed: {c['error']}" if "error" in c else
                    f"{c['ceiling_steps_per_s']:.2f} steps/s ({c['speedup_over_eager']:.2f}x"
                    f" eager, best epochs {c['speedup_over_eager_best']:.2f}x; two warm-up"
                    f" epochs {c['warmup_s']:.1f} s)")
            print(f"[datapath] {case.name}: compiled ceiling {line}", flush=True)
        cases.append(r)
    return {"cases": cases}
