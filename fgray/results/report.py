"""Leaderboard, renderings and plots of a study: what `fgray results STUDY_DIR` prints.

Final test metrics come from the `evals` table (split=test) of every trial that shares the
best trial's `config_hash` (the same configuration re-run with other seeds), reported as
mean ± sample std; when a configuration has no such rows, the trials' own `test_*` columns
are used. Evaluation rows map to leaderboard columns by (protocol, metric): retrieval rank1 /
rank5 / map, knn top1 / top5, linear top1 / top5 (percent), localisation box_mass / pointing
/ part_hits (fractions) -- a metric may repeat its protocol, e.g. `knn_top1`.

The init rows (method `init`, or `init:<weights>` when methods start from different weights:
the initial weights evaluated without SSL) come first. Every other row is compared with MoCo
and with the init row of its weights, metric by metric: a difference counts only where it
exceeds the spread, |mean_a - mean_b| > std_a + std_b (the ±1 std intervals do not
overlap). A row with one value (one seed, or the init row) has no measured spread: its std
counts as 0, so the rule then rests on the other row's spread alone (two single values
differ "significantly" whenever they differ). The text renderings show the comparison on
the headline metric (`HEADLINE`, test kNN top-1) as "vs moco" / "vs init": "+4.1*" where it
counts, "+1.0 (n.s.)" where it does not; JSON carries it for every metric.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import statistics
import tempfile
from collections import Counter
from typing import Any

import pyarrow.dataset as ds
import pyarrow.fs as pafs

from fgray.errors import UserError
from fgray.results.schema import PARAM_PREFIX, TEST_METRICS
from fgray.results.tables import is_local, latest_trials, load, resolve

FORMATS = ("table", "csv", "markdown", "json")
RANKED_STATUSES = ("completed", "stopped")
OPTUNA_JOURNAL = "optuna/journal.log"
INIT = "init"  # the init rows' method: `init`, or `init:<weights>`
REFERENCE = "moco"  # the method every other one is compared with
HEADLINE = "test_knn_top1"  # the metric of the "vs moco" / "vs init" columns

_EVAL_COLUMN = {
    ("retrieval", "rank1"): "test_rank1",
    ("retrieval", "rank5"): "test_rank5",
    ("retrieval", "map"): "test_map",
    ("knn", "top1"): "test_knn_top1",
    ("knn", "top5"): "test_knn_top5",
    ("linear", "top1"): "test_linear_top1",
    ("linear", "top5"): "test_linear_top5",
    ("localisation", "box_mass"): "test_loc_box_mass",
    ("localisation", "pointing"): "test_loc_pointing",
    ("localisation", "part_hits"): "test_loc_part_hits",
}


def eval_column(protocol: str | None, metric: str | None) -> str | None:
    """The leaderboard column an `evals` row feeds, or None."""
    if not protocol or not metric:
        return None
    name = metric.lower()
    if name.startswith(f"{protocol}_"):
        name = name[len(protocol) + 1:]
    return _EVAL_COLUMN.get((protocol, name))


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def _summary(values: list[float]) -> tuple[float | None, float | None, int]:
    if not values:
        return None, None, 0
    std = statistics.stdev(values) if len(values) >= 2 else None
    return statistics.fmean(values), std, len(values)


def _params(trial: dict[str, Any]) -> dict[str, Any]:
    text = trial.get("params_json")
    return json.loads(text) if text else {}


def is_init(method: str) -> bool:
    """Whether a leaderboard method is an init row (the initial weights, no SSL)."""
    return method == INIT or method.startswith(f"{INIT}:")


def compare(a: dict[str, Any], b: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """Row `a` against row `b` on `metric`: the difference of the means, the spread
    std_a + std_b (a missing std -- one value -- counts as 0) and whether the difference
    exceeds it; None when either mean is missing."""
    if a.get(metric) is None or b.get(metric) is None:
        return None
    diff = float(a[metric]) - float(b[metric])
    spread = float(a.get(f"{metric}_std") or 0.0) + float(b.get(f"{metric}_std") or 0.0)
    return {"diff": diff, "spread": spread, "significant": abs(diff) > spread}


def method_note(method: str, backbone: str | None) -> str | None:
    """What a row's reader must know about how it was run."""
    if is_init(method):
        return "initial weights, no SSL"
    if method == "lodisc" and backbone:
        import timm

        vit = timm.models.is_model_in_modules(
            backbone, ("vision_transformer", "vision_transformer_hybrid", "deit"))
        if not vit:
            return "cnn location map [ours]"  # LoDisc's attention map needs a ViT
    return None


def _weights(row: dict[str, Any]) -> tuple[Any, Any]:
    return row.get("backbone"), row.get("init")


