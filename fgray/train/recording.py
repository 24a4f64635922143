"""Recording a Ray Train run's epochs where the study reads them: every rank's metrics under
`ranks/`, rank 0's in the epochs table and TensorBoard, once per epoch however often the
workers restart. On the Train controller (`RecordEpochs`) and, with `--workers 0`, in the
trial's own process (`TuneSession.report`)."""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from fgray.results.records import RESTORED_KEY, EpochWriter, format_epoch
from fgray.storage import join, write_json

RANKS_DIR = "ranks"  # ranks/epoch-XXXX.json: every rank's metrics of the epoch


class RecordEpochs(UserCallback):
    """Runs on the Train controller after every consolidated report (all ranks reported, the
    checkpoint registered): records rank 0's metrics once per epoch, however often workers
    restart, and keeps every rank's metrics under `ranks/`."""

    def __init__(self, run_uri: str, recorder: EpochWriter | None = None,
                 echo: bool = False) -> None:
        self.run_uri = run_uri
        # The writer alone: the controller unpickles this callback, and a whole recorder
        # (the run's spec, its method's config class) would import torch there.
        self.recorder = None if recorder is None else recorder.epoch_writer()
        self.echo = echo

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        record_epoch(self.run_uri, metrics, self.recorder, self.echo)


def record_epoch(run_uri: str | None, metrics: list[dict[str, Any]],
                 recorder: EpochWriter | None = None, echo: bool = False) -> None:
    """Record one epoch, reported by every rank (`metrics[r]` is rank r's): every rank's
    metrics under `run_uri/ranks/`, rank 0's in the tables and TensorBoard (`recorder`).

    The first report after a resume carries the restored history (`RESTORED_KEY`, removed
    from the reports here, so later callbacks and Tune never see it): its epochs missing from
    the epochs table are recorded first, once. A report of an epoch that history holds (a run
    resumed at its end reports its last epoch again) records nothing else."""
    lead = metrics[0]
    restored = lead.pop(RESTORED_KEY, None)
    for report in metrics[1:]:
        report.pop(RESTORED_KEY, None)
    epoch = int(lead["epoch"])
    replay = bool(restored) and epoch <= max(int(r["epoch"]) for r in restored)
    if run_uri is not None and not replay:
        write_json(join(run_uri, RANKS_DIR, f"epoch-{epoch:04d}.json"), metrics)
    if recorder is not None and restored:
        recorder.record_missing(restored)
    if recorder is not None and not replay:
        recorder(lead)
    if echo:
        print(format_epoch(lead), flush=True)
