"""Where a default-path CPU forward spends its time, against what this machine can do.

    python bench/forward_profile.py [--size 800x1066] [--repeats 5] [--seed 0]

Model only, one process, float32, the default path (``optimise_for_inference``) on one input of
``--size`` (height x width after preprocessing; 800x1066 is a 2000x1500 FACET photo) with the
non-degenerate random weights of the benches. It prints, per op family (convolutions,
linear layers, attention, everything else):

- milliseconds per forward: torch.profiler's self CPU time over ``--repeats`` forwards after a
  warm-up, so the families add up to the profiled forward;
- GFLOP per forward: counted on the same model with batch norms folded and ``input_proj`` as the
  matrix product the fast path runs, by a dispatch mode that sees every convolution, matrix
  product and attention call (multiply-adds x 2; element-wise work is not counted);
- GFLOP/s, and that rate as a share of a measured roof: the best of a few large dense products
  through the same oneDNN linear the fast path uses (float32, all threads, measured before and
  after the profile), i.e. the rate this machine reaches on the easiest possible product, not a
  datasheet peak.

A family far below the roof is where a float32 lever could still pay; one at the roof can only
get faster with less arithmetic (a smaller ``--min-size``) or lower precision, both of which
change results. In-process timings: for locating time, not headline figures (those are
``bench/extract_bench.py --whole-process``).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from extractor.checkpoints import UNTRAINED, build_model  # noqa: E402
from extractor.detr import fold_frozen_batchnorm  # noqa: E402
from extractor.fastpath import (LINEAR_OPS, PackedLinear, PointwiseProjection, _mkldnn_ops,  # noqa: E402
                                optimise_for_inference)
from extractor.policy import POLICY, keep_freed_memory  # noqa: E402

FAMILIES = ("convolutions", "linear layers", "attention", "other")
aten = torch.ops.aten


def family_of(op_name: str) -> str:
    """The family of a profiler op name (``mkldnn::_linear_pointwise``, ``aten::addmm``)."""
    name = op_name.lower()
    if "scaled_dot_product" in name:
        return "attention"
    if "convolution" in name:
        return "convolutions"
    if any(k in name for k in ("linear", "addmm", "::mm", "bmm", "matmul")):
        return "linear layers"
    return "other"


class FlopCount(TorchDispatchMode):
    """Multiply-adds x 2 of every convolution, matrix product and attention call, by family.

    Attention is counted from the query [B, H, L, E], key [B, H, S, E] and value [B, H, S, Ev]
    shapes of SDPA's fused kernels: Q K^T and the weighted sum of V, 2 B H L S (E + Ev). Where
    SDPA falls back to its math path (not on DETR's shapes) it runs, and is counted as, matrix
    products."""

    def __init__(self):
        super().__init__()
        self.flops = dict.fromkeys(FAMILIES, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet in (aten.convolution, aten._convolution):
            w = args[1].shape
            self.flops["convolutions"] += 2 * math.prod(out.shape) * math.prod(w[1:])
        elif packet in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm):
            a = args[1] if packet in (aten.addmm, aten.baddbmm) else args[0]
            self.flops["linear layers"] += 2 * math.prod(out.shape) * int(a.shape[-1])
        elif "scaled_dot_product" in str(packet):
            q, k, v = args[0], args[1], args[2]
            b, h, length, e = q.shape
            self.flops["attention"] += 2 * b * h * length * k.shape[-2] * (e + v.shape[-1])
        return out


def count_flops(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> dict[str, int]:
    """FLOPs of one ``model(x, mask)`` by family (see :class:`FlopCount`)."""
    counter = FlopCount()
    with torch.no_grad(), counter:
        model(x, mask)
    return counter.flops


def counting_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its batch norms folded and ``input_proj`` as a matrix product: the arithmetic
    the fast path runs, in ops a dispatch mode can see (oneDNN's fused ops hide their weights)."""
    folded = fold_frozen_batchnorm(model.eval())
    folded.input_proj = PointwiseProjection(folded.input_proj, None)
    return folded


def time_families(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, repeats: int) -> dict[str, float]:
    """Seconds per forward by family: torch.profiler's self CPU time over ``repeats`` forwards."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x, mask)  # warm-up: packing for this shape, allocator
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                model(x, mask)
    out = dict.fromkeys(FAMILIES, 0.0)
    for event in prof.key_averages():
        out[family_of(event.key)] += event.self_cpu_time_total / 1e6 / repeats
    return out


def wall_forward(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward, unprofiled."""
    with torch.inference_mode():
        return statistics.median(_timed(lambda: model(x, mask)) for _ in range(repeats))


def gemm_roof(rows: int = 4096, inner: int = 1024, cols: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of the best of ``repeats`` dense [rows, inner] x [inner, cols] products through the
    fast path's linear (oneDNN with a reordered weight; ``F.linear`` without oneDNN)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, inner, generator=g), torch.randn(cols, inner, generator=g)
    ops = _mkldnn_ops(LINEAR_OPS)
    lin = PackedLinear(ops, w, None) if ops is not None else (lambda t: nn.functional.linear(t, w))
    with torch.inference_mode():
        lin(x)
        best = min(_timed(lambda: lin(x)) for _ in range(repeats))
    return 2 * rows * inner * cols / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def profile_rows(seconds: dict[str, float], flops: dict[str, int], roof: float) -> list[dict]:
    """One row per family and a total: ms, GFLOP, GFLOP/s and share of the roof (None where no FLOPs)."""
    rows = []
    for name in (*FAMILIES, "total"):
        sec = sum(seconds.values()) if name == "total" else seconds[name]
        gflop = sum(flops.values()) / 1e9 if name == "total" else flops[name] / 1e9
        rate = gflop / sec if gflop and sec > 0 else None
        rows.append({"family": name, "ms": 1e3 * sec, "share": sec / sum(seconds.values()),
                     "gflop": gflop, "gflops": rate, "of_roof": rate / roof if rate else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="800x1066", help="input height x width after preprocessing (default 800x1066)")
    p.add_argument("--repeats", type=int, default=5, help="profiled and timed forwards (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and input")
    args = p.parse_args(argv)
    try:
        height, width = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--size {args.size!r}: give height x width, e.g. 800x1066")

    keep_freed_memory(POLICY)  # as a CPU extraction does
    model, _ = build_model(UNTRAINED, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(1, 3, height, width, generator=g).contiguous(memory_format=torch.channels_last)
    mask = torch.zeros(1, height, width, dtype=torch.bool)

    flops = count_flops(counting_model(model), x, mask)
    fast = optimise_for_inference(model, "cpu", "fp32")
    # The roof is taken before and after (the best of both), so a busy moment on shared cores
    # lowers it less; a busy moment during the profile still lowers the shares: run it twice.
    roof = gemm_roof()
    seconds = time_families(fast, x, mask, args.repeats)
    wall = wall_forward(fast, x, mask, args.repeats)
    roof = max(roof, gemm_roof())
    print(f"input {height}x{width}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"forward {wall:.3f} s (median of {args.repeats}, unprofiled); roof {roof:.0f} GFLOP/s "
          f"(best dense 4096x1024x1024 product through the fast path's linear)\n")
    print("| family | ms / forward | share | GFLOP | GFLOP/s | of roof |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in profile_rows(seconds, flops, roof):
        rate = f"{r['gflops']:.0f}" if r["gflops"] else "-"
        share = f"{r['of_roof']:.0%}" if r["of_roof"] else "-"
        print(f"| {r['family']} | {r['ms']:.1f} | {r['share']:.0%} | {r['gflop']:.2f} | {rate} | {share} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
