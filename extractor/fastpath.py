"""Inference-only speed-ups of DETR on the CPU that keep float32 results.

Measured on the 2-core AVX-512 CPU of the project (bench/extract_bench.py --levers):
the backbone's convolutions are ~75% of a forward at 800 px. Three things pay:

1. channels-last memory, which oneDNN's convolutions want;
2. the frozen batch norms folded into the convolutions before them (no extra passes
   over the large activation maps);
3. convolution weights reordered once into oneDNN's blocked layout *for the input shape
   at hand* (a layout chosen for another shape gains nothing), with the ReLU and the
   residual add fused into the convolution that precedes them;
4. every linear layer through oneDNN with its weight reordered once (torch's MKL runs AVX2
   kernels on AMD CPUs, at under half oneDNN's speed on the transformer's products).

All of them compute the same float32 arithmetic (the fused path matches the eager
backbone bit for bit in our checks), so embeddings, scores and boxes stay those of the
official model to float32 rounding. bf16 is an opt-in precision: it changes the
embeddings measurably (see the README).
"""
from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict

import torch
from torch import Tensor, nn

from .detr import DETR, fold_frozen_batchnorm, set_submodule
from .transformer import MultiheadAttention
from .policy import POLICY

log = logging.getLogger(__name__)

PACKED_SHAPES = POLICY.packed_shapes  # shapes kept packed at once (extractor/policy.py says why)


CONV_OPS = ("_reorder_convolution_weight", "_convolution_pointwise", "_convolution_pointwise_")
LINEAR_OPS = ("_reorder_linear_weight", "_linear_pointwise")


def _mkldnn_ops(needed: tuple[str, ...] = CONV_OPS):
    ops = getattr(torch.ops, "mkldnn", None)
    if ops is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        return ops if all(getattr(ops, n, None) is not None for n in needed) else None
    except (AttributeError, RuntimeError):
        return None


class _PackedConv:
    """One folded convolution with its weight reordered for a given input shape."""

    def __init__(self, ops, conv: nn.Conv2d, input_shape: torch.Size):
        self.ops = ops
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.weight = ops._reorder_convolution_weight(conv.weight, *self.args, list(input_shape))
        self.bias = conv.bias

    def __call__(self, x: Tensor, unary: str = "none") -> Tensor:
        return self.ops._convolution_pointwise(x, self.weight, self.bias, *self.args, unary, [], "")

    def add_relu_(self, x: Tensor, residual: Tensor) -> Tensor:
        """relu(conv(x) + residual), written into ``residual`` (which is not needed after)."""
        return self.ops._convolution_pointwise_(residual, x, self.weight, self.bias, *self.args,
                                                "add", 1.0, "relu", [], "")


class FusedTrunk(nn.Module):
    """Drop-in for a BN-folded ResNet trunk: [B, 3, H, W] -> [B, 2048, h, w], same float32 values."""

    def __init__(self, trunk: nn.Module, ops):
        super().__init__()
        self.trunk = trunk
        self.ops = ops
        self._packed: OrderedDict[tuple, list] = OrderedDict()
        # The app shares one model between sessions, each in its own thread.
        self._lock = threading.Lock()

    def _pack(self, x: Tensor) -> list:
        """Packed weights for this input shape; each conv's input shape follows from conv
        arithmetic, so no forward pass is needed (that would cost as much as an image)."""
        t = self.trunk
        packed = [_PackedConv(self.ops, t.conv1, x.shape)]
        shape = _pool_out(_conv_out(tuple(x.shape), t.conv1), t.maxpool)
        for layer in (t.layer1, t.layer2, t.layer3, t.layer4):
            for block in layer:
                c1 = _PackedConv(self.ops, block.conv1, shape)
                mid = _conv_out(shape, block.conv1)
                c2 = _PackedConv(self.ops, block.conv2, mid)
                mid = _conv_out(mid, block.conv2)
                c3 = _PackedConv(self.ops, block.conv3, mid)
                down = None if block.downsample is None else _PackedConv(self.ops, block.downsample[0], shape)
                packed.append((c1, c2, c3, down))
                shape = _conv_out(mid, block.conv3)
        return packed

    def forward(self, x: Tensor) -> Tensor:
        key = (tuple(x.shape), x.dtype)
        with self._lock:
            packed = self._packed.get(key)
            if packed is None:
                packed = self._pack(x)
                self._packed[key] = packed
                while len(self._packed) > PACKED_SHAPES:
                    self._packed.popitem(last=False)
            else:
                self._packed.move_to_end(key)
        stem, blocks = packed[0], packed[1:]
        h = self.trunk.maxpool(stem(x, "relu"))
        for c1, c2, c3, down in blocks:
            residual = down(h) if down is not None else h
            h = c3.add_relu_(c2(c1(h, "relu"), "relu"), residual)
        return h


