"""PP-SSL: the text corpus, AIS distillation with a tiny random CLIP, IADM views, CLI runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import pretrain_argv

from fgray.cli import main
from fgray.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fgray.errors import UserError
from fgray.methods import build_method
from fgray.methods.base import StepInfo
from fgray.methods.corpus import (
    attribute_sentence,
    build_corpus,
    corpus_info,
    corpus_texts,
    load_clip,
    load_corpus,
    select_subset,
    template_texts,
)
from fgray.methods.gradcam import input_gradcam
from fgray.methods.ppssl import iadm_boxes, iadm_view, kd_loss, to_clip_input

TINY = {"queue_size": 64, "mlp_hidden": 64, "dim": 16}
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                   "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[str, str]:
    """A randomly initialised tiny CLIP: (config JSON path, local weights file)."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    config = folder / "fgray-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("fgray-tiny-clip", pretrained=None)
    weights = folder / "tiny-clip.pt"
    torch.save(model.state_dict(), weights)
    return str(config), str(weights)


@pytest.fixture(scope="module")
def corpus_file(tiny_clip, synth_root, tmp_path_factory) -> Path:
    config, weights = tiny_clip
    out = tmp_path_factory.mktemp("corpus") / "corpus.parquet"
    return build_corpus("cub", synth_root, config, weights, out)


def _views(batch: int = 8, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=g),
            torch.randn(batch, 3, size, size, generator=g))


# -- corpus -----------------------------------------------------------------------------------


def test_attribute_sentences():
    assert attribute_sentence("has_bill_shape::curved_(up_or_down)") == (
        "a photo of a bird with a curved (up or down) bill shape")
    assert attribute_sentence("has_wing_color::iridescent") == (
        "a photo of a bird with an iridescent wing color")
    assert attribute_sentence("has_size::large_(16_-_32_in)") == (
        "a photo of a large (16 - 32 in) bird")
    assert attribute_sentence("has_bill_length::longer_than_head") == (
        "a photo of a bird with a bill longer than head")
    with pytest.raises(UserError, match="expected the CUB form"):
        attribute_sentence("bill shape")
    cars = template_texts("car")
    assert "a photo of a car with a round headlights" in cars and len(set(cars)) == len(cars)
    assert all("aircraft" in t for t in template_texts("aircraft"))


def test_corpus_texts_from_synthetic_attributes_and_templates(synth_root, tmp_path):
    from fgray.data.birds import attribute_names

    texts = corpus_texts("cub", synth_root)
    assert texts == [attribute_sentence(a) for a in attribute_names()]
    assert "a photo of a bird with a single bar wing pattern" in texts
    from conftest import write_folder

    folder = write_folder(tmp_path / "folder")
    assert corpus_texts("folder", folder) == template_texts("object")
    assert list(select_subset(10, 4)) == [0, 3, 6, 9]
    assert list(select_subset(5, 0)) == list(range(5))


def test_corpus_table_roundtrip_and_cache(tiny_clip, corpus_file, synth_root, tmp_path):
    config, weights = tiny_clip
    texts, emb = load_corpus(corpus_file)
    assert texts == corpus_texts("cub", synth_root)
    assert emb.dtype == torch.float32 and emb.shape == (len(texts), 32)
    table = pq.read_table(corpus_file)
    emb_type = table.schema.field("embedding").type
    assert table.schema.field("text").type == pa.string()
    assert pa.types.is_fixed_size_list(emb_type) and emb_type.list_size == 32
    assert emb_type.value_type == pa.float32()
    # The stored embeddings are CLIP's normalised text embeddings of the same texts.
    clip = load_clip(config, weights)
    torch.testing.assert_close(emb, clip.encode_texts(texts))
    info = corpus_info(corpus_file)
    assert info["count"] == len(texts) and info["dim"] == 32
    assert info["clip"]["model"] == "fgray-tiny-clip"
    # Same key: returned as is, not rewritten.
    stamp = corpus_file.stat().st_mtime_ns
    assert build_corpus("cub", synth_root, config, weights, corpus_file) == corpus_file
    assert corpus_file.stat().st_mtime_ns == stamp
    # A subset is a different corpus with its own key.
    small = build_corpus("cub", synth_root, config, weights, tmp_path / "small.parquet",
                         max_size=5)
    small_texts, small_emb = load_corpus(small)
    keep = select_subset(len(texts), 5)
    assert small_texts == [texts[i] for i in keep]
    torch.testing.assert_close(small_emb, emb[keep])
    assert corpus_info(small)["key"] != info["key"]


