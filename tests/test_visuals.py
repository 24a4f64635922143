"""TensorBoard visuals of a run: spatial maps and image pairs per epoch, read back with
TensorBoard's own event reader, and the embedding projector of a final test evaluation."""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import pytest
import torch
from conftest import TINY_SDF, pretrain_argv
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea

from fgray.cli import main
from fgray.data.augment import eval_transform
from fgray.data.formats import load_dataset
from fgray.engine.evaluate import evaluate_method, load_checkpoint
from fgray.engine.run import build_pretrainer, load_splits
from fgray.engine.spec import DataSpec, build_spec
from fgray.errors import UserError
from fgray.eval.retrieval import retrieval_metrics

SIZE = 64  # test_resnet has stride 32: LCR's rationale map is 2x2 at 64 px
LCR_SETS = ("queue_size=32", "mlp_hidden=32", "capacity=4", "depth=2", "knn_k=10")
SHOWN = 8  # Pretrainer.visuals' default count


def _accumulator(path) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(path), size_guidance={ea.IMAGES: 0, ea.SCALARS: 0})
    acc.Reload()
    return acc


def _png(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def _val_count(root) -> int:
    return len(load_dataset("cub", root, val_fraction=0.1, seed=0).split("val"))


@pytest.fixture(scope="module")
def lcr_run(synth_root, tmp_path_factory):
    """A 2-epoch in-process LCR run through the CLI: (storage, run name)."""
    tmp = tmp_path_factory.mktemp("lcr-visuals")
    assert main(pretrain_argv("lcr", synth_root, tmp, *LCR_SETS, name="lcr-vis",
                              image_size=SIZE, epochs=2)) == 0
    return tmp / "runs", "lcr-vis", tmp / "cache"


def test_lcr_rationale_maps_every_epoch(lcr_run, synth_root):
    storage, name, _ = lcr_run
    acc = _accumulator(storage / "tensorboard" / "lcr" / name)
    assert "maps/rationale" in acc.Tags()["images"]
    assert not [t for t in acc.Tags()["images"] if t.startswith("pairs/")]
    events = acc.Images("maps/rationale")
    assert [e.step for e in events] == [1, 2]
    n = min(SHOWN, _val_count(synth_root))
    # One row of n overlaid images at the training size, make_grid's 2-px padding around each.
    assert (events[0].height, events[0].width) == (SIZE + 4, n * (SIZE + 2) + 2)
    assert _png(events[0].encoded_image_string).shape == (SIZE + 4, n * (SIZE + 2) + 2, 3)
    # The scalars of the same epochs live in the same run.
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2]


def test_sdf_decoded_pairs(synth_root, tmp_path):
    rc = main(pretrain_argv("sdf", synth_root, tmp_path, *TINY_SDF, name="sdf-vis",
                            batch_size=32))
    assert rc == 0
    acc = _accumulator(tmp_path / "runs" / "tensorboard" / "sdf" / "sdf-vis")
    assert acc.Tags()["images"] == ["pairs/decoded"]  # SDF has no spatial map of its own
    (event,) = acc.Images("pairs/decoded")
    assert event.step == 1
    n = min(SHOWN, _val_count(synth_root))
    # One pair per row, D(z') upsampled next to D(z), both at the decoder's 16 px.
    assert (event.height, event.width) == (n * (16 + 2) + 2, 2 * (16 + 2) + 2)


def _lcr_pretrainer(synth_root, tmp_path, **train):
    spec = build_spec("lcr", DataSpec(root=str(synth_root), cache_dir=str(tmp_path / "cache")),
                      backbone="test_resnet",
                      train={"epochs": 3, "batch_size": 16, "image_size": SIZE, **train},
                      sets=dict(kv.split("=") for kv in LCR_SETS))
    calls: list[tuple] = []
    trainer = build_pretrainer(spec, device=torch.device("cpu"), progress=False,
                               on_visuals=lambda *a: calls.append(a))
    return trainer, calls