class PackedLinear(nn.Module):
    """``nn.Linear`` through oneDNN with the weight reordered once into its blocked layout:
    x ``[..., K]`` -> ``[..., N]``.

    ``F.linear`` goes to the BLAS torch ships (MKL), which on AMD CPUs runs its AVX2 kernels: on
    DETR's transformer shapes it measured 106-163 GFLOP/s against oneDNN's 288-374 on the 2-core
    Zen 5 (README "Extraction speed"). Same float32 products, summed in another order (~3e-6
    relative); oneDNN splits rows and columns, never the sums, so every thread count gives the
    same bits, and the reordered weight gives the same bits as the plain one for any row count.
    """

    def __init__(self, ops, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.ops = ops
        self.out_features, self.in_features = weight.shape
        self.weight = ops._reorder_linear_weight(weight.detach().contiguous(), POLICY.linear_rows_hint)
        self.bias = None if bias is None else bias.detach().contiguous()

    def forward(self, x: Tensor) -> Tensor:
        return self.ops._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")


def _linear(weight: Tensor, bias: Tensor | None, ops) -> nn.Module:
    """A PackedLinear where oneDNN's linear ops exist, else an ``nn.Linear`` holding these tensors."""
    if ops is not None:
        return PackedLinear(ops, weight, bias)
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


class PackedAttention(MultiheadAttention):
    """DETR's attention with the q/k/v in-projection slices and the out-projection as PackedLinear."""

    def __init__(self, mha: MultiheadAttention, ops):
        nn.Module.__init__(self)
        self.num_heads = mha.num_heads
        d = mha.out_proj.in_features
        w, b = mha.in_proj_weight, mha.in_proj_bias
        # Every slice forward() asks for: q and k at once (self-attention), q, k, v.
        self.slices = nn.ModuleDict({f"{a}:{z}": PackedLinear(ops, w[a:z], b[a:z])
                                     for a, z in ((0, 2 * d), (0, d), (d, 2 * d), (2 * d, 3 * d))})
        self.out_proj = PackedLinear(ops, mha.out_proj.weight, mha.out_proj.bias)

    def project(self, x: Tensor, start: int, stop: int) -> Tensor:
        return self.slices[f"{start}:{stop}"](x)


def pack_linears(model: nn.Module, ops) -> None:
    """Every linear layer and attention of ``model`` (in place) as its PackedLinear form."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MultiheadAttention) and not isinstance(module, PackedAttention):
            set_submodule(model, name, PackedAttention(module, ops))
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            set_submodule(model, name, PackedLinear(ops, module.weight, module.bias))


class PointwiseProjection(nn.Module):
    """A 1x1 convolution (DETR's ``input_proj``) computed as one matrix product over the pixels.

    oneDNN's 1x1 convolution splits its 2048-long sums differently with the thread count, so the
    embeddings moved by ~1e-5 between 1 and 2 threads; a matrix product splits only rows and
    columns, so its sums, and a run's files, are the same for every thread count (a Ray actor on
    one core writes the bytes a local run on two writes). Same float32 arithmetic otherwise.
    """

    def __init__(self, conv: nn.Conv2d, ops=None):
        super().__init__()
        assert conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
        self.linear = _linear(conv.weight.detach()[:, :, 0, 0].contiguous(), conv.bias, ops)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, h, w] -> [B, D, h, w] (channels-last memory)."""
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _out_side(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv_out(shape: tuple, conv: nn.Conv2d) -> tuple:
    """[B, C, H, W] after ``conv``."""
    h, w = (_out_side(shape[2 + i], conv.kernel_size[i], conv.stride[i], conv.padding[i], conv.dilation[i])
            for i in range(2))
    return (shape[0], conv.out_channels, h, w)


def _pool_out(shape: tuple, pool: nn.MaxPool2d) -> tuple:
    """[B, C, H, W] after a square max-pool (ResNet's stem), floor mode."""
    h, w = (_out_side(side, pool.kernel_size, pool.stride, pool.padding, pool.dilation) for side in shape[2:])
    return (shape[0], shape[1], h, w)


def optimise_for_inference(model: DETR, device: str, precision: str) -> nn.Module:
    """An inference-only copy of ``model`` made fast for ``device`` / ``precision``.

    The copy's state dict no longer has the official keys (batch norms are folded):
    never save it. ``model`` itself is left as it was.
    """
    fast = fold_frozen_batchnorm(model.eval())
    fast = fast.to(device).to(memory_format=torch.channels_last)
    if device != "cpu" or precision != "fp32":
        return fast
    linear_ops = _mkldnn_ops(LINEAR_OPS)
    if linear_ops is not None and not _linear_agrees(linear_ops):
        linear_ops = None
    fast.input_proj = PointwiseProjection(fast.input_proj, linear_ops)
    if linear_ops is not None:
        pack_linears(fast, linear_ops)
    ops = _mkldnn_ops()
    if ops is None:
        log.info("oneDNN fused convolutions unavailable; using channels-last + folded batch norms")
        return fast
    body = fast.backbone[0].body
    probe = _probe_trunk(body)
    if not _agrees(probe, FusedTrunk(probe, ops)):
        return fast
    fused = FusedTrunk(body, ops)
    fast.backbone[0].body = fused
    return fast


def _probe_trunk(body: nn.Module) -> nn.Module:
    """The stem and the first block of each layer of ``body`` (sharing its convolutions): every kind
    of fused call the full trunk makes (strided, dilated, downsampling, residual add), for a
    quarter of the packing and forward cost of checking the whole trunk at each start."""
    probe = copy.copy(body)
    probe._modules = dict(body._modules)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        probe._modules[name] = nn.Sequential(body._modules[name][0])
    return probe


def _linear_agrees(ops) -> bool:
    """PackedLinear against ``F.linear`` on one transformer-sized product (see :func:`_matches`)."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 40, 64, generator=g), torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    return _matches(lambda: nn.functional.linear(x, w, b), lambda: PackedLinear(ops, w, b)(x),
                    "oneDNN linear", "torch's linear")


def _agrees(reference: nn.Module, candidate: nn.Module) -> bool:
    """The fused trunk against the folded one on one small image (see :func:`_matches`)."""
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    ok = _matches(lambda: reference(x), lambda: candidate(x.clone()), "oneDNN fused convolutions", "the plain path")
    candidate._packed.clear()
    return ok


def _matches(reference, candidate, what: str, fallback: str) -> bool:
    """A small self-check, so an unusual torch build degrades to the slower path, never to wrong numbers."""
    try:
        with torch.inference_mode():
            want, got = reference(), candidate()
        ok = bool(torch.allclose(want, got, rtol=1e-4, atol=1e-4 * float(want.abs().max())))
    except RuntimeError as exc:
        log.warning("%s failed (%s); using %s", what, exc, fallback)
        return False
    if not ok:
        log.warning("%s disagree with the reference; using %s", what, fallback)
    return ok
