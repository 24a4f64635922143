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
    HPARAMS_FILE,
    TrialWriter,
    latest_images,
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


def _event_dirs(tb_dir) -> set[str]:
    """TensorBoard's runs: every folder that directly holds an event file."""
    return {os.path.relpath(d, tb_dir).replace(os.sep, "/") for d, _, files in os.walk(tb_dir)
            if any("tfevents" in f for f in files)}


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
    expected = {"moco/t1", "moco/t2", "lcr/l1", "sdf/s1"}
    assert set(sessions) == expected

    tb_dir = tmp_path / "tensorboard"
    assert _event_dirs(tb_dir) == expected  # one run per trial, nothing else
    for session in expected:
        assert os.listdir(tb_dir / session) == [HPARAMS_FILE]

    mux, parsed = _hparams_by_run(tb_dir)
    assert set(mux.Runs()) == expected
    starts = {run: data[metadata.SESSION_START_INFO_TAG].session_start_info
              for run, data in parsed.items() if metadata.SESSION_START_INFO_TAG in data}
    assert set(starts) == expected  # every trial exactly once
    t1 = starts["moco/t1"].hparams
    assert t1["lr"].number_value == pytest.approx(0.03)
    assert t1["tau"].number_value == pytest.approx(0.2)
    assert t1["method"].string_value == "moco"
    assert t1["image_size"].number_value == 32
    assert starts["lcr/l1"].hparams["fusion"].string_value == "product"
    assert starts["lcr/l1"].hparams["status"].string_value == "stopped"
    assert json.loads(starts["lcr/l1"].hparams["crops"].string_value) == [96, 64]

    ends = {run: data[metadata.SESSION_END_INFO_TAG].session_end_info.status
            for run, data in parsed.items() if metadata.SESSION_END_INFO_TAG in data}
    assert ends == {"moco/t1": api_pb2.STATUS_SUCCESS, "moco/t2": api_pb2.STATUS_SUCCESS,
                    "lcr/l1": api_pb2.STATUS_SUCCESS, "sdf/s1": api_pb2.STATUS_FAILURE}

    # The latest state of t2 (completed, 8 epochs) is what the session reports.
    (event,) = mux.Scalars("moco/t2", "final/best_val_knn_top1")
    assert event.value == pytest.approx(0.66) and event.step == 8
    assert mux.Scalars("moco/t1", "final/test_rank1")[0].value == pytest.approx(0.5)
    assert "final/best_val_knn_top1" not in mux.Runs()["sdf/s1"]["scalars"]

    # One experiment, in the first run by method then trial id.
    holders = [run for run, data in parsed.items() if metadata.EXPERIMENT_TAG in data]
    assert holders == ["lcr/l1"]
    experiment = parsed["lcr/l1"][metadata.EXPERIMENT_TAG].experiment
    hparam_names = {h.name for h in experiment.hparam_infos}
    assert {"lr", "tau", "fusion", "crops", "method", "backbone", "seed"} <= hparam_names
    metric_tags = [m.name.tag for m in experiment.metric_infos]
    assert metric_tags[0] == "final/best_val_knn_top1"
    assert experiment.metric_infos[0].display_name == "best_val_knn_top1"
    assert {"final/test_rank1", "final/epochs_run", "final/gpu_hours"} <= set(metric_tags)
    method_info = next(h for h in experiment.hparam_infos if h.name == "method")
    assert sorted(v.string_value for v in method_info.domain_discrete.values) == [
        "lcr", "moco", "sdf"]


def _hparams_plugin_view(tb_dir) -> tuple[api_pb2.Experiment, list]:
    """The HParams dashboard's experiment and session groups, from TensorBoard's own plugin
    over the logdir (what the HParams tab shows)."""
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context, list_session_groups

    mux = plugin_event_multiplexer.EventMultiplexer(size_guidance=LOAD_ALL)
    mux.AddRunsFromDirectory(str(tb_dir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(tb_dir))
    context = backend_context.Context(base_plugin.TBContext(logdir=str(tb_dir),
                                                            multiplexer=mux,
                                                            data_provider=provider))
    from tensorboard import context as tb_context

    ctx = tb_context.RequestContext()
    experiment = context.experiment_from_metadata(
        ctx, "", include_metrics=True,
        hparams_run_to_tag_to_content=context.hparams_metadata(ctx, ""),
        data_provider_hparams=context.hparams_from_data_provider(ctx, "", limit=None))
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=100,
        allowed_statuses=[api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE,
                          api_pb2.STATUS_RUNNING, api_pb2.STATUS_UNKNOWN])
    handler = list_session_groups.Handler(ctx, context, "", request)
    return experiment, list(handler.run().session_groups)


