"""Render a results JSON of benchmarks/run.py as the markdown tables of RESULTS.md.

    python benchmarks/report.py results-gpu.json >> benchmarks/RESULTS.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _f(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def machine(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    gpu = f", GPU {hw['gpu']} x{hw['gpu_count']}" if hw.get("gpu") else ", no GPU"
    before = ", ".join(f"{x:.2f}" for x in report["load_average_before"])
    after = ", ".join(f"{x:.2f}" for x in report.get("load_average_after", []))
    return (f"- Written: {hw['date']} (by the last run into this file; each section says when"
            f" it ran)\n- Machine: {hw['cpus']} CPUs ({hw['cpu_model']}){gpu}; torch"
            f" {hw['torch']}, {hw['torch_threads']} torch threads, Python {hw['python']}\n"
            f"- Load average (1, 5, 15 min) of that run, before: {before}; after: {after}\n")


def datapath(r: dict[str, Any]) -> str:
    lines = ["| case | precision | steps/epoch | full steps/s | ceiling steps/s | PIL steps/s |"
             " full / ceiling | full / PIL | cached img/s (data only) | PIL img/s (data only) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in r["cases"]:
        q, d = c["ratios"], c["data_only"]
        lines.append(
            f"| {c['case']['name']} | {c['precision']} | {c['steps_per_epoch']} |"
            f" {_f(c['full']['steps_per_s'])} ({_f(c['full']['steps_per_s_best'])}) |"
            f" {_f(c['ceiling']['steps_per_s'])} ({_f(c['ceiling']['steps_per_s_best'])}) |"
            f" {_f(c['pil']['steps_per_s'])} ({_f(c['pil']['steps_per_s_best'])}) |"
            f" {_f(q['full_over_ceiling'], 3)} ({_f(q['full_over_ceiling_best'], 3)}) |"
            f" {_f(q['full_over_pil'])} ({_f(q['full_over_pil_best'])}) |"
            f" {d['cached_images_per_s']:.0f} ({d['cached_images_per_s_best']:.0f}) |"
            f" {d['pil_images_per_s']:.0f} ({d['pil_images_per_s_best']:.0f}) |")
    out = "\n".join(lines) + "\n\nEach cell: median epoch (best epoch).\n"
    spread = [f"- {c['case']['name']}: full/ceiling per round "
              + ", ".join(_f(x, 2) for x in c["ratios"]["full_over_ceiling_per_round"])
              + "; full/PIL per round "
              + ", ".join(_f(x, 2) for x in c["ratios"]["full_over_pil_per_round"])
              for c in r["cases"]]
    out += "\nSpread, round by round:\n\n" + "\n".join(spread) + "\n"
    syncs = [f"- {c['case']['name']}: {c['host_syncs_per_step']} host syncs per step"
             for c in r["cases"] if "host_syncs_per_step" in c]
    if syncs:
        out += "\n" + "\n".join(syncs) + "\n"
    compiled = [c for c in r["cases"] if "compile" in c]
    if compiled:
        out += ("\n| case | eager ceiling steps/s | compiled ceiling steps/s | speedup (median) |"
                " speedup (best) | compile warm-up s |\n|---|---:|---:|---:|---:|---:|\n")
        for c in compiled:
            k = c["compile"]
            if "error" in k:
                out += f"| {c['case']['name']} | compile failed: {k['error']} | | | | |\n"
                continue
            out += (f"| {c['case']['name']} | {_f(k['eager_ceiling_steps_per_s'])} |"
                    f" {_f(k['ceiling_steps_per_s'])} | {_f(k['speedup_over_eager'])} |"
                    f" {_f(k['speedup_over_eager_best'])} | {_f(k['warmup_s'], 1)} |\n")
    return out


def ray(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"Skipped: {r['skipped']}\n"
    return (f"| | value |\n|---|---:|\n"
            f"| steady-state epoch time, Ray / in-process (median) |"
            f" {_f(r['steady_state_ratio'], 3)} |\n"
            f"| same, best epochs | {_f(r['steady_state_ratio_best'], 3)} |\n"
            + _spare(r.get("spare_core")) +
            f"| `fgray pretrain` wall, in-process (two runs) |"
            f" {', '.join(_f(x, 1) for x in r['in_process']['wall_s'])} s |\n"
            f"| `fgray pretrain --workers 1` wall | {_f(r['ray']['wall_s'], 1)} s |\n"
            f"| start-up cost (Ray wall - in-process wall) | {_f(r['startup_s'], 1)} s |\n"
            f"| starting the local Ray the run joins (not in the start-up cost) |"
            f" {_f(r['ray_init_s'], 1)} s |\n"
            f"\n{r['epochs']} epochs of {r['case']['name']}, the first left out;"
            f" {r['cpus_per_worker']} CPUs per worker.\n" + _start_up(r) + _gap(r))


def _spare(spare: dict[str, Any] | None) -> str:
    """The rows of the comparison with a core left to the rest of the host, where it ran."""
    if not spare:
        return ""
    return (f"| same, {spare['threads']} torch thread(s) on both sides, a core left to Ray's"
            f" daemons (median; best) | {_f(spare['steady_state_ratio'], 3)};"
            f" {_f(spare['steady_state_ratio_best'], 3)} |\n")


def _gap(r: dict[str, Any]) -> str:
    """Where a steady-state gap goes, per run (`benchmarks/cpu_share.py`): the same CPU
    seconds per epoch with fewer cores means other processes took them."""
    runs = [(name, seen) for name, seen in (r.get("inside") or {}).items() if "cores" in seen]
    if not runs:
        return ""
    shares = r.get("cpu_share") or {}

    def others(name: str) -> str:
        share = shares.get(name)
        if not share:
            return "n/a"
        from benchmarks.cpu_share import largest

        return f"{share['others']:.3f} ({largest(share['by_label'], 4)})"

    rows = "".join(f"| {name} | {seen['step_cpu_s']:.2f} | {seen['cores']:.2f} |"
                   f" {others(name)} |\n" for name, seen in runs)
    return ("\n| run | CPU s per epoch (steps) | cores the loop got | other processes' cores"
            " while it trained (largest) |\n|---|---:|---:|---|\n" + rows)


def _start_up(r: dict[str, Any]) -> str:
    """Train's start-up step by step (`benchmarks/ray_timeline.py`), where the run has it."""
    if "train_start_up" not in r:  # a result from before the breakdown
        return ""
    from benchmarks.ray_timeline import describe

    return f"\nTrain's start-up: {describe(r['train_start_up'])}.\n"