def _add_comparisons(rows: list[dict[str, Any]]) -> None:
    """Each non-init row against MoCo (`vs_moco`) and against the init row of its weights
    (`vs_init`; the only init row when there is one), metric by metric."""
    reference = next((r for r in rows if r["method"] == REFERENCE), None)
    inits = [r for r in rows if r["is_init"]]
    for row in rows:
        row["vs_moco"] = row["vs_init"] = None
        if row["is_init"]:
            continue
        if reference is not None and row is not reference:
            row["vs_moco"] = {m: compare(row, reference, m) for m in TEST_METRICS}
        same = [r for r in inits if _weights(r) == _weights(row)]
        base = same[0] if same else (inits[0] if len(inits) == 1 else None)
        if base is not None:
            row["vs_init"] = {m: compare(row, base, m) for m in TEST_METRICS}


def leaderboard(study_dir: str) -> list[dict[str, Any]]:
    """One row per method, the init rows first: its best trial by best_val_knn_top1 among
    completed/stopped trials, the weights it started from (backbone with its tag, init),
    that trial's parameters, its final test metrics (mean, std and count over the seeds of
    its configuration), trial counts by status, the total GPU/CPU hours, and its comparison
    with MoCo and with the init row (see the module docstring)."""
    trials = latest_trials(load(study_dir, "trials").to_pylist())
    evals = load(study_dir, "evals", filter=ds.field("split") == "test").to_pylist()
    rows = []
    methods = sorted({t["method"] for t in trials}, key=lambda m: (not is_init(m), m))
    for method in methods:
        mine = sorted((t for t in trials if t["method"] == method), key=lambda t: t["trial_id"])
        counts = Counter(t.get("status") for t in mine)
        row: dict[str, Any] = {
            "method": method, "is_init": is_init(method), "backbone": None, "init": None,
            "note": None, "best_trial": None, "best_epoch": None, "config_hash": None,
            "val_knn_top1": None}
        for col in TEST_METRICS:
            row.update({col: None, f"{col}_std": None, f"{col}_n": 0})
        ranked = [t for t in mine
                  if t.get("status") in RANKED_STATUSES and _finite(t.get("best_val_knn_top1"))]
        params: dict[str, Any] = {}
        searched: dict[str, Any] = {}
        if ranked:
            best = max(ranked, key=lambda t: t["best_val_knn_top1"])
            params = _params(best)
            searched = {k[len(PARAM_PREFIX):]: v for k, v in best.items()
                        if k.startswith(PARAM_PREFIX) and v is not None}
            row.update(best_trial=best["trial_id"], best_epoch=best.get("best_epoch"),
                       config_hash=best.get("config_hash"),
                       val_knn_top1=best["best_val_knn_top1"], backbone=best.get("backbone"),
                       init=best.get("init"))
            same = ([t for t in mine if t.get("config_hash") == best["config_hash"]]
                    if best.get("config_hash") else [best])
            ids = {t["trial_id"] for t in same}
            seen: dict[tuple[str, str, Any], float] = {}
            for e in evals:
                col = eval_column(e.get("protocol"), e.get("metric"))
                if (col and e["method"] == method and e["trial_id"] in ids
                        and _finite(e.get("value"))):
                    # One value per trial and seed: a re-run evaluation does not count twice.
                    seen.setdefault((col, e["trial_id"], e.get("seed")), float(e["value"]))
            for col in TEST_METRICS:
                values = [v for (c, _, _), v in seen.items() if c == col]
                if not values:
                    values = [float(t[col]) for t in same if _finite(t.get(col))]
                mean, std, n = _summary(values)
                row.update({col: mean, f"{col}_std": std, f"{col}_n": n})
        row.update(
            trials_completed=counts.get("completed", 0), trials_stopped=counts.get("stopped", 0),
            trials_failed=counts.get("failed", 0), trials_running=counts.get("running", 0),
            gpu_hours=math.fsum(float(t["gpu_hours"]) for t in mine
                                if _finite(t.get("gpu_hours"))),
            cpu_hours=math.fsum(float(t["cpu_hours"]) for t in mine
                                if _finite(t.get("cpu_hours"))),
            params=params, searched=searched)
        if row["backbone"] is None and mine:  # nothing ranked yet: the weights all the same
            row.update(backbone=mine[0].get("backbone"), init=mine[0].get("init"))
        row["note"] = method_note(method, row["backbone"])
        rows.append(row)
    _add_comparisons(rows)
    return rows


# ---------------------------------------------------------------- rendering

_DISPLAY = ("method", "backbone", "best_trial", "val_knn_top1", *TEST_METRICS, "vs moco",
            "vs init", "seeds", "completed", "stopped", "failed", "running", "gpu_hours",
            "cpu_hours", "note", "params")
