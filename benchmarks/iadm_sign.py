"""Which sign of PP-SSL's input Grad-CAM points at the bird: a measurement, not a test.

IADM keeps the window holding most of the saliency of sum_rgb x * dL/dx (L: the InfoNCE
loss). `saliency_sign=raises_loss` keeps its positive part (pixels whose presence raises the
loss), `lowers_loss` the positive part of its negation (pixels whose presence lowers it: the
evidence for the positive pair). For each sign and seed this script trains PP-SSL from
ImageNet weights on the embedded synthetic set (boxes and 15 part locations per image) and
scores `PPSSL.spatial_maps` on the test split with `fgray.eval.localisation` (through
`evaluate_method(..., ["localisation", "knn"])`): box mass, pointing game, part hits (top 20 %
of the map), and test kNN top-1. Reference rows: the untrained method (ImageNet backbone,
fresh heads) with each sign, the backbone's last-feature-map norm (the map every method
without one is scored on) and a uniform map (box mass = mean box share of the view).

    python -m benchmarks.iadm_sign --epochs 2 --seeds 2            # CPU, minutes
    python -m benchmarks.iadm_sign --out /tmp/iadm.json --work /tmp/iadm-work

Writes a JSON record (`--out`, default ./iadm_sign.json) and prints a markdown table. It never
writes over a file git tracks; the data set, cache and runs go under `--work` (default a
temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

SIGNS = ("raises_loss", "lowers_loss")
METRICS = ("loc_box_mass", "loc_pointing", "loc_part_hits", "knn_top1")
BACKBONE = "tf_efficientnet_lite0"


def _tracked(path: Path) -> bool:
    """Whether git tracks `path` (False outside a repository or without git)."""
    try:
        res = subprocess.run(["git", "ls-files", "--error-unmatch", path.name],
                             cwd=path.parent, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


class UniformMap(nn.Module):
    """A constant map: the baseline of fgray.eval.localisation (box mass = box share)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.backbone(images), dim=1)

    def spatial_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"uniform": torch.ones(images.shape[0], *images.shape[-2:])}


def make_spec(root: Path, cache: Path, sign: str, epochs: int, seed: int):
    from fgray.engine.spec import DataSpec, build_spec

    data = DataSpec(root=str(root), val_fraction=0.25, cache_dir=str(cache))
    spec = build_spec("ppssl", data, backbone=BACKBONE, init="imagenet",
                      train={"epochs": epochs, "batch_size": 32, "image_size": 96, "knn_k": 20,
                             "seed": seed, "visual_every": 0},
                      sets={"queue_size": "1024", "mlp_hidden": "512", "saliency_sign": sign})
    return spec, data


def scores(model: nn.Module, spec, data, protocols: list[str]) -> dict[str, float]:
    from fgray.engine.evaluate import evaluate_method

    out = evaluate_method(model, spec, data, protocols, split="test",
                          device=torch.device("cpu"), progress=False)
    return {k: float(out[k]) for k in METRICS if k in out}


def both_maps(add, method, spec, data, model: str, trained_with: str, seed: int) -> None:
    """Score `method`'s saliency with each sign (kNN once: the sign leaves the encoder alone);
    the sign it trained with comes first."""
    own = method.cfg.saliency_sign
    knn: dict[str, float] = {}
    try:
        for sign in sorted(SIGNS, key=lambda s: s != own):
            method.cfg.saliency_sign = sign
            t0 = time.monotonic()
            got = scores(method, spec, data, ["localisation"] + ([] if knn else ["knn"]))
            knn = knn or {"knn_top1": got["knn_top1"]}
            add({"model": model, "trained_with": trained_with, "sign": sign, "seed": seed,
                 **got, **knn, "seconds": time.monotonic() - t0})
    finally:
        method.cfg.saliency_sign = own


