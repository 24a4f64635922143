"""A test of learning: a short MoCo run from real ImageNet weights (tf_efficientnet_lite0,
shipped offline by a package) must keep what the weights know about the embedded set.

The baseline is computed here, independently of the engine: the packaged weights, the eval
view written out by hand with the weights' own normalisation (mean = std = 0.5), kNN on the
same split. The run goes through the normal path (build_spec -> run_pretraining). So the test
fails when learning breaks -- views fed with the wrong normalisation, a feature path that
returns the wrong tensor, a loss that wrecks the encoder -- not only when a loss stops falling.
Measured when it was written (2 cores, ~30 s): baseline 35.0 %. Deliberately broken, once:
with a 100x learning rate (`lr=3.0`, a batch-scaling bug) the run fell to 18.3 % and the
test failed; views normalised with mean 0.9 / std 0.1 instead of 0.5 / 0.5 did NOT fail it --
BatchNorm after the stem absorbs an affine input error within two epochs, so a wrong
normalisation costs little on this backbone (it still matters for the untrained init row and
for backbones without BN, which the eval tests check number for number).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fgray.engine.run import load_splits, run_pretraining
from fgray.engine.spec import DataSpec, build_spec
from fgray.eval.knn import knn_classify
from fgray.models.backbone import create_backbone

CLASSES = 10
CHANCE = 100.0 / CLASSES
SIZE = 96
# One val image moves val kNN by 100/60 points; two epochs with a fresh projector may dip
# a little below the baseline, but a broken pipeline falls far below it.
TOLERANCE = 10.0


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    from fgray.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("learn") / "fg"
    write_synthetic(root, classes=CLASSES, per_class=40, size=SIZE, seed=0, progress=False)
    return DataSpec(root=str(root), val_fraction=0.3,
                    cache_dir=str(tmp_path_factory.mktemp("cache")))


def _reference_knn(data: DataSpec, decoded: int) -> float:
    """Val kNN top-1 of the untrained ImageNet weights, computed without the engine."""
    net = create_backbone("tf_efficientnet_lite0", init="imagenet").eval()
    splits = load_splits(data, decoded, progress=False)

    def features(split) -> torch.Tensor:
        x = torch.from_numpy(np.array(split.images)).float() / 255  # square: whole canvas
        resized = round(SIZE / 0.875)
        x = F.interpolate(x, size=(resized, resized), mode="bilinear", antialias=True,
                          align_corners=False).clamp(0, 1)
        top = (resized - SIZE) // 2
        x = x[..., top:top + SIZE, top:top + SIZE]
        with torch.no_grad():
            return F.normalize(net((x - 0.5) / 0.5), dim=1)

    knn = knn_classify(features(splits.train), torch.from_numpy(splits.train.labels),
                       features(splits.val), torch.from_numpy(splits.val.labels), k=20,
                       temperature=0.1, num_classes=CLASSES)
    return knn["top1"]


@pytest.mark.slow
def test_moco_from_imagenet_init_learns_above_chance_and_keeps_the_baseline(embedded,
                                                                             tmp_path):
    spec = build_spec("moco", embedded, backbone="tf_efficientnet_lite0", init="imagenet",
                      train={"epochs": 2, "batch_size": 32, "image_size": SIZE, "knn_k": 20},
                      sets={"queue_size": "512", "mlp_hidden": "512"})
    baseline = _reference_knn(embedded, spec.train.decoded_size)
    assert baseline >= 3 * CHANCE  # the weights are real ImageNet weights
    trainer = run_pretraining(spec, tmp_path / "run", device=torch.device("cpu"),
                              progress=False)
    best = max(row["val_knn_top1"] for row in trainer.history)
    assert best >= 2 * CHANCE, f"run {best:.1f} %, baseline {baseline:.1f} %"
    assert best >= baseline - TOLERANCE, f"run {best:.1f} %, baseline {baseline:.1f} %"
