"""Scaling, on paper: a model of DDP efficiency for 1-64 GPUs from measured inputs.

Measured here:
- the single-device step time, split into forward (query and key encoders), backward and
  optimiser + momentum update, with a device sync between the phases (the best of a few
  steps of the engine's step on one device-resident batch, after a warm-up step);
- the gradient all-reduce payload: the sizes of the trainable parameters' gradients (DDP
  reduces gradients in the parameters' dtype);
- the other collectives one step issues, by running the method's forward once with a
  recording stand-in for torch.distributed (world size 2) on the meta device: MoCo v2's
  shuffle-BN all-gathers the key view and the keys and broadcasts the permutation; the queue
  update all-gathers the keys. Meta tensors carry no autocast, so these sizes are fp32
  (the keys of a bf16 run are half as big; the images are fp32 either way).

The model (stated assumptions; efficiency = single-device step / n-device step at a fixed
per-device batch, i.e. weak scaling):
- ring all-reduce of B bytes on n ranks costs 2(n-1)/n * B / bw; a ring all-gather of b bytes
  per rank costs (n-1) * b / bw; a broadcast costs b / bw. Bandwidth only: no per-message
  latency, no congestion, nominal link rates.
- bw is the NVLink rate per GPU while n <= gpus_per_node, else the inter-node rate of one
  node's network (a ring crossing nodes is bound by its slowest hop, and all eight GPUs of
  a node share that node's link).
- without overlap, step(n) = compute + all-reduce + gathers. With overlap, DDP's bucketed
  all-reduce runs during the backward pass: step(n) = compute + max(0, all-reduce - backward)
  + gathers (the gathers sit on the forward's critical path and do not overlap).
"""

from __future__ import annotations

import math
import time
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
from fgray.engine.loop import autocast_for
from fgray.engine.optim import clip_gradients
from fgray.methods import build_method
from fgray.methods import common as method_common
from fgray.methods.base import StepInfo

GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)


class RecordingDist:
    """Stands in for `torch.distributed` inside fgray.methods.common: reports a world of
    `world` ranks, records each collective's per-rank bytes, and fills gathers with copies
    of this rank's tensor so the forward runs to the end in one process."""

    def __init__(self, world: int = 2) -> None:
        self.world = world
        self.calls: list[dict[str, Any]] = []

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return self.world

    def get_rank(self) -> int:
        return 0

    def all_gather(self, out: list[torch.Tensor], x: torch.Tensor) -> None:
        self.calls.append({"op": "all_gather", "bytes_per_rank": x.numel() * x.element_size(),
                           "shape": list(x.shape), "dtype": str(x.dtype)})
        for o in out:
            o.copy_(x)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> None:
        self.calls.append({"op": "broadcast", "bytes_per_rank": x.numel() * x.element_size(),
                           "shape": list(x.shape), "dtype": str(x.dtype)})


def step_collectives(case: Case) -> dict[str, Any]:
    """Gradient bytes and the collectives of one step of `case`, on the meta device."""
    method = build_method(case.method, backbone=case.backbone, image_size=case.image_size,
                          overrides={k: str(v) for k, v in case.sets.items()}).to("meta")
    grad_bytes = sum(p.numel() * p.element_size() for p in method.parameters()
                     if p.requires_grad)
    view = torch.empty(case.batch_size, 3, case.image_size, case.image_size, device="meta")
    recorder, real = RecordingDist(), method_common.dist
    method_common.dist = recorder
    try:
        method.train()
        method(view, view, StepInfo(epoch=0, step=0, progress=0.0, epochs=1))
    finally:
        method_common.dist = real
    return {"grad_bytes": grad_bytes,
            "trainable_params": sum(p.numel() for p in method.parameters() if p.requires_grad),
            "collectives": recorder.calls,
            "gather_bytes_per_rank": sum(c["bytes_per_rank"] for c in recorder.calls
                                         if c["op"] == "all_gather"),
            # Gathers of whole image batches: shuffle-BN's, which only has to permute them.
            "image_gather_bytes_per_rank": sum(c["bytes_per_rank"] for c in recorder.calls
                                               if c["op"] == "all_gather"
                                               and len(c["shape"]) == 4),
            "broadcast_bytes": sum(c["bytes_per_rank"] for c in recorder.calls
                                   if c["op"] == "broadcast")}


