"""Backbones (feature maps, tokens, explicit attention, weight loading) and MoCo heads."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import ResPostBlock
from torch import nn

from fgray.errors import UserError
from fgray.models import (
    Backbone,
    create_backbone,
    mlp,
    moco_v2_projector,
    moco_v3_predictor,
    moco_v3_projector,
)
from fgray.models.backbone import _block_with_attention


def _images(h: int = 64, w: int = 64, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


# -- shapes -----------------------------------------------------------------------------------


def test_resnet_feature_map_and_pooled_shapes():
    bb = create_backbone("test_resnet").eval()
    x = _images(64, 64)
    fmap = bb.feature_map(x)
    assert not bb.is_vit
    assert fmap.shape == (2, bb.num_features, 2, 2)  # test_resnet downsamples by 32
    pooled = bb(x)
    assert pooled.shape == (2, bb.num_features)
    # timm's ResNet pre-logits pooling is the spatial mean of the last map.
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(Backbone.pooled_from_map(fmap), pooled)
    with pytest.raises(UserError, match="need a ViT backbone, but 'test_resnet' is a CNN"):
        bb.tokens(x)


def test_vit_feature_map_tokens_and_pooled_shapes():
    bb = create_backbone("test_vit", img_size=64).eval()
    assert bb.is_vit and bb.num_prefix_tokens == 1
    x = _images(64, 48)  # non-square: 4x3 patch grid
    tokens = bb.tokens(x)
    assert tokens.shape == (2, 1 + 4 * 3, bb.num_features)
    fmap = bb.feature_map(x)
    assert fmap.shape == (2, bb.num_features, 4, 3)
    # Grid position (i, j) holds patch token 1 + i*w + j (row-major, CLS removed).
    torch.testing.assert_close(fmap[:, :, 2, 1], tokens[:, 1 + 2 * 3 + 1])
    pooled = bb(x)
    assert pooled.shape == (2, bb.num_features)
    torch.testing.assert_close(pooled, tokens[:, 0])  # CLS pooling
    assert bb.grid_size((64, 48)) == (4, 3)


def test_vit_runs_at_other_sizes_than_built():
    bb = create_backbone("test_vit", img_size=64).eval()
    assert bb.feature_map(_images(32, 32)).shape == (2, bb.num_features, 2, 2)
    assert bb(_images(96, 96)).shape == (2, bb.num_features)


# -- explicit attention -----------------------------------------------------------------------


# test_vit2: a register token and no CLS, layer scale (ls1/ls2), average pooling.
@pytest.mark.parametrize("name", ["test_vit", "test_vit2"])
def test_explicit_attention_blocks_equal_timm_fused_forward(name):
    torch.manual_seed(0)
    bb = create_backbone(name, img_size=64).eval()
    m = bb.model
    assert all(blk.attn.fused_attn for blk in m.blocks), "compare against the fused path"
    x = _images(64, 64)
    with torch.no_grad():
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for blk in m.blocks:
            fused = blk(h)
            explicit, _ = _block_with_attention(blk, h, name)
            torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
            h = fused
        out = bb.forward_with_attention(x)
        torch.testing.assert_close(out.tokens, m.forward_features(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.pooled, bb(x), atol=1e-5, rtol=1e-5)


def test_attention_maps_are_timm_softmax_weights():
    bb = create_backbone("test_vit", img_size=64).eval()
    x = _images(64, 64)
    with torch.no_grad():
        maps = bb.attention_maps(x)
    depth = len(bb.model.blocks)
    heads = bb.model.blocks[0].attn.num_heads
    assert len(maps) == depth
    for a in maps:
        assert a.shape == (2, heads, 17, 17)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, heads, 17))
        assert (a >= 0).all()
    # Independent reference: timm's own non-fused branch, whose softmax enters attn_drop.
    captured: list[torch.Tensor] = []
    hooks = []
    for blk in bb.model.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(
            lambda _m, inp, _out: captured.append(inp[0])))
    with torch.no_grad():
        bb.model.forward_features(x)
    for hook in hooks:
        hook.remove()
    assert len(captured) == depth
    for ours, timms in zip(maps, captured):
        torch.testing.assert_close(ours, timms, atol=1e-6, rtol=1e-5)


def test_forward_with_attention_reduce_and_post_norm_blocks():
    bb = create_backbone("test_vit", img_size=64).eval()
    x = _images(64, 64)
    with torch.no_grad():
        full = bb.attention_maps(x)
        reduced = bb.forward_with_attention(x, reduce=lambda a: a.mean(1)[:, 0, 1:]).attentions
    for a, r in zip(full, reduced):
        torch.testing.assert_close(r, a.mean(1)[:, 0, 1:])
    # Post-norm blocks (ResPostBlock) follow their own order of norm and residual.
    import timm

    post = Backbone(timm.create_model("test_vit", num_classes=0, img_size=64,
                                      block_fn=ResPostBlock), "test_vit").eval()
    with torch.no_grad():
        out = post.forward_with_attention(x)
        torch.testing.assert_close(out.tokens, post.tokens(x), atol=1e-5, rtol=1e-5)


def test_attention_on_cnn_is_a_user_error():
    with pytest.raises(UserError, match="attention maps need a ViT backbone"):
        create_backbone("test_resnet").attention_maps(_images(32, 32))


# -- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_gradient_flows_through_backbone(name):
    bb = create_backbone(name, img_size=32).train()
    loss = bb(_images(32, 32, batch=4)).pow(2).mean()
    loss.backward()
    first = next(p for p in bb.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert all(p.grad is not None for p in bb.parameters() if p.requires_grad)


def test_gradient_flows_through_attention_pass():
    bb = create_backbone("test_vit", img_size=32).train()
    out = bb.forward_with_attention(_images(32, 32, batch=4))
    (out.pooled.sum() + out.attentions[-1][:, :, 0, 1:].sum()).backward()
    assert bb.model.patch_embed.proj.weight.grad.abs().sum() > 0


# -- initialisation ---------------------------------------------------------------------------


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_init_from_local_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = create_backbone("test_resnet")
    torch.save(source.model.state_dict(), tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    for fname in ("w.pth", "w.safetensors"):
        loaded = create_backbone("test_resnet", init=str(tmp_path / fname))
        assert loaded.init == str(tmp_path / fname)
        _assert_same_params(loaded.model, source.model)
        assert "state_dict" not in loaded.model.pretrained_cfg
    torch.manual_seed(2)
    other = create_backbone("test_resnet")
    assert not torch.equal(other.model.conv1[0].weight, source.model.conv1[0].weight)


def test_init_from_checkpoint_with_classifier_and_wrapped_keys(tmp_path):
    import timm

    torch.manual_seed(3)
    full = timm.create_model("test_resnet")  # with its 1000-way fc
    torch.save({"state_dict": full.state_dict(), "epoch": 7}, tmp_path / "ckpt.pth")
    loaded = create_backbone("test_resnet", init=str(tmp_path / "ckpt.pth"))
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, full.state_dict()[k], msg=k)
    # A Backbone's own state dict (keys under "model.") loads too.
    torch.save(loaded.state_dict(), tmp_path / "bb.pth")
    _assert_same_params(create_backbone("test_resnet", init=str(tmp_path / "bb.pth")).model,
                        loaded.model)


def test_vit_init_from_file_resamples_position_embedding(tmp_path):
    torch.manual_seed(4)
    source = create_backbone("test_vit", img_size=64)
    torch.save(source.model.state_dict(), tmp_path / "vit.pth")
    loaded = create_backbone("test_vit", init=str(tmp_path / "vit.pth"), img_size=32)
    assert loaded.model.pos_embed.shape == (1, 1 + 4, 64)
    torch.testing.assert_close(loaded.model.blocks[0].attn.qkv.weight,
                               source.model.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(loaded.model.cls_token, source.model.cls_token)


def test_missing_weights_file_is_a_user_error(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(UserError, match=r"weights file '.*nope\.pth' not found: --init expects "
                                        r"random, imagenet or a path"):
        create_backbone("test_resnet", init=str(path))


def test_mismatched_weights_file_is_a_user_error(tmp_path):
    torch.save(create_backbone("test_vit").model.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(UserError, match=r"weights file '.*vit\.pth' does not match backbone "
                                        r"'test_resnet': \d+ missing keys"):
        create_backbone("test_resnet", init=str(tmp_path / "vit.pth"))
    partial = create_backbone("test_resnet").model.state_dict()
    partial.pop("conv1.0.weight")
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(UserError, match=r"1 missing keys conv1\.0\.weight"):
        create_backbone("test_resnet", init=str(tmp_path / "partial.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"cannot read weights file '.*junk\.pth'"):
        create_backbone("test_resnet", init=str(tmp_path / "junk.pth"))


def test_unknown_backbone_is_a_user_error():
    with pytest.raises(UserError) as err:
        create_backbone("resnet_9000")
    assert str(err.value) == (
        "unknown backbone 'resnet_9000': expected a timm model name, e.g. resnet50, "
        "vit_base_patch16_224, test_resnet, test_vit")


def test_imagenet_init_offline_asks_for_a_weights_file(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(UserError) as err:
        create_backbone("test_resnet", init="imagenet")
    msg = str(err.value)
    assert "cannot load ImageNet weights for 'test_resnet'" in msg
    assert "pass a local weights file with --init PATH" in msg
    assert "\n" not in msg
    assert constants.HF_HUB_OFFLINE is True  # restored to the monkeypatched value


# -- heads ------------------------------------------------------------------------------------


def _layer_types(seq: nn.Sequential) -> list[str]:
    return [type(m).__name__ for m in seq]


def test_moco_v2_projector_structure_and_shape():
    head = moco_v2_projector(96, hidden=64, dim=16)
    assert _layer_types(head) == ["Linear", "ReLU", "Linear"]
    assert head[0].bias is not None and head[2].bias is not None
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (96, 64, 16)
    assert head(torch.randn(5, 96)).shape == (5, 16)


def test_moco_v3_projector_structure_and_shape():
    head = moco_v3_projector(64, hidden=128, dim=32)
    assert _layer_types(head) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d",
                                  "ReLU", "Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in head if isinstance(m, nn.Linear))
    assert head[1].affine and not head[-1].affine
    out = head.train()(torch.randn(8, 64))
    assert out.shape == (8, 32)
    # Affine-free final BN: each output dimension is standardised over the batch.
    torch.testing.assert_close(out.mean(0), torch.zeros(32), atol=1e-5, rtol=0)
    assert _layer_types(moco_v3_projector(64, 128, 32, num_layers=2)) == [
        "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]


def test_moco_v3_predictor_structure_and_shape():
    head = moco_v3_predictor(dim=32, hidden=128)
    assert _layer_types(head) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head[0].in_features == 32 and head[-1].out_features == 32
    assert head(torch.randn(4, 32)).shape == (4, 32)


def test_mlp_general_and_invalid():
    head = mlp(10, 20, 5, num_layers=1, last_bn=True, last_bn_affine=True)
    assert _layer_types(head) == ["Linear", "BatchNorm1d"] and head[1].affine
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        mlp(10, 20, 5, num_layers=0)