def study(r: dict[str, Any]) -> str:
    if "skipped" in r or "error" in r:
        return f"{r.get('skipped') or r.get('error')}\n"
    if "in_trial" not in r:  # a result of the one-path benchmark (before --workers 0)
        r = {"ray_train": r, "case": r["case"], "target_ratio": r["target_ratio"]}
    sides = [(name, label, r[name]) for name, label in (
        ("in_trial", "`--workers 0` (in the trial)"), ("ray_train", "`--workers 1` (Ray Train)"))
        if name in r]

    def cells(fn) -> str:
        return " | ".join("n/a" if "error" in x else fn(x) for _, _, x in sides)

    target = r.get("target_fixed_s")
    if isinstance(target, dict):  # per side (a number in results before the Ray Train target)
        target = " / ".join(f"{target[name]:g}" for name, _, _ in sides if name in target)
    out = (f"| | {' | '.join(label for _, label, _ in sides)} |\n"
           f"|---|{'---:|' * len(sides)}\n"
           f"| study wall time | {cells(lambda x: _f(x['wall_time_s'], 1) + ' s')} |\n"
           f"| (Σ trial + Σ test evaluation wall time) / concurrency | {cells(lambda x: '(' + _f(x['trial_time_s'], 1) + ' + ' + _f(x.get('evaluation_time_s', 0.0), 1) + ') s / ' + str(x['concurrency']) + ' = ' + _f(x['ideal_s'], 1) + ' s')} |\n"  # noqa: E501
           f"| ratio (target <= {r['target_ratio']}) | {cells(lambda x: _f(x['overhead_ratio']))} |\n"  # noqa: E501
           f"| overhead (wall - ideal) | {cells(lambda x: _f(x.get('overhead_s'), 1) + ' s')} |\n"  # noqa: E501
           f"| per-trial fixed cost, median / max (target <= {target} s) |"
           f" {cells(lambda x: _f(x.get('fixed_s_median')) + ' / ' + _f(x.get('fixed_s_max')) + ' s')} |\n"  # noqa: E501
           f"| first trial started after | {cells(lambda x: _f(x['first_trial_start_s'], 1) + ' s')} |\n"  # noqa: E501
           f"| starting the local Ray (not in the ratio) | {cells(lambda x: _f(x['ray_init_s'], 1) + ' s')} |\n")  # noqa: E501
    first = next(x for _, _, x in sides if "error" not in x)
    return out + (f"\n{first['trials']} trials per side ({first['mode']}, {first['epochs']} epochs"
                  f" each) of {r['case']['name']}; stopped early / failed: "
                  + ", ".join(f"{x.get('stopped')} / {x.get('failed')}" for _, _, x in sides)
                  + ".\n" + "".join(_trial_start_up(label, x) for _, label, x in sides))