def _study_like_logs(study: str) -> list[dict]:
    """What a study leaves in TensorBoard for 3 trials: per-epoch scalars and maps from the
    trials' recorders, then (at the end) the HParams and the best trial's embeddings."""
    from fgray.engine.spec import DataSpec, build_spec
    from fgray.results.records import EpochRecorder

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=gen)
    rows = []
    for i, (method, status) in enumerate((("moco", "completed"), ("moco", "stopped"),
                                          ("lcr", "completed"))):
        spec = build_spec(method, DataSpec(format="cub", root="/data/cub"),
                          backbone="test_resnet",
                          train={"epochs": 3, "batch_size": 16, "image_size": 32})
        recorder = EpochRecorder(study, f"t{i}", spec, params={"lr": 0.01 * (i + 1)})
        recorder.finish([], "running")
        epochs = 3 if status == "completed" else 1
        history = []
        for epoch in range(1, epochs + 1):
            metrics = {"epoch": epoch, "loss": 2.0 - epoch / 4, "val_knn_top1": 10.0 * i + epoch}
            recorder(metrics)
            recorder.visuals(epoch, images, {"attention": torch.rand(4, 4, 4, generator=gen)},
                             {})
            history.append(metrics)
        rows.append(recorder.finish(history, status))
    return rows


def test_one_run_per_trial_with_scalars_images_hparams_and_embeddings(tmp_path):
    study = str(tmp_path)
    from fgray.results.tables import load

    _study_like_logs(study)
    write_hparams(study, load(study, "trials").to_pylist())
    write_embeddings(study, "moco/t0", torch.randn(30, 4), torch.arange(30) % 3,
                     ["a", "b", "c"])
    write_hparams(study, load(study, "trials").to_pylist())  # a refresh changes nothing
    tb_dir = tmp_path / "tensorboard"
    runs = {"moco/t0", "moco/t1", "lcr/t2"}
    assert _event_dirs(tb_dir) == runs

    mux, parsed = _hparams_by_run(tb_dir)
    assert set(mux.Runs()) == runs
    t0 = mux.Runs()["moco/t0"]
    assert {"loss/total", "val/knn_top1", "final/best_val_knn_top1"} <= set(t0["scalars"])
    assert t0["images"] == ["maps/attention"]
    assert [e.step for e in mux.Images("moco/t0", "maps/attention")] == [1, 2, 3]
    assert {run for run, data in parsed.items()
            if metadata.SESSION_START_INFO_TAG in data} == runs
    assert os.path.isfile(tb_dir / "moco" / "t0" / "projector_config.pbtxt")

    # TensorBoard's HParams plugin: one session group per trial, with the final metrics.
    experiment, groups = _hparams_plugin_view(tb_dir)
    assert {m.name.tag for m in experiment.metric_infos} >= {"final/best_val_knn_top1"}
    assert sorted(s.name for g in groups for s in g.sessions) == sorted(runs)
    best = {g.sessions[0].name: next(v.value for v in g.metric_values
                                     if v.name.tag == "final/best_val_knn_top1")
            for g in groups}
    assert best == {"moco/t0": 3.0, "moco/t1": 11.0, "lcr/t2": 23.0}

    # The projector plugin finds the embeddings in the trial's own run.
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin

    plugin = ProjectorPlugin(base_plugin.TBContext(
        logdir=str(tb_dir), data_provider=data_provider.MultiplexerDataProvider(
            mux, str(tb_dir))))
    plugin._update_configs()
    assert set(plugin._configs) == {"moco/t0"}
    (embedding,) = plugin._configs["moco/t0"].embeddings
    assert embedding.tensor_name == "features"
    assert os.path.isfile(tb_dir / "moco" / "t0" / embedding.tensor_path)


