"""TensorBoard writers, read back with TensorBoard's own event readers."""

from __future__ import annotations

import datetime as dt
import io
import json
import os

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torchvision.utils import make_grid

from fgray.errors import UserError
from fgray.results.tensorboard import (
    TrialWriter,
    overlay_maps,
    run_name,
    scalar_tag,
    stratified_subsample,
    write_embeddings,
    write_hparams,
)

LOAD_ALL = {ea.SCALARS: 0, ea.IMAGES: 0, ea.TENSORS: 0, ea.HISTOGRAMS: 0}
UTC = dt.timezone.utc


def _accumulator(path) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(path), size_guidance=LOAD_ALL)
    acc.Reload()
    return acc


def _png(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def test_scalar_tags():
    assert scalar_tag("loss") == "loss/total"
    assert scalar_tag("loss_rationale") == "loss/rationale"
    assert scalar_tag("val_knn_top1") == "val/knn_top1"
    assert scalar_tag("test_map") == "test/map"
    assert scalar_tag("lr") == "train/lr"
    assert scalar_tag("images_per_s") == "train/images_per_s"
    assert scalar_tag("custom/thing") == "custom/thing"


def test_trial_writer_scalars_read_back(tmp_path):
    metrics = {e: {"loss": 2.0 - e / 4, "loss_inst": 1.5 - e / 8, "loss_local": 0.5,
                   "val_knn_top1": 0.1 * (e + 1), "lr": 0.03 * 0.5 ** e,
                   "images_per_s": 100.0 + e, "peak_mem_mb": None,
                   "epoch_time_s": torch.tensor(3.5)} for e in range(3)}
    with TrialWriter(str(tmp_path), run_name("moco", "t1")) as writer:
        for epoch, values in metrics.items():
            writer.scalars(epoch, values)
    acc = _accumulator(tmp_path / "tensorboard" / "moco" / "t1")
    expected_tags = {"loss/total": "loss", "loss/inst": "loss_inst", "loss/local": "loss_local",
                     "val/knn_top1": "val_knn_top1", "train/lr": "lr",
                     "train/images_per_s": "images_per_s", "train/epoch_time_s": "epoch_time_s"}
    assert set(acc.Tags()["scalars"]) == set(expected_tags)
    for tag, key in expected_tags.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 1, 2]
        want = [float(metrics[s][key]) for s in range(3)]
        assert [e.value for e in events] == pytest.approx(want, rel=1e-6)


def test_overlay_matches_an_independent_blend():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8, generator=gen)
    maps = torch.rand(2, 6, 6, generator=gen)  # same size as the images: no resampling
    out = overlay_maps(images, maps, alpha=0.5, cmap="viridis")
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 6, 6)
    m = maps.numpy()
    norm = (m - m.min(axis=(1, 2), keepdims=True)) / np.ptp(m, axis=(1, 2), keepdims=True)
    heat = colormaps["viridis"](norm)[..., :3].transpose(0, 3, 1, 2)
    want = np.clip(0.5 * images.numpy() / 255 + 0.5 * heat, 0, 1) * 255
    assert np.abs(out.numpy().astype(float) - want).max() <= 1.0


def test_maps_and_pairs_images_read_back(tmp_path):
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=gen)
    maps = torch.rand(3, 4, 4, generator=gen)
    decoded = torch.rand(3, 3, 8, 8, generator=gen)  # float in [0, 1], other size
    with TrialWriter(str(tmp_path), "lcr/t9") as writer:
        writer.maps("maps/rationale", images, maps, epoch=4)
        writer.image_pairs("sdf/pairs", images, decoded, epoch=4)
    acc = _accumulator(tmp_path / "tensorboard" / "lcr" / "t9")
    assert set(acc.Tags()["images"]) == {"maps/rationale", "sdf/pairs"}

    (event,) = acc.Images("maps/rationale")
    assert event.step == 4
    grid = _png(event.encoded_image_string)
    want = make_grid(overlay_maps(images, maps), nrow=3, padding=2).permute(1, 2, 0).numpy()
    assert grid.shape == (16 + 4, 3 * 16 + 4 * 2, 3)
    assert np.array_equal(grid, want)

    (event,) = acc.Images("sdf/pairs")
    grid = _png(event.encoded_image_string)
    assert grid.shape == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2, 3)  # one pair per row
    # Row 2's left tile is images[1] unchanged.
    assert np.array_equal(grid[20:36, 2:18], images[1].permute(1, 2, 0).numpy())


def test_bad_run_name_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="expected a relative path"):
        TrialWriter(str(tmp_path), "../escape")


def _trial(method, trial_id, status, val, params, **extra):
    row = {"study": "s", "method": method, "trial_id": trial_id, "status": status,
           "best_val_knn_top1": val, "backbone": "test_resnet", "dataset": "synthetic",
           "image_size": 32, "seed": 0, "epochs_run": 4, "gpu_hours": 0.5,
           "params_json": json.dumps(params),
           "start_time": dt.datetime(2024, 1, 1, tzinfo=UTC),
           "end_time": dt.datetime(2024, 1, 1, 1, tzinfo=UTC)}
    row.update(extra)
    return row


def _hparams_by_run(tb_dir):
    mux = EventMultiplexer(size_guidance=LOAD_ALL)
    mux.AddRunsFromDirectory(str(tb_dir))
    mux.Reload()
    content = mux.PluginRunToTagToContent(metadata.PLUGIN_NAME)
    parsed = {run: {tag: plugin_data_pb2.HParamsPluginData.FromString(raw)
                    for tag, raw in tags.items()} for run, tags in content.items()}
    return mux, parsed


