"""Who had the CPU while a run trained: every process's CPU seconds, sampled twice a second with
psutil, over the window in which the training process was busy.

A training loop slower in one process than in another while doing the same work (the same
CPU seconds per epoch, `step_cpu_s` of `fgray.engine.stepclock`) lost the time to other
processes on the machine. `share()` names them: the cores each process used while the
training process (the one that used the most CPU) ran above one core, which on a small host
is where Ray's daemons (raylet, GCS, dashboard and agents, Train's controller and helper
actors) take their part.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Any

BUSY_CORES = 1.0  # the training process counts as training above this many cores
HOT_CORES = 0.5  # a process this busy since the last sample gets its threads sampled too


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads, summed per thread name without its digits (torch's
    pool threads are all `python`; Ray's are named: `ray_core_worker`, `grpc_global_tim`,
    ...), from /proc (Linux; empty elsewhere)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        label = re.sub(r"[\d.:-]+$", "", name) or name
        out[label] = out.get(label, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _label(name: str, cmdline: list[str]) -> str:
    """A process's name as a reader knows it: Ray's workers and daemons by their own names,
    a Python process by its script or module."""
    if name.startswith("ray::") or not name.startswith("python"):
        return name
    for i, arg in enumerate(cmdline[1:], start=1):
        if arg == "-m" and i + 1 < len(cmdline):
            return f"python -m {cmdline[i + 1]}"
        if arg.endswith(".py"):
            return os.path.basename(arg)
    return name


class CpuSampler:
    """Samples every process's CPU seconds (user + system) every `every` seconds while open
    (`with CpuSampler() as s: ...`); `samples` is a list of (time, {pid: (label, seconds)}),
    and `threads` one of (time, {pid: {thread name: seconds}}) for the processes that used
    more than HOT_CORES since the previous sample. Without psutil it samples nothing and
    `available` is False."""

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self.threads: list[tuple[float, dict[int, dict[str, float]]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import psutil  # noqa: F401
            self.available = True
        except ImportError:
            self.available = False

    def _sample(self) -> None:
        import psutil

        while True:
            now, seen = time.time(), {}
            for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
                times = proc.info["cpu_times"]
                if times is not None:
                    seen[proc.pid] = (_label(proc.info["name"] or "?", proc.info["cmdline"] or []),
                                      times.user + times.system)
            if self.samples:
                then, before = self.samples[-1]
                hot = [pid for pid, (_, cpu) in seen.items() if pid in before
                       and (cpu - before[pid][1]) / max(now - then, 1e-9) > HOT_CORES]
                self.threads.append((now, {pid: _thread_cpu(pid) for pid in hot}))
            self.samples.append((now, seen))
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> CpuSampler:
        if self.available:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def share(samples: list[tuple[float, dict[int, tuple[str, float]]]],
          threads: list[tuple[float, dict[int, dict[str, float]]]] = ()
          ) -> dict[str, Any] | None:
    """Cores per process over the window in which the training process -- the one with the
    most CPU seconds in `samples` -- used more than BUSY_CORES: {"window_s", "training"
    (its label and cores), "others" (cores of every other process together), "by_label"
    (cores per label of the others, largest first), "threads" (the training process's cores
    per thread name, from `threads`, where sampled)}. None if nothing trained. A process that
    ended inside the window counts up to its last sample."""
    if len(samples) < 3:
        return None
    first: dict[int, tuple[int, float]] = {}  # pid: (index, seconds) where first seen
    for i, (_, seen) in enumerate(samples):
        for pid, (_, cpu) in seen.items():
            first.setdefault(pid, (i, cpu))

    def cpu_by(pid: int, index: int) -> tuple[str, float] | None:
        """The pid's label and CPU seconds at its last sample up to `index`, counted from
        zero for a process started after the first sample (a Ray worker)."""
        for _, seen in reversed(samples[:index + 1]):
            if pid in seen:
                label, cpu = seen[pid]
                return label, cpu - (first[pid][1] if first[pid][0] == 0 else 0.0)
        return None

    end_index = len(samples) - 1
    used = {pid: cpu_by(pid, end_index)[1] for pid in first}
    trainer = max(used, key=used.get)
    busy = [i for i in range(1, len(samples))
            if trainer in samples[i][1] and trainer in samples[i - 1][1]
            and (samples[i][1][trainer][1] - samples[i - 1][1][trainer][1])
            / (samples[i][0] - samples[i - 1][0]) > BUSY_CORES]
    if not busy:
        return None
    i0, i1 = busy[0] - 1, busy[-1]
    t0, t1 = samples[i0][0], samples[i1][0]
    window = t1 - t0
    cores = {}
    for pid in first:
        at_end = cpu_by(pid, i1)
        if at_end is None:
            continue  # started after the window
        at_start = cpu_by(pid, i0)
        cores[pid] = (at_end[0], (at_end[1] - (at_start[1] if at_start else 0.0)) / window)
    label, mine = cores.pop(trainer)
    by_label: dict[str, float] = {}
    for other, value in cores.values():
        by_label[other] = by_label.get(other, 0.0) + value
    ranked = dict(sorted(((k, round(v, 4)) for k, v in by_label.items() if v >= 0.0005),
                         key=lambda kv: -kv[1]))
    # The training process's threads, between the first and last thread samples in the window.
    inside = [(t, seen[trainer]) for t, seen in threads if t0 <= t <= t1 and trainer in seen]
    by_thread: dict[str, float] = {}
    if len(inside) >= 2:
        (ta, a), (tb, b) = inside[0], inside[-1]
        by_thread = dict(sorted(((k, round((v - a.get(k, 0.0)) / (tb - ta), 3))
                                 for k, v in b.items()), key=lambda kv: -kv[1]))
    return {"window_s": round(window, 2), "training": {"label": label, "cores": round(mine, 3)},
            "others": round(sum(by_label.values()), 3), "by_label": ranked,
            "threads": by_thread}


def largest(cores: dict[str, float], top: int) -> str:
    """The first `top` entries of a largest-first {name: cores}, over a thousandth of a core."""
    return ", ".join(f"{k} {v:.3f}" for k, v in list(cores.items())[:top] if v >= 0.001)


def describe(result: dict[str, Any] | None, top: int = 6) -> str:
    """One line: the training process's cores, the others' together and the largest of them."""
    if not result:
        return "no CPU samples (psutil missing, or the run never used a core)"
    parts = largest(result["by_label"], top)
    threads = largest(result.get("threads", {}), top)
    return (f"{result['training']['label']} {result['training']['cores']:.2f} cores"
            + (f" (its threads: {threads})" if threads else "")
            + f", every other process {result['others']:.3f} cores ({parts}) over"
            f" {result['window_s']:.0f} s")