def test_older_sub_runs_are_folded_into_the_trial_run(tmp_path):
    """Logs of the earlier layout (`<run>/hparams/`, `<run>/embeddings/`, an experiment file
    in the log root: each a run of its own) become one run per trial."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.writer import FileWriter

    study = str(tmp_path)
    tb_dir = tmp_path / "tensorboard"
    with TrialWriter(study, "moco/t1") as writer:
        writer.scalars(1, {"loss": 1.0})
    old = FileWriter(str(tb_dir / "moco" / "t1" / "hparams"), filename_suffix=".hparams")
    old.close()
    FileWriter(str(tb_dir), filename_suffix=".hparams_experiment").close()
    with SummaryWriter(str(tb_dir / "moco" / "t1" / "embeddings")) as old:
        old.add_embedding(torch.eye(3), metadata=["0", "1", "2"], tag="features",
                          global_step=0)
    assert _event_dirs(tb_dir) == {".", "moco/t1", "moco/t1/hparams", "moco/t1/embeddings"}

    write_hparams(study, [_trial("moco", "t1", "completed", 0.5, {"lr": 0.1})])
    assert _event_dirs(tb_dir) == {"moco/t1"}
    config = (tb_dir / "moco" / "t1" / "projector_config.pbtxt").read_text()
    assert 'tensor_path: "projector/features/tensors.tsv"' in config
    tensors = np.loadtxt(tb_dir / "moco" / "t1" / "projector" / "features" / "tensors.tsv",
                         delimiter="\t")
    assert np.array_equal(tensors, np.eye(3))


def test_latest_images_of_a_run(tmp_path):
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=gen)
    with TrialWriter(str(tmp_path), "lcr/t9") as writer:
        for epoch in (1, 2):
            writer.maps("maps/rationale", images, torch.rand(2, 2, 2, generator=gen), epoch)
        writer.image_pairs("pairs/decoded", images, images, 2)
        writer.image_pairs("other/x", images, images, 2)
    write_hparams(str(tmp_path), [_trial("lcr", "t9", "completed", 0.5, {})])
    got = latest_images(str(tmp_path), "lcr/t9")
    assert [(tag, step) for tag, step, _ in got] == [("maps/rationale", 2), ("pairs/decoded", 2)]
    assert _png(got[0][2]).shape == (8 + 4, 2 * 8 + 3 * 2, 3)
    assert latest_images(str(tmp_path), "lcr/none") == []


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
    assert run_dir == f"{tmp_path}/tensorboard/moco/t1"
    assert not any("tfevents" in f for _, _, fs in os.walk(run_dir) for f in fs)
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
    # A second tag is listed next to the first; no class names: one column, no header.
    write_embeddings(str(tmp_path), "moco/t1", features[:10], labels[:10], tag="local")
    config = open(os.path.join(run_dir, "projector_config.pbtxt")).read()
    assert config.count("embeddings {") == 2 and 'tensor_name: "local"' in config
    local = open(os.path.join(run_dir, "projector", "local", "metadata.tsv")).read()
    assert local.splitlines() == ["0"] * 10


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_tensorboard_server_lists_one_run_per_trial(tmp_path):
    """A real `tensorboard` (its default Rust data server): the runs selector, the projector
    and the HParams table each list every trial once."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    from fgray.results.tables import load

    study = str(tmp_path / "study")
    _study_like_logs(study)
    write_hparams(study, load(study, "trials").to_pylist())
    write_embeddings(study, "moco/t0", torch.randn(30, 4), torch.arange(30) % 3)
    port = _free_port()
    binary = shutil.which("tensorboard")
    command = ([binary] if binary else [sys.executable, "-m", "tensorboard.main"]) + [
        "--logdir", f"{study}/tensorboard", "--host", "127.0.0.1", "--port", str(port),
        "--reload_interval", "1"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def get(path: str, body: dict | None = None):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode() if body else None,
            headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    runs = {"moco/t0", "moco/t1", "lcr/t2"}
    try:
        deadline, listed = time.time() + 90, []
        while time.time() < deadline and set(listed) != runs:
            time.sleep(1)
            try:
                listed = get("/data/runs")
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
        assert sorted(listed) == sorted(runs)  # once each, no sub-runs, no "." run
        assert get("/data/plugin/projector/runs") == ["moco/t0"]
        groups = get("/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 100, "colParams": [],
            "allowedStatuses": ["STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING",
                                "STATUS_UNKNOWN"]})["sessionGroups"]
        best = {g["name"]: next(m["value"] for m in g["metricValues"]
                                if m["name"]["tag"] == "final/best_val_knn_top1")
                for g in groups}
        assert best == {"moco/t0": 3.0, "moco/t1": 11.0, "lcr/t2": 23.0}
    finally:
        server.terminate()
        server.wait(30)
