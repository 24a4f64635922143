"""Run fgray's benchmarks and write their figures as JSON.

    python benchmarks/run.py --preset cpu            # tiny models, a few minutes on 2 cores
    python benchmarks/run.py --preset gpu            # ResNet-50 / ViT-B/16 at 224 px, bf16
    python benchmarks/run.py --preset cpu --only datapath --tiny --out /tmp/bench.json
    python benchmarks/run.py --preset cpu --only ray --merge   # re-run one, keep the rest
    python benchmarks/report.py results-cpu.json   # the tables of RESULTS.md

The JSON goes to `results-<preset>.json` in the current folder (or `--out`), never into the
repository: the reference figures live in benchmarks/RESULTS.md.

Benchmarks: datapath (cached on-device path vs compute ceiling vs PIL reference), ray
(1-worker TorchTrainer vs in-process), study (study wall time vs trial time / concurrency and
each trial's fixed cost, with trials in their own process and as 1-worker Ray Train runs),
memory (peak host RSS and device memory per worker), scaling (a DDP efficiency model from
the measured step time and collective payload), driver (the study driver's own time per
trial at 20, 200 and 2,000 trials, with a trivial trainable: it must stay flat). Each prints
its ratios as it goes; the JSON holds every measured number, the machine and the load
average before and after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NAMES = ("datapath", "ray", "study", "memory", "scaling", "driver")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--only", default=None,
                   help=f"comma list of benchmarks to run (of {', '.join(NAMES)})")
    p.add_argument("--out", default=None,
                   help="JSON file to write (default results-<preset>.json in the current "
                        "folder)")
    p.add_argument("--tiny", action="store_true",
                   help="cpu preset: the smallest settings (for the CI smoke test; the"
                        " figures mean nothing)")
    p.add_argument("--compile", action="store_true",
                   help="datapath: also measure the ceiling with torch.compile'd backbones")
    p.add_argument("--nvlink-gbps", type=float, default=2400.0,
                   help="scaling: intra-node (NVLink) bandwidth per GPU, Gb/s per direction")
    p.add_argument("--inter-gbps", default="25,100,400",
                   help="scaling: inter-node bandwidths per node to model, Gb/s, comma list")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--merge", action="store_true",
                   help="keep the other benchmarks already in --out (same preset): re-run one"
                        " noisy benchmark without the rest")
    p.add_argument("--workdir", default=None,
                   help="folder for the synthetic data, caches and runs (default: a temp dir,"
                        " removed at the end)")
    # Internal: `--child memory|study JSON` runs one measurement in a fresh process.
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def selected(only: str | None) -> list[str]:
    if not only:
        return list(NAMES)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise SystemExit(f"--only {only}: unknown benchmark {', '.join(unknown)}; expected"
                         f" names from {', '.join(NAMES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        kind, job = args.child
        if kind == "memory":
            from benchmarks.memory import child
        else:
            from benchmarks.study_overhead import child
        print(json.dumps(child(json.loads(job)), default=str), flush=True)
        return 0

    import torch

    from benchmarks import common

    names = selected(args.only)
    if args.preset == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--preset gpu: CUDA is not available on this machine; expected a GPU"
                         " (use --preset cpu here)")
    try:
        inter = [float(x) for x in args.inter_gbps.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--inter-gbps {args.inter_gbps}: expected a comma list of numbers"
                         ) from None
    preset = common.presets(tiny=args.tiny)[args.preset]
    device = common.default_device()
    out = Path(args.out or f"results-{args.preset}.json").resolve()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fgray-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {"preset": args.preset, "tiny": args.tiny,
                              "hardware": common.hardware(),
                              "load_average_before": common.load_average(), "benchmarks": {}}
    if args.merge and out.is_file():
        kept = json.loads(out.read_text())
        if (kept.get("preset"), kept.get("tiny")) != (args.preset, args.tiny):
            raise SystemExit(f"--merge: {out} holds preset {kept.get('preset')!r} (tiny:"
                             f" {kept.get('tiny')}); expected {args.preset!r} (tiny: {args.tiny})")
        report["benchmarks"] = {k: v for k, v in kept["benchmarks"].items() if k not in names}
    print(f"fgray benchmarks, preset {args.preset}{' (tiny)' if args.tiny else ''}, device"
          f" {device}, load average {report['load_average_before']}", flush=True)
    try:
        data_root = common.make_data(workdir, preset.data)
        for name in names:
            meta = {"started": common.hardware()["date"],
                    "load_average_before": common.load_average()}
            start = time.perf_counter()
            result = run_one(name, args, preset, workdir, data_root, device, inter)
            # Each benchmark says when it ran and how busy the machine was meanwhile.
            result["meta"] = {**meta, "seconds": time.perf_counter() - start,
                              "load_average_after": common.load_average()}
            report["benchmarks"][name] = result
            _write(out, report)  # partial results survive a later failure
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["load_average_after"] = common.load_average()
    _write(out, report)
    print(f"wrote {out}", flush=True)
    return 0


def run_one(name: str, args, preset, workdir: Path, data_root: Path, device,
            inter: list[float]) -> dict[str, Any]:
    if name == "datapath":
        from benchmarks import datapath

        return datapath.run(preset, workdir, data_root, device, compile_=args.compile)
    if name == "ray":
        from benchmarks import ray_overhead

        return ray_overhead.run(preset, workdir, data_root, device)
    if name == "study":
        from benchmarks import study_overhead

        return study_overhead.run(preset, workdir, data_root, device)
    if name == "memory":
        from benchmarks import memory

        return memory.run(preset, workdir, data_root, device)
    if name == "driver":
        from benchmarks import driver

        return driver.run(preset.driver_sizes, workdir)
    from benchmarks import scaling

    return scaling.run(preset, workdir, data_root, device, nvlink_gbps=args.nvlink_gbps,
                       inter_gbps=inter, gpus_per_node=args.gpus_per_node)


def _write(path: Path, report: dict[str, Any]) -> None:
    from fgray.storage import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    if __package__ in (None, ""):
        # Run as a script: import `benchmarks` from the repository root, and keep this folder
        # off the path so its module names cannot shadow installed ones.
        sys.path[0] = str(Path(__file__).resolve().parent.parent)
    sys.exit(main())
