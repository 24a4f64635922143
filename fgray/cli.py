"""The `fgray` command: data, pretrain, eval, corpus, results.

User mistakes (fgray.errors.UserError and bad flags) print one line and exit 2; anything
else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fgray.cliutil import OneLineParser, run_main
from fgray.data.formats import FORMATS
from fgray.errors import UserError

if TYPE_CHECKING:
    from fgray.engine.spec import DataSpec


class RegisteredMethods(Sequence):
    """`--method`'s choices: the method registry, read when argparse first needs it (a check,
    usage, help). Building the parser imports no method (nor torch), so `fgray data ...`
    starts fast."""

    def _names(self) -> tuple[str, ...]:
        from fgray.methods import method_names

        return method_names()

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, value: object) -> bool:
        return value in self._names()


def add_data_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--dataset", choices=FORMATS, required=required, help="dataset layout")
    p.add_argument("--data-root", required=required, help="dataset root folder")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of each class's train images held out for model selection")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--aircraft-level", default="variant",
                   choices=("variant", "family", "manufacturer"))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fgray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    data = sub.add_parser("data", help="create and validate datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True,
                                   parser_class=OneLineParser)
    synth = data_sub.add_parser("synth", help="write the embedded fine-grained dataset")
    synth.add_argument("out")
    synth.add_argument("--classes", type=int, default=10)
    synth.add_argument("--per-class", type=int, default=60)
    synth.add_argument("--size", type=int, default=96)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=_data_synth)

    check = data_sub.add_parser("check", help="summarise and validate a dataset")
    check.add_argument("root")
    check.add_argument("--format", choices=FORMATS, default="cub")
    check.add_argument("--val-fraction", type=float, default=0.1)
    check.add_argument("--split-seed", type=int, default=0)
    check.add_argument("--aircraft-level", default="variant",
                       choices=("variant", "family", "manufacturer"))
    check.set_defaults(handler=_data_check)

    pre = sub.add_parser("pretrain", help="self-supervised pretraining of one method")
    pre.add_argument("--method", choices=RegisteredMethods(), required=True, metavar="METHOD",
                     help="a registered method: %(choices)s")
    add_data_args(pre)
    pre.add_argument("--backbone", default=None, help="timm model name (method default if unset)")
    pre.add_argument("--init", default="random", help="random, imagenet or a weights file path")
    pre.add_argument("--image-size", type=int, default=224)
    pre.add_argument("--epochs", type=int, default=100)
    pre.add_argument("--batch-size", type=int, default=128, help="global batch size")
    pre.add_argument("--workers", type=int, default=0,
                     help="Ray Train workers; 0 runs in this process without Ray")
    pre.add_argument("--gpus-per-worker", type=float, default=None)
    pre.add_argument("--cpus-per-worker", type=float, default=None)
    pre.add_argument("--address", default=None, help="Ray cluster address (default RAY_ADDRESS)")
    pre.add_argument("--storage", default="runs", help="output path or s3:// / gs:// URI")
    pre.add_argument("--name", default=None, help="run name (default: method-dataset-hash)")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: best available)")
    pre.add_argument("--cache-dir", default=None, help="decoded-cache folder (default FGRAY_CACHE)")
    pre.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="a setting of the run: method.KEY (the method's Config), optim.KEY, "
                          "train.KEY or aug.KEY; a bare KEY where one section has it; "
                          "repeatable")
    pre.set_defaults(handler=_pretrain)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on the test split")
    ev.add_argument("checkpoint")
    # Every data setting defaults to the checkpoint's own (the run's split, validation
    # fraction and seed), so an evaluation agrees with the study that trained it.
    ev.add_argument("--dataset", choices=FORMATS, help="dataset layout (default: the run's)")
    ev.add_argument("--data-root", help="dataset root folder (default: the run's)")
    ev.add_argument("--val-fraction", type=float,
                    help="fraction of each class's train images held out (default: the run's)")
    ev.add_argument("--split-seed", type=int, help="seed of the validation split (default: "
                                                   "the run's)")
    ev.add_argument("--aircraft-level", choices=("variant", "family", "manufacturer"))
    ev.add_argument("--image-size", type=int, help="evaluation view in pixels (default: the "
                                                   "run's)")
    ev.add_argument("--seed", type=int, help="linear probe seed (default: the run's seed, as "
                                             "the study's test evaluation uses)")
    ev.add_argument("--protocols", default="retrieval,knn",
                    help="comma list of retrieval, knn, linear, linear-paper, localisation")
    ev.add_argument("--split", default="test", choices=("val", "test"))
    ev.add_argument("--device", default=None)
    ev.add_argument("--cache-dir", default=None)
    ev.add_argument("--out", default=None, help="JSON file for the metrics (default beside the"
                    " checkpoint)")
    ev.set_defaults(handler=_eval)

    corpus = sub.add_parser("corpus", help="embed PP-SSL's attribute-text corpus with CLIP")
    corpus.add_argument("--dataset", choices=FORMATS, required=True)
    corpus.add_argument("--data-root", required=True)
    corpus.add_argument("--clip-model", default="ViT-B-32",
                        help="open_clip model name, hf-hub:/local-dir: id or config JSON")
    corpus.add_argument("--clip-weights", default=None,
                        help="local CLIP weights file (or a pretrained tag when online)")
    corpus.add_argument("--out", required=True, help="Parquet file to write")
    corpus.add_argument("--max-size", type=int, default=None, help="keep at most N texts")
    corpus.set_defaults(handler=_corpus)

    res = sub.add_parser("results", help="leaderboard, plots and TensorBoard of a study")
    res.add_argument("study_dir")
    res.add_argument("--format", default="table",
                     choices=("table", "wide", "csv", "markdown", "json", "html"),
                     help="table: the compact leaderboard (100 columns); wide, markdown, "
                          "json, html: every column and interval")
    res.add_argument("--tensorboard", action="store_true",
                     help="also print the command that opens TensorBoard on the study")
    res.add_argument("--plots", action="store_true", help="render PNG plots under STUDY_DIR/plots")
    res.add_argument("--html", action="store_true",
                     help="write a one-page report to STUDY_DIR/report/index.html")
    res.set_defaults(handler=_results)
    return parser


def _data_synth(args) -> int:
    from fgray.data.synth import write_synthetic

    summary = write_synthetic(args.out, classes=args.classes, per_class=args.per_class,
                              size=args.size, seed=args.seed)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def _data_check(args) -> int:
    from fgray.data.check import check_dataset

    report = check_dataset(args.format, args.root, val_fraction=args.val_fraction,
                           seed=args.split_seed, aircraft_level=args.aircraft_level)
    for line in report.summary():
        print(line)
    for line in report.problems:
        print(line, file=sys.stderr)
    return 2 if report.problems else 0


def _pretrain(args) -> int:
    from fgray.storage import check_writable
    from fgray.train.launch import pretrain_command

    # Before anything is trained or written: a read-only --storage would otherwise end in an
    # OSError traceback (from the run folder or the results tables) after the work was done.
    check_writable(args.storage, "--storage")
    return pretrain_command(args)


def eval_data_spec(stored: DataSpec, args) -> DataSpec:
    """The data an `fgray eval` reads: the checkpoint's own spec (`stored`), each field that
    a flag gives replaced."""
    from fgray.engine.spec import DataSpec

    given = {"format": args.dataset, "root": args.data_root,
             "val_fraction": args.val_fraction, "split_seed": args.split_seed,
             "aircraft_level": args.aircraft_level, "cache_dir": args.cache_dir}
    fields = {**dataclasses.asdict(stored),
              **{k: v for k, v in given.items() if v is not None}}
    if not fields.get("root"):
        raise UserError("the checkpoint records no dataset root: pass --dataset and --data-root")
    return DataSpec(**fields)


def _eval(args) -> int:
    import json

    from fgray.engine.evaluate import evaluate_method, load_checkpoint
    from fgray.engine.run import resolve_device
    from fgray.storage import absolute, display, join, local_copy, write_text

    device = resolve_device(args.device)
    # A checkpoint in object storage (a study's, on a cluster) is read through a local copy.
    with local_copy(args.checkpoint) as local:
        method, spec, _ = load_checkpoint(local, device)
        folder = local.is_dir()
    data = eval_data_spec(spec.data, args)
    if args.image_size is not None:
        if args.image_size <= 0:
            raise UserError(f"--image-size {args.image_size}: expected a positive size")
        spec.train = dataclasses.replace(spec.train, image_size=args.image_size)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    seed = args.seed if args.seed is not None else spec.train.seed
    metrics = evaluate_method(method, spec, data, protocols, split=args.split, device=device,
                              seed=seed)
    ckpt = absolute(args.checkpoint)
    out = args.out or join(ckpt if folder else ckpt.rsplit("/", 1)[0], f"eval-{args.split}.json")
    record = {"checkpoint": display(ckpt), "split": args.split, "method": spec.method,
              "metrics": metrics}
    write_text(out, json.dumps(record, indent=1))
    for name, value in metrics.items():
        print(f"{args.split} {name}: {value:.{3 if name.startswith('loc_') else 2}f}")
    print(f"wrote {display(out)}")
    return 0


def _corpus(args) -> int:
    from fgray.methods.corpus import build_corpus, corpus_info

    out = build_corpus(args.dataset, args.data_root, args.clip_model, args.clip_weights,
                       args.out, max_size=args.max_size)
    info = corpus_info(out)
    print(f"wrote {out}: {info.get('count')} texts, {info.get('dim')}-d embeddings")
    return 0


def _results(args) -> int:
    from fgray.results.report import results_command

    print(results_command(args.study_dir, args.format, tensorboard=args.tensorboard,
                          plots=args.plots, html=args.html))
    return 0


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        return args.handler(args)

    return run_main(body, "fgray")


if __name__ == "__main__":
    sys.exit(main())