LEGEND = (f"vs {REFERENCE} / vs init: difference of the mean test kNN top-1 (points) from "
          f"{REFERENCE}'s and from the init row's; * where it exceeds the spread, "
          "|mean_a - mean_b| > std_a + std_b (the ±1 std intervals do not overlap), (n.s.) "
          "where it does not. A row with one value (one seed, the init row) has std 0: the "
          "spread is then the other row's std alone.")


def _digits(column: str) -> int:
    """Localisation scores are fractions in [0, 1]; every other metric is percent."""
    return 3 if column.startswith("test_loc_") else 2


def _fmt_number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1e4 or 0 < abs(value) < 1e-3:
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_params(params: dict[str, Any]) -> str:
    parts = []
    for key in sorted(params):
        value = params[key]
        if isinstance(value, float):
            text = f"{value:.4g}"
        elif isinstance(value, (list, dict)):
            text = json.dumps(value)
        else:
            text = str(value)
        parts.append(f"{key}={text}")
    return ", ".join(parts)


def fmt_comparison(result: dict[str, Any] | None, column: str = HEADLINE) -> str:
    """"+4.1*" for a difference that exceeds the spread, "+1.0 (n.s.)" for one that does
    not, "-" for none."""
    if result is None:
        return "-"
    digits = _digits(column) - 1
    text = f"{result['diff']:+.{digits}f}"
    return f"{text}*" if result["significant"] else f"{text} (n.s.)"


def _weights_cell(row: dict[str, Any]) -> str:
    if not row.get("backbone"):
        return "-"
    return f"{row['backbone']} ({row['init']})" if row.get("init") else row["backbone"]


def _display_cells(row: dict[str, Any]) -> list[str]:
    cells = {
        "method": row["method"],
        "backbone": _weights_cell(row),
        "best_trial": row["best_trial"] or "-",
        "val_knn_top1": _fmt_number(row["val_knn_top1"], 2),
        "vs moco": fmt_comparison((row.get("vs_moco") or {}).get(HEADLINE)),
        "vs init": fmt_comparison((row.get("vs_init") or {}).get(HEADLINE)),
        "seeds": str(max(row[f"{c}_n"] for c in TEST_METRICS)),
        "completed": str(row["trials_completed"]),
        "stopped": str(row["trials_stopped"]),
        "failed": str(row["trials_failed"]),
        "running": str(row["trials_running"]),
        "gpu_hours": _fmt_number(row["gpu_hours"], 2),
        "cpu_hours": _fmt_number(row["cpu_hours"], 2),
        "note": row.get("note") or "",
        # The searched parameters tell trials apart; fixed ones are in params_json.
        "params": _fmt_params(row["searched"] or row["params"]),
    }
    for col in TEST_METRICS:
        text = _fmt_number(row[col], _digits(col))
        if row[f"{col}_std"] is not None:
            text += f" ± {_fmt_number(row[f'{col}_std'], _digits(col))}"
        cells[col] = text
    return [cells[name] for name in _DISPLAY]


def _csv_keys() -> list[str]:
    keys = ["method", "backbone", "init", "best_trial", "best_epoch", "config_hash",
            "val_knn_top1"]
    for col in TEST_METRICS:
        keys += [col, f"{col}_std", f"{col}_n"]
    return keys + ["vs_moco", "vs_moco_significant", "vs_init", "vs_init_significant",
                   "trials_completed", "trials_stopped", "trials_failed", "trials_running",
                   "gpu_hours", "cpu_hours", "note", "params", "searched"]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    """The leaderboard as an aligned text table, CSV, GitHub markdown or JSON."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(_json_safe(rows), indent=2, sort_keys=False, default=str)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=_csv_keys(), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            flat = {k: row.get(k) for k in _csv_keys()}
            for ref in ("vs_moco", "vs_init"):  # the headline metric's comparison
                result = (row.get(ref) or {}).get(HEADLINE)
                flat[ref] = result["diff"] if result else None
                flat[f"{ref}_significant"] = result["significant"] if result else None
            flat["params"] = json.dumps(row.get("params") or {}, sort_keys=True)
            flat["searched"] = json.dumps(row.get("searched") or {}, sort_keys=True)
            writer.writerow(flat)
        return out.getvalue()
    body = [_display_cells(row) for row in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(_DISPLAY) + " |", "|" + "---|" * len(_DISPLAY)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
                  for cells in body]
        if body:
            lines += ["", LEGEND]
        return "\n".join(lines) + "\n"
    widths = [max(len(h), *(len(cells[i]) for cells in body)) if body else len(h)
              for i, h in enumerate(_DISPLAY)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(_DISPLAY, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in body]
    if not body:
        lines.append("(no trials recorded yet)")
    else:
        lines += ["", LEGEND]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _save(fig: Any, fs: pafs.FileSystem, directory: str, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    path = f"{directory}/{name}"
    with fs.open_output_stream(path) as stream:
        stream.write(buf.getvalue())
    return path


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _start_key(trial: dict[str, Any]) -> tuple:
    start = trial.get("start_time")
    return (start is None, start.timestamp() if start else 0.0, trial["trial_id"])


def _open_journal(study_dir: str, notes: list[str]) -> tuple[Any, str | None]:
    """The study's Optuna JournalStorage (a local copy for object stores), or None."""
    fs, root = resolve(study_dir)
    path = f"{root}/{OPTUNA_JOURNAL}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        notes.append(f"no Optuna journal at {study_dir.rstrip('/')}/{OPTUNA_JOURNAL}: "
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