def measure(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from fgray.data.synth import write_synthetic
    from fgray.engine.evaluate import InitialWeights
    from fgray.engine.run import run_pretraining
    from fgray.methods import build_method
    from fgray.models.backbone import create_backbone

    root, cache = work / "synth", work / "cache"
    write_synthetic(root, classes=10, per_class=60, size=96, seed=0, progress=False)
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        shown = " ".join(f"{k}={row[k]:.3f}" for k in METRICS if k in row)
        print(f"[{time.strftime('%H:%M:%S')}] {row['model']:>8} {row['trained_with']:>12}"
              f" map {row['sign']:>12} "
              f"seed {row['seed']}: {shown} ({row['seconds']:.0f} s)", flush=True)

    # References: the plain ImageNet encoder's feature-norm map and a uniform map.
    spec, data = make_spec(root, cache, SIGNS[0], args.epochs, 0)
    t0 = time.monotonic()
    net = create_backbone(BACKBONE, init="imagenet", img_size=96)
    add({"model": "init", "trained_with": "-", "sign": "feature-norm", "seed": 0,
         **scores(InitialWeights(net).eval(), spec, data, ["localisation", "knn"]),
         "seconds": time.monotonic() - t0})
    t0 = time.monotonic()
    add({"model": "uniform", "trained_with": "-", "sign": "-", "seed": 0,
         **scores(UniformMap(net).eval(), spec, data, ["localisation"]),
         "seconds": time.monotonic() - t0})

    for seed in range(args.seeds):
        # Untrained: ImageNet backbone, heads initialised with this seed; its map scored
        # with either sign (the sign changes the map only, not the encoder).
        spec, data = make_spec(root, cache, SIGNS[0], args.epochs, seed)
        torch.manual_seed(seed)
        method = build_method("ppssl", backbone=BACKBONE, init="imagenet", image_size=96,
                              config=spec.method_config).eval()
        both_maps(add, method, spec, data, "init", "-", seed)
        for sign in SIGNS:
            spec, data = make_spec(root, cache, sign, args.epochs, seed)
            t0 = time.monotonic()
            trainer = run_pretraining(spec, work / "runs" / f"{sign}-s{seed}",
                                      device=torch.device("cpu"), resume=False, progress=False)
            print(f"  trained {sign} seed {seed} in {time.monotonic() - t0:.0f} s", flush=True)
            both_maps(add, trainer.method, spec, data, "trained", sign, seed)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds of each (model, sign)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["trained_with"], row["sign"]), []).append(row)
    out = []
    for (model, trained_with, sign), rs in groups.items():
        entry: dict[str, Any] = {"model": model, "trained_with": trained_with, "sign": sign,
                                 "seeds": len(rs)}
        for k in METRICS:
            vals = [r[k] for r in rs if k in r]
            if vals:
                entry[k] = statistics.fmean(vals)
                entry[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(entry)
    return out


def paired(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """lowers_loss minus raises_loss map on the same model (same weights), per metric: mean,
    sample std and how many models favour lowers_loss / tie / favour raises_loss."""
    maps: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["sign"] in SIGNS:
            maps.setdefault((r["model"], r["trained_with"], r["seed"]), {})[r["sign"]] = r
    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    for (model, trained_with, _), pair in maps.items():
        if len(pair) == 2:
            groups.setdefault((model, trained_with), []).append(
                {k: pair["lowers_loss"][k] - pair["raises_loss"][k] for k in METRICS[:3]
                 if k in pair["lowers_loss"]})
    out = []
    for (model, trained_with), diffs in groups.items():
        entry: dict[str, Any] = {"model": model, "trained_with": trained_with,
                                 "models": len(diffs)}
        for k in METRICS[:3]:
            vals = [d[k] for d in diffs if k in d]
            entry[k] = statistics.fmean(vals)
            entry[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            entry[k + "_wins"] = sum(v > 0 for v in vals)
            entry[k + "_ties"] = sum(v == 0 for v in vals)
            entry[k + "_losses"] = sum(v < 0 for v in vals)
        out.append(entry)
    return out


def paired_table(entries: list[dict[str, Any]]) -> str:
    lines = ["| model | trained with | models | " + " | ".join(
        f"Δ {k} (+/=/−)" for k in METRICS[:3]) + " |", "|---|---|---|" + "---|" * 3]
    for e in entries:
        cells = [f"{e[k]:+.4f} ± {e[k + '_std']:.4f} "
                 f"({e[k + '_wins']}/{e[k + '_ties']}/{e[k + '_losses']})" for k in METRICS[:3]]
        lines.append(f"| {e['model']} | {e['trained_with']} | {e['models']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(summary: list[dict[str, Any]]) -> str:
    lines = ["| model | trained with | map sign | seeds | " + " | ".join(METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for e in summary:
        cells = []
        for k in METRICS:
            if k not in e:
                cells.append("—")
            elif e["seeds"] > 1:
                cells.append(f"{e[k]:.3f} ± {e[k + '_std']:.3f}")
            else:
                cells.append(f"{e[k]:.3f}")
        lines.append(f"| {e['model']} | {e['trained_with']} | {e['sign']} | {e['seeds']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", default="iadm_sign.json", help="JSON record (default ./iadm_sign.json)")
    p.add_argument("--work", default=None, help="data, cache and runs (default: a temporary"
                                                " folder, removed at the end)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--report", metavar="JSON", default=None,
                   help="print the tables of a record this script wrote, and measure nothing")
    args = p.parse_args(argv)
    if args.report:
        rows = json.loads(Path(args.report).expanduser().read_text())["rows"]
        print(table(summarise(rows)))
        print("\nSame weights, lowers_loss map minus raises_loss map:\n")
        print(paired_table(paired(rows)))
        return 0
    if args.epochs < 1 or args.seeds < 1:
        p.error("--epochs and --seeds must be >= 1")
    out = Path(args.out).expanduser().resolve()
    if out.exists() and _tracked(out):
        p.error(f"{out} is tracked by git: pick another --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work).expanduser() if args.work else Path(tempfile.mkdtemp(prefix="iadm-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        rows = measure(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary, pairs = summarise(rows), paired(rows)
    record = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "epochs": args.epochs, "seeds": args.seeds, "backbone": BACKBONE,
              "data": "write_synthetic(classes=10, per_class=60, size=96, seed=0),"
                      " val_fraction 0.25, test split",
              "torch": torch.__version__, "machine": platform.platform(),
              "threads": torch.get_num_threads(), "seconds": time.monotonic() - start,
              "rows": rows, "summary": summary, "paired_lowers_minus_raises": pairs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(table(summary))
    print("\nSame weights, lowers_loss map minus raises_loss map:\n")
    print(paired_table(pairs))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
