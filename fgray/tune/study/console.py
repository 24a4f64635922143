"""What a study prints for a person: `StudyProgress` (a Tune callback: one line or a tqdm
bar per trial event, with each method's counts, best val kNN top-1 and the study's ETA) and
`Console`, how verbose a study is."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass

from ray.tune import Callback

from fgray.engine.selection import SELECTION_METRIC, Best
from fgray.tune.study.jobs import Job


class StudyProgress(Callback):
    """What the study prints for a person: one line per trial event, labelled with the
    trial's method, with that method's trials started / completed / stopped / failed, its best
    val kNN top-1 so far and the study's ETA -- a tqdm bar over all the study's trials where a
    terminal is attached, plain lines otherwise. Ray's own reporting goes to the study's log
    file instead (`--verbose` shows it live).

    The ETA spreads the work left over the concurrent slots: the mean duration of the trials
    finished so far for each trial not started, and what that mean leaves of each running
    trial. Without a terminal, an epoch's report also prints the line when none was printed
    for `heartbeat_s` seconds, so the ETA keeps moving between trial events.

    tqdm: the progress bar every Python user knows, with rate and ETA handling and a clean
    fallback when output is not a terminal -- not worth writing by hand."""

    def __init__(self, totals: dict[str, int], epochs: int, concurrency: int,
                 stream=None, heartbeat_s: float = 30.0) -> None:
        import sys

        self.heartbeat_s, self.printed = heartbeat_s, time.monotonic()
        self.totals, self.epochs = dict(totals), epochs
        self.concurrency = max(concurrency, 1)
        self.stream = stream or sys.stdout
        self.started: dict[str, tuple[str, float]] = {}  # trial id -> (method, start time)
        self.ended: set[str] = set()
        # Kept as trials start and end, not counted from `started` at every event: a
        # study of thousands of trials would pay for its whole history each time.
        self.running: dict[str, float] = {}  # trial id -> start time, of those not ended
        self.per_method: Counter[str] = Counter()  # trials started, per method
        self.durations: list[float] = []
        self.duration_sum = 0.0
        # per method: trials completed / stopped / failed (a method not in `totals`, e.g. the
        # init row's evaluation job, gets its counters when first seen)
        self.counts: dict[str, dict[str, int]] = defaultdict(
            lambda: dict.fromkeys(("completed", "stopped", "failed"), 0))
        self.best: dict[str, Best] = {}  # per method, of val kNN top-1
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=sum(totals.values()), desc="study", unit="trial",
                            file=self.stream, dynamic_ncols=True, leave=True)

    @staticmethod
    def group(trial) -> str:
        return Job.of(trial.config).method

    def _eta(self, now: float) -> str:
        left = sum(self.totals.values()) - len(self.ended)
        if left <= 0 or not self.durations:
            return "-"
        mean = self.duration_sum / len(self.durations)
        running = [now - t for t in self.running.values()]
        work = mean * max(left - len(running), 0) + sum(max(mean - e, 0.0) for e in running)
        return f"{work / self.concurrency:.0f} s"

    def _status(self, method: str) -> str:
        c = self.counts[method]
        best = self.best.get(method)
        shown = f"{best.value:.1f}" if best is not None and best.value is not None else "-"
        started = self.per_method[method]
        return (f"{started} of {self.totals.get(method, 0)} started, {c['completed']} "
                f"completed, {c['stopped']} stopped, {c['failed']} failed; best val kNN "
                f"{shown}; ETA {self._eta(time.time())}")

    def _show(self, method: str, event: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{method}: {self._status(method)}", refresh=True)
        else:
            print(f"[{method}] {event}: {self._status(method)}", file=self.stream, flush=True)
            self.printed = time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if not Job.of(trial.config).trains:
            return  # a test evaluation job: one line when it ends
        if trial.trial_id not in self.started:
            self.started[trial.trial_id] = (self.group(trial), time.time())
            self.running[trial.trial_id] = self.started[trial.trial_id][1]
            self.per_method[self.group(trial)] += 1
        self._show(self.group(trial), f"trial {trial.trial_id} started")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        method = self.group(trial)
        self.best.setdefault(method, Best(SELECTION_METRIC)).update(result)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{method}: {self._status(method)}", refresh=True)
        elif (time.monotonic() - self.printed >= self.heartbeat_s
              and Job.of(trial.config).trains and "epoch" in result):
            self._show(method, f"trial {trial.trial_id} epoch {int(result['epoch'])}")

    def _end(self, trial, status: str) -> None:
        method, job = self.group(trial), Job.of(trial.config)
        if not job.trains:
            what = "initial weights" if job.tests_init else f"trial {job.target}"
            took = (trial.last_result or {}).get("evaluation_s")
            line = (f"[{method}] test evaluation of the {what} "
                    f"{'failed' if status == 'failed' else 'done'}"
                    f"{f' in {took:.0f} s' if took is not None else ''}")
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, file=self.stream, flush=True)
            return
        if trial.trial_id in self.started and trial.trial_id not in self.ended:
            self.durations.append(time.time() - self.started[trial.trial_id][1])
            self.duration_sum += self.durations[-1]
        self.ended.add(trial.trial_id)
        self.running.pop(trial.trial_id, None)
        self.counts[method][status] += 1
        if self.bar is not None:
            self.bar.update(1)
        self._show(method, f"trial {trial.trial_id} {status}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        ran = int((trial.last_result or {}).get("epoch", 0))
        self._end(trial, "completed" if ran >= self.epochs else "stopped")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, "failed")

    def on_experiment_end(self, trials, **info) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class Console:
    """How a study talks: `verbose` shows Ray Tune's own tables and the workers' output;
    otherwise a `StudyProgress` and Ray's output in the log file."""

    verbose: bool = False
    concurrency: int = 1

