"""The command line shared by the scripts in studies/: flags -> StudyConfig -> run_study.

    python studies/cub_sweep.py [--data-root ROOT | --synthetic] [--preset smoke|laptop|paper]
        [--methods moco,lcr,...] [--trials N] [--epochs N] [--seeds N] [--backbone NAME]
        [--image-size PX] [--storage PATH_OR_URI] [--resume] [--name NAME] [--address ADDR]
        [--workers N] ...

Run directly, a script starts a local Ray for the study; under `ray job submit` (or with
RAY_ADDRESS / --address) it joins that cluster. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fgray.cliutil import OneLineParser, run_main
from fgray.config import parse_set_flags
from fgray.data.cache import default_cache_dir
from fgray.engine.spec import parse_settings
from fgray.errors import UserError
from fgray.methods import method_class, method_names
from fgray.tune.presets import PRESETS, Preset, get_preset
from fgray.tune.spaces import SHARED_KNOBS


def build_parser(prog: str, description: str, *, mode: str) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description=description,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data-root", help="dataset root folder")
    source.add_argument("--synthetic", action="store_true",
                        help="use the embedded fine-grained dataset (generated once, cached)")
    p.add_argument("--preset", default="laptop", choices=tuple(PRESETS),
                   help="study size: smoke (minutes on a laptop CPU), laptop, paper (GPUs)")
    p.add_argument("--methods",
                   help=f"comma list of {', '.join(method_names())} (preset default)")
    if mode == "search":
        p.add_argument("--trials", type=int, help="trials per method (preset default)")
    p.add_argument("--epochs", type=int, help="epochs per trial (preset default)")
    p.add_argument("--backbone", help="timm model for every method (preset default)")
    p.add_argument("--image-size", type=int, help="training image side in pixels")
    p.add_argument("--batch-size", type=int, help="global batch size per trial")
    p.add_argument("--init", help="random, imagenet or a weights file (preset default)")
    p.add_argument("--storage", default="studies_out", help="parent folder or s3:// / gs:// URI")
    p.add_argument("--name", help="study name: its folder under --storage")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted study --storage/--name")
    p.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS, else local)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray Tune's trial tables and the workers' output live (default: "
                        "a progress line per method here, Ray's output in STUDY/logs/ray.log)")
    p.add_argument("--epoch-hook", action="append", metavar="HOOK",
                   help="call HOOK on every rank of every trial after each epoch, before it "
                        "is reported: 'pkg.module:function' or a JSON object {\"hook\": "
                        "\"pkg.module:function\", \"kwargs\": {...}}; called as "
                        "hook(epoch, rank, run_uri, metrics, **kwargs) (custom logging, "
                        "fault injection); repeatable, and not stored with the study")
    p.add_argument("--workers", type=int,
                   help="Ray Train workers per trial, or 0: each trial runs the engine loop in "
                        "its own process (no worker group; preset default: 0 for smoke and "
                        "laptop, 1 for paper)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (default 1)")
    p.add_argument("--gpus-per-worker", type=float,
                   help="GPUs per worker, fractions allowed for one-worker trials "
                        "(default: 1 when the cluster has GPUs)")
    p.add_argument("--concurrency", type=int, help="trials at a time (default: what fits)")
    if mode == "search":
        p.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial may stop")
        p.add_argument("--reduction-factor", type=int, help="ASHA: keep 1/N at each rung")
        p.add_argument("--search-shared", default="lr",
                       help=f"shared knobs to search besides each method's own: comma list of "
                            f"{', '.join(SHARED_KNOBS)}, or 'none'")
        p.add_argument("--points", metavar="JSON",
                       help="configurations to try first, after each method's paper recipe: a "
                            "JSON file holding a list of {knob: value} (every method) or "
                            "{method: [...]}")
        p.add_argument("--seeds", type=int,
                       help="seeds of the final test evaluation of each method's best config "
                            "(extra seeds retrain it; preset default: 3)")
        p.add_argument("--more-seeds", type=int, default=0, metavar="N",
                       help="with --resume: retrain and test each method's best config with "
                            "N more seeds (more evidence for a comparison the first seeds "
                            "could not resolve); the search is not repeated")
    else:
        p.add_argument("--seeds", type=int, help="seeds per method (preset default: 3)")
    p.add_argument("--seed", type=int, help="first training seed; also seeds TPE (default 0)")
    p.add_argument("--protocols",
                   help="final test protocols: retrieval, knn, linear, linear-paper, "
                        "localisation (preset default: retrieval,knn,linear,localisation)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="fixed setting for every method (method.KEY, optim.KEY, train.KEY, "
                        "aug.KEY, or a bare KEY where one section has it), or "
                        "METHOD.SECTION.KEY=VALUE for one method")
    p.add_argument("--val-fraction", type=float,
                   help="share of each class's train images held out for model selection "
                        "(preset default)")
    p.add_argument("--cache-dir", help="decoded-cache folder (default FGRAY_CACHE)")
    p.add_argument("--plan", action="store_true",
                   help="print what the study would run and an estimate of its wall time and "
                        "GPU/CPU-hours, then exit (starts no Ray, writes nothing)")
    p.add_argument("--plan-from", metavar="JSON",
                   help="the throughput for the plan's estimate: a `python benchmarks/run.py` "
                        "result (default: a probe of a few steps here); also used for the "
                        "plan-vs-actual lines at the end of a study")
    return p


def _methods(text: str | None, preset: Preset) -> list[str]:
    if not text:
        return list(preset.methods)
    methods = [m.strip() for m in text.split(",") if m.strip()]
    known = method_names()
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise UserError(f"--methods {text!r}: expected a comma list of {', '.join(known)}")
    return list(dict.fromkeys(methods))


def _scoped(key: str, methods) -> dict[str, str]:
    """Which methods a `--set` key is for, and its key there: `lcr.method.capacity` is LCR's
    `method.capacity` (nothing when LCR is not studied), any other key is every method's."""
    target, _, rest = key.partition(".")
    if rest and target in method_names():
        return {target: rest} if target in methods else {}
    return {m: key for m in methods}


