"""The precision registry, the GPU default, the TF32 switch, and the CPU reproduction of
TF32 / bf16 rounding that chose that default (bench/precision_proxy.py)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extractor.infer import precision_context, resolve_precision
from extractor.precisions import PRECISIONS
from extractor.settings import ExtractSettings

REPO = Path(__file__).resolve().parents[1]


def _proxy():
    spec = importlib.util.spec_from_file_location("precision_proxy", REPO / "bench" / "precision_proxy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("capability, expected", [((9, 0), "tf32"), ((8, 0), "tf32"), ((7, 5), "fp32")])
def test_gpu_auto_is_tf32_where_the_gpu_has_it(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", "cuda") == expected
    assert resolve_precision("auto", "cuda:1") == expected
    assert resolve_precision("bf16", "cuda") == "bf16"


def test_cpu_refuses_the_cuda_only_precisions(tmp_path):
    assert resolve_precision("auto", "cpu") == "fp32"
    for precision in ("tf32", "fp16"):
        with pytest.raises(ValueError, match=f"{precision} is for CUDA"):
            resolve_precision(precision, "cpu")
    with pytest.raises(ValueError, match="unknown precision 'fp64'"):
        ExtractSettings(data=tmp_path, out=tmp_path / "r", device="cpu", precision="fp64").resolved()


def test_cli_choices_are_the_registry():
    out = subprocess.run([sys.executable, "-m", "extractor", "run", "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert "{" + ",".join(PRECISIONS) + "}" in out


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("tf32", True)])
def test_gpu_precision_sets_tf32_and_restores_the_process_flags(precision, tf32):
    """No GPU is needed: the flags are process state, read by cuDNN / cuBLAS at each call."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    try:
        matmul.allow_tf32, cudnn.allow_tf32 = (not tf32), (not tf32)
        with precision_context("cuda", precision):
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (tf32, tf32)
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (not tf32, not tf32)
        with pytest.raises(RuntimeError, match="boom"), precision_context("cuda:0", precision):
            raise RuntimeError("boom")
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (not tf32, not tf32)
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


def test_cpu_precision_context_leaves_tf32_alone_and_autocasts_bf16():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    x = torch.randn(4, 8)
    with precision_context("cpu", "fp32"):
        assert (x @ x.T).dtype == torch.float32
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with precision_context("cpu", "bf16"):
        assert (x @ x.T).dtype == torch.bfloat16


def test_mantissa_rounding_is_torchs_own_bf16_rounding():
    """7 kept bits, round-to-nearest-even, is exactly float32 -> bfloat16; truncation rounds toward zero."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100_000, generator=g) * 10.0 ** torch.randint(-8, 8, (100_000,), generator=g),
                   torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 0.0, -0.0])])
    proxy = _proxy()
    assert torch.equal(proxy.round_mantissa(x, 7), x.bfloat16().float())
    t = proxy.round_mantissa(x, 10, nearest=False)
    assert bool((t.abs() <= x.abs()).all()) and bool(((x - t).abs() <= x.abs() * 2 ** -10).all())
    n = proxy.round_mantissa(x, 10)
    assert bool(((x - n).abs() <= x.abs() * 2 ** -11).all())
    assert torch.equal(proxy.round_mantissa(n, 10), n)  # idempotent


def test_reduced_inputs_round_the_factors_not_the_bias():
    proxy = _proxy()
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(5, 16, generator=g), torch.randn(3, 16, generator=g), torch.randn(3, generator=g)
    cut = lambda t: t.bfloat16().float()  # noqa: E731
    with torch.inference_mode(), proxy.ReducedInputs(7, nearest=True) as mode:
        got = F.linear(x, w, b)
    assert mode.calls == 1
    torch.testing.assert_close(got, F.linear(cut(x), cut(w), b), rtol=0, atol=1e-6)
    assert not torch.allclose(got, F.linear(x, w, b), rtol=0, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_emulated_attention_is_sdpa_with_rounded_products(masked):
    proxy = _proxy()
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    keep = torch.rand(2, 1, 1, 6, generator=g) > 0.3 if masked else None
    if keep is not None:
        keep[..., 0] = True
    with torch.inference_mode(), proxy.ReducedInputs(22, nearest=True) as mode:
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert mode.calls == 2
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=keep), rtol=1e-5, atol=1e-5)


def test_emulation_reaches_every_convolution_and_matmul_of_detr():
    """Small input, real architecture: 53 convolutions, the transformer's projections and attentions."""
    proxy = _proxy()
    model = proxy.gpu_model(0)
    x = torch.randn(1, 3, 96, 128).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = model(x)["query_embeddings"]
        with proxy.ReducedInputs(10, nearest=True) as mode:
            got = model(x)["query_embeddings"]
    assert mode.calls >= 53 + 88 + 2 * 18
    cos = F.cosine_similarity(ref, got, dim=-1)
    assert float(cos.min()) > 0.999 and not torch.equal(ref, got)


def test_collate_is_the_official_normalisation_bit_for_bit():
    """collate = pad uint8, then normalise (on the GPU when there is one): each image's pixels are
    ((x - 255 mean) / (255 std)) in float32 exactly as computed one image at a time, padding zero."""
    from extractor.preprocess import IMAGENET_MEAN, IMAGENET_STD, collate, pad_uint8

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((50, 70), (64, 33), (20, 90))]
    pixel_values, mask = collate(images)
    assert pixel_values.shape == (3, 3, 64, 90) and pixel_values.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD) * 255.0)
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        one = (torch.from_numpy(im).float() - mean) * inv_std
        assert torch.equal(pixel_values[i, :, :h, :w], one.permute(2, 0, 1))
        assert not mask[i, :h, :w].any() and mask[i].sum() == 64 * 90 - h * w
        assert not pixel_values[i][:, mask[i]].any()
    assert torch.equal(collate(images, channels_last=False)[0], pixel_values.contiguous())
    u8, _ = pad_uint8(images)
    assert u8.dtype == torch.uint8 and torch.equal(u8[1, :64, :33], torch.from_numpy(images[1]))
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_cuda_autocast_lists_keep_layer_norm_and_softmax_in_float32():
    """CPU autocast leaves layer norm / softmax in bf16; CUDA's op lists run them in float32."""
    proxy = _proxy()
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.linear(x, w)
        assert y.dtype == torch.bfloat16 and F.layer_norm(y, (8,)).dtype == torch.bfloat16
        with proxy.CudaAutocastLists() as mode:
            assert F.linear(x, w).dtype == torch.bfloat16
            ln = F.layer_norm(y, (8,))
            assert ln.dtype == torch.float32 and y.softmax(-1).dtype == torch.float32
    torch.testing.assert_close(ln, F.layer_norm(y.float(), (8,)))
    assert mode.calls == 2
