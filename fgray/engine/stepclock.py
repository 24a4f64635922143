"""Where a training process runs and where its steps' time goes: what an epoch row records
so that a run slower in one place than another (a Ray Train worker against the same loop in
the driver's process, one node against another) can be told apart by cause.

`process_facts` is recorded with every epoch: torch's intra-op and inter-op threads (the
augmentation runs on torch too), the CPUs this process may run on (its affinity) and its
niceness (Ray starts workers at niceness 15 by default; fgray sets 0, see
`fgray.train.cluster`).

`StepClock` splits an epoch's step time into four phases when `FGRAY_STEP_CLOCK=1`:

    data       waiting for the next batch from the loader
    augment    the two views (crops, flips, colour, on the device) and their layout
    compute    the method's forward and the backward pass
    optimizer  gradient clipping, the optimiser step and the momentum update

and records `step_cpu_s`, the CPU seconds the whole process (every thread: torch's pools,
and in a Ray worker Ray's own threads) used over the same steps. CPU seconds over step seconds
is the cores the loop got: the same loop doing the same work uses the same CPU seconds, so
two runs whose wall times differ while their CPU seconds agree lost the difference to other
processes on the machine, not to the loop (benchmarks/ray_overhead.py).

Off by default: on a GPU each lap synchronises the device (a host sync per phase, which the
step otherwise never makes), so the clock costs time where it is measured. On a CPU the work
is synchronous and the clock costs four `perf_counter` calls per step."""

from __future__ import annotations

import os
import time

import torch

STEP_CLOCK_ENV = "FGRAY_STEP_CLOCK"
PHASES = ("data", "augment", "compute", "optimizer")


def process_facts() -> dict[str, int]:
    """The threads, CPUs and niceness this process trains with."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "cpus_visible": int(cpus or 0), "niceness": os.nice(0)}


class StepClock:
    """Seconds per phase (`PHASES`) summed over an epoch's steps; a no-op unless enabled
    (default: `FGRAY_STEP_CLOCK=1` in the environment)."""

    def __init__(self, device: torch.device, enabled: bool | None = None):
        self.enabled = (os.environ.get(STEP_CLOCK_ENV) == "1") if enabled is None else enabled
        self.device = device
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._last = 0.0
        self._cpu_start = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        """Begin an epoch: totals to zero, the clock at now."""
        if self.enabled:
            self.totals = dict.fromkeys(PHASES, 0.0)
            self._last = self._now()
            self._cpu_start = time.process_time()

    def lap(self, phase: str) -> None:
        """The time since the previous lap (or `start`) goes to `phase`."""
        if self.enabled:
            now = self._now()
            self.totals[phase] += now - self._last
            self._last = now

    def report(self) -> dict[str, float]:
        """The epoch's totals as `step_<phase>_s` columns and the process's CPU seconds since
        `start` as `step_cpu_s` (nothing when disabled)."""
        if not self.enabled:
            return {}
        return {**{f"step_{p}_s": v for p, v in self.totals.items()},
                "step_cpu_s": time.process_time() - self._cpu_start}