def test_hparams_one_session_per_trial_and_idempotent(tmp_path):
    study = str(tmp_path)
    trials = [
        _trial("moco", "t1", "completed", 0.61, {"lr": 0.03, "tau": 0.2}, test_rank1=0.5),
        _trial("moco", "t2", "running", None, {"lr": 0.1, "tau": 0.1}),
        _trial("lcr", "l1", "stopped", 0.42, {"lr": 0.05, "fusion": "product",
                                              "crops": [96, 64]}),
    ]
    write_hparams(study, trials)
    later = trials + [
        _trial("moco", "t2", "completed", 0.66, {"lr": 0.1, "tau": 0.1}, epochs_run=8),
        _trial("sdf", "s1", "failed", None, {"lr": 0.2}, error="OOM"),
    ]
    sessions = write_hparams(study, later)
    expected = {"moco/t1/hparams", "moco/t2/hparams", "lcr/l1/hparams", "sdf/s1/hparams"}
    assert set(sessions) == expected

    tb_dir = tmp_path / "tensorboard"
    for session in expected:
        files = os.listdir(tb_dir / session)
        assert len(files) == 1 and files[0].endswith(".hparams")
    assert len([f for f in os.listdir(tb_dir) if f.endswith(".hparams_experiment")]) == 1

    mux, parsed = _hparams_by_run(tb_dir)
    starts = {run: data[metadata.SESSION_START_INFO_TAG].session_start_info
              for run, data in parsed.items() if metadata.SESSION_START_INFO_TAG in data}
    assert set(starts) == expected  # every trial exactly once
    t1 = starts["moco/t1/hparams"].hparams
    assert t1["lr"].number_value == pytest.approx(0.03)
    assert t1["tau"].number_value == pytest.approx(0.2)
    assert t1["method"].string_value == "moco"
    assert t1["image_size"].number_value == 32
    assert starts["lcr/l1/hparams"].hparams["fusion"].string_value == "product"
    assert starts["lcr/l1/hparams"].hparams["status"].string_value == "stopped"
    assert json.loads(starts["lcr/l1/hparams"].hparams["crops"].string_value) == [96, 64]

    ends = {run: data[metadata.SESSION_END_INFO_TAG].session_end_info.status
            for run, data in parsed.items() if metadata.SESSION_END_INFO_TAG in data}
    assert ends == {"moco/t1/hparams": api_pb2.STATUS_SUCCESS,
                    "moco/t2/hparams": api_pb2.STATUS_SUCCESS,
                    "lcr/l1/hparams": api_pb2.STATUS_SUCCESS,
                    "sdf/s1/hparams": api_pb2.STATUS_FAILURE}

    # The latest state of t2 (completed, 8 epochs) is what the session reports.
    (event,) = mux.Scalars("moco/t2/hparams", "best_val_knn_top1")
    assert event.value == pytest.approx(0.66) and event.step == 8
    assert mux.Scalars("moco/t1/hparams", "test_rank1")[0].value == pytest.approx(0.5)
    assert "best_val_knn_top1" not in mux.Runs()["sdf/s1/hparams"]["scalars"]

    experiment = parsed["."][metadata.EXPERIMENT_TAG].experiment
    hparam_names = {h.name for h in experiment.hparam_infos}
    assert {"lr", "tau", "fusion", "crops", "method", "backbone", "seed"} <= hparam_names
    metric_names = [m.name.tag for m in experiment.metric_infos]
    assert metric_names[0] == "best_val_knn_top1"
    assert {"test_rank1", "epochs_run", "gpu_hours"} <= set(metric_names)
    method_info = next(h for h in experiment.hparam_infos if h.name == "method")
    assert sorted(v.string_value for v in method_info.domain_discrete.values) == [
        "lcr", "moco", "sdf"]


def test_stratified_subsample_keeps_every_class():
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 5 + [3] * 195)
    idx = stratified_subsample(labels, 100, seed=3)
    assert idx.numel() == 100 and idx.unique().numel() == 100
    counts = torch.bincount(labels[idx], minlength=4).tolist()
    assert counts[2] == 5 and all(c >= 25 for c in (counts[0], counts[1], counts[3]))
    assert torch.equal(idx, stratified_subsample(labels, 100, seed=3))
    assert torch.equal(stratified_subsample(labels[:50], 100), torch.arange(50))


def test_embeddings_projector_files(tmp_path):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(100)
    features = torch.randn(600, 8, generator=gen)
    names = ["black tern", "blue jay", "cardinal", "crow", "gull", "wren"]
    for _ in range(2):  # rewriting replaces, never appends
        run_dir = write_embeddings(str(tmp_path), "moco/t1", features, labels, names,
                                   max_points=120, seed=0)
    assert run_dir == f"{tmp_path}/tensorboard/moco/t1/embeddings"
    config = open(os.path.join(run_dir, "projector_config.pbtxt")).read()
    assert config.count("embeddings {") == 1
    (tensor_dir,) = [d for d, _, fs in os.walk(run_dir) if "tensors.tsv" in fs]
    tensors = np.loadtxt(os.path.join(tensor_dir, "tensors.tsv"), delimiter="\t")
    assert tensors.shape == (120, 8)
    lines = open(os.path.join(tensor_dir, "metadata.tsv")).read().splitlines()
    assert lines[0] == "label\tclass" and len(lines) == 121
    per_class = {}
    for line in lines[1:]:
        label, name = line.split("\t")
        assert names[int(label)] == name
        per_class[name] = per_class.get(name, 0) + 1
    assert per_class == {n: 20 for n in names}
    # Each kept row is the feature of an item of the stated class.
    keep = stratified_subsample(labels, 120, seed=0)
    assert np.allclose(tensors, features[keep].numpy(), atol=1e-5)
