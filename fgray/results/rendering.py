"""The leaderboard (`fgray.results.ranking.leaderboard`) as text: what `fgray results
--format` prints, and the leaderboard table the HTML report embeds.

`table` (the default) fits 100 columns -- method, kNN top-1, Rank-1, mAP (mean ± std over
seeds) and the kNN difference from MoCo with its interval; `wide` and `markdown` carry every
column; `json` (and the Parquet file `ranking.write_comparisons` writes) carry every metric's
interval; `html` is a standalone page of the wide table.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import statistics
from typing import Any

from fgray.errors import UserError
from fgray.results.ranking import HEADLINE, REFERENCE
from fgray.results.schema import TEST_METRICS

FORMATS = ("table", "wide", "csv", "markdown", "json", "html")


def rung_lines(correlations: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The console's account of `rung_correlations`, one line per method and rung, then a
    plain sentence per group whose early ranking cannot be trusted."""
    if not correlations:
        return []
    lines = ["ASHA: Spearman rho of val kNN top-1 at each rung vs the final epoch "
             "(completed trials):"]
    verdicts = []
    for name, items in correlations.items():
        for c in items:
            rho = "-" if c["rho"] is None else f"{c['rho']:+.2f}"
            lines.append(f"  {name:<8} epoch {c['rung']} vs {c['final']}: rho {rho} "
                         f"(n={c['n']})")
            if c["trusted"] is False:
                verdicts.append(f"{name}: rho {rho} at epoch {c['rung']} is too low to trust "
                                f"ASHA's early stops at this budget.")
            elif c["trusted"] is None:
                verdicts.append(f"{name}: {c['n']} completed trials are too few to tell "
                                f"whether epoch {c['rung']} predicts the final ranking.")
    for v in verdicts:
        lines += _wrap(v)
    return lines


_DISPLAY = ("method", "backbone", "best_trial", "val_knn_top1", *TEST_METRICS, "knn test se",
            "vs moco", "vs init", "seeds", "completed", "stopped", "failed", "running",
            "gpu_hours", "cpu_hours", "note", "params")
LEGEND = (f"Metrics: mean ± std over seeds. knn test se: the test set's standard error of kNN "
          f"top-1 (another draw of as many test images moves the mean by about that). vs "
          f"{REFERENCE} / vs init: paired difference of test kNN top-1 (points) from "
          f"{REFERENCE}'s and from the init row's, with its 95 % interval over seeds and "
          "test images; * where the interval excludes 0. JSON carries every metric's "
          "interval.")
WIDTH = 100  # the default console leaderboard's width
COMPACT = (("method", "method"), ("kNN top-1", "test_knn_top1"), ("Rank-1", "test_rank1"),
           ("mAP", "test_map"), ("test se", "knn test se"),
           (f"kNN vs {REFERENCE} [95% CI]", "vs moco"))


def _digits(column: str) -> int:
    """Localisation scores are fractions in [0, 1]; every other metric is percent."""
    return 3 if column.startswith("test_loc_") else 2


def _fmt_std(value: float, digits: int) -> str:
    """A spread with at least two significant digits (0.004 stays 0.004, not 0.0)."""
    if value != 0 and round(value, digits) == 0:
        return f"{value:.2g}"
    return f"{value:.{digits}f}"


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
    """"+4.1 [+0.3, +7.9]*" for a difference whose 95 % interval excludes 0, "+1.0 [-2.4,
    +4.4]" for one whose interval holds 0, "+1.0 (1 seed)" for one without an interval, "-"
    for none."""
    if result is None:
        return "-"
    digits = _digits(column) - 1
    if result.get("low") is None:
        return f"{result['diff']:+.{digits}f} ({result['seeds']} seed)"
    text = (f"{result['diff']:+.{digits}f} [{result['low']:+.{digits}f}, "
            f"{result['high']:+.{digits}f}]")
    return f"{text}*" if result["significant"] else text


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
        "knn test se": _fmt_number(row.get(f"{HEADLINE}_se"), 1),
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
            text += f" ± {_fmt_std(row[f'{col}_std'], _digits(col))}"
        cells[col] = text
    return [cells[name] for name in _DISPLAY]


