"""Ending a stopped trial's Ray Train run, so Tune can hand the trial's process to the next
trial (`reuse_actors`) instead of starting a new one.

A `--workers N` trial's thread sits in `trainer.fit()` while its Train run goes: the run's
reports reach Tune through `TuneReportCallback` and the trial's main thread, never through
this thread. When Tune stops the trial (ASHA at a rung, the end of the experiment) nothing
tells `fit()`, and when Tune hands the process to the next trial, `reset_config` waits only
`TUNE_FUNCTION_THREAD_TIMEOUT_S` (2 s by default) for the old thread, then aborts the *next*
trial ("Trainable runner reuse requires reset_config() to be implemented and return True").
Without reuse Tune kills the process instead, and the run's controller (an actor it owns)
dies with it: a new process per trial, 0.9 s to start and 3.5 s of imports on a 2-core host,
36 times in the README's main job.

So while the run goes, a thread here waits for the stop event Tune sets on the trial's session
(on a reset, or when it removes the actor) and then kills the run's controller with
`ray.kill`: exactly what the process's death did before. Its workers die with it (they are
the controller's actors) and Train's placement-group cleaner frees their resources within
about a second. `fit()` then raises in the trial's thread, which `ends_quietly` turns into a
normal return, and the process is free for the next trial.

The trial process needs the controller's actor handle, which `fit()` keeps to itself. The
controller publishes it (`PublishController`, a Train callback: after the run's first report,
the earliest point at which a scheduler can stop a trial) as a pickled handle in a file on its
own node, which is the trial's: Ray Train pins its controller to the node of the process that
calls `fit()`. A stop before the first report (a study interrupted while a run starts) waits
for the handle. This module imports Ray alone: the controller unpickles the callback, and
a heavier module would import torch there before every run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import ray
import ray.cloudpickle
from ray.train import UserCallback

# How long Tune's `reset_config` waits for a stopped trial's thread. Killing the controller
# and `fit()` raising take about a second; a loaded node gets ample margin, since running out
# of it aborts the next trial.
THREAD_TIMEOUT_S = 60
POLL_S = 0.2  # how often the watcher looks for the stop, then for the controller's handle


class PublishController(UserCallback):
    """On the Train controller: after the run's first report, write the controller's own actor
    handle to `path` (on the controller's node) for `TrainRunStopper`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.published = False

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if self.published:
            return
        handle = ray.get_runtime_context().current_actor
        part = Path(self.path + ".part")
        part.write_bytes(ray.cloudpickle.dumps(handle))
        os.replace(part, self.path)  # whole or absent for the reader
        self.published = True


class TrainRunStopper:
    """While a Tune trial's Train run goes (a context manager around `fit()`): kill the run's
    controller when Tune stops the trial. Pass `callback` to the trainer; after `fit()`
    raised, `stopped` says whether this did it."""

    def __init__(self) -> None:
        from ray.train._internal.session import get_session

        session = get_session()  # the Tune trial's session: Tune sets its stop event
        if session is None:
            raise RuntimeError("TrainRunStopper runs inside a Tune trial")
        self._stop = session.stop_event
        os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = str(THREAD_TIMEOUT_S)
        self._folder = tempfile.mkdtemp(prefix="fgray-controller-")
        self.callback = PublishController(os.path.join(self._folder, "controller.pkl"))
        self.stopped = threading.Event()
        self._done = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="fgray-train-stop",
                                         daemon=True)

    def __enter__(self) -> TrainRunStopper:
        self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._watcher.join()
        shutil.rmtree(self._folder, ignore_errors=True)

    def _watch(self) -> None:
        while not self._done.is_set():
            if self._stop.wait(POLL_S):
                break
        else:
            return  # the run ended first
        self.stopped.set()
        handle = Path(self.callback.path)
        while not self._done.is_set():
            if handle.is_file():
                controller = ray.cloudpickle.loads(handle.read_bytes())
                ray.kill(controller, no_restart=True)
                return
            self._done.wait(POLL_S)

    def ends_quietly(self, exc: BaseException) -> bool:
        """Whether `exc`, raised by `fit()`, is this stop's doing (the trial then returns)."""
        return self.stopped.is_set() and isinstance(exc, Exception)