def time_phases(case: Case, data_root: Path, cache_dir: Path, device: torch.device,
                steps: int) -> dict[str, Any]:
    """The engine's step (as in `Pretrainer.train_epoch`) timed phase by phase."""
    spec = make_spec(case, data_root, cache_dir)
    trainer = make_pretrainer(spec, device)
    method, opt = trainer.method, trainer.optimizer
    images, _, regions = next(iter(trainer.loader))
    view1, view2 = trainer.augment(images, regions)
    if device.type == "cuda" and spec.train.channels_last:
        view1 = view1.contiguous(memory_format=torch.channels_last)
        view2 = view2.contiguous(memory_format=torch.channels_last)
    method.train()
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    for i in range(steps + 1):
        info = StepInfo(epoch=0, step=i, progress=i / (steps + 1), epochs=1)
        sync(device)
        t0 = time.perf_counter()
        with autocast_for(device, spec.train.precision):
            terms = trainer.model(view1, view2, info)
        sync(device)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        sync(device)
        t2 = time.perf_counter()
        clip_gradients(method, spec.optim.grad_clip)
        opt.step()
        method.momentum_update((i + 1) / (steps + 1))
        sync(device)
        t3 = time.perf_counter()
        if i:  # the first step warms up kernels and allocators
            phases["forward"].append(t1 - t0)
            phases["backward"].append(t2 - t1)
            phases["optimizer"].append(t3 - t2)
    # Best of the steps: other processes only ever add time (on a dedicated GPU the best
    # and the median agree; `median_*` keeps the latter).
    out: dict[str, Any] = {k: min(v) for k, v in phases.items()}
    out["step"] = sum(out.values())
    out["backward_fraction"] = out["backward"] / out["step"]
    out.update({f"median_{k}": median(v) for k, v in phases.items()})
    out["precision"] = effective_precision(spec.train.precision, device)
    out["steps"] = steps
    return out


def comm_seconds(n: int, payload: dict[str, Any], bw_bytes_per_s: float) -> dict[str, float]:
    """Seconds of one step's collectives on n ranks. `gather_s_all_to_all_shuffle` is the
    what-if of a shuffle-BN that exchanges the images with all_to_all ((n-1)/n of a batch
    in and out per rank) instead of gathering every rank's batch on every rank."""
    if n <= 1:
        return {"allreduce_s": 0.0, "gather_s": 0.0, "gather_s_all_to_all_shuffle": 0.0}
    allreduce = 2 * (n - 1) / n * payload["grad_bytes"] / bw_bytes_per_s
    gathered = payload["gather_bytes_per_rank"]
    images = payload.get("image_gather_bytes_per_rank", 0)
    gather = ((n - 1) * gathered + payload["broadcast_bytes"]) / bw_bytes_per_s
    exchange = ((n - 1) * (gathered - images) + (n - 1) / n * images
                + payload["broadcast_bytes"]) / bw_bytes_per_s
    return {"allreduce_s": allreduce, "gather_s": gather,
            "gather_s_all_to_all_shuffle": exchange}


