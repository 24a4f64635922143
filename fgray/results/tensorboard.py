# Why one file (over ~450 lines): everything here writes or reads one run folder's TensorBoard
# files with the same event-file and staging rules (`_LogDir`, `_event_file`, the file-name
# order TensorBoard's loader needs); the scalars, the HParams session and the projector are
# three views of one run, and splitting them would spread those rules over three modules
# that must agree on them.
"""TensorBoard logs of a study under `STUDY_DIR/tensorboard/`: one run per trial.

TensorBoard makes a run of every folder that directly holds an event file, so everything a
trial shows lives in its one folder `<method>/<trial_id>/` (stable names, so a resumed trial
keeps writing to the same run), and nothing else under `tensorboard/` holds event files:

- `events.out.tfevents.<time>.<host>...`  per-epoch scalars and images (`TrialWriter`)
- `events.out.tfevents.0000000000.fgray.hparams`  the trial's HParams session and its final
  metrics as `final/<metric>` scalars (`write_hparams`); the first trial's file (by method,
  then trial id) also holds the HParams experiment (every hyperparameter name and metric)
- `projector_config.pbtxt`, `projector/<tag>/{tensors,metadata}.tsv`  the embedding projector
  (`write_embeddings`; no event file of its own)

The HParams file is rewritten whole (atomically, under one fixed name) each time, so running
`write_hparams` again after more trials finish lists every trial exactly once. Its name sorts
before every `TrialWriter` file: TensorBoard's Python loader reads a run's event files in name
order and never goes back to an earlier one, so the file a live `TrialWriter` appends to must
stay the last. (The Rust data server, TensorBoard's default, reads them all.) A TensorBoard
already running keeps the HParams it first read; restart it to see a rewritten table.

Logs written by earlier versions (sub-runs `<run>/hparams/` and `<run>/embeddings/`, and an
experiment file in `tensorboard/` itself, each a run of its own) are folded into the trial's
run by `write_hparams`.

TensorBoard's writers need a local directory; for `s3://` / `gs://` study dirs `TrialWriter`
writes to a local staging directory that is copied to the store on `flush`/`close` (and at
most every `sync_secs` while logging scalars). The HParams and projector files are written
straight to the store (one object each).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import scalar as scalar_summary

from fgray.errors import UserError
from fgray.results.schema import TEST_METRICS
from fgray.results.tables import latest_trials
from fgray.storage import as_location, copy_stream, is_local, put, resolve

# Sorts before every SummaryWriter file of the run (their names carry the Unix time).
HPARAMS_FILE = "events.out.tfevents.0000000000.fgray.hparams"
FINAL_SECTION = "final"  # the HParams metrics' scalar tags: final/<metric>
PROJECTOR_CONFIG = "projector_config.pbtxt"
PROJECTOR_DIR = "projector"
# Layout of earlier versions, folded into the trial's run by write_hparams.
LEGACY_HPARAMS_RUN = "hparams"
LEGACY_EMBEDDINGS_RUN = "embeddings"
LEGACY_EXPERIMENT_SUFFIX = ".hparams_experiment"

# Trial-row columns that become hyperparameters next to everything in params_json
# (`status` too, so the HParams view can filter completed / stopped / failed trials).
HPARAM_COLUMNS = ("method", "backbone", "dataset", "image_size", "seed", "status")
# Trial-row columns shown as the HParams view's metrics.
METRIC_COLUMNS = ("best_val_knn_top1", *TEST_METRICS, "best_epoch", "epochs_run",
                  "wall_time_s", "gpu_hours", "cpu_hours")

# The HParams protos have no "aborted": a trial a scheduler stopped early still produced a
# valid result, so it counts as a success; the `status` hparam tells the two apart.
_STATUS = {
    "completed": api_pb2.STATUS_SUCCESS,
    "stopped": api_pb2.STATUS_SUCCESS,
    "failed": api_pb2.STATUS_FAILURE,
    "running": api_pb2.STATUS_RUNNING,
}


def run_name(method: str, trial_id: str) -> str:
    """The stable TensorBoard run of a trial: `<method>/<trial_id>`."""
    return f"{method}/{trial_id}"


def _check_run(name: str) -> str:
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise UserError(f"TensorBoard run name {name!r}: expected a relative path like "
                        "'<method>/<trial_id>' without empty, '.' or '..' parts")
    return name


def scalar_tag(key: str) -> str:
    """TensorBoard tag of a metric key, so related curves share a section.

    `loss` -> `loss/total`; `loss_<term>` -> `loss/<term>`; `val_<m>` -> `val/<m>`;
    `test_<m>` -> `test/<m>`; a key that already has a `/` is kept; anything else (lr,
    images_per_s, peak_mem_mb, epoch_time_s, momentum, ...) -> `train/<key>`.
    """
    if "/" in key:
        return key
    if key == "loss":
        return "loss/total"
    for prefix, section in (("loss_", "loss"), ("val_", "val"), ("test_", "test")):
        if key.startswith(prefix) and len(key) > len(prefix):
            return f"{section}/{key[len(prefix):]}"
    return f"train/{key}"


class _LogDir:
    """A local directory for TensorBoard writers, mirrored to object storage when needed."""

    def __init__(self, study_dir: str, rel: str) -> None:
        self.fs, root = resolve(study_dir)
        self.remote = f"{root}/tensorboard/{rel}" if rel else f"{root}/tensorboard"
        if is_local(self.fs):
            self.local = self.remote
            self._staging: str | None = None
        else:
            self._staging = tempfile.mkdtemp(prefix="fgray-tb-")
            self.local = self._staging
        os.makedirs(self.local, exist_ok=True)

    def sync(self) -> None:
        """Copy every staged file to the store (whole files: event files are small)."""
        if self._staging is None:
            return
        for directory, _, files in os.walk(self._staging):
            rel = os.path.relpath(directory, self._staging).replace(os.sep, "/")
            target = self.remote if rel == "." else f"{self.remote}/{rel}"
            self.fs.create_dir(target, recursive=True)
            for name in files:
                with open(os.path.join(directory, name), "rb") as src, \
                        self.fs.open_output_stream(f"{target}/{name}") as dst:
                    shutil.copyfileobj(src, dst)

    def close(self) -> None:
        self.sync()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


def _run_dir(study_dir: str, run: str) -> tuple[pafs.FileSystem, str, str]:
    """The filesystem, the run's path in it, and the run's path as a local path or URI."""
    fs, root = resolve(study_dir)
    path = f"{root}/tensorboard/{_check_run(run)}"
    return fs, path, as_location(study_dir, path)


def _event_file(events: list[tuple[int, Summary]]) -> bytes:
    """An event file's bytes: the version record, then each summary at its step."""
    buf = io.BytesIO()
    records = RecordWriter(buf)
    now = time.time()
    records.write(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
    for step, summary in events:
        records.write(Event(wall_time=now, step=step, summary=summary).SerializeToString())
    return buf.getvalue()


def _uint8_images(images: torch.Tensor) -> torch.Tensor:
    """[N,C,H,W] images (uint8, or float in [0, 1]) as uint8 with 3 channels on the CPU."""
    images = images.detach().cpu()
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images


def overlay_maps(images: torch.Tensor, maps: torch.Tensor, *, alpha: float = 0.5,
                 cmap: str = "jet") -> torch.Tensor:
    """Each spatial map, upsampled to its image, min-max normalised and colour-mapped, blended
    over the image: `(1 - alpha) * image + alpha * colour(map)`; returns uint8 [N,3,H,W].
    """
    from matplotlib import colormaps

    images = _uint8_images(images)
    maps = maps.detach().cpu().float()
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3 or maps.shape[0] != images.shape[0]:
        raise ValueError(f"maps must be [N, h, w] with N={images.shape[0]}, "
                         f"got shape {tuple(maps.shape)}")
    height, width = images.shape[-2:]
    up = F.interpolate(maps[:, None], size=(height, width), mode="bilinear",
                       align_corners=False)[:, 0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    norm = (up - lo) / (hi - lo).clamp_min(1e-12)
    colour = colormaps[cmap](norm.numpy())[..., :3]  # [N,H,W,3] in [0, 1]
    heat = torch.from_numpy(colour).permute(0, 3, 1, 2).float()
    blended = (1 - alpha) * images.float() / 255 + alpha * heat
    return (blended.clamp(0, 1) * 255).round().to(torch.uint8)


def _make_grid(images: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """torchvision's `make_grid`, imported when an image is first written: torchvision imports
    `torch._dynamo` (about 1 s), and the Ray Train controller, which writes scalars only,
    should not pay for it at its first report."""
    from torchvision.utils import make_grid

    return make_grid(images, **kwargs)


class TrialWriter:
    """Per-epoch TensorBoard logging of one trial under `STUDY_DIR/tensorboard/<run_name>/`."""

    def __init__(self, study_dir: str, run_name: str, *, max_images: int = 16,
                 flush_secs: int = 30, sync_secs: float = 60.0) -> None:
        self.run_name = _check_run(run_name)
        self.max_images = max_images
        self._sync_secs = sync_secs
        self._last_sync = time.monotonic()
        self._dir = _LogDir(study_dir, self.run_name)
        self._writer = SummaryWriter(log_dir=self._dir.local, flush_secs=flush_secs)

    def scalars(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Log every metric (loss terms, val metrics, lr, throughput, ...) at `epoch`; tags
        follow `scalar_tag`. None values are skipped; NaN is logged (a divergence shows)."""
        for key, value in metrics.items():
            if value is None:
                continue
            number = float(value.item() if hasattr(value, "item") else value)
            self._writer.add_scalar(scalar_tag(key), number, epoch)
        if self._dir._staging is not None and time.monotonic() - self._last_sync > self._sync_secs:
            self.flush()

    def maps(self, tag: str, images_uint8: torch.Tensor, maps: torch.Tensor, epoch: int,
             *, alpha: float = 0.5, cmap: str = "jet") -> None:
        """A grid of the first `max_images` images, each with its spatial map overlaid."""
        n = min(self.max_images, images_uint8.shape[0])
        overlaid = overlay_maps(images_uint8[:n], maps[:n], alpha=alpha, cmap=cmap)
        grid = _make_grid(overlaid, nrow=min(8, n), padding=2)
        self._writer.add_image(tag, grid, epoch, dataformats="CHW")

    def image_pairs(self, tag: str, a: torch.Tensor, b: torch.Tensor, epoch: int) -> None:
        """A grid with one pair per row, `a[i]` left of `b[i]` (e.g. an image and its decoded
        reconstruction); `b` is resized to `a`'s size when they differ."""
        n = min(self.max_images, a.shape[0], b.shape[0])
        left, right = _uint8_images(a[:n]), _uint8_images(b[:n])
        if right.shape[-2:] != left.shape[-2:]:
            right = F.interpolate(right.float(), size=left.shape[-2:], mode="bilinear",
                                  align_corners=False).round().clamp(0, 255).to(torch.uint8)
        pairs = torch.stack([left, right], dim=1).flatten(0, 1)
        grid = _make_grid(pairs, nrow=2, padding=2)
        self._writer.add_image(tag, grid, epoch, dataformats="CHW")

    def flush(self) -> None:
        self._writer.flush()
        self._dir.sync()
        self._last_sync = time.monotonic()

    def close(self) -> None:
        self._writer.close()
        self._dir.close()

    def __enter__(self) -> TrialWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- HParams


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _hparam_value(value: Any) -> bool | float | str | None:
    if value is None:
        return None
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return json.dumps(value)
    return str(value)


def trial_hparams(trial: dict[str, Any]) -> dict[str, bool | float | str]:
    """The hyperparameters shown for a trial: everything in params_json (nested keys joined
    with '.') plus the trial's method, backbone, dataset, image size, seed and status."""
    params = json.loads(trial["params_json"]) if trial.get("params_json") else {}
    merged = {col: trial.get(col) for col in HPARAM_COLUMNS}
    merged.update(_flatten(params))
    return {k: v for k, v in ((k, _hparam_value(v)) for k, v in merged.items()) if v is not None}


def trial_metrics(trial: dict[str, Any]) -> dict[str, float]:
    out = {}
    for name in METRIC_COLUMNS:
        value = trial.get(name)
        if value is not None and math.isfinite(float(value)):
            out[name] = float(value)
    return out


def _hparams_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    return Summary(value=[Summary.Value(tag=tag,
                                        metadata=metadata.create_summary_metadata(data))])


def _timestamp_secs(value: Any) -> float:
    return value.timestamp() if value is not None else 0.0


def _session_start(hparams: dict[str, Any], start_time: Any) -> Summary:
    info = plugin_data_pb2.SessionStartInfo(start_time_secs=_timestamp_secs(start_time))
    for name, value in hparams.items():
        if isinstance(value, bool):
            info.hparams[name].bool_value = value
        elif isinstance(value, float):
            info.hparams[name].number_value = value
        else:
            info.hparams[name].string_value = value
    return _hparams_summary(metadata.SESSION_START_INFO_TAG,
                            plugin_data_pb2.HParamsPluginData(session_start_info=info))


def _session_end(status: str | None, end_time: Any) -> Summary:
    info = plugin_data_pb2.SessionEndInfo(
        status=_STATUS.get(status or "", api_pb2.STATUS_UNKNOWN),
        end_time_secs=_timestamp_secs(end_time))
    return _hparams_summary(metadata.SESSION_END_INFO_TAG,
                            plugin_data_pb2.HParamsPluginData(session_end_info=info))


def _experiment(all_hparams: dict[str, list[Any]], metric_names: list[str]) -> Summary:
    infos = []
    for name in sorted(all_hparams):
        values = all_hparams[name]
        info = api_pb2.HParamInfo(name=name, display_name=name)
        if all(isinstance(v, bool) for v in values):
            info.type = api_pb2.DATA_TYPE_BOOL
        elif all(isinstance(v, float) for v in values):
            info.type = api_pb2.DATA_TYPE_FLOAT64
        elif all(isinstance(v, str) for v in values):
            info.type = api_pb2.DATA_TYPE_STRING
            # Listing the values lets the HParams view filter by them.
            info.domain_discrete.extend(sorted(set(values)))
        infos.append(info)
    metrics = []
    for name in metric_names:
        kind = (api_pb2.DATASET_VALIDATION if name.startswith("best_val")
                else api_pb2.DATASET_UNKNOWN)
        metrics.append(api_pb2.MetricInfo(name=api_pb2.MetricName(group="", tag=final_tag(name)),
                                          display_name=name, dataset_type=kind))
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics,
                                    time_created_secs=time.time())
    return _hparams_summary(metadata.EXPERIMENT_TAG,
                            plugin_data_pb2.HParamsPluginData(experiment=experiment))


def final_tag(metric: str) -> str:
    """The scalar tag of a trial's final metric in its run (the HParams view's metric)."""
    return f"{FINAL_SECTION}/{metric}"


def write_hparams(study_dir: str, trials: list[dict[str, Any]]) -> list[str]:
    """Write the HParams plugin table: one session per trial, in the trial's run
    `<method>/<trial_id>` (file `HPARAMS_FILE`, replaced whole).

    `trials` are trials-table rows (several states of one trial collapse to its latest).
    Each session holds the trial's hyperparameters, its status, and its final metrics as
    `final/<metric>` scalars at step `epochs_run`; the experiment (all hyperparameter names
    and metrics) goes into the first trial's file. Sub-runs an earlier version wrote are
    folded in (module docstring). Returns the trials' runs.
    """
    trials = sorted(latest_trials(trials), key=lambda t: (t["method"], t["trial_id"]))
    all_hparams: dict[str, list[Any]] = {}
    metric_names: list[str] = []
    sessions = []
    for trial in trials:
        hparams = trial_hparams(trial)
        metrics = trial_metrics(trial)
        for name, value in hparams.items():
            all_hparams.setdefault(name, []).append(value)
        metric_names.extend(m for m in metrics if m not in metric_names)
        step = int(trial.get("epochs_run") or 0)
        events = [(step, _session_start(hparams, trial.get("start_time")))]
        events += [(step, scalar_summary(final_tag(name), value))
                   for name, value in metrics.items()]
        events.append((step, _session_end(trial.get("status"), trial.get("end_time"))))
        sessions.append((run_name(trial["method"], trial["trial_id"]), events))
    ordered = [m for m in METRIC_COLUMNS if m in metric_names]
    for i, (run, events) in enumerate(sessions):
        if i == 0:  # one experiment for the whole study, in the first run
            events = [(0, _experiment(all_hparams, ordered))] + events
        fs, path, _ = _run_dir(study_dir, run)
        _fold_legacy_runs(fs, path)
        put(fs, f"{path}/{HPARAMS_FILE}", _event_file(events))
    fs, root = resolve(study_dir)
    _remove_legacy_experiment(fs, f"{root}/tensorboard")
    return [run for run, _ in sessions]


def _remove_legacy_experiment(fs: pafs.FileSystem, logdir: str) -> None:
    selector = pafs.FileSelector(logdir, allow_not_found=True)
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.File and info.base_name.endswith(LEGACY_EXPERIMENT_SUFFIX):
            fs.delete_file(info.path)


def _fold_legacy_runs(fs: pafs.FileSystem, run_path: str) -> None:
    """Fold an earlier version's sub-runs of a trial into its run: the HParams sub-run is
    dropped (the caller rewrites it), the projector files of the embeddings sub-run move to
    `projector/<tag>/` with the run's projector config rewritten."""
    hparams = f"{run_path}/{LEGACY_HPARAMS_RUN}"
    if fs.get_file_info(hparams).type == pafs.FileType.Directory:
        fs.delete_dir(hparams)
    legacy = f"{run_path}/{LEGACY_EMBEDDINGS_RUN}"
    if fs.get_file_info(legacy).type != pafs.FileType.Directory:
        return
    # SummaryWriter.add_embedding wrote <step>/<tag>/{tensors,metadata}.tsv.
    found = fs.get_file_info(pafs.FileSelector(legacy, recursive=True))
    for info in found:
        parts = info.path[len(legacy) + 1:].split("/")
        if info.type == pafs.FileType.File and len(parts) == 3 and parts[2] in (
                "tensors.tsv", "metadata.tsv"):
            with fs.open_input_stream(info.path) as src:
                put(fs, f"{run_path}/{PROJECTOR_DIR}/{parts[1]}/{parts[2]}", src.read())
    _write_projector_config(fs, run_path)
    fs.delete_dir(legacy)


# ---------------------------------------------------------------- embeddings


def stratified_subsample(labels: torch.Tensor, max_points: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of at most `max_points` items with every class represented: an equal
    quota per class (classes smaller than it give all they have), the rest of the budget
    filled at random from what is left. Deterministic for a given seed."""
    labels = torch.as_tensor(labels).long().cpu()
    n = labels.numel()
    if n <= max_points:
        return torch.arange(n)
    rng = np.random.default_rng(seed)
    classes = torch.unique(labels).tolist()
    quota = max(1, max_points // len(classes))
    chosen: list[np.ndarray] = []
    leftover: list[np.ndarray] = []
    for cls in classes:
        members = rng.permutation(torch.nonzero(labels == cls).flatten().numpy())
        chosen.append(members[:quota])
        leftover.append(members[quota:])
    picked = np.concatenate(chosen)[:max_points]
    rest = np.concatenate(leftover)
    budget = max_points - picked.size
    if budget > 0:
        picked = np.concatenate([picked, rng.choice(rest, size=budget, replace=False)])
    return torch.from_numpy(np.sort(picked))


def _tsv_safe(text: str) -> str:
    return " ".join(str(text).split())


def _write_projector_config(fs: pafs.FileSystem, run_path: str) -> None:
    """The run's projector config: one embedding per `projector/<tag>/tensors.tsv`."""
    base = f"{run_path}/{PROJECTOR_DIR}"
    entries = []
    for info in sorted(fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)),
                       key=lambda i: i.base_name):
        if info.type != pafs.FileType.Directory:
            continue
        tag = info.base_name
        if fs.get_file_info(f"{info.path}/tensors.tsv").type != pafs.FileType.File:
            continue
        entry = (f'embeddings {{\n  tensor_name: {json.dumps(tag)}\n'
                 f'  tensor_path: "{PROJECTOR_DIR}/{tag}/tensors.tsv"\n')
        if fs.get_file_info(f"{info.path}/metadata.tsv").type == pafs.FileType.File:
            entry += f'  metadata_path: "{PROJECTOR_DIR}/{tag}/metadata.tsv"\n'
        entries.append(entry + "}\n")
    put(fs, f"{run_path}/{PROJECTOR_CONFIG}", "".join(entries).encode())


def write_embeddings(study_dir: str, run_name: str, features: torch.Tensor,
                     labels: list[int] | torch.Tensor, class_names: list[str] | None = None,
                     *, max_points: int = 2000, seed: int = 0, tag: str = "features") -> str:
    """Write features to TensorBoard's embedding projector in the trial's run
    (`<run_name>/projector/<tag>/`, listed in the run's `projector_config.pbtxt`), replacing
    what `tag` held; large sets are subsampled per class (`stratified_subsample`). Metadata
    columns: `label` and, with class names, `class`. No event file is written: the projector
    belongs to the run the trial's scalars made. Returns the run's directory."""
    labels_t = torch.as_tensor(labels).long().cpu()
    features = features.detach().float().cpu()
    if features.ndim != 2 or features.shape[0] != labels_t.numel():
        raise ValueError(f"features must be [N, D] with N={labels_t.numel()} labels, "
                         f"got shape {tuple(features.shape)}")
    if not tag or "/" in tag or tag.startswith("."):
        raise ValueError(f"embedding tag {tag!r}: expected a plain name")
    keep = stratified_subsample(labels_t, max_points, seed)
    kept_labels = labels_t[keep].tolist()
    tensors = "".join("\t".join(format(float(v), ".8g") for v in row) + "\n"
                      for row in features[keep].numpy())
    if class_names is not None:
        lines = ["label\tclass"] + [f"{lab}\t{_tsv_safe(class_names[lab])}"
                                    for lab in kept_labels]
    else:  # one column: the projector expects no header
        lines = [str(lab) for lab in kept_labels]
    fs, path, uri = _run_dir(study_dir, run_name)
    put(fs, f"{path}/{PROJECTOR_DIR}/{tag}/tensors.tsv", tensors.encode())
    put(fs, f"{path}/{PROJECTOR_DIR}/{tag}/metadata.tsv", ("\n".join(lines) + "\n").encode())
    _write_projector_config(fs, path)
    return uri


# ---------------------------------------------------------------- reading back


def latest_images(study_dir: str, run: str, prefixes: tuple[str, ...] = ("maps/", "pairs/")
                  ) -> list[tuple[str, int, bytes]]:
    """The last logged image of each tag of `run` that starts with one of `prefixes`, as
    (tag, step, PNG bytes), sorted by tag; [] when the run has none. Read with TensorBoard's
    own event reader (object-store runs are copied to a temporary folder first)."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    fs, path, _ = _run_dir(study_dir, run)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    staging = None
    if not is_local(fs):
        staging = tempfile.mkdtemp(prefix="fgray-tb-read-")
        for info in fs.get_file_info(pafs.FileSelector(path)):
            if info.type == pafs.FileType.File and "tfevents" in info.base_name:
                with fs.open_input_stream(info.path) as src, \
                        open(os.path.join(staging, info.base_name), "wb") as out:
                    copy_stream(src, out)
        path = staging
    try:
        # Image reservoirs of size 1 keep the latest image; nothing else is kept.
        guidance = {ea.IMAGES: 1, ea.SCALARS: 1, ea.TENSORS: 1, ea.HISTOGRAMS: 1,
                    ea.COMPRESSED_HISTOGRAMS: 1, ea.AUDIO: 1}
        acc = ea.EventAccumulator(path, size_guidance=guidance)
        acc.Reload()
        out = []
        for tag in sorted(acc.Tags().get("images", [])):
            if tag.startswith(prefixes):
                event = acc.Images(tag)[-1]
                out.append((tag, int(event.step), bytes(event.encoded_image_string)))
        return out
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
