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
    monkeypatch.setattr(fastpath, "_mkldnn_ops", lambda needed=fastpath.CONV_OPS: None)
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


@pytest.mark.parametrize("dilation", [False, True], ids=["r50", "r50-dc5"])
def test_own_resnet_trunk_is_torchvisions(dilation):
    """extractor.resnet (no torchvision import at run time) against torchvision's ResNet-50:
    same keys in the same order (the seeded weights are drawn in that order), same numbers."""
    import torchvision
    from extractor.detr import FrozenBatchNorm2d
    ours = build_detr("resnet50", dilation=dilation).backbone[0].body
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, dilation],
                                      norm_layer=FrozenBatchNorm2d)
    ref_keys = [k for k in ref.state_dict() if not k.startswith("fc.")]
    assert list(ours.state_dict()) == ref_keys
    sd = {k.removeprefix("backbone.0.body."): v for k, v in seeded_state_dict(0).items()
          if k.startswith("backbone.0.body.")}
    ours.load_state_dict(sd)
    ref.load_state_dict(sd, strict=False)
    x = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        assert torch.equal(ours.eval()(x), want)


def test_build_model_without_random_init_equals_a_plain_load(tmp_path):
    from extractor.checkpoints import build_model
    sd = seeded_state_dict(0)
    path = tmp_path / "w.pth"
    torch.save({"model": sd}, path)
    model, _ = build_model(str(path))
    ref = build_detr()
    ref.load_state_dict(sd)
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        _close(ref.eval()(x), model(x))
    torch.save({"model": {k: v.half() for k, v in sd.items()}}, path)  # not float32: copied and cast
    half, _ = build_model(str(path))
    assert all(p.dtype == torch.float32 for p in half.parameters())


def test_self_check_probe_catches_a_wrong_fused_convolution(model, monkeypatch):
    """The cheaper self-check (stem + first block of each layer) still refuses a fused path that
    computes something else, and the run then keeps the correct unfused convolutions."""
    if fastpath._mkldnn_ops() is None:
        pytest.skip("oneDNN fused convolutions are not available in this torch build")
    real = fastpath._PackedConv.__call__
    monkeypatch.setattr(fastpath._PackedConv, "__call__", lambda self, x, unary="none": real(self, x, unary) * 1.01)
    fast = fastpath.optimise_for_inference(model, "cpu", "fp32")
    assert not isinstance(fast.backbone[0].body, fastpath.FusedTrunk)
    x = torch.randn(1, 3, 96, 128)
    with torch.inference_mode():
        _close(model(x), fast(x))


def test_auto_settings_come_from_the_one_speed_policy(tmp_path, monkeypatch):
    from extractor import policy
    monkeypatch.setattr(policy, "POLICY", policy.SpeedPolicy(cpu_batch_size=3, max_decode_workers=1))
    monkeypatch.setattr("extractor.settings.POLICY", policy.POLICY)
    s = ExtractSettings(data=tmp_path, out=tmp_path / "r", device="cpu").resolved()
    assert (s.batch_size, s.workers) == (3, 1)
    assert policy.SpeedPolicy().batch_size("cuda:0") == 16 and policy.SpeedPolicy().batch_size("cpu") == 1


def test_fused_path_gives_the_same_bits_for_every_thread_count(model):
    """A Ray actor on one core must write the bytes of a local run on two: every output of the
    fast path is bit-identical across torch thread counts (eager's 1x1 input_proj was not)."""
    fast = fastpath.optimise_for_inference(model, "cpu", "fp32")
    assert isinstance(fast.input_proj, fastpath.PointwiseProjection)
    g = torch.Generator().manual_seed(4)
    batch = torch.randn(2, 3, 160, 224, generator=g).contiguous(memory_format=torch.channels_last)
    mask = torch.zeros(2, 160, 224, dtype=torch.bool)
    mask[1, 120:, :] = True
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.inference_mode():
                outs.append(fast(batch, mask, return_features=True))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for key, value in outs[0].items():
            assert torch.equal(value, other[key]), key
    with torch.inference_mode():
        _close(model(batch, mask), outs[0])


def test_decode_threads_leave_the_cpu_model_its_cores_and_feed_a_gpu_with_the_rest():
    from extractor.policy import SpeedPolicy
    p = SpeedPolicy()
    assert [p.decode_workers(c) for c in (1, 2, 16, 64)] == [1, 2, 8, 8]
    assert [p.decode_workers(c, "cuda:0") for c in (1, 2, 16, 64)] == [1, 1, 15, 32]


def test_transformer_linears_run_packed_through_onednn_and_fall_back_without_it(model, monkeypatch):
    """MKL's sgemm runs AVX2 kernels on AMD CPUs, so the fast path sends every linear layer (and the
    attention's q/k/v slices) to oneDNN with reordered weights; the same numbers, and plain
    ``nn.Linear`` where the ops are missing."""
    if fastpath._mkldnn_ops(fastpath.LINEAR_OPS) is None:
        pytest.skip("this torch build has no oneDNN linear ops")
    fast = fastpath.optimise_for_inference(model, "cpu", "fp32")
    kinds = {type(m) for m in fast.modules()}
    assert torch.nn.Linear not in kinds and fastpath.PackedAttention in kinds
    assert isinstance(fast.input_proj.linear, fastpath.PackedLinear)
    layer = fast.transformer.decoder.layers[0]
    g = torch.Generator().manual_seed(5)
    for rows in (1, 7, 850):  # the reordered weight serves any row count with the plain weight's bits
        x = torch.randn(2, rows, 256, generator=g)
        with torch.inference_mode():
            want = torch.nn.functional.linear(x, model.transformer.decoder.layers[0].linear1.weight,
                                              model.transformer.decoder.layers[0].linear1.bias)
            torch.testing.assert_close(layer.linear1(x), want, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(fastpath, "LINEAR_OPS", ("no_such_op",))
    plain = fastpath.optimise_for_inference(model, "cpu", "fp32")
    assert fastpath.PackedLinear not in {type(m) for m in plain.modules()}
    x = torch.randn(1, 3, 96, 128, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        _close(plain(x), fast(x))


def test_a_wrong_onednn_linear_is_caught_by_the_self_check(model, monkeypatch):
    if fastpath._mkldnn_ops(fastpath.LINEAR_OPS) is None:
        pytest.skip("this torch build has no oneDNN linear ops")
    real = fastpath.PackedLinear.forward
    monkeypatch.setattr(fastpath.PackedLinear, "forward", lambda self, x: real(self, x) * 1.01)
    fast = fastpath.optimise_for_inference(model, "cpu", "fp32")
    assert fastpath.PackedLinear not in {type(m) for m in fast.modules()}


def test_the_malloc_policy_keeps_freed_memory_on_glibc_and_can_be_turned_off():
    import subprocess
    import sys
    code = ("from extractor.policy import POLICY, SpeedPolicy, keep_freed_memory; "
            "print(keep_freed_memory(SpeedPolicy(keep_freed_memory=False)), keep_freed_memory(POLICY))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    import platform
    glibc = platform.libc_ver()[0] == "glibc"
    assert out == ["False", str(glibc)]
