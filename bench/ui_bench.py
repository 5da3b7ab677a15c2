"""How fast the explorer answers on a 50k-row run: a plain script that prints a table.

    .venv/bin/python bench/ui_bench.py [--rows 50000] [--dir /tmp/ui-bench] [--reps 5] [--no-browser]

Measures, on a synthetic run (``index.write_synthetic_run`` + ``index.build_index``):
- page switches with Streamlit's AppTest (script time) after a first, cold visit of each page;
- page switches in headless Chromium (sidebar click -> title, script done, first chart drawn and
  the main thread free again);
- the query by photo: the DETR forward alone against the whole path (decode, forward, ranked,
  filtered search, gallery table, composition), and the overhead between them;
- a cached projection back on screen: cache load + metadata join + figure + its JSON, and the
  AppTest rerun of the map page with a warm cache; the map's payload (WebGL traces).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import io  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import index  # noqa: E402
from ui import figures, gallery, photos, projections as pj  # noqa: E402

PAGES = {"runs": "Runs", "overview": "Overview", "similar": "Find similar persons", "map": "Embedding map",
         "groups": "Group comparison"}
ROWS: list[tuple[str, str, str]] = []


def report(name: str, value: str, target: str = "") -> None:
    ROWS.append((name, value, target))
    print(f"  {name}: {value}", flush=True)


def timed(fn, reps: int) -> tuple[float, object]:
    """Median seconds of ``reps`` calls, and the last result."""
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def ms(s: float) -> str:
    return f"{s * 1000:.0f} ms"


def make_run(root: Path, rows: int) -> Path:
    run_dir = root / "runs" / f"synthetic-{rows}"
    if not (run_dir / "index" / "manifest.json").is_file():
        print(f"writing a synthetic run of {rows} rows to {run_dir}", flush=True)
        index.write_synthetic_run(run_dir, rows)
        index.build_index(run_dir)
    return run_dir


def astronaut_png() -> bytes:
    from skimage.data import astronaut
    buf = io.BytesIO()
    Image.fromarray(astronaut()).save(buf, "PNG")
    return buf.getvalue()


def bench_query(run: index.Run, reps: int) -> None:
    from extractor.checkpoints import build_model
    from extractor.infer import Detector
    from ui.app import DetectorSpec

    spec = DetectorSpec.of(run.manifest)  # the synthetic run records no checkpoint: seeded weights
    model, _ = build_model(spec.checkpoint, seed=spec.seed)
    detector = Detector(model, min_size=spec.min_size, max_size=spec.max_size, precision=spec.precision)
    data = astronaut_png()
    img = photos.decode_photo(data)
    detector.detect(img)  # warm-up (allocations, kernels)
    forward, _ = timed(lambda: detector.detect(img, return_attention=True), reps)
    where = gallery.build_where("persons", bands=["darker", "medium"], lighting=["dimly_lit", "well_lit"])
    by = "mst_band"

    run.search(np.ones(run.dim, np.float32), 1, where)  # the filter's mask, as after the first query
    base = gallery.base_rates(run.meta, run.mask(where), by)
    stages: dict[str, list[float]] = {k: [] for k in ("decode", "forward", "ranked", "search", "table",
                                                       "composition", "total")}
    table = None
    for _ in range(reps):
        t0 = time.perf_counter()
        image = photos.decode_photo(data, "astronaut.png")
        t1 = time.perf_counter()
        det = detector.detect(image, return_attention=True)
        t2 = time.perf_counter()
        q = int(det.ranked(0.7, fallback=5)[0])
        t3 = time.perf_counter()
        D, I = run.search(det.embeddings[q], 12, where)
        t4 = time.perf_counter()
        table = gallery.neighbour_table(run.meta, D[0], I[0])
        t5 = time.perf_counter()
        gallery.composition(run.meta, I[0], by, base)  # base rates: cached per filter in the app
        t6 = time.perf_counter()
        for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t6 - t0)):
            stages[k].append(v)
    med = {k: statistics.median(v) for k, v in stages.items()}
    overhead = statistics.median([t - f for t, f in zip(stages["total"], stages["forward"])])
    report(f"DETR forward alone (astronaut 512x512, seeded weights, {spec.min_size}-{spec.max_size} px, "
           f"{detector.precision})", ms(forward))
    report("query by photo, whole path (median)", ms(med["total"]), "<= one forward + 300 ms")
    report("  of which the forward inside it", ms(med["forward"]))
    report("  overhead: decode + ranked + filtered search + table + composition", ms(overhead), "<= 300 ms")
    for k in ("decode", "ranked", "search", "table", "composition"):
        report(f"    {k}", f"{med[k] * 1000:.1f} ms")
    # A filter the session has not used yet: its mask and base rates are computed once, then cached.
    fresh = gallery.build_where("all", bands=["lighter"], lighting=["overexposed"])
    t = time.perf_counter()
    run.search(det.embeddings[q], 12, fresh)
    gallery.base_rates(run.meta, run.mask(fresh), by)
    report("  + first use of a new filter (mask + base rates, then cached)", ms(time.perf_counter() - t))
    assert table is not None and len(table) == 12


def bench_projection(run: index.Run, reps: int) -> None:
    params = pj.ProjectionParams()
    t = time.perf_counter()
    proj, hit = pj.load_or_compute(run, "pca", "all", params)
    report(f"PCA of all {run.n} rows ({'cache hit' if hit else 'computed and cached'})", ms(time.perf_counter() - t))
    key = proj.info["key"]

    def back_on_screen():
        p = pj.load_cached(run.run_dir, key)
        table = pj.map_table(run.meta, p.frame)
        fig = figures.embedding_scatter(table, "mst_mode")
        return fig.to_json()  # what st.plotly_chart serialises

    seconds, payload = timed(back_on_screen, reps)
    report("cached projection back on screen (load + join + figure + JSON)", ms(seconds), "<= 1 s")
    fig = figures.embedding_scatter(pj.map_table(run.meta, proj.frame), "mst_mode")
    kinds = {type(t).__name__ for t in fig.data}
    report("map payload", f"{len(payload) / 2**20:.1f} MB JSON, {len(fig.data)} traces ({', '.join(sorted(kinds))})")


def bench_apptest(runs_dir: Path, run_name: str, reps: int) -> None:
    from streamlit.testing.v1 import AppTest

    os.environ["RUNS_DIR"] = str(runs_dir)
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=600)
    at.query_params["run"] = run_name
    t = time.perf_counter()
    at.run()
    report("AppTest first load (Runs page, opens the run)", ms(time.perf_counter() - t))
    for slug in ("overview", "similar", "map", "groups"):
        t = time.perf_counter()
        at.switch_page(f"ui/pages/{slug}.py").run()
        assert not at.exception, [e.value for e in at.exception]
        report(f"AppTest first visit of {slug} (cold caches)", ms(time.perf_counter() - t))
    worst = {}
    for _ in range(reps):
        for slug in ("runs", "overview", "similar", "map", "groups"):
            t = time.perf_counter()
            at.switch_page(f"ui/pages/{slug}.py").run()
            worst[slug] = max(worst.get(slug, 0.0), time.perf_counter() - t)
    for slug, s in worst.items():
        report(f"AppTest page switch to {slug} (worst of {reps})", ms(s), "<= 2 s")
    at.switch_page("ui/pages/map.py").run()
    seconds, _ = timed(lambda: at.run(), reps)
    report("AppTest rerun of the map page, warm projection cache", ms(seconds), "<= 1 s")
    at.switch_page("ui/pages/similar.py").run()
    data = astronaut_png()
    t = time.perf_counter()
    at.file_uploader(key="sim_upload").set_value(("astronaut.png", data, "image/png")).run()
    report("AppTest upload -> gallery (forward included)", ms(time.perf_counter() - t))
    seconds, _ = timed(lambda: at.slider(key="sim_k").set_value(int(at.slider(key="sim_k").value) % 20 + 5).run(),
                       reps)
    report("AppTest rerun after changing k (detections cached, no forward)", ms(seconds))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_browser(runs_dir: Path, run_name: str, reps: int) -> None:
    chromium = Path("/usr/bin/chromium")
    if not chromium.is_file():
        report("browser page switches", f"skipped: no {chromium}")
        return
    from playwright.sync_api import sync_playwright

    port = _free_port()
    env = {**os.environ, "RUNS_DIR": str(runs_dir), "OMP_WAIT_POLICY": "PASSIVE"}
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "streamlit_app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                if urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(chromium), args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
            page.goto(f"{base}/?run={run_name}")

            def visit(slug: str) -> float:
                t = time.perf_counter()
                page.get_by_role("link", name=PAGES[slug]).first.click()
                page.get_by_role("heading", name=PAGES[slug], level=1).wait_for(timeout=600_000)
                page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                                       timeout=600_000)
                if slug not in ("runs", "similar"):  # pages with charts: until the first one is drawn
                    page.wait_for_function("() => { const p = document.querySelector('.js-plotly-plot');"
                                           " return p && p._fullLayout && !p._transitioning; }", timeout=600_000)
                    # two animation frames: the main thread is free again, so the WebGL draw is done
                    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
                return time.perf_counter() - t

            page.get_by_role("heading", name="Runs", level=1).wait_for(timeout=600_000)
            for slug in ("overview", "similar", "map", "groups"):
                report(f"browser first visit of {slug} (cold)", ms(visit(slug)))
            times: dict[str, list[float]] = {}
            for _ in range(reps):
                for slug in ("runs", "overview", "similar", "map", "groups"):
                    times.setdefault(slug, []).append(visit(slug))
            for slug, ts in times.items():
                report(f"browser page switch to {slug}: click -> drawn (median / worst of {reps})",
                       f"{ms(statistics.median(ts))} / {ms(max(ts))}", "<= 2 s")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--dir", type=Path, default=Path("/tmp/ui-bench"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-browser", action="store_true")
    args = p.parse_args()
    run_dir = make_run(args.dir, args.rows)
    run = index.load_run(run_dir)
    print(f"run {run_dir}: {run.n} rows, {run.kind} index; {os.cpu_count()} CPUs", flush=True)
    bench_query(run, args.reps)
    bench_projection(run, args.reps)
    bench_apptest(run_dir.parent, run_dir.name, args.reps)
    if not args.no_browser:
        bench_browser(run_dir.parent, run_dir.name, args.reps)
    width = max(len(r[0]) for r in ROWS)
    print(f"\n{'measurement'.ljust(width)}  {'value':>22}  target")
    for name, value, target in ROWS:
        print(f"{name.ljust(width)}  {value:>22}  {target}")


if __name__ == "__main__":
    main()