def test_corpus_errors(tmp_path, synth_root, tiny_clip):
    with pytest.raises(UserError, match="file not found; build one with `fgray corpus`"):
        load_corpus(tmp_path / "missing.parquet")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "other.parquet")
    with pytest.raises(UserError, match="not an fgray corpus table"):
        load_corpus(tmp_path / "other.parquet")
    with pytest.raises(UserError, match="needs CLIP weights"):
        build_corpus("cub", synth_root, "ViT-B-32", None, tmp_path / "c.parquet")
    with pytest.raises(UserError, match="clip_weights '/nowhere/clip.pt': file not found"):
        build_corpus("cub", synth_root, tiny_clip[0], "/nowhere/clip.pt", tmp_path / "c.parquet")
    bad = tmp_path / "bad-config.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(UserError, match="not an open_clip model config"):
        load_clip(str(bad), tiny_clip[1])


# -- AIS ----------------------------------------------------------------------------------------


def test_kd_loss_zero_for_equal_embeddings_and_matches_numpy():
    torch.manual_seed(0)
    corpus = F.normalize(torch.randn(12, 8), dim=1)
    t = torch.randn(5, 8)
    assert kd_loss(t, t, corpus, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(3 * t, t, corpus, 0.1).item() == pytest.approx(0.0, abs=1e-6)  # cosine
    s = torch.randn(5, 8)

    def softmax(a):
        e = np.exp(a - a.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    c = corpus.numpy().astype(np.float64)
    sn = s.numpy() / np.linalg.norm(s.numpy(), axis=1, keepdims=True)
    tn = t.numpy() / np.linalg.norm(t.numpy(), axis=1, keepdims=True)
    p_t, p_s = softmax(tn @ c.T / 0.1), softmax(sn @ c.T / 0.1)
    want = (p_t * (np.log(p_t) - np.log(p_s))).sum(1).mean()
    assert kd_loss(s, t, corpus, 0.1).item() == pytest.approx(want, rel=1e-4)


def test_clip_input_conversion():
    img = torch.rand(2, 3, 16, 16)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.4, 0.3)
    view = (img - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    stats = {"view_mean": IMAGENET_MEAN, "view_std": IMAGENET_STD}
    got = to_clip_input(view, (16, 16), mean, std, **stats)
    want = (img - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(got, want)
    assert to_clip_input(view, (32, 32), mean, std, **stats).shape == (2, 3, 32, 32)


def test_ais_without_weights_or_corpus_is_a_user_error(tmp_path, corpus_file, tiny_clip):
    with pytest.raises(UserError, match="kd_weight > 0 \\(AIS\\) needs CLIP weights .* or "
                                        "kd_weight=0"):
        build_method("ppssl", backbone="test_resnet", image_size=32,
                     overrides={**TINY, "kd_weight": 1.0})
    with pytest.raises(UserError, match="needs a text corpus"):
        build_method("ppssl", backbone="test_resnet", image_size=32,
                     overrides={**TINY, "kd_weight": 1.0, "clip_model": tiny_clip[0],
                                "clip_weights": tiny_clip[1]})
    # A corpus embedded with other weights is refused.
    other = tmp_path / "other-weights.pt"
    other.write_bytes(b"x")
    with pytest.raises(UserError, match="rebuild it with `fgray corpus`"):
        build_method("ppssl", backbone="test_resnet", image_size=32,
                     overrides={**TINY, "kd_weight": 1.0, "clip_model": tiny_clip[0],
                                "clip_weights": str(other), "corpus_path": str(corpus_file)})


def test_ais_distillation_trains_student_and_encoder(tiny_clip, corpus_file):
    config, weights = tiny_clip
    torch.manual_seed(0)
    m = build_method("ppssl", backbone="test_resnet", image_size=32,
                     overrides={**TINY, "kd_weight": 1.0, "iadm_weight": 0.0,
                                "clip_model": config, "clip_weights": weights,
                                "corpus_path": str(corpus_file), "corpus_size": 7,
                                "student_head": "linear"}).train()
    assert m.corpus.shape == (7, 32) and len(m.corpus_texts) == 7
    v1, v2 = _views()
    out = m(v1, v2, StepInfo(epoch=0, step=0, progress=0.0))
    assert set(out) == {"loss", "infonce", "kd", "iadm"} and out["iadm"].item() == 0.0
    # The teacher is CLIP's image tower on the converted view.
    clip = load_clip(config, weights)
    want_t = clip.model.encode_image(to_clip_input(  # views carry the backbone's normalisation
        v1, clip.image_size, clip.mean, clip.std, view_mean=(0.5,) * 3, view_std=(0.5,) * 3))
    torch.testing.assert_close(m.teacher_embed(v1), want_t)
    student = m.student(m.backbone(v1))
    assert out["kd"].item() == pytest.approx(kd_loss(student, want_t, m.corpus, 0.05).item(),
                                             rel=1e-4)
    torch.testing.assert_close(out["loss"].detach(), out["infonce"] + out["kd"])
    out["loss"].backward()
    assert m.student.weight.grad.abs().sum() > 0
    # The teacher is neither trained nor checkpointed.
    assert not any(k.startswith("_teacher") or "visual" in k for k in m.state_dict())
    assert all(not p.requires_grad for p in m._teacher[0].parameters())


# -- IADM ---------------------------------------------------------------------------------------


def _planted(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with a pattern in the top-left 8x8 corner and a saliency from a planted loss
    that depends on that corner only."""
    g = torch.Generator().manual_seed(3)
    images = torch.zeros(2, 3, size, size)
    images[:, :, :8, :8] = 1.0 + torch.rand(2, 3, 8, 8, generator=g)
    x = images.clone().requires_grad_(True)
    loss = (x[:, :, :8, :8] ** 2).sum() + 0.0 * x.sum()
    return images, input_gradcam(loss, x, smooth=1)


def test_iadm_crop_keeps_the_salient_corner():
    images, sal = _planted()
    assert sal[:, 10:, :].sum() == 0 and sal[:, :8, :8].min() > 0
    boxes = iadm_boxes(sal, 0.25)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2))
    kept = iadm_view(images, sal, "crop", 0.25)
    assert kept.shape == images.shape
    # The 16x16 top-left window, upsampled x2: the planted 8x8 corner fills a quarter of it.
    want = F.interpolate(images[:, :, :16, :16], scale_factor=2, mode="bilinear",
                         align_corners=False)
    torch.testing.assert_close(kept[:, :, 2:-2, 2:-2], want[:, :, 2:-2, 2:-2], atol=0.15,
                               rtol=0)
    assert kept[:, :, :12, :12].mean() > 1.0 and kept[:, :, 20:, 20:].abs().max() < 1e-6
    # A flat map keeps the centre window.
    centre = iadm_boxes(torch.ones(1, 32, 32), 0.25)
    torch.testing.assert_close(centre, torch.tensor([[8.0, 8.0, 24.0, 24.0]]))


def test_iadm_mask_keeps_the_salient_corner():
    images, sal = _planted()
    kept = iadm_view(images, sal, "mask", 0.05)  # 51 of 1024 pixels fully kept
    top = sal.flatten(1) >= torch.quantile(sal.flatten(1), 0.95, dim=1, keepdim=True)
    for i in range(2):
        torch.testing.assert_close(kept[i].flatten(1)[:, top[i]], images[i].flatten(1)[:, top[i]])
    assert kept[:, :, 10:, :].abs().max() == 0 and kept[:, :, 10:, :].numel() > 0
    assert kept.abs().sum() > 0.5 * images[:, :, :8, :8].abs().sum()
    blank = iadm_view(images, torch.zeros(2, 32, 32), "mask", 0.5)
    torch.testing.assert_close(blank, images)  # no saliency: keep the whole view


@pytest.mark.parametrize("mode", ["crop", "mask"])
def test_iadm_forward_and_saliency_map(mode):
    torch.manual_seed(0)
    m = build_method("ppssl", backbone="test_resnet", image_size=32,
                     overrides={**TINY, "iadm_mode": mode, "iadm_weight": 0.5}).train()
    v1, v2 = _views()
    ptr = int(m.queue_ptr)
    out = m(v1, v2, StepInfo(epoch=0, step=0, progress=0.0))
    assert out["iadm"].item() > 0 and out["kd"].item() == 0.0
    torch.testing.assert_close(out["loss"].detach(), out["infonce"] + 0.5 * out["iadm"])
    assert int(m.queue_ptr) == (ptr + len(v1)) % 64
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())
    m.eval()
    with torch.no_grad():  # the map needs gradients internally
        maps = m.spatial_maps(v1[:3])
    assert set(maps) == {"saliency"} and maps["saliency"].shape == (3, 32, 32)
    assert maps["saliency"].min() >= 0 and maps["saliency"].sum() > 0
    assert int(m.queue_ptr) == (ptr + len(v1)) % 64
    emb = m.embed(v1)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(v1)))


# -- CLI ----------------------------------------------------------------------------------------


def _pretrain(synth_root, tmp_path, name, *sets):
    rc = main(pretrain_argv("ppssl", synth_root, tmp_path, "queue_size=64", "mlp_hidden=64",
                            "knn_k=10", *sets, name=name, batch_size=32))
    metrics = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return rc, json.loads(metrics[-1]) if metrics else {}


def test_pretrain_cli_ppssl_iadm_only(synth_root, tmp_path):
    rc, last = _pretrain(synth_root, tmp_path, "iadm")
    assert rc == 0 and last["loss_iadm"] > 0 and last["loss_kd"] == 0


def test_pretrain_cli_ppssl_with_ais(synth_root, tmp_path, tiny_clip, corpus_file, capsys):
    config, weights = tiny_clip
    rc, last = _pretrain(synth_root, tmp_path, "ais", f"clip_model={config}",
                         f"clip_weights={weights}", f"corpus_path={corpus_file}",
                         "kd_weight=1.0", "iadm_mode=mask")
    assert rc == 0 and last["loss_kd"] > 0 and last["loss_iadm"] > 0
    capsys.readouterr()
    rc = main(["pretrain", "--method", "ppssl", "--dataset", "cub", "--data-root",
               str(synth_root), "--set", "kd_weight=1", "--storage", str(tmp_path / "x")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs CLIP weights" in err


# -- IADM saliency sign -------------------------------------------------------------------------


def _independent_saliency(m, images: torch.Tensor, sign: float) -> torch.Tensor:
    """ReLU(sign * sum_rgb x * dL/dx) of MoCo v2's InfoNCE written out here (query, momentum
    key of the same image, the queue's negatives, cross-entropy at logit 0), by autograd."""
    x = images.clone().requires_grad_(True)
    q = F.normalize(m.projector(m.backbone.pool(m.backbone.forward_features(x))), dim=1)
    with torch.no_grad():
        k = F.normalize(m.projector_k(m.backbone_k(images)), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ m.queue.t()], 1) / m.cfg.temperature
    loss = F.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long))
    (g,) = torch.autograd.grad(loss, x)
    return F.relu(sign * (images * g).sum(1))


def test_iadm_default_saliency_is_the_evidence_that_lowers_the_loss():
    """The default sign keeps ReLU(-sum_rgb x * dL/dx): the pixels whose presence lowers the
    InfoNCE loss (benchmarks/iadm_sign.py chose it; docs/methods.md, PP-SSL)."""
    from fgray.methods.ppssl import PPSSLConfig

    assert PPSSLConfig().saliency_sign == "lowers_loss"
    torch.manual_seed(0)
    m = build_method("ppssl", backbone="test_resnet", image_size=32,
                     overrides={**TINY, "smooth": 0}).eval()
    v1, _ = _views(batch=4)
    with torch.no_grad():
        got = m.spatial_maps(v1)["saliency"]
    lowers, raises = _independent_saliency(m, v1, -1.0), _independent_saliency(m, v1, 1.0)
    assert lowers.sum() > 0 and raises.sum() > 0
    torch.testing.assert_close(got, lowers, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(got, raises)
    # The other sign stays available, and equals today's ReLU(sum_rgb x * dL/dx).
    m.cfg.saliency_sign = "raises_loss"
    with torch.no_grad():
        torch.testing.assert_close(m.spatial_maps(v1)["saliency"], raises, rtol=1e-4,
                                   atol=1e-7)


def test_input_gradcam_sign_on_a_planted_loss():
    images, _ = _planted()
    x = images.clone().requires_grad_(True)
    loss = -(x[:, :, :8, :8] ** 2).sum()  # the corner lowers the loss
    lowers = input_gradcam(loss, x, sign="lowers_loss")
    assert lowers[:, :8, :8].min() > 0 and lowers[:, 8:, :].sum() == 0
    assert input_gradcam(loss, x, sign="raises_loss").sum() == 0
    with pytest.raises(ValueError, match="unknown saliency sign"):
        input_gradcam(loss, x, sign="up")
    with pytest.raises(UserError, match="saliency_sign='up': expected one of"):
        build_method("ppssl", backbone="test_resnet", image_size=32,
                     overrides={**TINY, "saliency_sign": "up"})
