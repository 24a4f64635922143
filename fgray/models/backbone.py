"""timm backbones with the views fgray's methods need: feature maps, tokens, attention maps.

One entry point, `create_backbone(name, init=...)`, as in timm's `create_model`: any timm model
name, random or ImageNet weights, or a local weights file through timm's own pretrained-config
mechanism (`pretrained_cfg_overlay`), so user code never special-cases paths.

The normal forward is timm's (fused SDPA attention for ViTs). Only `forward_with_attention`
runs the ViT blocks step by step to expose the softmaxed attention that fused attention hides;
it is used once per step by LoDisc's momentum pass, which needs features and attention together.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import Tensor, nn

from fgray.errors import UserError
from fgray.models.packaged import packaged_weights_file

__all__ = ["AttentionForward", "Backbone", "backbone_normalisation", "create_backbone"]

# Families whose constructors take `img_size` / `dynamic_img_size` (timm VisionTransformer).
_VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid", "deit")
_HUB_PROBE_TIMEOUT_S = 2.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


class AttentionForward(NamedTuple):
    """One ViT pass: pooled feature [B,D], final tokens [B,T,D], per-block attention."""

    pooled: Tensor
    tokens: Tensor
    attentions: list[Tensor]


class Backbone(nn.Module):
    """A timm model without its classifier, plus the feature views fgray's methods use.

    CNNs (any timm model whose `forward_features` gives a feature map) and timm
    `VisionTransformer`s are supported. `forward(x)` is timm's
    `forward_head(forward_features(x), pre_logits=True)`: global average pool for ResNets,
    the CLS token (or the model's own pooling) for ViTs.

    The engine moves CNNs to channels-last (`train.channels_last`); ViTs are left as they are.
    """

    def __init__(self, model: nn.Module, name: str, init: str = "random") -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.init = init
        self.is_vit = isinstance(model, VisionTransformer)
        self.num_features: int = int(model.num_features)
        self.num_prefix_tokens = 0
        if self.is_vit:
            self.num_prefix_tokens = int(model.num_prefix_tokens)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        # The normalisation the weights were trained with; data pipelines may read it.
        self.mean: tuple[float, ...] = tuple(cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN))
        self.std: tuple[float, ...] = tuple(cfg.get("std", timm.data.IMAGENET_DEFAULT_STD))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, init={self.init!r}, num_features={self.num_features}"

    # -- the normal path (timm's own, fused) ------------------------------------------------

    def forward_features(self, x: Tensor) -> Tensor:
        """timm's `forward_features`: [B,C,h,w] (or NHWC for such models) or ViT tokens [B,T,D]."""
        return self.model.forward_features(x)

    def pool(self, features: Tensor) -> Tensor:
        """Pooled feature [B,num_features] from `forward_features` output (timm pre-logits)."""
        return self.model.forward_head(features, pre_logits=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.forward_features(x))

    # -- feature maps and tokens ------------------------------------------------------------

    def feature_map(self, x: Tensor) -> Tensor:
        """The last feature map [B,C,h,w]: layer-4 output for a CNN, the patch-token grid for a ViT.

        For a CLS-pooled ViT the pooled feature does not depend on the final patch tokens, so a
        Grad-CAM of a loss on `forward(x)` w.r.t. this map is zero; take the map and the pooled
        feature from one `forward_features` call (`features_to_map`, `pool`) on a CNN or an
        average-pooled ViT instead.
        """
        return self.features_to_map(self.forward_features(x), tuple(x.shape[-2:]))

    def features_to_map(self, features: Tensor, input_hw: tuple[int, int] | None = None) -> Tensor:
        """Turn `forward_features` output into an NCHW map (differentiable, no copy for CNNs).

        `input_hw` (the image's H, W) fixes a ViT's patch grid; without it the grid must be square.
        """
        if self.is_vit:
            patches = features[:, self.num_prefix_tokens:]
            h, w = self._token_grid(patches.shape[1], input_hw)
            return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], h, w)
        if features.ndim != 4:
            raise UserError(
                f"backbone '{self.name}' gives {features.ndim}-d features, expected a CNN feature "
                "map [B,C,h,w] or a timm VisionTransformer; pick e.g. resnet50 or "
                "vit_base_patch16_224")
        if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
            return features.permute(0, 3, 1, 2)
        return features

    @staticmethod
    def pooled_from_map(feature_map: Tensor) -> Tensor:
        """Global average pool of an NCHW map, e.g. LCR's attention-weighted map A ⊙ F."""
        return feature_map.mean(dim=(-2, -1))

    def tokens(self, x: Tensor) -> Tensor:
        """ViT tokens [B,T,D] after the final norm: prefix (CLS/register) tokens, then patches."""
        self._require_vit("tokens")
        return self.model.forward_features(x)

    def grid_size(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        """The ViT patch grid (h, w) for an image of size `input_hw`."""
        self._require_vit("grid_size")
        return tuple(self.model.patch_embed.dynamic_feat_size(tuple(input_hw)))

    # -- explicit attention ------------------------------------------------------------------

    def forward_with_attention(
        self, x: Tensor, reduce: Callable[[Tensor], Tensor] | None = None
    ) -> AttentionForward:
        """One ViT pass returning the pooled feature, the final tokens and every block's attention.

        Follows timm 1.0 `VisionTransformer.forward_features` (patch_embed, _pos_embed,
        patch_drop, norm_pre, blocks, norm) with each block's attention computed explicitly
        from `attn.qkv`, `q_norm`/`k_norm` and `scale`, then the rest of the block as timm does
        (attn.norm, gate, proj, ls1/ls2, drop_path), so the outputs equal the fused forward.

        Each attention is the softmax [B,heads,T,T] (before attention dropout). `reduce`, if
        given, is applied to it before it is kept, e.g. `lambda a: a.mean(1)` for head-averaged
        maps, so the full maps of all blocks need not be held at once.
        """
        self._require_vit("attention maps")
        m = self.model
        h = m.patch_embed(x)
        h = m._pos_embed(h)
        h = m.patch_drop(h)
        h = m.norm_pre(h)
        attentions: list[Tensor] = []
        for block in m.blocks:
            h, attn = _block_with_attention(block, h, self.name)
            attentions.append(reduce(attn) if reduce is not None else attn)
        tokens = m.norm(h)
        return AttentionForward(self.pool(tokens), tokens, attentions)

    def attention_maps(self, x: Tensor) -> list[Tensor]:
        """Softmaxed attention [B,heads,T,T] of every block (see `forward_with_attention`)."""
        return self.forward_with_attention(x).attentions

    # -- misc --------------------------------------------------------------------------------

    def _require_vit(self, what: str) -> None:
        if not self.is_vit:
            raise UserError(
                f"{what} need a ViT backbone, but '{self.name}' is a CNN; "
                "pick a timm VisionTransformer such as vit_base_patch16_224 or test_vit")

    def _token_grid(self, num_patches: int, input_hw: tuple[int, int] | None) -> tuple[int, int]:
        if input_hw is not None:
            h, w = self.grid_size(input_hw)
        else:
            h = w = int(round(num_patches ** 0.5))
        if h * w != num_patches:
            raise ValueError(
                f"{num_patches} patch tokens do not form a {h}x{w} grid; pass input_hw")
        return h, w


def _block_with_attention(block: nn.Module, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """timm `Block.forward` / `ResPostBlock.forward` with the attention weights exposed."""
    if type(block) is Block:
        y, attn = _attention_with_weights(block.attn, block.norm1(x), name)
        x = x + block.drop_path1(block.ls1(y))
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x, attn
    if type(block) is ResPostBlock:
        y, attn = _attention_with_weights(block.attn, x, name)
        x = x + block.drop_path1(block.norm1(y))
        x = x + block.drop_path2(block.norm2(block.mlp(x)))
        return x, attn
    raise UserError(
        f"attention maps are supported for timm ViTs with standard blocks; '{name}' uses "
        f"{type(block).__name__}; pick e.g. vit_base_patch16_224 or deit_small_patch16_224")


def _attention_with_weights(attn: nn.Module, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """timm `Attention.forward` (non-fused branch, no mask) returning (output, softmax weights)."""
    if type(attn) is not Attention:
        raise UserError(
            f"attention maps are supported for timm's standard Attention; '{name}' uses "
            f"{type(attn).__name__}; pick e.g. vit_base_patch16_224")
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = attn.attn_drop(weights) @ v
    out = out.transpose(1, 2).reshape(b, n, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, weights


# -- creation ---------------------------------------------------------------------------------


def backbone_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the weights of timm model `name` were trained with (its pretrained_cfg),
    without building the model. Every view a backbone sees -- training, evaluation, maps,
    decoded images -- is normalised with these: ImageNet statistics for torchvision-style
    ResNets, mean = std = 0.5 for tf_efficientnet_lite0 and timm's default ViTs."""
    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    if cfg is None:
        return tuple(timm.data.IMAGENET_DEFAULT_MEAN), tuple(timm.data.IMAGENET_DEFAULT_STD)
    return tuple(cfg.mean), tuple(cfg.std)


def create_backbone(name: str, *, init: str = "random", img_size: int | None = None) -> Backbone:
    """A timm backbone without classifier.

    `init`: "random"; "imagenet" (timm's pretrained weights, from the Hugging Face cache or
    hub); or a local weights file (.pth/.pt/.bin/.safetensors holding a timm state dict, plain
    or under "state_dict"/"model"/"state_dict_ema", as timm's `load_state_dict` reads it; a
    `Backbone.state_dict()` with its "model." prefix is accepted too). A file's keys must match
    the model (its classifier aside): a mismatch is an error, never a silent partial load.
    `img_size` sets a ViT's native size (position embeddings resampled from the weights);
    ViTs are built with dynamic image size, so other input sizes work too. CNNs ignore it.
    """
    if not isinstance(name, str) or not timm.is_model(name):
        raise UserError(
            f"unknown backbone '{name}': expected a timm model name, e.g. resnet50, "
            "vit_base_patch16_224, test_resnet, test_vit")
    kwargs: dict[str, Any] = {"num_classes": 0}
    if timm.models.is_model_in_modules(name, _VIT_MODULES):
        kwargs["dynamic_img_size"] = True
        if img_size is not None:
            kwargs["img_size"] = img_size
    if init == "random":
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif init == "imagenet":
        model = _create_imagenet(name, kwargs)
    else:
        model = _create_from_file(name, Path(init).expanduser(), kwargs)
    return Backbone(model, name, init)


def _create_imagenet(name: str, kwargs: dict[str, Any]) -> nn.Module:
    hint = "pass a local weights file with --init PATH (or use --init random)"
    if not timm.models.is_model_pretrained(name):
        raise UserError(f"timm has no ImageNet weights for '{name}'; {hint}")
    offline = _hub_offline()
    try:
        with _hub_offline_mode(offline):
            return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError) as exc:
        # OSError covers hub/cache misses, DNS and HTTP failures; RuntimeError timm's "no weights".
        # Without the hub, weights an installed package ships (fgray.models.packaged) serve.
        packaged = packaged_weights_file(name)
        if packaged is not None:
            return _create_from_file(name, packaged, kwargs)
        where = "offline and not in the local cache" if offline else "download failed"
        raise UserError(
            f"cannot load ImageNet weights for '{name}' ({where}: {type(exc).__name__}); "
            f"{hint}") from exc


def _hub_offline() -> bool:
    """True when the hub must not be tried: offline mode set, or its host is unreachable.

    Without this, huggingface_hub retries an unreachable host for about a minute before
    falling back to the cache. A proxy hides reachability, so with one set we just try.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
            "1", "ON", "YES", "TRUE"):
        return True
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=_HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return True
    return False


@contextlib.contextmanager
def _hub_offline_mode(offline: bool) -> Iterator[None]:
    """Run huggingface_hub in offline mode (cache only, fails fast) for the duration."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _create_from_file(name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    if not path.is_file():
        raise UserError(
            f"weights file '{path}' not found: --init expects random, imagenet or a path to a "
            ".pth/.bin/.safetensors file")
    try:
        state_dict = timm.models.load_state_dict(str(path))
    except Exception as exc:  # any parse failure of a user's file is the user's to fix
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"cannot read weights file '{path}': {type(exc).__name__}: {first_line}") from exc
    if not isinstance(state_dict, dict) or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"weights file '{path}' does not hold a state dict of tensors")
    # A bare model on the meta device (no memory, no init) tells which keys are ours and which
    # classifier keys to drop, so the strict load below is free of classifier noise.
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False, **kwargs)
    own = set(reference.state_dict().keys())
    classifiers = reference.pretrained_cfg.get("classifier") or ()
    del reference
    state_dict = _strip_backbone_prefix(state_dict, own)
    for c in (classifiers,) if isinstance(classifiers, str) else classifiers:
        for key in (f"{c}.weight", f"{c}.bias"):
            if key not in own:
                state_dict.pop(key, None)
    # `num_classes=0` in the overlay too: timm then loads strictly (it turns strict off when the
    # model's class count differs from the weights'), so a mismatched file cannot half-load.
    overlay = {"state_dict": state_dict, "num_classes": 0, "source": None}
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise UserError(
            f"weights file '{path}' does not match backbone '{name}': {_summarise(exc)}") from exc
    # timm keeps the overlay in the model's config; drop it so the weights are not held twice.
    for cfg in (getattr(model, "pretrained_cfg", None), getattr(model, "default_cfg", None)):
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)
            cfg["file"] = str(path)
    return model


def _strip_backbone_prefix(state_dict: dict[str, Tensor], own: set[str]) -> dict[str, Tensor]:
    """Accept a `Backbone.state_dict()` (keys under "model.") for a timm model's keys."""
    prefix = "model."
    if state_dict and all(k.startswith(prefix) for k in state_dict) and not any(
            k.startswith(prefix) for k in own):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _summarise(exc: BaseException) -> str:
    """One short line from torch's multi-line load_state_dict error."""
    text = str(exc)
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)")):
        found = re.search(pattern, text)
        if found:
            keys = re.findall(r'"([^"]+)"', found.group(1))
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            parts.append(f"{len(keys)} {label} keys {', '.join(keys[:3])}{more}")
    mismatched = re.findall(r"size mismatch for ([^:]+):", text)
    if mismatched:
        more = f" (+{len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        parts.append(f"{len(mismatched)} shape mismatches {', '.join(mismatched[:3])}{more}")
    if parts:
        return "; ".join(parts)
    return f"{type(exc).__name__}: {text[:200]}"