def _fixed(pairs: list[str], methods: list[str], preset: Preset) -> dict[str, dict[str, Any]]:
    """Each method's fixed settings: the preset's, then the `--set` flags, keys qualified and
    values typed (a key a method lacks, or one that is ambiguous for it, is an error now)."""
    out = {m: preset.settings_for(m) for m in methods}
    for key, value in parse_set_flags(pairs).items():
        for m, k in _scoped(key, methods).items():
            out[m].update(parse_settings(m, {k: value}))
    return out


def _upgrade_fixed(method: str, fixed: dict[str, Any]) -> dict[str, Any]:
    """Fixed settings of a study stored before settings had sections: a bare key went to the
    method's Config first (SDF's `warmup_epochs`, MoCo's `momentum`), then to the one other
    section that has it."""
    fields = {f.name for f in dataclasses.fields(method_class(method).Config)}
    return parse_settings(method, {(f"method.{k}" if k in fields else k): v
                                   for k, v in fixed.items()})


def _points(path: str | None, methods: list[str]) -> dict[str, list[dict[str, Any]]]:
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--points {path}: cannot read a JSON file ({exc})") from None
    if isinstance(data, list):
        data = {m: data for m in methods}
    if not isinstance(data, dict) or not all(
            isinstance(v, list) and all(isinstance(p, dict) for p in v) for v in data.values()):
        raise UserError(f"--points {path}: expected a list of {{knob: value}} objects or "
                        "{method: [...]}")
    return {m: list(v) for m, v in data.items() if m in methods}


def synthetic_params(preset: Preset) -> dict[str, int]:
    """The `write_synthetic` arguments of the preset's embedded dataset."""
    return {"classes": 10, "per_class": 24, "size": 64, "seed": 0, **preset.synthetic}


