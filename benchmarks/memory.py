"""Memory: peak host RSS and peak device memory of one worker training a preset.

Each preset trains in a fresh process (a process's peak RSS only ever grows, so presets
measured in one process would hide each other): `run.py --child memory` builds the same
Pretrainer an in-process run builds and trains one epoch. Host RSS counts the pages of the
memory-mapped cache that the epoch touched (file-backed, shared between workers on a node,
dropped by the kernel under pressure); `cache_mb` gives their upper bound. The paper preset
(ResNet-50 at 224 px, batch 128) is measured on a GPU only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Case, Preset, effective_precision, host_rss_peak_mb
from benchmarks.ray_overhead import warm_cache

RUN_PY = Path(__file__).resolve().parent / "run.py"
GPU_ONLY = {"paper"}


def _current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in the fresh process: build, train one epoch, report the peaks."""
    from benchmarks.common import make_pretrainer, make_spec

    case = Case(**job["case"])
    device = torch.device(job["device"])
    start_rss = _current_rss_mb()
    spec = make_spec(case, Path(job["data_root"]), Path(job["cache_dir"]))
    trainer = make_pretrainer(spec, device)
    built_rss = _current_rss_mb()
    metrics = trainer.train_epoch()
    out = {
        "case": case.describe(), "device": str(device),
        "precision": effective_precision(spec.train.precision, device),
        "steps": trainer.steps_per_epoch, "images_per_s": metrics["images_per_s"],
        "params_m": sum(p.numel() for p in trainer.method.parameters()) / 1e6,
        "cache_mb": trainer.train_data.images.nbytes / 2**20,
        "host_rss_start_mb": start_rss, "host_rss_after_build_mb": built_rss,
        "host_rss_peak_mb": host_rss_peak_mb(),
    }
    if device.type == "cuda":
        out["device_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["device_peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
        out["device_total_mb"] = torch.cuda.get_device_properties(device).total_memory / 2**20
    return out


def run(preset: Preset, workdir: Path, data_root: Path, device: torch.device) -> dict[str, Any]:
    rows = []
    for case in preset.memory:
        if case.name in GPU_ONLY and device.type != "cuda":
            print(f"[memory] {case.name}: skipped, measured on a GPU only", flush=True)
            rows.append({"case": case.describe(),
                         "skipped": "GPU only: run `python benchmarks/run.py --preset gpu"
                                    " --only memory` on a CUDA machine"})
            continue
        warm_cache(case, data_root, workdir / "cache", val_fraction=0.0)  # as make_spec
        job = {"case": case.describe(), "device": str(device), "data_root": str(data_root),
               "cache_dir": str(workdir / "cache")}
        print(f"[memory] {case.name} in a fresh process ...", flush=True)
        proc = subprocess.run([sys.executable, str(RUN_PY), "--child", "memory", json.dumps(job)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child for {case.name} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        line = f"host RSS peak {row['host_rss_peak_mb']:.0f} MB"
        if "device_peak_allocated_mb" in row:
            line += (f", device peak {row['device_peak_allocated_mb']:.0f} MB allocated"
                     f" / {row['device_peak_reserved_mb']:.0f} MB reserved")
        print(f"[memory] {case.name}: {line}", flush=True)
        rows.append(row)
    return {"presets": rows, "workers": 1,
            "note": "one worker = one process; a Ray Train worker holds the same Pretrainer"}
