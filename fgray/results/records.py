# Why one file (over ~450 lines): a trial's records -- its epoch rows, its trials row, its
# test and init rows -- are built by one `EpochRecorder` and the functions beside it from the
# same keys and columns (`keys`, `trial_row`, `eval_rows`); apart they would each restate them.
"""The bridge from per-epoch metrics to the results layer (Parquet tables + TensorBoard).

`EpochRecorder` is one trial's recorder: calling it with an epoch's metrics appends a row to
the `epochs` table and writes the TensorBoard scalars of run `<method>/<trial_id>`; `finish`
writes the trial's row to the `trials` table. `record_test` adds the final test evaluation
(`evals` rows and the `test_*` columns of the trial's row); `record_init` the row of the
initial weights (method `init`, the study's no-SSL baseline). No Ray here: `fgray pretrain
--workers 0`, Ray Train's controller callback and the Tune study driver all use it.

The trials table holds one row per trial, its current state: each state (`running`, then a
terminal state, then the same state with test metrics) replaces the trial's file
(`fgray.results.trials.write_trials`; a terminal state is never replaced by `running`), and
every state is also appended to `trial_events`, the trial's history.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from fgray import __version__
from fgray.config import to_dict
from fgray.engine.selection import best_of, score
from fgray.results.schema import (
    OUTCOME_METRICS,
    OUTCOME_WEIGHTS,
    PARTITION_COLUMN,
    TEST_METRICS,
    param_fields,
)
from fgray.results.tables import append, load_trial
from fgray.results.trials import read_trial, update_trial, write_trials
from fgray.storage import resolve

if TYPE_CHECKING:  # the spec's module imports torch; the Train controller unpickles an
    from fgray.engine.spec import RunSpec  # EpochWriter and should not pay for it (4-5 s)

# The key under which rank 0's first report after a resume carries the restored history (every
# finished epoch the checkpoint holds): `record_epoch` pops it and records the epochs missing
# from the epochs table (`EpochRecorder.record_missing`); nothing downstream sees it.
RESTORED_KEY = "fgray_restored_history"
# Per-epoch clocks (Unix seconds) of the process that ran the epoch: when that process started
# and when the epoch ended. They give a resumed trial's running segments (`running_time`).
SESSION_START, EPOCH_END = "session_start_time", "epoch_end_time"

# Keys a Ray report adds to an epoch's metrics that are bookkeeping, not measurements.
_NOT_RECORDED = frozenset({"checkpoint_path", "checkpoint_dir_name", "done",
                           "training_iteration", "trial_id", "timestamp", "time_this_iter_s",
                           "time_total_s", "pid", "hostname", "node_ip", "date",
                           "time_since_restore", "iterations_since_restore", "config",
                           "experiment_tag", RESTORED_KEY})

# Text an epoch's report carries that its row keeps (every other recorded value is a number).
NODE_ID = "node_id"
_TEXT = frozenset({NODE_ID})

OUTCOMES_TABLE = "outcomes"  # per-image test outcomes of each final model

# evaluate_method's metric names -> (protocol, metric) of an `evals` row.
_EVAL_ROWS = {
    "rank1": ("retrieval", "rank1"), "rank5": ("retrieval", "rank5"), "map": ("retrieval", "map"),
    "knn_top1": ("knn", "top1"), "knn_top5": ("knn", "top5"),
    "linear_top1": ("linear", "top1"), "linear_top5": ("linear", "top5"),
    "linear_paper_top1": ("linear", "paper_top1"),
    "loc_box_mass": ("localisation", "box_mass"), "loc_pointing": ("localisation", "pointing"),
    "loc_part_hits": ("localisation", "part_hits"),
}


def git_revision(start: str | Path | None = None) -> str | None:
    """The commit the fgray source tree is checked out at, read from `.git` without running
    git; None outside a git checkout (e.g. an installed wheel) or when it cannot be read."""
    here = Path(start or __file__).resolve()
    for folder in (here, *here.parents):
        dot_git = folder / ".git"
        if dot_git.is_file():  # a worktree or submodule: "gitdir: <path>"
            text = dot_git.read_text().strip()
            if not text.startswith("gitdir:"):
                return None
            dot_git = (folder / text.split(":", 1)[1].strip()).resolve()
        if not dot_git.is_dir():
            continue
        try:
            head = (dot_git / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return head or None  # detached HEAD holds the commit itself
            ref = head.split(":", 1)[1].strip()
            for git_dir in (dot_git, _common_dir(dot_git)):
                loose = git_dir / ref
                if loose.is_file():
                    return loose.read_text().strip() or None
                packed = git_dir / "packed-refs"
                if packed.is_file():
                    for line in packed.read_text().splitlines():
                        parts = line.split()
                        if len(parts) == 2 and parts[1] == ref:
                            return parts[0]
        except OSError:
            return None
        return None  # a checkout whose branch has no commit yet
    return None


def _common_dir(git_dir: Path) -> Path:
    common = git_dir / "commondir"
    if common.is_file():
        return (git_dir / common.read_text().strip()).resolve()
    return git_dir


def config_hash(spec: RunSpec) -> str:
    """The experiment's identity without its seed: runs of one configuration with different
    seeds share it, which is how the leaderboard groups them into mean ± std."""
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, seed=0)).hash()


def weights_name(backbone: str, init: str) -> str:
    """The timm name of the weights a run starts from: with ImageNet init, the backbone with
    the pretrained tag timm resolves it to (`tf_efficientnet_lite0` ->
    `tf_efficientnet_lite0.in1k`); otherwise the backbone as given (random init has no
    weights to name; a file's path is the `init` column)."""
    if init != "imagenet" or "." in backbone:
        return backbone
    import timm

    cfg = timm.models.get_pretrained_cfg(backbone)
    return f"{cfg.architecture}.{cfg.tag}" if cfg is not None and cfg.tag else backbone


def resolved_params(spec: RunSpec) -> dict[str, Any]:
    """Every knob that defines the run, flat: the method's resolved config, the optimiser and
    the budget. This is the trial's `params_json` next to the searched parameters."""
    out: dict[str, Any] = {"backbone": spec.backbone_name, "init": spec.init,
                           "epochs": spec.train.epochs, "batch_size": spec.train.batch_size,
                           "image_size": spec.train.image_size}
    method = to_dict(spec.method_config)
    # A method knob and an optimiser setting may share a name (MoCo's EMA `momentum` and
    # SGD's); a bare name is the method's, as in the search spaces (`fgray.tune.spaces`), so
    # the optimiser's keeps an `optim.` prefix.
    out.update({(f"optim.{k}" if k in method else k): v for k, v in to_dict(spec.optim).items()})
    out.update(method)
    return out


def format_epoch(metrics: Mapping[str, Any]) -> str:
    """One console line per epoch."""
    parts = [f"epoch {metrics['epoch']}", f"loss {metrics['loss']:.4f}"]
    if score(metrics) is not None:
        parts.append(f"val kNN top-1 {score(metrics):.2f}")
    if metrics.get("images_per_s") is not None:
        parts.append(f"{metrics['images_per_s']:.1f} img/s")
    return "  ".join(parts)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def running_time(history: Iterable[Mapping[str, Any]], start: float, end: float) -> float:
    """Seconds a trial spent running between `start` and `end`, leaving out the time no process
    of it ran (its driver was dead, waiting for a restore).

    Each epoch row carries the start of the process that ran it (`session_start_time`) and its
    own end (`epoch_end_time`). The rows of one process are a running segment: the first from
    the trial's `start`, later ones from their process's start, each up to its last epoch's
    end, and the last segment up to `end`. A trial that ran in one process (or whose rows have
    no clocks) runs `end - start`. The work a crash loses after a segment's last recorded
    epoch is not counted: nothing records how long the dead process ran past it. A gap before
    a process that records no epoch (one resumed at its very end) is not left out."""
    segments: dict[float, float] = {}
    for row in history:
        began, done = row.get(SESSION_START), row.get(EPOCH_END)
        if _finite(began) and _finite(done):
            segments[float(began)] = max(segments.get(float(began), float("-inf")), float(done))
    if len(segments) < 2:
        return max(0.0, end - start)
    starts = sorted(segments)
    total = 0.0
    for i, began in enumerate(starts):
        seg_start = start if i == 0 else began
        seg_end = end if i == len(starts) - 1 else segments[began]
        total += max(0.0, seg_end - seg_start)
    return total


def best_epoch(history: Iterable[Mapping[str, Any]]) -> tuple[float | None, int | None]:
    """The best val kNN top-1 of a history and the epoch it was reached (the first on ties)."""
    row, best = best_of(history)
    return best, None if row is None else int(row["epoch"])


class EpochWriter:
    """Writes one trial's epochs: an `epochs` row and TensorBoard scalars per epoch.

    It knows the trial by its keys only (study folder, study, method, trial id) and imports
    neither torch nor the method modules, so the Ray Train controller that unpickles it
    (`fgray.train.recording.RecordEpochs`) starts without importing torch: that import was
    4-5 s of every Train run's start-up on a 2-core host. Picklable until first called (the
    TensorBoard writer opens lazily).
    """

    def __init__(self, study_dir: str, trial_id: str, method: str, *,
                 study: str | None = None) -> None:
        self.study_dir = str(study_dir)
        self.trial_id = trial_id
        self.method = method
        self.study = study
        self._writer = None

    @property
    def keys(self) -> dict[str, Any]:
        return {"study": self.study, "trial_id": self.trial_id, PARTITION_COLUMN: self.method}

    def epoch_row(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        row = dict(self.keys)
        for key, value in metrics.items():
            if key in _NOT_RECORDED or key in row:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) or (
                    key in _TEXT and isinstance(value, str)):
                row[key] = value
        row["epoch"] = int(metrics["epoch"])
        return row

    @property
    def run_name(self) -> str:
        """The trial's TensorBoard run."""
        from fgray.results.tensorboard import run_name

        return run_name(self.method, self.trial_id)

    def _trial_writer(self):
        if self._writer is None:
            from fgray.results.tensorboard import TrialWriter

            self._writer = TrialWriter(self.study_dir, self.run_name)
        return self._writer

    def __call__(self, metrics: Mapping[str, Any]) -> None:
        self._write([self.epoch_row(metrics)])

    def record_missing(self, history: Iterable[Mapping[str, Any]]) -> list[int]:
        """Record the epochs of `history` (a resumed run's restored history) that the epochs
        table does not hold yet for this trial -- a crash between an epoch's checkpoint and its
        row loses the row otherwise -- each once, whatever was recorded before. Returns the
        epochs written."""
        recorded = {int(r["epoch"]) for r in
                    trial_history(self.study_dir, self.method, self.trial_id)}
        rows: dict[int, dict[str, Any]] = {}
        for metrics in history:
            if metrics.get("epoch") is None or int(metrics["epoch"]) in recorded:
                continue
            rows[int(metrics["epoch"])] = self.epoch_row(metrics)
        self._write([rows[e] for e in sorted(rows)])
        return sorted(rows)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        append(self.study_dir, "epochs", rows)
        writer = self._trial_writer()
        for row in rows:
            scalars = {k: v for k, v in row.items()
                       if k not in self.keys and k not in ("epoch", SESSION_START, EPOCH_END)
                       and k not in _TEXT}
            writer.scalars(row["epoch"], scalars)
        # Flushed every epoch: a trial a scheduler stops is killed without a chance to close.
        writer.flush()

    def visuals(self, epoch: int, images: Any, maps: Mapping[str, Any],
                pairs: Mapping[str, tuple[Any, Any]]) -> None:
        """The Pretrainer's visuals hook: each spatial map overlaid on its images as
        `maps/<name>`, each image pair side by side as `pairs/<name>`, in the trial's run."""
        write_visuals(self._trial_writer(), epoch, images, maps, pairs)

    def epoch_writer(self) -> EpochWriter:
        """This trial's epoch writer alone, to ship to another process (the controller)."""
        return EpochWriter(self.study_dir, self.trial_id, self.method, study=self.study)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_writer"] = None  # an open event file stays with the process that opened it
        return state


class EpochRecorder(EpochWriter):
    """Records one trial: its epochs (`EpochWriter`) and a `trials` row at the end, which needs
    the run's spec (its knobs, backbone, seed, config hash).

    `cpus` and `gpus` are the resources the trial holds (all workers together); with the
    running time they give the trial's cpu_hours / gpu_hours. `start_time` (Unix seconds)
    defaults to now; a resumed trial passes its original start (`running_time` leaves out the
    time it did not run).
    """

    def __init__(self, study_dir: str, trial_id: str, spec: RunSpec, *, study: str | None = None,
                 params: dict[str, Any] | None = None, cpus: float = 1.0, gpus: float = 0.0,
                 start_time: float | None = None) -> None:
        super().__init__(study_dir, trial_id, spec.method, study=study)
        self.spec = spec
        self.params = dict(params or {})
        self.cpus, self.gpus = float(cpus), float(gpus)
        self.start_time = time.time() if start_time is None else float(start_time)

    def trial_row(self, history: list[Mapping[str, Any]], status: str, error: str | None = None,
                  test_metrics: Mapping[str, float] | None = None,
                  end_time: float | None = None) -> dict[str, Any]:
        end = time.time() if end_time is None else float(end_time)
        wall = running_time(history, self.start_time, end)
        best, at = best_epoch(history)
        epochs = [int(h["epoch"]) for h in history if h.get("epoch") is not None]
        row = dict(self.keys)
        row.update(
            backbone=weights_name(self.spec.backbone_name, self.spec.init),
            init=self.spec.init, dataset=self.spec.data.format,
            image_size=self.spec.train.image_size, status=status,
            error=_one_line(error) if error else None, best_val_knn_top1=best, best_epoch=at,
            epochs_run=max(epochs) if epochs else 0, seed=self.spec.train.seed,
            wall_time_s=wall, cpu_hours=wall * self.cpus / 3600,
            gpu_hours=wall * self.gpus / 3600, start_time=self.start_time, end_time=end,
            node_id=next((h[NODE_ID] for h in reversed(history) if h.get(NODE_ID)), None),
            fgray_version=__version__, git_revision=git_revision(),
            config_hash=config_hash(self.spec))
        row.update(param_fields(self.params, resolved_params(self.spec)))
        for name, value in (test_metrics or {}).items():
            column = name if name.startswith("test_") else f"test_{name}"
            if column in TEST_METRICS:
                row[column] = value
        return row

    def finish(self, history: list[Mapping[str, Any]], status: str, error: str | None = None,
               test_metrics: Mapping[str, float] | None = None) -> dict[str, Any]:
        """Write the trial's row; returns it. Its wall_time_s (and with the trial's resources
        its cpu_hours / gpu_hours) is the time the trial spent running (`running_time` of
        `history`): from `start_time` to now, less the time a resumed trial was not running."""
        row = self.trial_row(history, status, error, test_metrics)
        write_trials(self.study_dir, [row])
        self.close()
        return row


def write_visuals(writer, epoch: int, images: Any, maps: Mapping[str, Any],
                  pairs: Mapping[str, tuple[Any, Any]]) -> None:
    """Write the Pretrainer's visuals with a `fgray.results.tensorboard.TrialWriter`, flushed
    (a stopped trial is killed without closing its writer)."""
    for name, value in maps.items():
        writer.maps(f"maps/{name}", images, value, epoch)
    for name, (a, b) in pairs.items():
        writer.image_pairs(f"pairs/{name}", a, b, epoch)
    writer.flush()


def _one_line(text: str, limit: int = 2000) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def trial_history(study_dir: str, method: str, trial_id: str) -> list[dict[str, Any]]:
    """A trial's recorded epochs in order, one row per epoch (the last write of an epoch wins,
    should a restart have recorded it twice)."""
    if not has_tables(study_dir):
        return []
    table = load_trial(study_dir, "epochs", method, trial_id)  # its own files only
    by_epoch: dict[int, dict[str, Any]] = {}
    for row in table.to_pylist():
        if row.get("epoch") is not None:
            by_epoch[int(row["epoch"])] = {k: v for k, v in row.items() if v is not None}
    return [by_epoch[e] for e in sorted(by_epoch)]


def has_tables(study_dir: str) -> bool:
    """Whether anything was recorded under `study_dir` yet."""
    fs, root = resolve(study_dir)
    return fs.get_file_info(f"{root}/tables").type == pafs.FileType.Directory


def latest_trial_row(study_dir: str, method: str, trial_id: str) -> dict[str, Any] | None:
    """The trial's current row in the trials table, or None."""
    return read_trial(study_dir, method, trial_id)


def eval_rows(metrics: Mapping[str, float], *, study: str | None, method: str, trial_id: str,
              seed: int) -> list[dict[str, Any]]:
    """`evals` rows (split=test) for `evaluate_method`'s output."""
    rows = []
    for name, value in metrics.items():
        if name not in _EVAL_ROWS:
            continue
        protocol, metric = _EVAL_ROWS[name]
        rows.append({"study": study, "trial_id": trial_id, PARTITION_COLUMN: method,
                     "split": "test", "protocol": protocol, "metric": metric,
                     "value": float(value), "seed": int(seed)})
    return rows


def outcome_rows(outcomes: Mapping[str, Any], *, study: str | None, method: str,
                 trial_id: str, seed: int, split: str = "test") -> list[dict[str, Any]]:
    """`outcomes` rows, one per image, from `evaluate_method`'s per-image outcomes (arrays
    aligned with the split's images; a metric it did not compute is left out, NaN is
    stored as null)."""
    if not outcomes or "image_id" not in outcomes:
        return []
    keep = [c for c in (*OUTCOME_METRICS, *OUTCOME_WEIGHTS.values()) if c in outcomes]
    columns = {c: [float(v) for v in outcomes[c]] for c in keep}
    rows = []
    for i, image_id in enumerate(outcomes["image_id"]):
        row = {"study": study, "trial_id": trial_id, PARTITION_COLUMN: method, "split": split,
               "seed": int(seed), "image_id": int(image_id),
               "label": int(outcomes["label"][i]) if "label" in outcomes else None}
        row.update({c: (v[i] if math.isfinite(v[i]) else None) for c, v in columns.items()})
        rows.append(row)
    return rows


def _append_outcomes(study_dir: str, outcomes: Mapping[str, Any] | None, **keys: Any) -> None:
    rows = outcome_rows(outcomes or {}, **keys)
    if rows:
        append(study_dir, OUTCOMES_TABLE, rows)


def record_init(study_dir: str, name: str, spec: RunSpec, metrics: Mapping[str, float], *,
                study: str | None = None, start_time: float | None = None, cpus: float = 1.0,
                gpus: float = 0.0, outcomes: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
    """Record the initial weights' evaluation (`fgray.engine.evaluate.evaluate_init`) as the
    init row `name` (its method and trial id): a completed trials row whose best val kNN
    top-1 is the weights' val kNN top-1, so it ranks next to the trials, with its test
    metrics; `evals` rows for test and the val kNN top-1; `outcomes` rows for the per-image
    test outcomes when given. Returns the trials row."""
    end = time.time()
    start = end if start_time is None else float(start_time)
    wall = max(0.0, end - start)
    val = score(metrics)
    keys = {"study": study, "trial_id": name, PARTITION_COLUMN: name}
    row = dict(keys)
    row.update(
        backbone=weights_name(spec.backbone_name, spec.init), init=spec.init,
        dataset=spec.data.format, image_size=spec.train.image_size, status="completed",
        best_val_knn_top1=val, best_epoch=0, epochs_run=0,
        seed=spec.train.seed, wall_time_s=wall, cpu_hours=wall * cpus / 3600,
        gpu_hours=wall * gpus / 3600, start_time=start, end_time=end, fgray_version=__version__,
        git_revision=git_revision(), config_hash=config_hash(spec))
    row.update(param_fields({}, {"backbone": spec.backbone_name, "init": spec.init,
                                 "image_size": spec.train.image_size}))
    for name_, value in metrics.items():
        if f"test_{name_}" in TEST_METRICS and _finite(value):
            row[f"test_{name_}"] = float(value)
    evals = eval_rows(metrics, study=study, method=name, trial_id=name, seed=spec.train.seed)
    if val is not None:
        evals.append({**keys, "split": "val", "protocol": "knn", "metric": "top1",
                      "value": val, "seed": spec.train.seed})
    _append_outcomes(study_dir, outcomes, study=study, method=name, trial_id=name,
                     seed=spec.train.seed)
    if evals:
        append(study_dir, "evals", evals)
    write_trials(study_dir, [row])
    return row


def record_test(study_dir: str, method: str, trial_id: str, metrics: Mapping[str, float], *,
                seed: int, study: str | None = None,
                outcomes: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Record a trial's final test evaluation: its per-image `outcomes` rows when given
    (first: a study that finds the `evals` rows treats the trial as tested), its `evals`
    rows, and the trial's row with the `test_*` columns filled (end_time = now), in one
    read-modify-write of the trial's file. Returns the new trial row, or None when the
    trial has no row to extend."""
    _append_outcomes(study_dir, outcomes, study=study, method=method, trial_id=trial_id,
                     seed=seed)
    rows = eval_rows(metrics, study=study, method=method, trial_id=trial_id, seed=seed)
    if rows:
        append(study_dir, "evals", rows)

    def with_test(row: dict[str, Any]) -> dict[str, Any]:
        for name, value in metrics.items():
            column = f"test_{name}"
            if column in TEST_METRICS:
                row[column] = float(value)
        row["end_time"] = time.time()
        return row

    return update_trial(study_dir, method, trial_id, with_test)