def _importance_plots(study_dir: str, fs: pafs.FileSystem, out: str,
                      notes: list[str]) -> list[str]:
    from matplotlib.figure import Figure

    storage, copy = _open_journal(study_dir, notes)
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


def _write_plots(study_dir: str, out_dir: str | None, notes: list[str]) -> list[str]:
    # Figure without pyplot: no global backend switch, nothing left open between calls.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # The init rows are no trials: nothing to plot against trials or cost.
    trials = [t for t in latest_trials(load(study_dir, "trials").to_pylist())
              if not is_init(t["method"])]
    epochs = load(study_dir, "epochs").to_pylist()
    target = out_dir or f"{study_dir.rstrip('/')}/plots"
    fs, out = resolve(target)
    fs.create_dir(out, recursive=True)
    paths = []

    curves: dict[str, dict[str, dict[int, float]]] = {}
    for e in epochs:
        if _finite(e.get("val_knn_top1")) and e.get("epoch") is not None:
            curves.setdefault(e["method"], {}).setdefault(e["trial_id"], {})[e["epoch"]] = \
                float(e["val_knn_top1"])
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
            best, xs, ys = None, [], []
            for i, t in enumerate(ordered, start=1):
                if t.get("status") in RANKED_STATUSES and _finite(t.get("best_val_knn_top1")):
                    value = float(t["best_val_knn_top1"])
                    best = value if best is None else max(best, value)
                if best is not None:
                    xs.append(i)
                    ys.append(best)
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
                    float(t["best_val_knn_top1"]))
                   for t in trials if t["method"] == method and _finite(t.get("best_val_knn_top1"))]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=method)
        ax.set_xlabel("GPU + CPU hours")
        ax.set_ylabel("best val kNN top-1")
        ax.set_title("cost vs accuracy")
        ax.legend(fontsize="small")
        paths.append(_save(fig, fs, out, "cost_vs_accuracy.png"))

    paths += _importance_plots(study_dir, fs, out, notes)
    if "://" in target:
        scheme = target.split("://", 1)[0]
        paths = [f"{scheme}://{p}" for p in paths]
    return paths


def plots(study_dir: str, out_dir: str | None = None,
          notes: list[str] | None = None) -> list[str]:
    """Write PNG plots of the study (default: `STUDY_DIR/plots/`) and return their paths:
    `val_vs_epoch_<method>.png`, `best_so_far.png`, `cost_vs_accuracy.png`, and
    `param_importance_<method>.png` per Optuna study in `STUDY_DIR/optuna/journal.log`
    (labelled by the study's `method` user attribute, else its name). Why a plot was skipped
    is appended to `notes` when given."""
    return _write_plots(study_dir, out_dir, notes if notes is not None else [])


def results_command(study_dir: str, fmt: str = "table", *, tensorboard: bool = False,
                    plots: bool = False) -> str:
    """What `fgray results STUDY_DIR` prints: the leaderboard in `fmt`; with `tensorboard`,
    the HParams table is refreshed from the trials table and the command to view the logs is
    added; with `plots`, the plots are written and their paths listed. With json and either
    flag the output is one object: {"leaderboard", "tensorboard", "plots", "notes"}."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    rows = leaderboard(study_dir)
    if not (tensorboard or plots):
        return render(rows, fmt)
    notes: list[str] = []
    command = paths = None
    if tensorboard:
        from fgray.results.tensorboard import write_hparams

        write_hparams(study_dir, load(study_dir, "trials").to_pylist())
        logdir = f"{study_dir.rstrip('/')}/tensorboard"
        if "://" not in logdir:
            logdir = os.path.abspath(logdir)
        command = f"tensorboard --logdir {shlex.quote(logdir)}"
    if plots:
        paths = _write_plots(study_dir, None, notes)
    if fmt == "json":
        return json.dumps({"leaderboard": _json_safe(rows), "tensorboard": command,
                           "plots": paths, "notes": notes}, indent=2, default=str)
    lines = [render(rows, fmt).rstrip("\n"), ""]
    if command:
        lines.append(f"TensorBoard: {command}")
    if paths is not None:
        lines.append("plots:")
        lines += [f"  {p}" for p in paths]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines) + "\n"
