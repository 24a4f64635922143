"""What every benchmark shares: the presets, the synthetic data set, building a Pretrainer,
device syncs, and the description of the machine a figure was measured on."""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fgray.data.synth import write_synthetic
from fgray.engine.loop import Pretrainer
from fgray.engine.spec import DataSpec, RunSpec, build_spec
from fgray.methods import method_class

# MoCo v2 knobs that keep tiny CPU models tiny (the engine's own tests use the same idea).
TINY_MOCO = {"queue_size": 1024, "mlp_hidden": 256, "dim": 64}


@dataclass(frozen=True)
class Case:
    """One model configuration a benchmark trains: method, backbone, input size, batch."""

    name: str
    method: str = "moco"
    backbone: str = "test_resnet"
    image_size: int = 64
    batch_size: int = 32
    sets: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SynthData:
    """The embedded synthetic set (CUB layout): `size` is the JPEG side on disk, which is
    what the PIL reference decodes every step and the cache decodes once."""

    classes: int = 8
    per_class: int = 24
    size: int = 96


@dataclass(frozen=True)
class Preset:
    name: str
    data: SynthData
    datapath: tuple[Case, ...]
    epochs: int  # datapath rounds (one epoch of each side per round) after a warm-up epoch
    ray: Case
    ray_epochs: int
    study: Case
    study_trials: int  # per method
    study_epochs: int
    memory: tuple[Case, ...]
    scaling: Case
    scaling_steps: int
    pil_workers: int  # DataLoader workers of the PIL reference
    study_methods: tuple[str, ...] = ("moco",)  # searched in one study
    # Each method's settings (qualified keys); None: `study.sets` for every method.
    study_fixed: dict[str, dict[str, Any]] | None = None
    study_protocols: tuple[str, ...] = ("knn",)  # the test evaluations' protocols
    study_init: str = "random"
    study_seeds: int = 1  # seeds of each method's best (retrains: seeds - 1)
    study_data: SynthData | None = None  # the study's own set (None: `data`)
    study_val_fraction: float = 0.1
    driver_sizes: tuple[int, ...] = (20, 200, 2000)  # trials of the driver benchmark's studies


