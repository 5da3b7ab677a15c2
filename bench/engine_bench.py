"""CPU execution engines for the DETR forward, against the default torch fast path (issue 15 section 2).

    python bench/engine_bench.py [--images 3] [--repeats 3] [--engines openvino,onnxruntime,bucket]
                                 [--inductor-cache DIR]

Model only, one process, the same FACET-sized inputs (2000x1500 real-photo composites
prepared to 800x1066) and the same non-degenerate random weights (``seeded_state_dict``).
Every engine runs the BN-folded model exported from the project's own DETR module
(``extractor.detr``); the reference is the default path (``optimise_for_inference``: folded
BN, channels-last, prepacked fused oneDNN convolutions). Rounds are interleaved (each round
runs every engine on every image) so load from other programs on the machine hits all alike.

Engines (each skipped with a one-line note when its package is missing;
``pip install -e .[engines]`` installs them):

- ``openvino``: ``openvino.convert_model`` of the traced module, compiled for the CPU with
  f32 inference precision and the latency hint;
- ``onnxruntime``: ``torch.onnx.export`` (TorchScript exporter, opset 17), CPU execution
  provider, all graph optimisations, one intra-op thread per core;
- ``inductor``: ``torch.compile`` with freezing, static shape, its FX-graph cache in
  ``--inductor-cache`` (run the bench twice with the same directory for the warm cost a second
  process pays); cold compiles take minutes on 2 cores;
- ``bucket``: the default torch path on the image zero-padded to a static 800x1344 bucket with
  the padding mask (what shape buckets would compute: DETR masks the padding, but the
  convolutions see it, so results move).

Reported per engine: fixed cost (export/conversion, which a disk cache keyed by checkpoint and
shape would pay once, and load/compile, which every process pays), seconds per image (median
over rounds), the speed ratio to the default path, and agreement with it: min cosine of the
query embeddings, max |person-score difference| and kept-set flips beyond 0.01 of a threshold
that keeps about three queries per image.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from extractor.checkpoints import seeded_state_dict  # noqa: E402
from extractor.detr import build_detr, fold_frozen_batchnorm  # noqa: E402
from extractor.fastpath import optimise_for_inference  # noqa: E402
from extractor.preprocess import collate, prepare_image  # noqa: E402

ENGINES = ("openvino", "onnxruntime", "inductor", "bucket")
PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime", "inductor": "torch"}
BUCKET = (800, 1344)  # (H, W): the 4:3 landscape FACET shape padded up to a multiple of 32 past 1333

Runner = Callable[[Tensor], tuple[np.ndarray, np.ndarray]]  # [1,3,H,W] -> scores [Q], embeddings [Q,256]


class Outputs(nn.Module):
    """DETR without a mask, returning a tuple (exporters want tensors, not a dict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(x, None)
        return out["pred_logits"], out["pred_boxes"], out["query_embeddings"]


def _scores_emb(logits, emb) -> tuple[np.ndarray, np.ndarray]:
    logits = torch.as_tensor(np.asarray(logits)).float()
    return logits[0].softmax(-1)[:, 1].numpy(), np.asarray(emb, dtype=np.float32)[0]


def inputs(n: int, seed: int) -> list[Tensor]:
    """n real-photo 2000x1500 composites through the official preprocessing: [1,3,800,1066] each."""
    from whole_process import photo_canvas, real_photos
    rng, photos = np.random.default_rng(seed), real_photos()
    return [collate([prepare_image(photo_canvas(photos, rng), 800, 1333).pixels])[0] for _ in range(n)]


def torch_default(model: nn.Module) -> Runner:
    fast = optimise_for_inference(model, "cpu", "fp32")

    def run(x: Tensor):
        with torch.inference_mode():
            out = fast(x, None)
        return _scores_emb(out["pred_logits"], out["query_embeddings"])
    return run


def bucket(model: nn.Module) -> Runner:
    fast = optimise_for_inference(model, "cpu", "fp32")

    def run(x: Tensor):
        h, w = x.shape[-2:]
        padded = torch.zeros(1, 3, *BUCKET).contiguous(memory_format=torch.channels_last)
        padded[..., :h, :w] = x
        mask = torch.ones(1, *BUCKET, dtype=torch.bool)
        mask[:, :h, :w] = False
        with torch.inference_mode():
            out = fast(padded, mask)
        return _scores_emb(out["pred_logits"], out["query_embeddings"])
    return run


def openvino(model: nn.Module, x: Tensor, work: Path) -> tuple[Runner, float, float]:
    import openvino as ov
    t0 = time.perf_counter()
    ov.save_model(ov.convert_model(Outputs(fold_frozen_batchnorm(model)).eval(), example_input=(x,)),
                  work / "detr.xml")
    t1 = time.perf_counter()
    compiled = ov.Core().compile_model(work / "detr.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                 "PERFORMANCE_HINT": "LATENCY"})
    t2 = time.perf_counter()

    def run(x: Tensor):
        out = compiled(x.contiguous().numpy())
        return _scores_emb(out[0], out[2])
    return run, t1 - t0, t2 - t1


def onnxruntime(model: nn.Module, x: Tensor, work: Path) -> tuple[Runner, float, float]:
    import onnxruntime as ort
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(Outputs(fold_frozen_batchnorm(model)).eval(), (x.contiguous(),), str(work / "detr.onnx"),
                          dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["logits", "boxes", "emb"])
    t1 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(work / "detr.onnx"), opts, providers=["CPUExecutionProvider"])
    t2 = time.perf_counter()

    def run(x: Tensor):
        logits, _, emb = session.run(None, {"x": x.contiguous().numpy()})
        return _scores_emb(logits, emb)
    return run, t1 - t0, t2 - t1


def inductor(model: nn.Module, x: Tensor, cache: Path) -> tuple[Runner, float, float]:
    """Compile + first call (the cost a process pays; the cache makes a second process's cheaper)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    import torch._inductor.config as config
    config.freezing = True
    compiled = torch.compile(Outputs(fold_frozen_batchnorm(model)).to(memory_format=torch.channels_last).eval(),
                             dynamic=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(x)
    compile_s = time.perf_counter() - t0

    def run(x: Tensor):
        with torch.no_grad():
            logits, _, emb = compiled(x)
        return _scores_emb(logits, emb)
    return run, 0.0, compile_s


def agreement(ref: list, got: list, threshold: float) -> dict:
    cos, dscore, flips = [], [], 0
    for (sa, ea), (sb, eb) in zip(ref, got):
        cos.append(float(((ea * eb).sum(1) / (np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1))).min()))
        dscore.append(float(np.abs(sa - sb).max()))
        flipped = (sa >= threshold) != (sb >= threshold)
        flips += int((flipped & (np.abs(sa - threshold) >= 0.01)).sum())
    return {"cos_min": min(cos), "score_diff_max": max(dscore), "flips_beyond": flips}


def keep_threshold(ref: list, per_image: float = 3.0) -> float:
    scores = np.sort(np.concatenate([s for s, _ in ref]))[::-1]
    k = int(round(per_image * len(ref)))
    return float((scores[k - 1] + scores[k]) / 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3, help="distinct inputs (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--engines", default="openvino,onnxruntime,bucket",
                   help=f"comma-separated, of {', '.join(ENGINES)} (inductor's cold compile takes minutes)")
    p.add_argument("--inductor-cache", type=Path, default=Path(tempfile.gettempdir()) / "detr_inductor_cache",
                   help="TORCHINDUCTOR_CACHE_DIR for the inductor engine")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(names) - set(ENGINES))
    if unknown:
        raise SystemExit(f"unknown engine(s) {', '.join(unknown)}: choose from {', '.join(ENGINES)}")

    model = build_detr()
    model.load_state_dict(seeded_state_dict(args.seed))
    model.eval()
    xs = inputs(args.images, args.seed)
    print(f"{len(xs)} inputs {list(xs[0].shape)}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    runners: dict[str, Runner] = {"torch default (fused oneDNN)": torch_default(model)}
    fixed: dict[str, tuple[float, float]] = {"torch default (fused oneDNN)": (0.0, 0.0)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None:
                print(f"{name}: not installed, skipped (pip install -e .[engines])")
                continue
            if name == "bucket":
                label = f"default path padded to a {BUCKET[0]}x{BUCKET[1]} bucket + mask"
                runners[label], fixed[label] = bucket(model), (0.0, 0.0)
                continue
            if name == "inductor":
                cold = not any(args.inductor_cache.rglob("*")) if args.inductor_cache.exists() else True
                run, export_s, load_s = inductor(model, xs[0], args.inductor_cache)
                name = f"inductor ({'cold' if cold else 'warm'} cache)"
            else:
                run, export_s, load_s = globals()[name](model, xs[0], Path(tmp))
            runners[name], fixed[name] = run, (export_s, load_s)
            print(f"{name}: export/convert {export_s:.1f} s, load/compile {load_s:.1f} s", flush=True)

        outputs = {name: [run(x) for x in xs] for name, run in runners.items()}  # also the warm-up
        times: dict[str, list[float]] = {name: [] for name in runners}
        for r in range(args.repeats):
            for name, run in runners.items():
                t0 = time.perf_counter()
                for x in xs:
                    run(x)
                times[name].append((time.perf_counter() - t0) / len(xs))
            print(f"  round {r + 1}: " + ", ".join(f"{n.split(' (')[0]} {t[-1]:.2f}" for n, t in times.items()),
                  flush=True)
    ref_name = next(iter(runners))
    ref = outputs[ref_name]
    threshold = keep_threshold(ref)
    base = statistics.median(times[ref_name])
    print(f"\nload average at end {os.getloadavg()[0]:.1f}; threshold {threshold:.4f} (default path keeps "
          f"~3 queries per image); s/image = median over {args.repeats} rounds (range)\n")
    print("| engine | export/convert s (once, cacheable) | load/compile s (every process) | s/image | "
          "speed vs default | min cosine | max score diff | flips beyond 0.01 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, ts in times.items():
        a = agreement(ref, outputs[name], threshold)
        med = statistics.median(ts)
        ratios = [b / t for b, t in zip(times[ref_name], ts)]
        print(f"| {name} | {fixed[name][0]:.1f} | {fixed[name][1]:.1f} | {med:.2f} ({min(ts):.2f}-{max(ts):.2f}) | "
              f"{base / med:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {a['cos_min']:.6f} | "
              f"{a['score_diff_max']:.1e} | {a['flips_beyond']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
