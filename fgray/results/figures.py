"""The PNG plots of a study (`fgray results --plots`, and the report page's figures): val
kNN top-1 per epoch, best so far, cost against accuracy, and Optuna's parameter importance.

Figures are drawn without pyplot (no global backend, nothing left open) and written through
the study's storage, local or object store.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

import pyarrow.fs as pafs

from fgray.engine.selection import BEST_METRIC, Best, score
from fgray.results.ranking import RANKED_STATUSES, is_init
from fgray.results.tables import latest_trials, load
from fgray.storage import as_location, is_local, join, put, resolve


def _save(fig: Any, fs: pafs.FileSystem, directory: str, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    path = f"{directory}/{name}"
    put(fs, path, buf.getvalue())
    return path


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _start_key(trial: dict[str, Any]) -> tuple:
    start = trial.get("start_time")
    return (start is None, start.timestamp() if start else 0.0, trial["trial_id"])


def _open_journal(study_dir: str, journal: str, notes: list[str]) -> tuple[Any, str | None]:
    """The study's Optuna JournalStorage at `journal` (relative to the study; a local copy
    for object stores), or None."""
    fs, root = resolve(study_dir)
    path = f"{root}/{journal}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        notes.append(f"no Optuna journal at {join(study_dir, journal)}: "
                     "parameter-importance plots skipped")
        return None, None
    import optuna
    from optuna.storages.journal import JournalFileBackend

    copy = None
    if not is_local(fs):
        handle, copy = tempfile.mkstemp(suffix=".log")
        with os.fdopen(handle, "wb") as out, fs.open_input_stream(path) as src:
            out.write(src.read())
        path = copy
    return optuna.storages.JournalStorage(JournalFileBackend(path)), copy


def _importance_plots(study_dir: str, journal: str, fs: pafs.FileSystem, out: str,
                      notes: list[str]) -> list[str]:
    from matplotlib.figure import Figure

    storage, copy = _open_journal(study_dir, journal, notes)
    if storage is None:
        return []
    import optuna
    from optuna.trial import TrialState

    paths = []
    try:
        for name in optuna.study.get_all_study_names(storage):
            study = optuna.load_study(study_name=name, storage=storage)
            # The tune layer names one Optuna study per method or records it as a user attr.
            label = str(study.user_attrs.get("method", name))
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if len(done) < 2:
                notes.append(f"Optuna study {name!r}: {len(done)} completed trial(s), need 2 "
                             "for parameter importance; skipped")
                continue
            if len(study.directions) > 1:
                notes.append(f"Optuna study {name!r} is multi-objective; importance skipped")
                continue
            try:
                importances = optuna.importance.get_param_importances(study)
            except (ValueError, RuntimeError) as exc:
                notes.append(f"Optuna study {name!r}: parameter importance failed ({exc})")
                continue
            if not importances:
                notes.append(f"Optuna study {name!r}: no parameters varied; skipped")
                continue
            names = list(importances)[::-1]
            fig = Figure(figsize=(6, 0.4 * len(names) + 1.5), layout="constrained")
            ax = fig.subplots()
            ax.barh(names, [importances[n] for n in names])
            ax.set_xlabel("importance (PED-ANOVA, sums to 1)")
            ax.set_title(f"parameter importance: {label}")
            paths.append(_save(fig, fs, out, f"param_importance_{_safe_name(label)}.png"))
    finally:
        if copy:
            os.remove(copy)
    return paths


def write_plots(study_dir: str, out_dir: str | None, notes: list[str],
                journal: str) -> list[str]:
    """The PNG plots `fgray.results.report.plots` describes, written under `out_dir`
    (default `STUDY_DIR/plots/`); `journal` is the Optuna journal's path in the study (its
    owner passes it: this module only reads it). Why a plot was skipped goes to `notes`."""
    # Figure without pyplot: no global backend switch, nothing left open between calls.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # The init rows are no trials: nothing to plot against trials or cost.
    trials = [t for t in latest_trials(load(study_dir, "trials").to_pylist())
              if not is_init(t["method"])]
    epochs = load(study_dir, "epochs").to_pylist()
    target = out_dir or join(study_dir, "plots")
    fs, out = resolve(target)
    fs.create_dir(out, recursive=True)
    paths = []

    curves: dict[str, dict[str, dict[int, float]]] = {}
    for e in epochs:
        if score(e) is not None and e.get("epoch") is not None:
            curves.setdefault(e["method"], {}).setdefault(e["trial_id"], {})[e["epoch"]] = \
                score(e)
    if not curves:
        notes.append("no val_knn_top1 in the epochs table: val-vs-epoch plots skipped")
    for method in sorted(curves):
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.subplots()
        for trial_id in sorted(curves[method]):
            points = sorted(curves[method][trial_id].items())
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", lw=1,
                    label=trial_id)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("val kNN top-1")
        ax.set_title(f"{method}: val kNN top-1 per epoch ({len(curves[method])} trials)")
        if len(curves[method]) <= 12:
            ax.legend(fontsize="small")
        paths.append(_save(fig, fs, out, f"val_vs_epoch_{_safe_name(method)}.png"))

    if not trials:
        notes.append("no trials recorded: best-so-far and cost plots skipped")
    else:
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.subplots()
        for method in sorted({t["method"] for t in trials}):
            ordered = sorted((t for t in trials if t["method"] == method), key=_start_key)
            best, xs, ys = Best(BEST_METRIC), [], []
            for i, t in enumerate(ordered, start=1):
                if t.get("status") in RANKED_STATUSES:
                    best.update(t)
                if best.value is not None:
                    xs.append(i)
                    ys.append(best.value)
            ax.step(xs, ys, where="post", marker="o", label=method)
        ax.set_xlabel("trial (by start time)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("best val kNN top-1 so far")
        ax.set_title("best so far")
        ax.legend(fontsize="small")
        paths.append(_save(fig, fs, out, "best_so_far.png"))

        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.subplots()
        for method in sorted({t["method"] for t in trials}):
            pts = [((t.get("gpu_hours") or 0.0) + (t.get("cpu_hours") or 0.0),
                    score(t, BEST_METRIC))
                   for t in trials if t["method"] == method and score(t, BEST_METRIC) is not None]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=method)
        ax.set_xlabel("GPU + CPU hours")
        ax.set_ylabel("best val kNN top-1")
        ax.set_title("cost vs accuracy")
        ax.legend(fontsize="small")
        paths.append(_save(fig, fs, out, "cost_vs_accuracy.png"))

    paths += _importance_plots(study_dir, journal, fs, out, notes)
    return [as_location(target, p) for p in paths]