def model_table(step: dict[str, float], payload: dict[str, Any], batch: int, *,
                nvlink_gbps: float, inter_gbps: list[float],
                gpus_per_node: int) -> list[dict[str, Any]]:
    rows = []
    for inter in inter_gbps:
        for n in GPU_COUNTS:
            gbps = nvlink_gbps if n <= gpus_per_node else inter
            comm = comm_seconds(n, payload, gbps * 1e9 / 8)
            plain = step["step"] + comm["allreduce_s"] + comm["gather_s"]
            hidden = max(0.0, comm["allreduce_s"] - step["backward"])
            overlapped = step["step"] + hidden + comm["gather_s"]
            exchanged = step["step"] + hidden + comm["gather_s_all_to_all_shuffle"]
            rows.append({
                "inter_node_gbps": inter, "gpus": n, "nodes": math.ceil(n / gpus_per_node),
                "link": "nvlink" if n <= gpus_per_node else "inter-node", "link_gbps": gbps,
                **comm, "step_s_no_overlap": plain, "step_s_overlap": overlapped,
                "efficiency_no_overlap": step["step"] / plain,
                "efficiency_overlap": step["step"] / overlapped,
                "efficiency_overlap_all_to_all_shuffle": step["step"] / exchanged,
                "images_per_s_overlap": n * batch / overlapped,
                # The compute per step at which communication costs 10% (no overlap).
                "step_s_for_90pct_no_overlap": 9 * (comm["allreduce_s"] + comm["gather_s"]),
            })
    return rows


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    """Efficiency per GPU count (rows) and inter-node bandwidth (columns): without overlap /
    with overlap / with overlap and an all-to-all shuffle."""
    bws = sorted({r["inter_node_gbps"] for r in rows})
    head = "| GPUs | nodes | " + " | ".join(f"{b:g} Gb/s" for b in bws) + " |"
    lines = [f"**{title}**", "",
             "Efficiency (1-GPU step / n-GPU step), each cell: no overlap / overlap /"
             " overlap + all-to-all shuffle.", "", head,
             "|---:|---:|" + "---:|" * len(bws)]
    for n in sorted({r["gpus"] for r in rows}):
        cells = []
        for b in bws:
            r = next(x for x in rows if x["gpus"] == n and x["inter_node_gbps"] == b)
            cells.append(f"{r['efficiency_no_overlap']:.2f} / {r['efficiency_overlap']:.2f} /"
                         f" {r['efficiency_overlap_all_to_all_shuffle']:.2f}")
        nodes = next(x["nodes"] for x in rows if x["gpus"] == n)
        lines.append(f"| {n} | {nodes} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comm_markdown(rows: list[dict[str, Any]], title: str) -> str:
    """Milliseconds of communication per step: all-reduce / gathers / gathers with an
    all-to-all shuffle."""
    bws = sorted({r["inter_node_gbps"] for r in rows})
    lines = [f"**{title}**", "",
             "Communication per step in ms, each cell: gradient all-reduce / gathers /"
             " gathers with an all-to-all shuffle.", "",
             "| GPUs | " + " | ".join(f"{b:g} Gb/s" for b in bws) + " |",
             "|---:|" + "---:|" * len(bws)]
    for n in sorted({r["gpus"] for r in rows}):
        cells = []
        for b in bws:
            r = next(x for x in rows if x["gpus"] == n and x["inter_node_gbps"] == b)
            cells.append(f"{1e3 * r['allreduce_s']:.1f} / {1e3 * r['gather_s']:.1f} /"
                         f" {1e3 * r['gather_s_all_to_all_shuffle']:.1f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(preset: Preset, workdir: Path, data_root: Path, device: torch.device, *,
        nvlink_gbps: float, inter_gbps: list[float], gpus_per_node: int) -> dict[str, Any]:
    case = preset.scaling
    print(f"[scaling] timing {case.name} on {device} ...", flush=True)
    step = time_phases(case, data_root, workdir / "cache", device, preset.scaling_steps)
    payload = step_collectives(case)
    rows = model_table(step, payload, case.batch_size, nvlink_gbps=nvlink_gbps,
                       inter_gbps=inter_gbps, gpus_per_node=gpus_per_node)
    assumptions = {"gpus_per_node": gpus_per_node, "nvlink_gbps": nvlink_gbps,
                   "inter_node_gbps": inter_gbps, "per_device_batch": case.batch_size,
                   "overlap": "all-reduce overlaps the measured backward; gathers do not",
                   "latency": "ignored (bandwidth-only model)"}
    md = markdown(rows, f"{case.name}, measured on {device}: step {1e3 * step['step']:.1f} ms"
                  f" (backward {100 * step['backward_fraction']:.0f}%), gradients"
                  f" {payload['grad_bytes'] / 2**20:.1f} MiB, gathers"
                  f" {payload['gather_bytes_per_rank'] / 2**20:.2f} MiB per rank")
    result: dict[str, Any] = {"case": case.describe(), "device": str(device), "step": step,
                              "payload": payload, "assumptions": assumptions, "table": rows,
                              "markdown": md}
    for r in rows:
        if r["gpus"] in (8, 64):
            print(f"[scaling] {r['gpus']} GPUs at {r['inter_node_gbps']:g} Gb/s inter-node:"
                  f" efficiency {r['efficiency_no_overlap']:.3f} (no overlap),"
                  f" {r['efficiency_overlap']:.3f} (overlap)", flush=True)
    if device.type != "cuda":
        # The paper preset's payload costs nothing to count (meta device); its step time
        # needs a GPU, so report what communication costs and the compute per step at which
        # it would cost 10%.
        paper = next((c for c in preset.memory if c.name == "paper"), None) or Case(
            "paper", backbone="resnet50", image_size=224, batch_size=128)
        pp = step_collectives(paper)
        comm = model_table({"step": 1.0, "backward": 0.0}, pp, paper.batch_size,
                           nvlink_gbps=nvlink_gbps, inter_gbps=inter_gbps,
                           gpus_per_node=gpus_per_node)
        keep = ("inter_node_gbps", "gpus", "link", "allreduce_s", "gather_s",
                "gather_s_all_to_all_shuffle", "step_s_for_90pct_no_overlap")
        result["paper_payload"] = {
            "case": paper.describe(), "payload": pp,
            "communication": [{k: r[k] for k in keep} for r in comm],
            "markdown": comm_markdown(comm, f"{paper.name} preset ({paper.backbone},"
                                      f" {paper.image_size} px, batch {paper.batch_size} per"
                                      f" GPU): gradients {pp['grad_bytes'] / 2**20:.1f} MiB,"
                                      f" gathers {pp['gather_bytes_per_rank'] / 2**20:.1f} MiB"
                                      " per rank"),
            "note": "step time pending a GPU: run --preset gpu for the efficiency table"}
    return result