def _compact_cells(row: dict[str, Any]) -> list[str]:
    """The default table's cells: one decimal, the method name cut to 16 characters."""
    method = row["method"] if len(row["method"]) <= 16 else row["method"][:15] + "…"
    cells = {"method": method,
             "vs moco": fmt_comparison((row.get("vs_moco") or {}).get(HEADLINE)),
             "knn test se": ("±" + _fmt_number(row.get(f"{HEADLINE}_se"), 1)
                             if row.get(f"{HEADLINE}_se") is not None else "-")}
    for col in ("test_knn_top1", "test_rank1", "test_map"):
        text = _fmt_number(row[col], 1)
        if row[f"{col}_std"] is not None:
            text += f" ± {_fmt_std(row[f'{col}_std'], 1)}"
        cells[col] = text
    return [cells[key] for _, key in COMPACT]


def _wrap(text: str, width: int = WIDTH) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, break_on_hyphens=False)


def _detectable(rows: list[dict[str, Any]]) -> float | None:
    """The median smallest detectable kNN difference from MoCo (80 % power) over the rows."""
    mdes = [c["mde"] for r in rows if (c := (r.get("vs_moco") or {}).get(HEADLINE))
            and c.get("mde") is not None]
    return statistics.median(mdes) if mdes else None


def compact_table(rows: list[dict[str, Any]]) -> str:
    """The default console leaderboard: method, kNN top-1, Rank-1, mAP (mean ± std over
    seeds), the kNN test-set standard error and the kNN difference from MoCo with its 95 %
    interval, one line per method, every line at most `WIDTH` characters."""
    if not rows:
        return "(no trials recorded yet)\n"
    heads = [h for h, _ in COMPACT]
    body = [_compact_cells(r) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in body]
    legend = (f"Percent; mean ± std over seeds. test se: the test set's standard error of kNN "
              f"top-1. kNN vs {REFERENCE}: paired difference, 95 % interval over seeds and test "
              "images; * where it excludes 0.")
    mde = _detectable(rows)
    if mde is not None:
        legend += (f" Smallest kNN difference from {REFERENCE} these seeds and test images "
                   f"detect (80 % power): about {mde:.1f} points.")
    legend += " Every metric, vs init and the rest: --format wide|markdown|json|html."
    return "\n".join(lines + [""] + _wrap(legend)) + "\n"


def _csv_keys() -> list[str]:
    keys = ["method", "backbone", "init", "best_trial", "best_epoch", "config_hash",
            "val_knn_top1"]
    for col in TEST_METRICS:
        keys += [col, f"{col}_std", f"{col}_n", f"{col}_se"]
    return keys + ["vs_moco", "vs_moco_low", "vs_moco_high", "vs_moco_significant",
                   "vs_init", "vs_init_low", "vs_init_high", "vs_init_significant",
                   "trials_completed", "trials_stopped", "trials_failed", "trials_running",
                   "gpu_hours", "cpu_hours", "note", "params", "searched"]


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float as None (JSON has no NaN), nested dicts and lists too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    """The leaderboard as the compact text table (`table`), the aligned table of every column
    (`wide`), CSV, GitHub markdown, JSON or a standalone HTML page."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "table":
        return compact_table(rows)
    if fmt == "html":
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>fgray leaderboard</title><style>{CSS}</style></head><body>\n"
                f"{leaderboard_html(rows)}\n</body></html>\n")
    if fmt == "json":
        return json.dumps(json_safe(rows), indent=2, sort_keys=False, default=str)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=_csv_keys(), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            flat = {k: row.get(k) for k in _csv_keys()}
            for ref in ("vs_moco", "vs_init"):  # the headline metric's comparison
                result = (row.get(ref) or {}).get(HEADLINE)
                for key, field in (("", "diff"), ("_low", "low"), ("_high", "high"),
                                   ("_significant", "significant")):
                    flat[f"{ref}{key}"] = result[field] if result else None
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


# The style of every HTML page fgray writes: `render(rows, "html")` and the report page.
CSS = """
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


def leaderboard_html(rows: list[dict[str, Any]]) -> str:
    """The wide leaderboard as an HTML table with its legend (init rows shaded)."""
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
