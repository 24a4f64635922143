"""What `fgray results STUDY_DIR` prints and writes: the leaderboard in a format, the plots,
the TensorBoard and optuna-dashboard commands, and the one-page HTML report.

The parts live by job: the leaderboard and its statistics in `fgray.results.ranking`, its
text renderings in `fgray.results.rendering`, the plots in `fgray.results.figures`; this
module puts them together.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import os
import shlex

import pyarrow.fs as pafs

from fgray.errors import UserError
from fgray.results.figures import write_plots
from fgray.results.layout import OPTUNA_JOURNAL
from fgray.results.ranking import (
    COMPARISONS_FILE,
    leaderboard,
    rung_correlations,
    write_comparisons,
)
from fgray.results.rendering import CSS, FORMATS, json_safe, leaderboard_html, render, rung_lines
from fgray.results.tables import load
from fgray.storage import absolute, join, read_bytes, resolve, write_text

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


def plots(study_dir: str, out_dir: str | None = None,
          notes: list[str] | None = None) -> list[str]:
    """Write PNG plots of the study (default: `STUDY_DIR/plots/`) and return their paths:
    `val_vs_epoch_<method>.png`, `best_so_far.png`, `cost_vs_accuracy.png`, and
    `param_importance_<method>.png` per Optuna study in `STUDY_DIR/optuna/journal.log`
    (labelled by the study's `method` user attribute, else its name). Why a plot was skipped
    is appended to `notes` when given."""
    return write_plots(study_dir, out_dir, notes if notes is not None else [], OPTUNA_JOURNAL)


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
    plot_paths = write_plots(study_dir, None, notes, OPTUNA_JOURNAL)
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
    parts += ["<h2>Leaderboard</h2>", leaderboard_html(rows)]

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
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
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
    correlations = rung_correlations(study_dir)
    notes: list[str] = []
    try:
        write_comparisons(study_dir, rows)
    except OSError as exc:  # a study folder this user may read but not write
        notes.append(f"{COMPARISONS_FILE} not written ({exc})")
    if not (tensorboard or plots or html):
        text = render(rows, fmt)
        if fmt in ("table", "wide", "markdown") and correlations:
            text = text.rstrip("\n") + "\n\n" + "\n".join(rung_lines(correlations)) + "\n"
        return text + "".join(f"note: {n}\n" for n in notes if fmt != "json")
    command = paths = report = None
    if tensorboard:
        from fgray.results.tensorboard import write_hparams

        write_hparams(study_dir, load(study_dir, "trials").to_pylist())
        logdir = join(study_dir, "tensorboard")
        if "://" not in logdir:
            logdir = os.path.abspath(logdir)
        command = f"tensorboard --logdir {shlex.quote(logdir)}"
    if plots:
        paths = write_plots(study_dir, None, notes, OPTUNA_JOURNAL)
    if html:
        # Its plots are the same files --plots writes; their notes are already in `notes`.
        report = html_report(study_dir, notes=[] if plots else notes)
    if fmt == "json":
        return json.dumps({"leaderboard": json_safe(rows), "tensorboard": command,
                           "plots": paths, "report": report, "notes": notes}, indent=2,
                          default=str)
    lines = [render(rows, fmt).rstrip("\n"), ""]
    if fmt in ("table", "wide", "markdown") and correlations:
        lines += rung_lines(correlations) + [""]
    if command:
        lines.append(f"TensorBoard: {command}")
    if paths is not None:
        lines.append("plots:")
        lines += [f"  {p}" for p in paths]
    if report is not None:
        lines.append(f"report: {report}")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines) + "\n"
