"""The app in a real headless Chromium: every page, an upload, a CSV download, screenshots.

Skips only when Chromium cannot start here (binary missing or launch failure), saying why.
Screenshots go to tests/artifacts/.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from streamlit_server import free_port, streamlit_server

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
PAGES = {"runs": "Runs", "overview": "Overview", "similar": "Find similar persons", "map": "Embedding map",
         "groups": "Group comparison", "audit": "Detection audit"}

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def ui_server(ui_demo, tmp_path_factory):
    log = tmp_path_factory.mktemp("ui_server") / "streamlit.log"
    with streamlit_server(free_port(), ui_demo.runs_dir, log, "--server.address", "127.0.0.1",
                          "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none") as base:
        yield base


@pytest.fixture(scope="module")
def ui_browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (make browser-deps installs Debian's)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - a test extra
        pytest.skip(f"playwright is not installed: {exc}")
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    except Exception as exc:
        pw.stop()
        pytest.skip(f"Chromium failed to launch: {str(exc).splitlines()[0]}")
    try:
        yield browser
    finally:
        browser.close()
        pw.stop()


def _settled(page, title: str, timeout: float = 90_000) -> None:
    """The page's title is shown and the script has stopped running."""
    page.get_by_role("heading", name=title, level=1).wait_for(timeout=timeout)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout)
    page.wait_for_timeout(800)  # charts and data grids draw after the script finishes


def _lasso(page, plot) -> None:
    """Draw a rectangle with the map's lasso (its default drag mode) over most of the plot."""
    box = plot.bounding_box()
    x0, y0, w, h = box["x"], box["y"], box["width"], box["height"]
    page.mouse.move(x0 + 0.1 * w, y0 + 0.15 * h)  # inside the plotting area, off the axes
    page.mouse.down()
    for fx, fy in ((0.85, 0.15), (0.85, 0.95), (0.1, 0.95), (0.1, 0.16)):
        page.mouse.move(x0 + fx * w, y0 + fy * h, steps=8)
    page.mouse.up()


def _astronaut(tmp_path: Path) -> Path:
    from PIL import Image
    from skimage.data import astronaut
    path = tmp_path / "astronaut.png"
    Image.fromarray(astronaut()).save(path)
    return path


def test_every_page_upload_and_download(ui_server, ui_browser, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = ui_browser.new_context(viewport={"width": 1500, "height": 2400}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"{ui_server}/?run=demo")
        _settled(page, "Runs")
        assert page.get_by_text("Untrained weights.").first.is_visible()
        page.screenshot(path=str(ARTIFACTS / "runs.png"))

        for slug in ("overview", "map", "audit", "groups"):
            page.get_by_role("link", name=PAGES[slug]).first.click()  # the sidebar navigation
            _settled(page, PAGES[slug])
            assert "run=demo" in page.url, page.url
            if slug == "audit":  # one run here: the page says what it needs (AppTest covers a full audit)
                page.get_by_text(re.compile("The audit compares runs of one dataset|Pick at least two runs")) \
                    .first.wait_for(timeout=60_000)
            else:
                page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)  # plotly's bundle loads lazily
            assert page.locator("[data-testid='stException']").count() == 0
            page.screenshot(path=str(ARTIFACTS / f"{slug}.png"))
            if slug == "map":  # a lasso over the map selects persons: their crops and group mix appear
                _lasso(page, page.locator(".js-plotly-plot").first)
                page.get_by_text(" selected", exact=False).first.wait_for(timeout=60_000)
                _settled(page, PAGES[slug])
                # crops are fetched after the script ends: under load they arrive later than the text
                page.locator("[data-testid='stImage'] img").first.wait_for(timeout=60_000)
                page.screenshot(path=str(ARTIFACTS / "map-selection.png"))

        with page.expect_download() as download:
            page.get_by_role("button", name="recall (CSV)").click()
        assert Path(download.value.path()).read_bytes().startswith(b"group_a,group_b,metric,value")

        page.get_by_role("link", name=PAGES["similar"]).first.click()
        _settled(page, PAGES["similar"])
        page.locator("input[type=file]").set_input_files(str(_astronaut(tmp_path)))
        page.get_by_text("Nearest persons in the index").wait_for(timeout=120_000)
        _settled(page, PAGES["similar"])
        assert page.locator("[data-testid='stImage'] img").count() >= 12
        assert page.locator("[data-testid='stException']").count() == 0
        # A click on the photo shows the encoder's self-attention from that feature cell.
        photo = page.locator(".js-plotly-plot").first.bounding_box()
        page.mouse.click(photo["x"] + photo["width"] / 2, photo["y"] + photo["height"] / 2)
        page.get_by_text("Encoder self-attention from cell").wait_for(timeout=60_000)
        _settled(page, PAGES["similar"])
        page.screenshot(path=str(ARTIFACTS / "similar.png"))
        with page.expect_download() as download:
            page.get_by_role("button", name="Neighbours (CSV)").click()
        data = Path(download.value.path()).read_bytes()
        assert data.startswith(b"rank,similarity,det_id") and data.count(b"\n") == 13
    finally:
        context.close()
    assert not errors, errors