def _trial_start_up(label: str, x: dict[str, Any]) -> str:
    """Ray's start-up per trial of one side, where the study has it."""
    split = x.get("fixed_split_s")
    where = ("" if not split else f"\nWhere a trial's fixed cost goes, {label} (median seconds):"
             f" {', '.join(f'{k} {v:.2f}' for k, v in split.items())}.\n")
    if "start_up" not in x:
        return where
    from benchmarks.ray_timeline import describe

    return where + f"\nRay's start-up per trial, {label}: {describe(x['start_up'])}.\n"


def memory(r: dict[str, Any]) -> str:
    lines = ["| preset | backbone | px | batch | host RSS peak MB | device peak MB (allocated /"
             " reserved) | img/s |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in r["presets"]:
        c = row["case"]
        if "skipped" in row:
            lines.append(f"| {c['name']} | {c['backbone']} | {c['image_size']} |"
                         f" {c['batch_size']} | {row['skipped']} | | |")
            continue
        dev = (f"{row['device_peak_allocated_mb']:.0f} / {row['device_peak_reserved_mb']:.0f}"
               if "device_peak_allocated_mb" in row else "CPU run: host RSS only")
        lines.append(f"| {c['name']} | {c['backbone']} | {c['image_size']} | {c['batch_size']} |"
                     f" {row['host_rss_peak_mb']:.0f} | {dev} | {row['images_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def scaling(r: dict[str, Any]) -> str:
    step, a = r["step"], r["assumptions"]
    out = (f"Measured on {r['device']}: step {1e3 * step['step']:.1f} ms (forward"
           f" {1e3 * step['forward']:.1f}, backward {1e3 * step['backward']:.1f}, optimiser"
           f" {1e3 * step['optimizer']:.1f}; {step['precision']}), per-device batch"
           f" {a['per_device_batch']}. Model: {a['gpus_per_node']} GPUs per node on NVLink at"
           f" {a['nvlink_gbps']:g} Gb/s, {a['overlap']}, latency {a['latency']}.\n\n")
    out += r["markdown"]
    if "paper_payload" in r:
        out += "\n" + r["paper_payload"]["markdown"]
    return out


def driver(r: dict[str, Any]) -> str:
    lines = ["| trials | driver ms / trial | of which the searcher (Optuna TPE) | trial side"
             " ms / trial |", "|---:|---:|---:|---:|"]
    for row in r["sizes"]:
        lines.append(f"| {row['trials']} | {_f(row['driver_ms_per_trial'], 1)} |"
                     f" {_f(row['searcher_ms_per_trial'], 1)} |"
                     f" {_f(row['trial_ms_per_trial'], 1)} |")
    return ("\n".join(lines) + f"\n\n{', '.join(r['methods'])}, {r['epochs']} epochs per"
            f" trial, {r['concurrency']} at a time; driver time at the largest size over the"
            f" smallest: {_f(r['growth'])}.\n")


SECTIONS = {"datapath": ("Data path vs ceiling", datapath), "ray": ("Ray overhead", ray),
            "study": ("Study overhead", study), "memory": ("Memory", memory),
            "scaling": ("Scaling, on paper", scaling),
            "driver": ("The study driver's cost per trial", driver)}


def render(report: dict[str, Any]) -> str:
    out = [f"## Preset `{report['preset']}`{' (tiny)' if report['tiny'] else ''}\n",
           machine(report)]
    for name, result in report["benchmarks"].items():
        title, fn = SECTIONS[name]
        meta = result.get("meta")
        when = ""
        if meta:
            before, after = (", ".join(f"{x:.1f}" for x in meta[k])
                             for k in ("load_average_before", "load_average_after"))
            when = (f"_Ran {meta['started']} for {meta['seconds']:.0f} s; load average"
                    f" {before} before, {after} after._\n\n")
        out.append(f"### {title}\n\n{when}{fn(result)}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python benchmarks/report.py RESULTS_JSON", file=sys.stderr)
        return 2
    print(render(json.loads(Path(args[0]).read_text())))
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        # Run as a script (as the module docstring says): the start-up sections import
        # `benchmarks.ray_timeline` from the repository root, as benchmarks/run.py does.
        sys.path[0] = str(Path(__file__).resolve().parent.parent)
    sys.exit(main())
