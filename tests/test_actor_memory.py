"""A reused trial actor gives back what each job freed (`fgray.tune.actor_memory`).

Tune runs each trial of a reused actor in a new thread, and glibc keeps what a finished
thread freed in that thread's malloc arena: over the README's main job one actor grew to
9.5 GB. The first test rebuilds that situation in miniature (200 MiB freed by a finished
thread, the arena's top pinned by one live block) and checks the memory is retained, then
returned by `release_memory`; the second that every trial ends with it, failed ones too."""

from __future__ import annotations

import threading

import psutil
import pytest

from fgray.allocator import libc
from fgray.tune import actor_memory
from fgray.tune.study import Job, JobKind
from fgray.tune.study import trial as study

MIB = 2**20


def _uss() -> float:
    return psutil.Process().memory_full_info().uss / MIB


def test_memory_a_finished_thread_freed_goes_back_to_the_system():
    if libc() is None:
        pytest.skip("this C library is not glibc")
    kept = []

    def job():
        blocks = [bytearray(64 * 1024) for _ in range(3200)]  # 200 MiB in 64 KiB blocks
        kept.append(bytearray(64 * 1024))  # allocated last: pins the top of the arena
        del blocks

    before = _uss()
    worker = threading.Thread(target=job)
    worker.start()
    worker.join()
    retained = _uss() - before
    assert retained > 150, f"the freed blocks were returned already ({retained:.0f} MiB kept)"
    assert actor_memory.release_memory() is True
    assert _uss() - before < 50, f"{_uss() - before:.0f} MiB still held after release_memory"


def test_every_job_of_a_trial_actor_ends_by_releasing_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(study, "release_memory", lambda: calls.append("released"))

    def fails(config, setup):
        calls.append("ran")
        raise FloatingPointError("non-finite loss")

    monkeypatch.setattr(study, "_run_job", fails)
    with pytest.raises(FloatingPointError):
        study.train_trial(Job(JobKind.SEARCH, "moco").config(), setup=None)
    assert calls == ["ran", "released"]
