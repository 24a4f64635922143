"""The init row and the localisation protocol, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fgray.data.augment import eval_view_boxes, eval_view_points
from fgray.engine.evaluate import InitialWeights, evaluate_init, evaluate_method
from fgray.engine.features import embed_split
from fgray.engine.loop import to_channels_last
from fgray.engine.run import load_splits
from fgray.engine.spec import DataSpec, TrainConfig, build_spec
from fgray.eval.retrieval import retrieval_metrics
from fgray.methods import build_method
from fgray.models.backbone import create_backbone


@pytest.fixture(scope="module")
def spec_and_data(synth_root, tmp_path_factory):
    data = DataSpec(root=str(synth_root), val_fraction=0.25,
                    cache_dir=str(tmp_path_factory.mktemp("cache")))
    spec = build_spec("moco", data, backbone="test_resnet",
                      train={"image_size": 48, "knn_k": 5, "batch_size": 16})
    return spec, data


def test_eval_view_points_match_the_eval_crop():
    # A 64-px square cache image viewed at 48 px: resized to round(48 / 0.875) = 55, crop
    # offset 3.
    xy = torch.tensor([[[0.0, 0.0], [64.0, 64.0], [32.0, 16.0]]])
    got = eval_view_points(xy, torch.tensor([[0.0, 0.0, 64.0, 64.0, 0.0]]), 48)
    expected = xy * (55 / 64) - 3
    torch.testing.assert_close(got, expected)


def test_init_row_equals_the_untrained_backbone(spec_and_data):
    spec, data = spec_and_data
    metrics = evaluate_init(spec, data, ["retrieval", "knn", "localisation"],
                            device=torch.device("cpu"))
    # Independently: the same seed gives the same random weights; embed test by hand.
    torch.manual_seed(spec.train.seed)
    net = create_backbone("test_resnet", init="random", img_size=48).eval()
    splits = load_splits(data, spec.train.decoded_size, with_test=True, progress=False)
    raw = torch.from_numpy(np.array(splits.test.images)).float() / 255
    resized = F.interpolate(raw, size=(55, 55), mode="bilinear", antialias=True,
                            align_corners=False).clamp(0, 1)[..., 3:51, 3:51]
    with torch.no_grad():
        feats = F.normalize(net((resized - 0.5) / 0.5), dim=1)
    expected = retrieval_metrics(feats, torch.from_numpy(splits.test.labels))
    assert metrics["rank1"] == pytest.approx(expected["rank1"], abs=1e-6)
    assert 0.0 <= metrics["val_knn_top1"] <= 100.0
    # Localisation falls back to the activation norm: fractions of the box / parts.
    for key in ("loc_box_mass", "loc_pointing", "loc_part_hits"):
        assert 0.0 <= metrics[key] <= 1.0


def test_localisation_scores_a_map_that_points_at_the_box(spec_and_data):
    """A map equal to the box's indicator in the eval view scores box mass 1 and pointing 1;
    its complement scores box mass 0."""
    spec, data = spec_and_data
    splits = load_splits(data, spec.train.decoded_size, with_test=True, progress=False)
    boxes = torch.from_numpy(splits.test.boxes).float()
    regions = splits.test.regions
    size = spec.train.image_size

    class BoxMap(InitialWeights):
        invert = False

        def spatial_maps(self, images):
            n = images.shape[0]
            start = self.offset
            self.offset += n
            b = eval_view_boxes(boxes[start:start + n], regions[start:start + n], size)
            x0y0, x1y1 = b[:, :2], b[:, :2] + b[:, 2:]
            grid = torch.arange(size).float() + 0.5
            inside_x = (grid >= x0y0[:, :1]) & (grid <= x1y1[:, :1])
            inside_y = (grid >= x0y0[:, 1:]) & (grid <= x1y1[:, 1:])
            m = (inside_y[:, :, None] & inside_x[:, None, :]).float()
            return {"box": 1 - m if self.invert else m}

    model = BoxMap(create_backbone("test_resnet"))
    model.offset = 0
    inside = evaluate_method(model, spec, data, ["localisation"], device=torch.device("cpu"),
                             progress=False)
    # Cells on the box edge are only partly inside it (area upsampling), hence "about 1".
    assert inside["loc_box_mass"] == pytest.approx(1.0, abs=0.02)
    assert inside["loc_pointing"] == pytest.approx(1.0, abs=1e-6)
    model.offset, model.invert = 0, True
    outside = evaluate_method(model, spec, data, ["localisation"], device=torch.device("cpu"),
                              progress=False)
    assert outside["loc_box_mass"] < 0.05


def test_channels_last_small_batch_embedding_equals_the_plain_one(spec_and_data):
    """Evaluation embeds with a CNN in channels-last and, on a CPU, 32 images a batch (both
    faster there); the features are the plain layout's, whatever the batch."""
    spec, data = spec_and_data
    assert spec.train.eval_batch_for(torch.device("cpu")) == 32
    assert spec.train.eval_batch_for(torch.device("cuda")) == 256
    assert TrainConfig(eval_batch_size=5).eval_batch_for(torch.device("cpu")) == 5
    splits = load_splits(data, spec.train.decoded_size, with_test=True, progress=False)
    torch.manual_seed(0)
    method = build_method("moco", backbone="test_resnet", image_size=48,
                          config=spec.method_config)
    norm = {"mean": spec.augment.mean, "std": spec.augment.std}
    plain, labels = embed_split(method, method.embed, splits.test, 48, 256,
                                torch.device("cpu"), **norm)
    assert to_channels_last(method, spec.train)
    conv = next(m for m in method.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    fast, fast_labels = embed_split(method, method.embed, splits.test, 48, 5,
                                    torch.device("cpu"), channels_last=True, **norm)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)
    assert torch.equal(fast_labels, labels)
    assert not to_channels_last(method, TrainConfig(channels_last=False))
