"""Issue 15 section 1 in one run: extraction speed, memory and agreement on a GPU.

Run once on the GPU machine (an H200 with 16 cores, no internet; ~250-420 s with the defaults):

    python bench/gpu_suite.py --out $OUT --device cuda

(the photos need the test extras scikit-image and matplotlib; nothing is downloaded).
On FACET-sized 2000x1500 real-photo JPEGs (bench/whole_process.py) and seeded, non-degenerate
DETR-R50 weights, in this order (cheap and most important first):

1. environment: torch, CUDA, GPU name/capability, bf16 support, cores, the TF32 flags;
2. the dataset and the checkpoint, timed;
3. decoding: ``load_prepared`` in a thread pool at 1, 2, 4, ... up to ``POLICY.decode_workers()``
   workers (plus all cores, and JPEG draft decoding at the policy's count), images/s each; then
   ``torchvision.io.decode_jpeg`` on the device in batches with the resize on the device, images/s
   and its pixels' distance from ``load_prepared``'s (a measurement only: the runs decode on the CPU);
4. the reference: bench/extract_bench.py's plain official path (batch 1, strict float32 with
   TF32 off on CUDA) on the device over all images, its threshold (``pick_threshold``), and the
   same path on the CPU over the first ``--cpu-images`` images compared with it (cosine of the
   query embeddings over all queries, max |score diff|, kept-set flips at the threshold);
5. ``run_extraction`` per precision x batch: a warm-up on 2*batch images, then a timed run on
   all: images/s end to end (model loading included), steady images/s, GPU peak MiB allocated /
   reserved, and ``agreement`` with the device reference. Steady = (images - batch) / (last - first
   image stamp): the manifest's first stamp is taken after the whole first batch;
6. one ``python -m extractor run`` process with default settings (+ checkpoint, threshold, device).

Each step's failure is recorded (type, message, traceback tail) and the suite goes on; after
every step DIR/gpu_suite.json and DIR/gpu_suite.md are rewritten, so a kill keeps what finished.
Configurations starting after ``--budget-s`` are recorded as skipped. Exit 1 only when the
dataset or reference steps failed.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import sys
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if __name__ == "__main__":  # tqdm reads it at import; progress bars would bury the report in the output tail
    os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import extract_bench as eb  # noqa: E402  (puts the repo root on sys.path)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from extractor import rundir  # noqa: E402
from extractor.checkpoints import seeded_state_dict  # noqa: E402
from extractor.pipeline import run_extraction  # noqa: E402
from extractor.policy import POLICY  # noqa: E402
from extractor.preprocess import load_prepared  # noqa: E402
from extractor.settings import ExtractSettings  # noqa: E402
from precision_proxy import compare  # noqa: E402
from whole_process import FACET_SIZE, run_fast, write_photo_dataset  # noqa: E402

log = logging.getLogger("gpu_suite")
MiB = 2 ** 20


def error_info(exc: BaseException) -> dict:
    tail = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"type": type(exc).__name__, "message": str(exc)[:2000], "traceback": "".join(tail)[-3000:]}


def _json_default(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else str(v)


def compare_plain(ref: dict[str, dict], other: dict[str, dict], threshold: float) -> dict:
    """Two plain_path outputs on the same files, every query (precision_proxy.compare)."""
    stacked = lambda d: (np.stack([d[n]["scores"] for n in ref]), np.stack([d[n]["emb"] for n in ref]))  # noqa: E731
    c = compare(stacked(ref), stacked(other), threshold)
    return {"images": len(ref), **c, "kept_flips": c["flips"], "kept_flips_allowed": c["flips_allowed"]}


def tf32_flags() -> dict:
    return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}


def cuda_sync(device: str) -> None:
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class Suite:
    def __init__(self, args: argparse.Namespace):
        self.args, self.t0 = args, time.perf_counter()
        self.device = args.device
        self.ref: dict[str, dict] | None = None  # the device fp32 plain path, per file name
        self.threshold = 0.5                     # replaced by the reference's pick_threshold
        self.data: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "steps": {}, "configs": []}
        args.out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        for name, text in (("gpu_suite.json", json.dumps(self.data, indent=1, default=_json_default)),
                           ("gpu_suite.md", self.markdown())):
            tmp = self.args.out / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.args.out / name)

    def step(self, name: str, fn: Callable[[], dict]) -> dict:
        log.info("[%6.1f s] %s ...", self.elapsed(), name)
        t = time.perf_counter()
        try:
            entry = {"status": "ok", **fn()}
        except Exception as exc:  # recorded, and the suite goes on
            entry = {"status": "error", "error": error_info(exc)}
            log.error("%s failed: %s: %s", name, type(exc).__name__, exc)
        entry["seconds"] = round(time.perf_counter() - t, 2)
        self.data["steps"][name] = entry
        self.save()
        return entry

    # ------------------------------------------------------------------ the steps
    def environment(self) -> dict:
        cuda = torch.cuda.is_available()
        env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": cuda,
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "decode_workers_policy": POLICY.decode_workers(device=self.device), "gpu_batch_policy": POLICY.gpu_batch_size,
               "tf32_flags": tf32_flags(), "cudnn": torch.backends.cudnn.version()}
        if cuda:
            props = torch.cuda.get_device_properties(0)
            env.update(device_name=torch.cuda.get_device_name(0),
                       capability=list(torch.cuda.get_device_capability(0)),
                       bf16_supported=torch.cuda.is_bf16_supported(), gpu_memory_mib=round(props.total_memory / MiB))
        return env

    def dataset(self) -> dict:
        w = self.args.workdir
        shutil.rmtree(w, ignore_errors=True)
        t = time.perf_counter()
        self.paths = write_photo_dataset(w / "data", self.args.images, self.args.seed)
        t_data = time.perf_counter() - t
        self.ckpt = w / "detr-suite-weights.pth"
        self.sd = seeded_state_dict(self.args.seed)
        torch.save({"model": self.sd}, self.ckpt)
        return {"images": len(self.paths), "size": list(FACET_SIZE), "write_s": round(t_data, 2),
                "kB_per_image": round(sum(p.stat().st_size for p in self.paths) / len(self.paths) / 1e3, 1)}

    def decode(self) -> dict:
        policy, cores = POLICY.decode_workers(device=self.device), os.cpu_count() or 1
        counts = sorted({2 ** i for i in range(policy.bit_length()) if 2 ** i <= policy} | {policy, cores})
        rows = []
        for workers, draft in [(n, False) for n in counts] + [(policy, True)]:
            load = lambda p: load_prepared(p, self.args.min_size, self.args.max_size, draft=draft)  # noqa: E731
            t = time.perf_counter()
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(load, self.paths):
                    pass
            sec = time.perf_counter() - t
            rows.append({"workers": workers, "draft": draft, "policy": workers == policy,
                         "images_per_s": round(len(self.paths) / sec, 1)})
            log.info("  decode %d workers%s: %.1f img/s", workers, " (draft)" if draft else "",
                     rows[-1]["images_per_s"])
        return {"rows": rows, "policy_workers": policy}

    def device_decode(self) -> dict:
        """The alternative the issue names: ``torchvision.io.decode_jpeg`` on the device (nvJPEG on a
        GPU) in batches, then the resize as an antialiased bilinear ``interpolate``; images/s, and how
        far its uint8 pixels are from ``load_prepared``'s (libjpeg-turbo + PIL), which the runs use.
        torchvision 0.29 deprecates its image decoders (for TorchCodec) and warns on every call."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
            return self._device_decode()

    def _device_decode(self) -> dict:
        import torch.nn.functional as F
        import torchvision
        from torchvision.io import decode_jpeg, read_file

        from extractor.preprocess import target_size

        def prepare(batch: list[Path]) -> list[torch.Tensor]:
            decoded = decode_jpeg([read_file(str(p)) for p in batch], device=self.device)
            out = []
            for img in decoded:  # [3, H, W] uint8
                w, h = target_size(img.shape[2], img.shape[1], self.args.min_size, self.args.max_size)
                x = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", antialias=True,
                                  align_corners=False)
                out.append(x[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0))
            return out

        rows = []
        for batch in sorted({1, 16, 32, self.args.batches[-1]}):
            prepare(self.paths[:batch])  # warm-up: nvJPEG handles and kernels
            cuda_sync(self.device)
            t = time.perf_counter()
            for i in range(0, len(self.paths), batch):
                prepare(self.paths[i:i + batch])
            cuda_sync(self.device)
            rows.append({"batch": batch, "images_per_s": round(len(self.paths) / (time.perf_counter() - t), 1)})
            log.info("  device decode batch %d: %.1f img/s", batch, rows[-1]["images_per_s"])
        sample = self.paths[:min(8, len(self.paths))]
        diffs = []
        for path, got in zip(sample, prepare(sample)):
            want = load_prepared(path, self.args.min_size, self.args.max_size, draft=False).pixels
            diffs.append(np.abs(got.cpu().numpy().astype(np.int16) - want.astype(np.int16)))
        allpix = np.concatenate([d.ravel() for d in diffs])
        return {"torchvision": torchvision.__version__, "rows": rows, "vs_pil_images": len(sample), "vs_pil_max_abs": int(allpix.max()),
                "vs_pil_mean_abs": round(float(allpix.mean()), 3),
                "vs_pil_share_over_2": round(float((allpix > 2).mean()), 5)}

    def _plain(self, device: str, paths: list[Path]) -> tuple[float, dict[str, dict]]:
        """extract_bench's plain path (strict float32 on CUDA too) after a one-image warm-up."""
        sizes = (self.args.min_size, self.args.max_size)
        model = eb.build_and_load(self.sd).to(device)
        eb.plain_path(model, paths[:1], device, *sizes)  # warm-up: CUDA context, cuDNN / oneDNN, allocator
        return eb.plain_path(model, paths, device, *sizes)

    def reference(self) -> dict:
        sec, ref = self._plain(self.device, self.paths)
        cuda_sync(self.device)  # the reference model is gone: free its memory before the configurations
        self.ref, self.threshold = ref, eb.pick_threshold(ref)
        return {"threshold": self.threshold, "images": len(ref), "plain_s": round(sec, 2),
                "images_per_s": round(len(ref) / sec, 2)}

    def cpu_agreement(self) -> dict:
        paths = self.paths[:self.args.cpu_images]
        sec, cpu = self._plain("cpu", paths)
        return {"cpu_s_per_image": round(sec / len(paths), 3),
                **compare_plain(cpu, {p.name: self.ref[p.name] for p in paths}, self.threshold)}

    def config(self, precision: str, batch: int) -> dict:
        a, w = self.args, self.args.workdir
        common = dict(data=w / "data", checkpoint=str(self.ckpt), threshold=self.threshold, device=self.device,
                      precision=precision, batch_size=batch, min_size=a.min_size, max_size=a.max_size, overwrite=True)
        run_extraction(ExtractSettings(out=w / "warm", limit=2 * batch, **common))
        shutil.rmtree(w / "warm", ignore_errors=True)
        cuda = self.device.startswith("cuda")
        cuda_sync(self.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out = w / f"run-{precision}-b{batch}"
        t = time.perf_counter()
        try:
            result = run_extraction(ExtractSettings(out=out, **common))
            sec = time.perf_counter() - t
            mem = ((round(torch.cuda.max_memory_allocated() / MiB), round(torch.cuda.max_memory_reserved() / MiB))
                   if cuda else (None, None))
            tm, pre = result.manifest["timings"], result.manifest["preprocessing"]
            n = tm["images_this_session"]
            agree = None
            if self.ref is not None:
                agree = eb.agreement(self.ref, out, self.threshold, rundir.open_run(out).persons())
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return {"seconds": round(sec, 2), "images": n, "images_per_s": round(n / sec, 2),
                "steady_images_per_s": steady(tm, batch), "extract_s": tm["extract_s"],
                "gpu_mib_allocated": mem[0], "gpu_mib_reserved": mem[1],
                "manifest_precision": pre.get("precision"), "manifest_batch": pre.get("batch_size"),
                "manifest_device": pre.get("device"), "tf32_flags_after": tf32_flags(), "agreement": agree}

    def configs(self) -> None:
        for precision in self.args.precisions:
            for batch in self.args.batches:
                entry: dict[str, Any] = {"precision": precision, "batch": batch}
                if self.elapsed() > self.args.budget_s:
                    entry.update(status="skipped", reason="budget")
                else:
                    log.info("[%6.1f s] %s batch %d ...", self.elapsed(), precision, batch)
                    try:
                        entry.update(status="ok", **self.config(precision, batch))
                        log.info("  %.1f img/s end to end, steady %s", entry["images_per_s"],
                                 entry["steady_images_per_s"])
                    except Exception as exc:
                        entry.update(status="error", error=error_info(exc))
                        log.error("  failed: %s: %s", type(exc).__name__, exc)
                    cuda_sync(self.device)
                self.data["configs"].append(entry)
                self.save()

    def whole(self) -> dict:
        a, out = self.args, self.args.workdir / "whole"
        extra = ["--device", self.device]
        if (a.min_size, a.max_size) != (800, 1333):
            extra += ["--min-size", str(a.min_size), "--max-size", str(a.max_size)]
        t = run_fast(self.ckpt, a.workdir / "data", out, self.threshold, len(self.paths), tuple(extra))
        m = rundir.read_manifest(out)
        tm, pre = m["timings"], m["preprocessing"]
        shutil.rmtree(out, ignore_errors=True)
        return {"wall_s": round(t.whole_s, 2), "fixed_s": round(t.fixed_s, 2),
                "images_per_s": round(tm["images_this_session"] / t.whole_s, 2),
                "steady_images_per_s": steady(tm, pre["batch_size"]), "precision": pre["precision"],
                "batch": pre["batch_size"], "device": pre["device"]}

    # ------------------------------------------------------------------ the report
    def markdown(self) -> str:
        s, configs = self.data["steps"], self.data["configs"]
        lines = [f"# GPU suite ({self.device}, {self.data.get('elapsed_s', 0)} s)", ""]
        for name, e in s.items():
            if e["status"] != "ok":
                err = e.get("error", {})
                lines.append(f"- {name}: **{e['status']}** {e.get('reason', '')}{err.get('type', '')} "
                             f"{err.get('message', '')[:300]}")
        lines += table("Environment", ["key", "value"],
                       [[k, v] for k, v in s.get("environment", {}).items() if k not in ("status", "seconds")])
        for k in ("dataset", "reference"):
            if s.get(k, {}).get("status") == "ok":
                lines.append(f"\n{k}: " + ", ".join(f"{a}={b}" for a, b in s[k].items() if a != "status"))
        best = max((c.get("steady_images_per_s") or 0 for c in configs if c["status"] == "ok"), default=0)
        if s.get("decode", {}).get("status") == "ok":
            rows = s["decode"]["rows"]
            lines += table("Decode (load_prepared over all images, thread pool)",
                           ["workers", "draft", "policy", "images/s"],
                           [[r["workers"], r["draft"], "yes" if r["policy"] else "", r["images_per_s"]] for r in rows])
            pol = next(r["images_per_s"] for r in rows if r["policy"] and not r["draft"])
            lines.append(f"\nDecode at the policy's {s['decode']['policy_workers']} workers: {pol} img/s; best "
                         f"model steady rate: {best} img/s -> decoding keeps up: {pol >= best}")
        if s.get("device_decode", {}).get("status") == "ok":
            d = s["device_decode"]
            lines += table("Decode on the device (torchvision.io.decode_jpeg + antialiased bilinear interpolate)",
                           ["batch", "images/s"], [[r["batch"], r["images_per_s"]] for r in d["rows"]])
            lines.append(f"\nIts uint8 pixels against load_prepared's over {d['vs_pil_images']} images: max |diff| "
                         f"{d['vs_pil_max_abs']}, mean {d['vs_pil_mean_abs']}, share over 2: {d['vs_pil_share_over_2']}")
        if s.get("cpu_agreement", {}).get("status") == "ok":
            c = s["cpu_agreement"]
            lines += table("Agreement: device fp32 (plain, TF32 off) vs CPU fp32 (plain)",
                           ["images", "queries", "cosine min", "cosine mean", "max score diff", "kept",
                            "flips (allowed?)"],
                           [[c["images"], c["queries"], fmt(c["cos_min"], 6), fmt(c["cos_mean"], 6),
                             f"{c['score_diff_max']:.2e}", c["kept"],
                             f"{c['kept_flips']} ({c['kept_flips_allowed']})"]])
        rows = []
        for c in configs:
            ag, err = c.get("agreement") or {}, (c.get("error") or {}).get("message", "")
            rows.append([c["precision"], c["batch"], f"{c['status']} {c.get('reason', '')}{err[:120]}".strip(),
                         fmt(c.get("images_per_s")), fmt(c.get("steady_images_per_s")),
                         f"{fmt(c.get('gpu_mib_allocated'))} / {fmt(c.get('gpu_mib_reserved'))}",
                         fmt(ag.get("cos_min"), 6), fmt(ag.get("score_diff_max"), 4),
                         f"{fmt(ag.get('kept_flips'))} ({fmt(ag.get('kept_flips_allowed'))})"])
        lines += table("Extraction: precision x batch (agreement with the device fp32 reference)",
                       ["precision", "batch", "status", "images/s end to end", "steady images/s",
                        "GPU MiB allocated / reserved", "cosine min", "max score diff", "flips (allowed?)"], rows)
        w = s.get("whole_process")
        if w is not None:
            lines += table("Whole process (`python -m extractor run`, defaults)",
                           ["status", "wall s", "images/s (wall)", "steady images/s", "precision", "batch"],
                           [[w["status"], fmt(w.get("wall_s")), fmt(w.get("images_per_s")),
                             fmt(w.get("steady_images_per_s")), fmt(w.get("precision")), fmt(w.get("batch"))]])
        return "\n".join(lines) + "\n"


def fmt(v: Any, places: int = 1) -> str:
    return "-" if v is None else f"{v:.{places}f}" if isinstance(v, float) else str(v)


def table(title: str, header: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: str(v).replace("|", "/").replace("\n", " ")  # noqa: E731
    return ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows)]