def synthetic_root(preset: Preset, *, write: bool = True) -> str:
    """The embedded dataset at the preset's size, generated once under the cache folder
    (`write=False`: only its path)."""
    from fgray.data.synth import write_synthetic

    params = synthetic_params(preset)
    root = default_cache_dir() / "synthetic" / (
        f"c{params['classes']}-n{params['per_class']}-s{params['size']}-seed{params['seed']}")
    if not write:
        return str(root)
    summary = write_synthetic(root, progress=sys.stderr.isatty(), **params)
    if not summary["skipped"]:
        print(f"wrote the embedded dataset: {root} ({summary['images']} images)", flush=True)
    return str(root)


def study_from_args(args, *, dataset: str, mode: str, default_name: str, write: bool = True):
    from fgray.storage import Location
    from fgray.tune.study import StudyConfig, load_study

    preset = get_preset(args.preset)
    if args.resume:
        # The stored study.json decides everything else; only where it lives (and how it
        # runs: --address, --concurrency, --verbose) may be given again, and a setting given
        # again must equal the stored one -- a resume never silently ignores a flag.
        stored = load_study(Location(args.storage).child(args.name or default_name))
        stored.fixed = {m: _upgrade_fixed(m, f) for m, f in stored.fixed.items()}
        check_resume_flags(args, stored)
        return stored
    if not (args.synthetic or args.data_root):
        raise UserError("no dataset: expected --data-root ROOT or --synthetic")
    methods = _methods(args.methods, preset)
    if args.synthetic:
        root, fmt = synthetic_root(preset, write=write), "cub"
    else:
        root, fmt = str(Path(args.data_root).expanduser().resolve()), dataset
    shared: list[str] = []
    if mode == "search" and args.search_shared.strip().lower() != "none":
        shared = [s.strip() for s in args.search_shared.split(",") if s.strip()]
    cache_dir = str(Path(args.cache_dir).expanduser().resolve()) if args.cache_dir else None
    return StudyConfig(
        name=args.name or default_name, storage=Location(args.storage),
        data={"format": fmt, "root": root,
              "val_fraction": (args.val_fraction if args.val_fraction is not None
                               else preset.val_fraction),
              "cache_dir": cache_dir},
        methods=methods, mode=mode,
        trials=_given(getattr(args, "trials", None), preset.trials),
        epochs=_given(args.epochs, preset.epochs),
        batch_size=_given(args.batch_size, preset.batch_size),
        image_size=_given(args.image_size, preset.image_size),
        backbones={m: args.backbone or preset.backbone_for(m) for m in methods},
        init=args.init or preset.init,
        fixed=_fixed(args.set, methods, preset), shared=shared,
        grace_period=_given(getattr(args, "grace_period", None), preset.grace_period),
        reduction_factor=_given(getattr(args, "reduction_factor", None),
                                preset.reduction_factor),
        workers=args.workers if args.workers is not None else preset.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=(args.gpus_per_worker if args.gpus_per_worker is not None
                         else preset.gpus_per_worker),
        concurrency=args.concurrency, seed=_given(args.seed, 0),
        seeds=args.seeds if args.seeds is not None else preset.seeds,
        points=_points(getattr(args, "points", None), methods),
        protocols=([p.strip() for p in args.protocols.split(",") if p.strip()]
                   if args.protocols else list(preset.protocols)))


def _given(value, default):
    """A flag's value when given (0 included: it is then refused as 0), else the preset's."""
    return default if value is None else value


# Flags a resumed study compares with its study.json: (flag, attribute, stored field).
_RESUME_FLAGS = (("--trials", "trials", "trials"), ("--epochs", "epochs", "epochs"),
                 ("--batch-size", "batch_size", "batch_size"),
                 ("--image-size", "image_size", "image_size"), ("--init", "init", "init"),
                 ("--seeds", "seeds", "seeds"), ("--seed", "seed", "seed"),
                 ("--workers", "workers", "workers"),
                 ("--grace-period", "grace_period", "grace_period"),
                 ("--reduction-factor", "reduction_factor", "reduction_factor"))


