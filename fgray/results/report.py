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

import base64
import csv
import datetime as dt
import html
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

from fgray.engine.selection import BEST_METRIC, Best, best_of, score
from fgray.errors import UserError
from fgray.results.schema import PARAM_PREFIX, TEST_METRICS
from fgray.results.tables import latest_trials, load
from fgray.storage import (
    absolute,
    as_location,
    is_local,
    join,
    put,
    read_bytes,
    resolve,
    write_text,
)

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
                  if t.get("status") in RANKED_STATUSES and score(t, BEST_METRIC) is not None]
        params: dict[str, Any] = {}
        searched: dict[str, Any] = {}
        if ranked:
            # The best of the search: a seed retrain of the chosen configuration is a sample
            # of its spread, not a rival (picking the luckiest seed would bias the row).
            pool = [t for t in ranked if t.get(f"{PARAM_PREFIX}seed") is None] or ranked
            best, _ = best_of(pool, BEST_METRIC)
            params = _params(best)
            searched = {k[len(PARAM_PREFIX):]: v for k, v in best.items()
                        if k.startswith(PARAM_PREFIX) and v is not None}
            row.update(best_trial=best["trial_id"], best_epoch=best.get("best_epoch"),
                       config_hash=best.get("config_hash"),
                       val_knn_top1=best[BEST_METRIC], backbone=best.get("backbone"),
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
    put(fs, path, buf.getvalue())
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
        notes.append(f"no Optuna journal at {join(study_dir, OPTUNA_JOURNAL)}: "
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

    paths += _importance_plots(study_dir, fs, out, notes)
    return [as_location(target, p) for p in paths]


def plots(study_dir: str, out_dir: str | None = None,
          notes: list[str] | None = None) -> list[str]:
    """Write PNG plots of the study (default: `STUDY_DIR/plots/`) and return their paths:
    `val_vs_epoch_<method>.png`, `best_so_far.png`, `cost_vs_accuracy.png`, and
    `param_importance_<method>.png` per Optuna study in `STUDY_DIR/optuna/journal.log`
    (labelled by the study's `method` user attribute, else its name). Why a plot was skipped
    is appended to `notes` when given."""
    return _write_plots(study_dir, out_dir, notes if notes is not None else [])


# ---------------------------------------------------------------- viewers and HTML

REPORT_FILE = "report/index.html"
MAP_PREFIXES = ("maps/", "pairs/")  # the TensorBoard image tags the report shows


def _quote_path(study_dir: str, rel: str) -> str:
    path = join(study_dir, rel)
    return shlex.quote(absolute(path))


def viewer_commands(study_dir: str) -> dict[str, str | None]:
    """The shell commands that open the study in TensorBoard and in optuna-dashboard (None
    without an Optuna journal). optuna-dashboard reads a local journal file: for an object
    store study, the command first copies it here."""
    commands: dict[str, str | None] = {
        "tensorboard": f"tensorboard --logdir {_quote_path(study_dir, 'tensorboard')}",
        "optuna_dashboard": None}
    fs, root = resolve(study_dir)
    if fs.get_file_info(f"{root}/{OPTUNA_JOURNAL}").type == pafs.FileType.File:
        journal = _quote_path(study_dir, OPTUNA_JOURNAL)
        if "://" not in study_dir:
            commands["optuna_dashboard"] = f"optuna-dashboard {journal}"
        else:
            copy = ("gcloud storage cp" if study_dir.startswith("gs://") else "aws s3 cp")
            commands["optuna_dashboard"] = (f"{copy} {journal} journal.log && "
                                            "optuna-dashboard journal.log")
    return commands


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em;
       color: #1d2433; max-width: 1600px; }
h1 { margin-bottom: .1em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #d0d7e2; }
.meta, .legend, figcaption { color: #5a6478; }
pre { background: #f3f5f9; padding: .6em .8em; border-radius: 4px; overflow-x: auto; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d0d7e2; padding: .3em .55em; text-align: left;
         white-space: nowrap; vertical-align: top; }
th { background: #eef1f6; position: sticky; top: 0; }
tr.init td { background: #fbf7e9; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.params { white-space: normal; min-width: 18em; }
.gallery { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure { margin: 0; } figure img { max-width: 100%; border: 1px solid #d0d7e2; }
.plots figure img { width: 560px; }
.maps figure img { max-width: 820px; }
"""

_NUMERIC = {"val_knn_top1", *TEST_METRICS, "gpu_hours", "cpu_hours", "seeds", "completed",
            "stopped", "failed", "running"}


def _img(data: bytes, alt: str, *, min_width: int = 0, max_height: int = 700) -> str:
    """An inline PNG; one narrower than `min_width` is shown enlarged by a whole factor that
    keeps it under `max_height` (maps of 32-px images would be stamps), with crisp pixels."""
    encoded = base64.b64encode(data).decode("ascii")
    size = ""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and min_width:
        width, height = (int.from_bytes(data[i:i + 4], "big") for i in (16, 20))
        factor = min(min_width // max(width, 1), max_height // max(height, 1))
        if factor > 1:
            size = f' width="{width * factor}" style="image-rendering: pixelated"'
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}"{size}>'


def _leaderboard_html(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in _DISPLAY)
    body = []
    for row in rows:
        cells = []
        for name, text in zip(_DISPLAY, _display_cells(row)):
            cls = "num" if name in _NUMERIC else "params" if name == "params" else ""
            cells.append(f'<td class="{cls}">{html.escape(text)}</td>' if cls
                         else f"<td>{html.escape(text)}</td>")
        kind = ' class="init"' if row["is_init"] else ""
        body.append(f"<tr{kind}>{''.join(cells)}</tr>")
    if not body:
        return "<p>(no trials recorded yet)</p>"
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>"
            f'<p class="legend">{html.escape(LEGEND)}</p>')


def _read_bytes(path: str) -> bytes:
    data = read_bytes(path)
    if data is None:
        raise FileNotFoundError(path)
    return data


def html_report(study_dir: str, out: str | None = None,
                notes: list[str] | None = None) -> str:
    """Write a one-page, self-contained HTML report of the study (default
    `STUDY_DIR/report/index.html`; every image inline as base64) and return its path: how to
    open the study in TensorBoard and optuna-dashboard, the leaderboard (mean ± std over
    seeds), the plots (written under `STUDY_DIR/plots/` as `--plots` does), and per method
    its best trial's maps -- the last `maps/*` and `pairs/*` images logged to the trial's
    TensorBoard run (no model is loaded). Why something is missing goes to `notes` and to
    the page."""
    from fgray.results.tensorboard import latest_images, run_name

    notes = notes if notes is not None else []
    rows = leaderboard(study_dir)
    plot_paths = _write_plots(study_dir, None, notes)
    commands = viewer_commands(study_dir)
    name = study_dir.rstrip("/").rsplit("/", 1)[-1]
    trials = sum(r["trials_completed"] + r["trials_stopped"] + r["trials_failed"]
                 + r["trials_running"] for r in rows if not r["is_init"])
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    parts = [f"<h1>Study {html.escape(name)}</h1>",
             f'<p class="meta">{html.escape(study_dir)} &middot; {trials} trials &middot; '
             f"generated {generated} by <code>fgray results --html</code></p>",
             "<h2>Open the study</h2>",
             "<p>TensorBoard (scalars, maps, HParams, embedding projector; one run per "
             "trial):</p>", f"<pre>{html.escape(commands['tensorboard'] or '')}</pre>"]
    if commands["optuna_dashboard"]:
        parts += ["<p>optuna-dashboard (the Optuna studies: history, importances):</p>",
                  f"<pre>{html.escape(commands['optuna_dashboard'])}</pre>"]
    else:
        notes.append(f"no Optuna journal at {OPTUNA_JOURNAL}: no optuna-dashboard command")
    parts += ["<h2>Leaderboard</h2>", _leaderboard_html(rows)]

    parts.append("<h2>Plots</h2>")
    if plot_paths:
        figures = [f"<figure>{_img(_read_bytes(p), os.path.basename(p))}<figcaption>"
                   f"{html.escape(os.path.basename(p))}</figcaption></figure>"
                   for p in plot_paths]
        parts.append(f'<div class="gallery plots">{"".join(figures)}</div>')
    else:
        parts.append("<p>(no plots: nothing recorded yet)</p>")

    parts.append("<h2>Maps of each method's best trial</h2>")
    shown = 0
    for row in rows:
        if row["is_init"] or not row.get("best_trial"):
            continue
        images = latest_images(study_dir, run_name(row["method"], row["best_trial"]),
                               MAP_PREFIXES)
        if not images:
            notes.append(f"{row['method']}: its best trial {row['best_trial']} logged no "
                         f"{' or '.join(p + '*' for p in MAP_PREFIXES)} images to TensorBoard")
            continue
        shown += 1
        parts.append(f"<h3>{html.escape(row['method'])} &mdash; trial "
                     f"{html.escape(row['best_trial'])}</h3>")
        figures = [f"<figure>{_img(data, tag, min_width=560)}<figcaption>"
                   f"{html.escape(tag)}, epoch {step}"
                   f"</figcaption></figure>" for tag, step, data in images]
        parts.append(f'<div class="gallery maps">{"".join(figures)}</div>')
    if not shown:
        parts.append("<p>(no maps logged by the best trials)</p>")
    if notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        parts.append(f"<h2>Notes</h2><ul>{items}</ul>")

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>fgray study {html.escape(name)}</title>"
            '<link rel="icon" href="data:,">'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    target = out or join(study_dir, REPORT_FILE)
    write_text(target, page)
    return target


def results_command(study_dir: str, fmt: str = "table", *, tensorboard: bool = False,
                    plots: bool = False, html: bool = False) -> str:
    """What `fgray results STUDY_DIR` prints: the leaderboard in `fmt`; with `tensorboard`,
    the HParams table is refreshed from the trials table and the command to view the logs is
    added; with `plots`, the plots are written and their paths listed; with `html`, the
    one-page report is written (`html_report`) and its path printed. With json and any flag
    the output is one object: {"leaderboard", "tensorboard", "plots", "report", "notes"}."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    rows = leaderboard(study_dir)
    if not (tensorboard or plots or html):
        return render(rows, fmt)
    notes: list[str] = []
    command = paths = report = None
    if tensorboard:
        from fgray.results.tensorboard import write_hparams

        write_hparams(study_dir, load(study_dir, "trials").to_pylist())
        logdir = join(study_dir, "tensorboard")
        if "://" not in logdir:
            logdir = os.path.abspath(logdir)
        command = f"tensorboard --logdir {shlex.quote(logdir)}"
    if plots:
        paths = _write_plots(study_dir, None, notes)
    if html:
        # Its plots are the same files --plots writes; their notes are already in `notes`.
        report = html_report(study_dir, notes=[] if plots else notes)
    if fmt == "json":
        return json.dumps({"leaderboard": _json_safe(rows), "tensorboard": command,
                           "plots": paths, "report": report, "notes": notes}, indent=2,
                          default=str)
    lines = [render(rows, fmt).rstrip("\n"), ""]
    if command:
        lines.append(f"TensorBoard: {command}")
    if paths is not None:
        lines.append("plots:")
        lines += [f"  {p}" for p in paths]
    if report is not None:
        lines.append(f"report: {report}")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines) + "\n"