def steady(timings: dict, batch: int) -> float | None:
    """Images/s between the first and the last batch stamp (the first stamp comes after a whole batch)."""
    n, span = timings["images_this_session"], (timings["last_image_unix"] or 0) - (timings["first_image_unix"] or 0)
    return round((n - batch) / span, 2) if n > batch and span > 0 else None


def main(argv: list[str] | None = None) -> int:
    csv = lambda t: lambda v: [t(x) for x in v.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where gpu_suite.json and gpu_suite.md go")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--images", type=int, default=256, help="FACET-sized images (default 256)")
    p.add_argument("--batches", type=csv(int), default=[1, 8, 16, 32], help="default 1,8,16,32")
    p.add_argument("--precisions", type=csv(str), default=["fp32", "tf32", "bf16"], help="default fp32,tf32,bf16")
    p.add_argument("--cpu-images", type=int, default=8, help="images of the CPU reference (default 8)")
    p.add_argument("--budget-s", type=float, default=480, help="no configuration starts after this (default 480)")
    p.add_argument("--min-size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gpu_suite"), help="scratch (deleted at start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-whole-process", action="store_true", help="skip the `python -m extractor run` process")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)

    suite = Suite(args)
    suite.step("environment", suite.environment)
    if suite.step("dataset", suite.dataset)["status"] != "ok":
        print(suite.markdown())
        return 1
    suite.step("decode", suite.decode)
    suite.step("device_decode", suite.device_decode)
    # Without a reference the speed is still measured (threshold 0.5, no agreement).
    fatal = suite.step("reference", suite.reference)["status"] != "ok"
    if not fatal:
        fatal = suite.step("cpu_agreement", suite.cpu_agreement)["status"] != "ok"
    suite.configs()
    if args.no_whole_process or suite.elapsed() > args.budget_s:
        suite.data["steps"]["whole_process"] = {"status": "skipped",
                                                "reason": "--no-whole-process" if args.no_whole_process else "budget"}
        suite.save()
    else:
        suite.step("whole_process", suite.whole)
    shutil.rmtree(args.workdir, ignore_errors=True)
    print(suite.markdown(), flush=True)
    return 1 if fatal else 0


if __name__ == "__main__":
    sys.exit(main())
