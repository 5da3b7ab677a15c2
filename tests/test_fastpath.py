"""The CPU fast path keeps the official float32 numbers."""
import pytest
import torch

from extractor import fastpath
from extractor.checkpoints import seeded_state_dict
from extractor.detr import build_detr
from extractor.infer import resolve_precision
from extractor.settings import ExtractSettings


@pytest.fixture(scope="module", params=[False, True], ids=["r50", "r50-dc5"])
def model(request):
    m = build_detr("resnet50", dilation=request.param)
    m.load_state_dict(seeded_state_dict(0))
    return m.eval()


def _close(a: dict, b: dict) -> None:
    for key in ("pred_logits", "pred_boxes", "query_embeddings"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-4)


def test_fused_path_equals_reference_unbatched_and_padded_batch(model):
    fast = fastpath.optimise_for_inference(model, "cpu", "fp32")
    assert isinstance(fast.backbone[0].body, fastpath.FusedTrunk) == (fastpath._mkldnn_ops() is not None)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 130, 170, generator=g)
    batch = torch.zeros(2, 3, 140, 180)
    batch[0, :, :130, :170] = x[0]
    batch[1] = torch.randn(3, 140, 180, generator=g)
    mask = torch.ones(2, 140, 180, dtype=torch.bool)
    mask[0, :130, :170] = False
    mask[1] = False
    with torch.inference_mode():
        _close(model(x), fast(x.contiguous(memory_format=torch.channels_last)))
        _close(model(batch, mask), fast(batch.contiguous(memory_format=torch.channels_last), mask))
        # a second shape, then the first again: repacked per shape, same numbers
        _close(model(batch, mask), fast(batch, mask))


def test_fused_path_keeps_the_feature_outputs(model):
    fast = fastpath.optimise_for_inference(model, "cpu", "fp32")
    g = torch.Generator().manual_seed(2)
    batch = torch.randn(2, 3, 140, 180, generator=g)
    mask = torch.zeros(2, 140, 180, dtype=torch.bool)
    mask[1, 100:, :] = True
    batch[1, :, 100:] = 0
    with torch.inference_mode():
        want = model(batch, mask, return_features=True)
        got = fast(batch.contiguous(memory_format=torch.channels_last), mask, return_features=True)
    _close(want, got)
    assert torch.equal(got["feature_mask"], want["feature_mask"]) and got["feature_mask"][1].any()
    assert torch.equal(got["decoder_layers"][:, -1], got["query_embeddings"])
    for key in ("backbone_features", "encoder_memory", "decoder_layers"):
        scale = float(want[key].abs().max())
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4 * scale)


def test_original_model_is_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fastpath.optimise_for_inference(model, "cpu", "fp32")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_packed_shapes_are_bounded(model):
    fast = fastpath.optimise_for_inference(model, "cpu", "fp32")
    body = fast.backbone[0].body
    if not isinstance(body, fastpath.FusedTrunk):
        pytest.skip("oneDNN fused convolutions are not available in this torch build")
    with torch.inference_mode():
        for w in range(64, 64 + 32 * (fastpath.PACKED_SHAPES + 2), 32):
            body(torch.randn(1, 3, 64, w).contiguous(memory_format=torch.channels_last))
    assert len(body._packed) == fastpath.PACKED_SHAPES


def test_falls_back_without_the_fused_ops(model, monkeypatch):
    monkeypatch.setattr(fastpath, "_mkldnn_ops", lambda: None)
    fast = fastpath.optimise_for_inference(model, "cpu", "fp32")
    assert not isinstance(fast.backbone[0].body, fastpath.FusedTrunk)
    x = torch.randn(1, 3, 96, 128)
    with torch.inference_mode():
        _close(model(x), fast(x))


def test_cpu_defaults_are_float32_and_one_image_per_batch(tmp_path):
    assert resolve_precision("auto", "cpu") == "fp32"
    s = ExtractSettings(data=tmp_path, out=tmp_path / "r", device="cpu").resolved()
    assert (s.precision, s.batch_size, s.draft) == ("fp32", 1, False)
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        resolve_precision("fp16", "cpu")
