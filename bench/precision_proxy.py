"""How far each GPU precision moves DETR's outputs, measured on the CPU (no GPU needed).

    python bench/precision_proxy.py [--images 8] [--seed 0] [--workdir /tmp/precision_proxy]

The GPU default precision has to be chosen before a GPU run can confirm it (issue 15 §1:
"if bf16 moves embeddings below cosine 0.999, make fp32/TF32 the GPU default"). The
rounding a precision applies can be reproduced exactly on the CPU; only the kernels'
summation order differs, which float32 accumulation makes a ~1e-6 effect. So this runs the
model a GPU runs (batch norms folded, channels-last, no fused CPU convolutions) on
FACET-sized real-photo JPEGs with the non-degenerate random weights, in:

- fp32: the reference;
- bf16 autocast: ``torch.autocast("cpu", bfloat16)`` with CUDA autocast's op lists
  (convolutions and matmuls in bf16 with bf16 outputs; layer norm and softmax in float32,
  which CPU autocast would leave in bf16: ``CudaAutocastLists``), and CPU autocast as it is;
- TF32 emulated: every convolution, matmul and attention input rounded to TF32 (10 mantissa
  bits) and products accumulated in float32, what cuDNN / cuBLAS do with TF32 on; both
  round-to-nearest and truncation, since which one a kernel uses is not documented for all.

It prints, per variant, the query embeddings' cosine to fp32 (min, 0.1% quantile, median),
the max |person-score difference| and the kept-set flips at a threshold that keeps ~3
queries per image (a flip is allowed only within 0.01 of it).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from extractor.checkpoints import seeded_state_dict  # noqa: E402
from extractor.detr import build_detr, fold_frozen_batchnorm  # noqa: E402
from extractor.matching import person_probability  # noqa: E402
from extractor.preprocess import collate, load_prepared  # noqa: E402

log = logging.getLogger("precision_proxy")
aten = torch.ops.aten
# The ops TF32 applies to (as inference mode dispatches them, undecomposed): convolutions and
# GEMMs; attention is decomposed below so that both of its GEMMs see rounded inputs.
_TENSOR_CORE_OPS = {aten.conv2d.default, aten.convolution.default, aten.linear.default, aten.mm.default,
                    aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.matmul.default}
_ATTENTION = aten.scaled_dot_product_attention.default


def round_mantissa(x: torch.Tensor, bits: int, nearest: bool = True) -> torch.Tensor:
    """float32 ``x`` with its mantissa cut to ``bits`` bits (round-to-nearest-even or truncation).

    TF32 keeps 10 of float32's 23 mantissa bits, bf16 keeps 7. Finite inputs only."""
    assert x.dtype == torch.float32 and 0 < bits < 23
    drop = 23 - bits
    i = x.contiguous().view(torch.int32)
    if nearest:
        i = i + ((1 << (drop - 1)) - 1) + ((i >> drop) & 1)
    return (i & ~((1 << drop) - 1)).view(torch.float32).view_as(x)


class ReducedInputs(TorchDispatchMode):
    """Rounds the float32 inputs of the tensor-core ops to ``bits`` mantissa bits; outputs stay float32."""

    def __init__(self, bits: int, nearest: bool) -> None:
        super().__init__()
        self.bits, self.nearest, self.calls = bits, nearest, 0

    def _cut(self, a):
        if isinstance(a, torch.Tensor) and a.dtype == torch.float32:
            return round_mantissa(a, self.bits, self.nearest)
        return a

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _ATTENTION:
            return self._attention(*args, **kwargs)
        if func in _TENSOR_CORE_OPS:
            self.calls += 1
            # A bias is added after the product, in float32: only the two factors are rounded.
            first = 1 if func in (aten.addmm.default, aten.baddbmm.default) else 0
            args = tuple(self._cut(a) if first <= i < first + 2 else a for i, a in enumerate(args))
        return func(*args, **kwargs)

    def _attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        """softmax(q k^T * scale + mask) v with both products on rounded inputs (the math kernel)."""
        assert not is_causal and dropout_p == 0.0
        self.calls += 2
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = torch.matmul(self._cut(q), self._cut(k).transpose(-2, -1)) * scale
        if attn_mask is not None:
            scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                      else scores + attn_mask)
        return torch.matmul(self._cut(scores.softmax(-1)), self._cut(v))