def test_pretrainer_visuals_content(synth_root, tmp_path):
    trainer, _ = _lcr_pretrainer(synth_root, tmp_path)
    trainer.method.train()
    rng = torch.get_rng_state()
    images, maps, pairs = trainer.visuals(count=3)
    assert torch.equal(torch.get_rng_state(), rng) and trainer.method.training
    raw = torch.from_numpy(np.array(trainer.val_data.images[:3]))
    # The shown images are the eval crop in [0, 1], whatever the backbone's normalisation
    # (test_resnet's weights use mean = std = 0.5, which the views must use too).
    assert trainer.norm == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    plain = eval_transform(raw, SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    expected = (plain.clamp(0, 1) * 255).round().to(torch.uint8)
    view = (plain - 0.5) / 0.5
    assert images.dtype == torch.uint8 and torch.equal(images, expected)
    assert pairs == {} and set(maps) == {"rationale"}
    trainer.method.eval()
    want = trainer.method.spatial_maps(view)["rationale"]
    assert maps["rationale"].shape == (3, 2, 2)
    assert torch.allclose(maps["rationale"], want, atol=1e-6)


def test_visual_every(synth_root, tmp_path):
    trainer, calls = _lcr_pretrainer(synth_root, tmp_path, visual_every=2)
    trainer.run()
    assert [c[0] for c in calls] == [2]
    trainer, calls = _lcr_pretrainer(synth_root, tmp_path, epochs=1, visual_every=0)
    trainer.run()
    assert calls == []
    with pytest.raises(UserError, match="visual_every=-1 is out of range"):
        _lcr_pretrainer(synth_root, tmp_path, visual_every=-1)


def test_evaluate_method_returns_features(lcr_run, synth_root):
    storage, name, cache = lcr_run
    method, spec, _ = load_checkpoint(storage / name / "checkpoints" / "best", torch.device("cpu"))
    data = DataSpec(root=str(synth_root), cache_dir=str(cache))
    plain = evaluate_method(method, spec, data, ["retrieval"], device=torch.device("cpu"),
                            progress=False)
    metrics, (features, labels, classes) = evaluate_method(
        method, spec, data, ["retrieval"], device=torch.device("cpu"), progress=False,
        return_features=True)
    assert metrics == plain
    splits = load_splits(data, spec.train.decoded_size, with_test=True, progress=False)
    assert features.shape == (len(splits.test), method.embed(
        torch.zeros(1, 3, SIZE, SIZE)).shape[1])
    assert torch.equal(labels, torch.from_numpy(splits.test.labels))
    assert classes == splits.dataset.classes
    again = retrieval_metrics(features, labels)
    assert again["rank1"] == pytest.approx(metrics["rank1"])


def test_study_evaluation_writes_embeddings(lcr_run, synth_root, tmp_path):
    """The study's final-evaluation task, called directly (no Ray cluster needed)."""
    from fgray.tune.study import best_per_method
    from fgray.tune.study.evaluation import _evaluate_checkpoint

    storage, name, cache = lcr_run
    data = dataclasses.asdict(DataSpec(root=str(synth_root), cache_dir=str(cache)))
    study_dir = str(tmp_path / "study")
    metrics = _evaluate_checkpoint(str(storage / name / "checkpoints" / "best"), data,
                                   ["retrieval"], 0, embeddings=(study_dir, "lcr/t1"))
    assert set(metrics) == {"rank1", "rank5", "map"}
    run_dir = tmp_path / "study" / "tensorboard" / "lcr" / "t1"  # the trial's one run
    (tensor_dir,) = [d for d, _, fs in os.walk(run_dir) if "tensors.tsv" in fs]
    tensors = np.loadtxt(os.path.join(tensor_dir, "tensors.tsv"), delimiter="\t")
    ds = load_dataset("cub", synth_root, val_fraction=0.1, seed=0)
    assert tensors.shape[0] == len(ds.split("test"))
    rows = open(os.path.join(tensor_dir, "metadata.tsv")).read().splitlines()
    assert rows[0] == "label\tclass"
    assert {r.split("\t")[1] for r in rows[1:]} == set(ds.classes)

    trials = [{"method": "lcr", "trial_id": "a", "best_val_knn_top1": 40.0},
              {"method": "lcr", "trial_id": "b", "best_val_knn_top1": 55.0},
              {"method": "sdf", "trial_id": "c", "best_val_knn_top1": None},
              {"method": "moco_v2", "trial_id": "d", "best_val_knn_top1": 10.0},
              {"method": "moco_v2", "trial_id": "e", "best_val_knn_top1": 10.0}]
    assert best_per_method(trials) == {"b", "c", "d"}


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_ray_workers_write_maps(synth_root, tmp_path):
    """Two Ray Train workers: every rank computes the maps (PP-SSL's momentum keys shuffle
    across ranks), rank 0 writes them into the trial's run next to the controller's scalars."""
    from fgray.train.trainer import ray_pretrain

    spec = build_spec("ppssl", DataSpec(root=str(synth_root), cache_dir=str(tmp_path / "cache")),
                      backbone="test_resnet",
                      train={"epochs": 1, "batch_size": 32, "image_size": 32},
                      sets={"queue_size": 64, "mlp_hidden": 32, "knn_k": 10})
    ray_pretrain(spec, name="pp", storage=str(tmp_path / "runs"), workers=2, max_failures=0,
                 echo=False)
    run = tmp_path / "runs" / "tensorboard" / "ppssl" / "pp"
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # controller's and rank 0's
    acc = _accumulator(run)
    assert [e.step for e in acc.Images("maps/saliency")] == [1]
    assert [e.step for e in acc.Scalars("loss/total")] == [1]
    n = min(SHOWN, _val_count(synth_root))
    event = acc.Images("maps/saliency")[0]
    assert (event.height, event.width) == (32 + 4, n * (32 + 2) + 2)