def check_resume_flags(args, stored) -> None:
    """Refuse a `--resume` whose study-defining flags differ from the stored study, naming
    every difference; flags not given are taken from the stored study."""
    differ = []
    for flag, attr, field_name in _RESUME_FLAGS:
        value = getattr(args, attr, None)
        if value is not None and value != getattr(stored, field_name):
            differ.append(f"{flag} {value} (stored {getattr(stored, field_name)})")
    if getattr(args, "methods", None):
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if methods != list(stored.methods):
            differ.append(f"--methods {args.methods} (stored {','.join(stored.methods)})")
    if args.backbone and any(b != args.backbone for b in stored.backbones.values()):
        differ.append(f"--backbone {args.backbone} (stored "
                      f"{','.join(sorted({str(b) for b in stored.backbones.values()}))})")
    for key, value in parse_set_flags(args.set).items():
        given = {m: parse_settings(m, {k: value}) for m, k in _scoped(key, stored.fixed).items()}
        have = {str(stored.fixed[m].get(q)) for m, sets in given.items() for q in sets}
        if any(stored.fixed[m].get(q) != v for m, sets in given.items()
               for q, v in sets.items()):
            differ.append(f"--set {key}={value} (stored {sorted(have)})")
    if args.data_root and str(Path(args.data_root).expanduser().resolve()) != \
            stored.data.get("root"):
        differ.append(f"--data-root {args.data_root} (stored {stored.data.get('root')})")
    if args.protocols and [p.strip() for p in args.protocols.split(",") if p.strip()] != \
            list(stored.protocols):
        differ.append(f"--protocols {args.protocols} (stored {','.join(stored.protocols)})")
    if getattr(args, "points", None) and _points(args.points, list(stored.methods)) != \
            stored.points:
        differ.append(f"--points {args.points} (differs from the stored points)")
    if differ:
        raise UserError(f"--resume continues the stored study unchanged, but "
                        f"{'; '.join(differ)}: drop these flags, or start a new --name")