class CudaAutocastLists(TorchFunctionMode):
    """Inside CPU bf16 autocast, runs the ops CUDA autocast keeps in float32 (of those DETR uses:
    layer norm, softmax, group norm) in float32, as CUDA does; CPU autocast runs them in bf16."""
    FLOAT32 = {F.layer_norm, torch.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.group_norm}

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FLOAT32:
            self.calls += 1
            with torch.autocast("cpu", enabled=False):
                return func(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                              for a in args), **kwargs)
        return func(*args, **kwargs)


def gpu_model(seed: int) -> torch.nn.Module:
    """The model ``optimise_for_inference`` gives a GPU: folded batch norms, channels-last."""
    model = build_detr()
    model.load_state_dict(seeded_state_dict(seed))
    return fold_frozen_batchnorm(model.eval()).to(memory_format=torch.channels_last)


def outputs(model: torch.nn.Module, batches: list[torch.Tensor], variant: str) -> tuple[np.ndarray, np.ndarray]:
    """(person scores [N, Q], query embeddings [N, Q, 256]) over the images under ``variant``."""
    scores, embs = [], []
    for x in batches:
        modes: list = []
        if variant.startswith("bf16 autocast"):
            modes = [torch.autocast("cpu", dtype=torch.bfloat16)] + ([CudaAutocastLists()] if "CUDA" in variant else [])
        elif variant.startswith("tf32"):
            modes = [ReducedInputs(10, nearest="nearest" in variant)]
        elif variant != "fp32":
            raise ValueError(f"unknown variant {variant!r}")
        # Entered inside inference mode: an autocast entered outside it is not undone on exit there.
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            out = model(x)
        assert not torch.is_autocast_enabled("cpu")
        for mode in modes:
            if isinstance(mode, (ReducedInputs, CudaAutocastLists)):
                assert mode.calls > 20, f"{type(mode).__name__} saw too few of the ops it changes"
        scores.append(person_probability(out["pred_logits"][0].float()).numpy())
        embs.append(out["query_embeddings"][0].float().numpy())
    return np.stack(scores), np.stack(embs)


def compare(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray], threshold: float) -> dict:
    """Every query of two runs over the same images: ref / got = (scores [N, Q], embeddings [N, Q, D]).
    A kept-set flip is allowed only where the reference score is within 0.01 of the threshold."""
    (s0, e0), (s1, e1) = ref, got
    cos = (e0 * e1).sum(-1) / (np.linalg.norm(e0, axis=-1) * np.linalg.norm(e1, axis=-1))
    flips = (s0 >= threshold) != (s1 >= threshold)
    return {"queries": int(cos.size), "cos_min": float(cos.min()), "cos_q001": float(np.quantile(cos, 0.001)),
            "cos_median": float(np.median(cos)), "cos_mean": float(cos.mean()),
            "score_diff_max": float(np.abs(s0 - s1).max()), "kept": int((s0 >= threshold).sum()),
            "flips": int(flips.sum()), "flips_allowed": bool(np.all(np.abs(s0[flips] - threshold) < 0.01))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8, help="FACET-sized real-photo JPEGs (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the photos' tiling and of the weights")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/precision_proxy"), help="scratch directory")
    p.add_argument("--min-size", type=int, default=800, help="shorter side the model sees (default 800)")
    p.add_argument("--variants", default="bf16 autocast (CUDA lists),bf16 autocast (CPU lists),tf32 nearest,"
                                         "tf32 truncated",
                   help="comma-separated variants compared with fp32")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from whole_process import write_photo_dataset

    paths = write_photo_dataset(args.workdir / "data", args.images, args.seed)
    batches = [collate([load_prepared(q, args.min_size, 1333, draft=False).pixels])[0] for q in paths]
    model = gpu_model(args.seed)
    ref = outputs(model, batches, "fp32")
    ranked = np.sort(ref[0].ravel())[::-1]
    threshold = float(ranked[3 * len(paths)] + ranked[3 * len(paths) - 1]) / 2
    print(f"{len(paths)} images 2000x1500 -> {tuple(batches[0].shape[2:])}; torch {torch.__version__}; "
          f"threshold {threshold:.4f}\n")
    print("| variant vs fp32 | cosine min | cosine 0.1% | cosine median | max score diff | kept flips (allowed?) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        c = compare(ref, outputs(model, batches, variant), threshold)
        print(f"| {variant} | {c['cos_min']:.5f} | {c['cos_q001']:.5f} | {c['cos_median']:.6f} | "
              f"{c['score_diff_max']:.2e} | {c['flips']} of {c['kept']} ({c['flips_allowed']}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
