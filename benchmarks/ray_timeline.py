"""Where a Ray Train run's start-up goes, read from Ray's own task events (the state API).

Every actor Ray creates is an actor-creation task whose events Ray records with timestamps:
waiting for a worker process (`PENDING_NODE_ASSIGNMENT` to `RUNNING`: a process started, or an
idle one leased, and Ray's own imports in it) and the actor's `__init__` (`RUNNING` to
`FINISHED`). A Ray Train run creates, per run (per trial in a study): Train's controller
(`TrainController`), its placement group, the worker actors (`RayTrainWorker`) and helper
actors in their own processes (`PlacementGroupCleaner`, `SynchronizationActor`,
`DatasetManager`, `PreemptionWatcher`); a Tune trial is itself an actor (`ImplicitFunc`).
Inside a Train worker, `init_train_context` unpickles the training function, which imports the
module that defines it (`fgray.train.trainer`: torch, timm, fgray), and
`_setup_torch_process_group` creates the process group.

`start_up()` reads those events from the Ray this process is connected to, after the runs
ended and before the session closes, and returns every step's durations (one per run), so a
study's figures are per trial. `CHAIN` is the steps a run waits for one after another before
its training loop starts; the helpers start alongside the worker.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import median

# (step, actor class or task name, what is timed): the steps in the order a Train run waits
# for them.
CHAIN = (
    ("controller process", "TrainController", "process"),
    ("controller __init__", "TrainController", "init"),
    ("worker process", "RayTrainWorker", "process"),
    ("worker __init__", "RayTrainWorker", "init"),
    ("worker imports (train context)", "RayTrainWorker.init_train_context", "task"),
    ("process group", "RayTrainWorker.execute:execute._setup_torch_process_group", "task"),
)  # a task is "function" or "function:task name" (Train's `execute` runs many helpers)
HELPERS = ("PlacementGroupCleaner", "SynchronizationActor", "DatasetManager",
           "PreemptionWatcher")
TRIAL_ACTOR = "ImplicitFunc"  # a Tune trial's actor (the function trainable)


def _span(events: list[dict], first: str, last: str) -> float | None:
    """Seconds from the event `first` to the event `last` of one task, if both were recorded."""
    at = {e["state"]: e["created_ms"] for e in events or []}
    if first not in at or last not in at:
        return None
    return (at[last] - at[first]) / 1000.0


def start_up(address: str | None = None) -> dict[str, list[float]]:
    """Each start-up step's seconds, one per occurrence (run, or trial), from the task events of
    the Ray at `address` (default: the one this process is connected to)."""
    from ray.util.state import list_placement_groups, list_tasks

    def tasks(**where: str) -> list[Any]:
        filters = [(k, "=", v) for k, v in where.items()]
        return list_tasks(address=address, filters=filters, detail=True, limit=10_000,
                          raise_on_missing_output=False)

    out: dict[str, list[float]] = {}

    def add(step: str, seconds: float | None) -> None:
        if seconds is not None:
            out.setdefault(step, []).append(seconds)

    created = tasks(type="ACTOR_CREATION_TASK")
    by_class: dict[str, list[Any]] = {}
    for t in created:
        by_class.setdefault(t.func_or_class_name.split(".")[0], []).append(t)
    for cls in ("TrainController", "RayTrainWorker", *HELPERS, TRIAL_ACTOR):
        label = {"TrainController": "controller", "RayTrainWorker": "worker",
                 TRIAL_ACTOR: "trial actor"}.get(cls, cls)
        for t in by_class.get(cls, []):
            add(f"{label} process", _span(t.events, "PENDING_NODE_ASSIGNMENT", "RUNNING"))
            add(f"{label} __init__", _span(t.events, "RUNNING", "FINISHED"))
    for step, name, kind in CHAIN:
        if kind == "task":
            function, _, task = name.partition(":")
            for t in tasks(func_or_class_name=function):
                if t.name == (task or function):
                    add(step, _span(t.events, "RUNNING", "FINISHED"))
    for group in list_placement_groups(address=address, detail=True, limit=10_000,
                                       raise_on_missing_output=False):
        latency = (group.stats or {}).get("end_to_end_creation_latency_us")
        add("placement group", None if latency is None else float(latency) / 1e6)
    return out


def summary(steps: dict[str, list[float]]) -> dict[str, Any]:
    """Medians per step, and the chain's sum (what a run waits for before its loop)."""
    medians = {step: median(v) for step, v in steps.items() if v}
    chain = [step for step, _, _ in CHAIN if step in medians]
    return {"median_s": medians, "runs": max((len(v) for v in steps.values()), default=0),
            "chain": chain, "chain_s": sum(medians[s] for s in chain)}


def describe(found: dict[str, Any]) -> str:
    """One line: the chain step by step and its sum, then the steps alongside it."""
    med = found["median_s"]
    parts = []
    if found["chain"]:
        parts.append(", ".join(f"{s} {med[s]:.2f}" for s in found["chain"])
                     + f" (sum {found['chain_s']:.1f} s)")
    rest = [f"{s} {v:.2f}" for s, v in med.items() if s not in found["chain"]]
    if rest:
        parts.append(("alongside: " if found["chain"] else "") + ", ".join(rest))
    return ("; ".join(parts) or "no actor was created") + (
        f" [median seconds over {found['runs']} run(s), from Ray's task events]")