@contextmanager
def ray_log_file(study_dir: str, *, enabled: bool):
    """Send Ray's Python loggers (Tune, Train, core) to STUDY_DIR/logs/ray.log instead of
    the console for the duration; yields the file's path, or None (not enabled, or the study
    lives in object storage, where Ray's session logs on the head keep the same lines)."""
    if not enabled or "://" in study_dir:
        yield None
        return
    path = Path(study_dir) / "logs" / "ray.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(n) for n in ("ray", "ray.tune", "ray.train", "ray.data")]
    saved = [(lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers = [handler]
        lg.propagate = False
    try:
        yield path
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved):
            lg.handlers, lg.propagate = handlers, propagate
        handler.close()


class _TokenAuthNotice(logging.Filter):
    """Drops Ray's notice that it enabled token auth for the new local cluster (it does so
    on every local start and says so as a WARNING, so a clean run would never print
    nothing); token auth stays on, and every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray")


@contextmanager
def quiet_token_notice():
    """`_TokenAuthNotice` on Ray's authentication logger for the duration."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notice = _TokenAuthNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def epoch_hooks(values: list[str] | None) -> tuple[Any, ...]:
    """The `--epoch-hook` values: 'pkg.module:function' strings, or JSON objects."""
    from fgray.train.hooks import check_epoch_hooks

    hooks: list[Any] = []
    for value in values or []:
        if value.lstrip().startswith("{"):
            try:
                hooks.append(json.loads(value))
            except json.JSONDecodeError as exc:
                raise UserError(f"--epoch-hook {value!r}: not valid JSON ({exc.msg}); "
                                "expected 'pkg.module:function' or a JSON object") from None
        else:
            hooks.append(value)
    return check_epoch_hooks(hooks)


def check_plan_study(study) -> None:
    """What `prepare` checks of a new study before it runs, without writing study.json:
    every method's settings and search space, and the settings against the data."""
    import optuna

    from fgray.train.resources import WorkerResources
    from fgray.tune.study import TrialSetup, check_data, recipe

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for method in study.methods:
        study.space(method, validate=True)
        TrialSetup(study, WorkerResources()).spec_for(recipe(method))
    check_data(study)


def study_main(argv: list[str] | None = None, *, prog: str, description: str, dataset: str,
               mode: str = "search") -> int:
    """Entry point of a study script; returns the exit code."""

    def body() -> int:
        from fgray.results.report import results_command
        from fgray.storage import check_writable
        from fgray.train.cluster import ray_session
        from fgray.tune.plan import actual_epochs, make_plan, versus_lines
        from fgray.tune.study import run_study

        args = build_parser(prog, description, mode=mode).parse_args(argv)
        default_name = f"{Path(prog).stem}-{args.preset}"
        more = getattr(args, "more_seeds", 0) or 0
        if more < 0 or (more and not args.resume):
            raise UserError(f"--more-seeds {more}: expected a number >= 1 given with --resume "
                            "(it adds seeds to a study's finalists)")
        if args.plan and args.resume:
            raise UserError("--plan plans a new study: drop --resume (the stored study's "
                            "tables say what it cost)")
        study = study_from_args(args, dataset=dataset, mode=mode, default_name=default_name,
                                write=not args.plan)
        synthetic = synthetic_params(get_preset(args.preset)) if args.synthetic else None
        if args.plan:
            check_plan_study(study)
            print("\n".join(make_plan(study, plan_from=args.plan_from,
                                       synthetic=synthetic).lines))
            return 0
        hooks = epoch_hooks(args.epoch_hook)
        # Before Ray starts: a missing bucket, rejected credentials or a read-only policy is
        # one line here, not a traceback from a trial (nothing is written by the check).
        check_writable(study.storage, "--storage")
        plan = None
        if not args.resume and not more:
            plan = make_plan(study, plan_from=args.plan_from, synthetic=synthetic,
                             probe_mismatch=False)
            if plan.estimate is not None:
                print(f"plan: {plan.counts.trials} trials, {plan.counts.evaluations} test "
                      f"evaluations, {plan.counts.epochs_worst} epochs worst case; wall "
                      f"{plan.estimate.wall_s(False):.0f} s expected (--plan for details)",
                      flush=True)
        with quiet_token_notice(), ray_session(args.address, log_to_driver=args.verbose), \
                ray_log_file(study.study_dir, enabled=not args.verbose) as log:
            if log:
                print(f"Ray's output: {log} (--verbose shows it here)", flush=True)
            summary = run_study(study, resume=args.resume, verbose=args.verbose, more_seeds=more,
                                epoch_hooks=hooks)
        print()
        print(results_command(summary.study_dir))
        print(f"study wall time {summary.wall_time_s:.0f} s; {summary.trials} trials "
              f"({summary.stopped} stopped early by ASHA, {summary.failed} failed); "
              f"trial time {summary.trial_time_s:.0f} s + test evaluations "
              f"{summary.evaluation_time_s:.0f} s at {summary.concurrency} at a time; "
              f"overhead ratio {summary.overhead_ratio:.2f}")
        if plan is not None:
            epochs = actual_epochs(summary.study_dir, list(study.methods))
            print("\n".join(versus_lines(plan.counts, plan.estimate, summary, epochs)))
        print(f"tables: {summary.study_dir}/tables   TensorBoard: tensorboard --logdir "
              f"{summary.study_dir}/tensorboard   Optuna: optuna-dashboard "
              f"{summary.study_dir}/optuna/journal.log")
        return 0

    return run_main(body, prog)