def study_preset_case(name: str, method: str = "moco") -> Case:
    """MoCo v2 at the scale of the study preset `name` (fgray.tune.presets), the preset a
    user picks with `studies/cub_sweep.py --preset NAME`. Random init: memory does not
    depend on the weights, and ImageNet weights may not be at hand."""
    from fgray.tune.presets import get_preset

    p = get_preset(name)
    return Case(name, method=method,
                backbone=p.backbone_for(method) or method_class(method).default_backbone,
                image_size=p.image_size, batch_size=p.batch_size, sets=p.settings_for(method))


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def presets(tiny: bool = False) -> dict[str, Preset]:
    from fgray.tune.presets import get_preset

    cores = _cpu_count() or 1
    smoke, paper = study_preset_case("smoke"), study_preset_case("paper")
    smoke_preset = get_preset("smoke")
    cpu_case = Case("moco-test_resnet-64px", image_size=64, batch_size=32, sets=TINY_MOCO)
    hot_path = dataclasses.replace(smoke, name=f"moco-{smoke.backbone}-{smoke.image_size}px")
    cpu = Preset(
        name="cpu", data=SynthData(classes=8, per_class=48, size=96),
        # The main job's hot path: MoCo on tf_efficientnet_lite0 at the smoke preset's size.
        datapath=(cpu_case, dataclasses.replace(
            cpu_case, name="mocov3-test_vit-64px", method="mocov3", backbone="test_vit",
            sets={"mlp_hidden": 256, "dim": 64}),
            hot_path),
        # The Ray comparison on the main job's hot path too: its 2-3-s epochs outlast what the
        # Ray daemons take from a 2-core host now and then (test_resnet's 0.4-s epochs made
        # the ratio swing from 0.96 to 1.11 between two runs).
        epochs=8, ray=hot_path, ray_epochs=6,
        # The smoke preset's study (the README's main job): its methods, network, size, set,
        # validation split and per-method settings; two trials each, the best of each
        # retrained over two more seeds, every final model and the initial weights tested.
        study=dataclasses.replace(smoke, name=f"smoke-{smoke.backbone}-{smoke.image_size}px"),
        study_trials=smoke_preset.trials, study_epochs=smoke_preset.epochs,
        study_methods=tuple(smoke_preset.methods), study_seeds=smoke_preset.seeds,
        study_fixed={m: smoke_preset.settings_for(m) for m in smoke_preset.methods},
        study_protocols=tuple(smoke_preset.protocols), study_init=smoke_preset.init,
        study_data=SynthData(**smoke_preset.synthetic),
        study_val_fraction=smoke_preset.val_fraction,
        memory=(smoke, paper), scaling=cpu_case, scaling_steps=10, pil_workers=cores)
    if tiny:
        small = Case("moco-test_resnet-32px", image_size=32, batch_size=16,
                     sets={"queue_size": 64, "mlp_hidden": 64, "dim": 32})
        cpu = dataclasses.replace(
            cpu, data=SynthData(classes=4, per_class=16, size=40), datapath=(small,), epochs=1,
            ray=small, ray_epochs=2, study=small, study_trials=2, study_epochs=1,
            study_methods=("moco",), study_seeds=1, study_fixed=None, study_protocols=("knn",),
            study_init="random", study_data=None, study_val_fraction=0.1, driver_sizes=(4, 8),
            memory=(dataclasses.replace(small, name="smoke"),), scaling=small, scaling_steps=2,
            pil_workers=min(cores, 2))
    gpu_r50 = Case("moco-resnet50-224px", backbone="resnet50", image_size=224, batch_size=128)
    gpu = Preset(
        # CUB images are about 500 x 375: the PIL reference decodes JPEGs of that order.
        name="gpu", data=SynthData(classes=50, per_class=100, size=448),
        datapath=(gpu_r50, Case("mocov3-vit_base_patch16_224-224px", method="mocov3",
                                backbone="vit_base_patch16_224", image_size=224,
                                batch_size=128)),
        epochs=5, ray=gpu_r50, ray_epochs=4, study=Case(
            "moco-resnet18-112px", backbone="resnet18", image_size=112, batch_size=64),
        study_trials=8, study_epochs=2, memory=(smoke, paper), scaling=gpu_r50,
        scaling_steps=20, pil_workers=cores)
    return {"cpu": cpu, "gpu": gpu}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(root: Path, data: SynthData) -> Path:
    out = root / f"synth-{data.classes}x{data.per_class}-{data.size}px"
    write_synthetic(out, classes=data.classes, per_class=data.per_class, size=data.size,
                    seed=0, progress=False)
    return out


def make_spec(case: Case, data_root: Path, cache_dir: Path, *, epochs: int = 100,
              **train: Any) -> RunSpec:
    # No validation split: the datapath and memory benchmarks time training only, and the
    # run benchmarks keep evaluation identical on both sides of a ratio.
    data = DataSpec(format="cub", root=str(data_root), val_fraction=train.pop("val_fraction", 0.0),
                    cache_dir=str(cache_dir))
    return build_spec(case.method, data, backbone=case.backbone,
                      train={"epochs": epochs, "batch_size": case.batch_size,
                             "image_size": case.image_size, **train},
                      sets=dict(case.sets))


def make_pretrainer(spec: RunSpec, device: torch.device) -> Pretrainer:
    from fgray.engine.run import build_pretrainer

    return build_pretrainer(spec, device=device, progress=False)


def effective_precision(precision: str, device: torch.device) -> str:
    """What `fgray.engine.loop.autocast_for` does with the setting on this device."""
    return "bf16" if precision == "bf16" or (precision == "auto" and device.type == "cuda") \
        else "fp32"


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def host_rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def hardware() -> dict[str, Any]:
    """The machine a run measured: enough to tell whether two result files compare."""
    model = platform.processor() or ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu_model": model, "cpus": _cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def elapsed(start: float) -> float:
    return time.perf_counter() - start
