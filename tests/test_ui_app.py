"""Every page of the app through Streamlit's AppTest, against a demo run built for the tests."""
from __future__ import annotations

import functools
import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from ui import app as ui_app  # noqa: E402
from ui import runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("overview", "similar", "map", "groups")


def _app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=180)
    at.run()
    if page:
        at.switch_page(f"ui/pages/{page}.py").run()
    _no_exception(at)
    return at


def _no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _rerun_until(at: AppTest, done, what: str, timeout: float = 180) -> None:
    """Run the script again until ``done(at)``: background jobs finish between runs."""
    deadline = time.monotonic() + timeout
    while not done(at):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.3)
        at.run()
        _no_exception(at)


def _charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def _astronaut_png() -> bytes:
    from skimage.data import astronaut
    buf = io.BytesIO()
    Image.fromarray(astronaut()).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("page", ("runs",) + PAGES)
def test_every_page_renders_with_the_untrained_banner(ui_runs_env, page):
    at = _app(None if page == "runs" else page)
    assert at.title[0].value
    assert any("Untrained weights" in w.value for w in at.warning)
    assert at.session_state[ui_app.RUN_KEY] == "demo"
    assert at.query_params.get("run") == "demo"


def test_runs_page_opens_a_run(ui_runs_env):
    at = _app()
    assert "demo" in at.dataframe[0].value["run"].tolist()
    at.button(key="open-demo").click().run()
    _no_exception(at)
    assert at.title[0].value == "Overview"


def test_run_from_the_url_and_an_unknown_name(ui_runs_env):
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=180)
    at.query_params["run"] = "nope"
    at.run()
    _no_exception(at)
    assert any("no run named 'nope'" in w.value for w in at.warning)
    assert at.session_state[ui_app.RUN_KEY] == "demo"


def test_without_runs_the_demo_is_one_click_away(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(runs, "DemoSettings", functools.partial(runs.DemoSettings, n_images=3, min_size=128,
                                                                max_size=160, shard_size=1))
    at = _app()
    assert any("python -m extractor run" in m.value for m in at.markdown)
    at.button[0].click().run()
    _no_exception(at)
    _rerun_until(at, lambda a: a.title[0].value == "Overview", "the demo to be built and opened")
    assert (tmp_path / "runs" / "demo" / "index" / "manifest.json").is_file()
    assert (tmp_path / "data" / "demo" / "annotations.csv").is_file()
    assert at.session_state[ui_app.RUN_KEY] == "demo"


def test_overview_grouping_drives_the_charts(ui_runs_env):
    at = _app("overview")
    assert any("Checkpoint" in m.value and "untrained" in m.value for m in at.markdown)
    before = _charts(at)
    assert before[1]["data"][0]["type"] == "bar" and "error_y" in before[1]["data"][0]
    at.selectbox(key="overview_by").set_value("mst_mode").run()
    _no_exception(at)
    after = _charts(at)
    assert len(after[0]["data"][0]["x"]) == 11 != len(before[0]["data"][0]["x"])


def test_overview_detection_metric_switches_protocol(ui_runs_env):
    at = _app("overview")
    assert at.selectbox(key="overview_metric").value == "ar"
    assert any("COCO AR@100" in c.value for c in at.caption)
    at.selectbox(key="overview_metric").set_value("recall").run()
    _no_exception(at)
    assert any("kept detection" in c.value for c in at.caption)
    assert _charts(at)[1]["data"][0]["x"][-1].startswith("all")


def test_group_comparison_grouping_changes_the_matrix(ui_runs_env):
    at = _app("groups")
    assert at.selectbox(key="grp_population").value == "persons"  # the untrained demo matches nobody
    labels = _charts(at)[0]["data"][0]["y"]
    assert labels[0].startswith("lighter (n=")
    at.selectbox(key="grp_by").set_value("mst_mode").run()
    _no_exception(at)
    heat = _charts(at)[0]["data"][0]
    assert heat["type"] == "heatmap" and heat["y"][0].startswith("1 (n=") and len(heat["y"]) > len(labels)
    assert any("left out of the charts" in c.value for c in at.caption)  # tones nobody in the demo has
    assert {d.label for d in at.get("download_button")} == {"similarity (CSV)", "neighbours (CSV)", "recall (CSV)"}
    at.selectbox(key="grp_population").set_value("detections").run()
    _no_exception(at)


def test_group_comparison_cells_and_where(ui_runs_env):
    at = _app("groups")
    at.selectbox(key="grp_by2").set_value("lighting").run()
    _no_exception(at)
    titles = [c["layout"]["title"]["text"] for c in _charts(at)]
    assert any(t.startswith("recall by mst_band and lighting") for t in titles)
    cells = next(c for c in _charts(at) if c["layout"]["title"]["text"].startswith("recall by"))["data"][0]
    assert cells["type"] == "heatmap" and "design effect" in cells["hovertemplate"]
    assert any("Pairwise disparities" in e.label for e in at.expander)
    at.text_input(key="grp_where").set_value("class1 == 'nobody'").run()
    _no_exception(at)
    at.text_input(key="grp_where").set_value("no_such_column > 1").run()
    assert any("unknown column" in e.value for e in at.error)


def test_similar_from_a_run_image_and_filters(ui_runs_env):
    at = _app("similar")
    at.radio(key="sim_source").set_value("An image of this run").run()
    _no_exception(at)
    gallery = at.image[0]
    assert len(gallery.value) == 12 and "sim " in gallery.captions[0]
    table = at.dataframe[0].value
    at.multiselect(key="sim_bands").set_value(["darker"]).run()
    _no_exception(at)
    filtered = at.dataframe[0].value
    assert set(filtered["mst_band"]) == {"darker"} and filtered["det_id"].tolist() != table["det_id"].tolist()
    assert any("mst_band in ['darker']" in c.value for c in at.caption)
    # No person passes a threshold of 1: the page says so and still leads somewhere.
    at.slider(key="sim_threshold").set_value(1.0).run()
    _no_exception(at)
    assert any("No person reaches" in w.value for w in at.warning)
    assert len(at.image[0].value) >= 1


def test_similar_from_an_upload(ui_runs_env):
    at = _app("similar")
    at.file_uploader(key="sim_upload").set_value(("astronaut.png", _astronaut_png(), "image/png")).run()
    _no_exception(at)
    photo = _charts(at)[0]
    assert photo["data"][0]["type"] == "image" and len(photo["layout"]["shapes"]) >= 1
    assert photo["data"][-1]["type"] == "scatter" and len(photo["data"][-1]["customdata"]) > 1  # clickable cells
    assert len(at.image[0].value) == 12
    assert any(d.label == "Neighbours (CSV)" for d in at.get("download_button"))
    at.slider(key="sim_k").set_value(5).run()
    assert len(at.image[0].value) == 5
    # A visit to another page keeps the photo and the choices.
    at.switch_page("ui/pages/map.py").run()
    at.switch_page("ui/pages/similar.py").run()
    _no_exception(at)
    assert any("your last upload" in c.value for c in at.caption)
    assert len(at.image[0].value) == 5
    at.file_uploader(key="sim_upload").set_value(("notes.txt", b"meeting at noon", "text/plain")).run()
    _no_exception(at)
    assert any("not an image" in e.value for e in at.error)


def test_embedding_map_pca_colours_and_tsne(ui_runs_env):
    at = _app("map")
    _rerun_until(at, lambda a: bool(_charts(a)), "the PCA map")  # a background job, quick unless the machine is busy
    fig = _charts(at)[0]
    assert {t["type"] for t in fig["data"]} == {"scattergl"}
    names = [t["name"] for t in fig["data"]]
    at.selectbox(key="map_colour").set_value("lighting").run()
    _no_exception(at)
    assert [t["name"] for t in _charts(at)[0]["data"]] != names
    at.selectbox(key="map_method").set_value("tsne")
    at.slider(key="map_perp").set_value(5.0)
    at.button[0].click().run()  # the form's submit button
    _no_exception(at)
    _rerun_until(at, lambda a: any("t-SNE" in c.value for c in a.caption), "the t-SNE map")
    assert any(d.label.startswith("Map coordinates") for d in at.get("download_button"))


def test_a_run_without_index_gets_a_build_button(ui_demo, tmp_path, monkeypatch):
    import shutil
    shutil.copytree(ui_demo.run_dir, tmp_path / "runs" / "fresh", ignore=shutil.ignore_patterns("index"))
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    at = _app()
    assert any("not built" in w.value for w in at.warning)
    at.switch_page("ui/pages/overview.py").run()
    assert any("No run is open" in i.value for i in at.info)  # nothing usable yet: the page says where to go
    at.switch_page("ui/pages/runs.py").run()
    at.button(key="build-fresh").click().run()
    _no_exception(at)
    _rerun_until(at, lambda a: any(b.key == "open-fresh" for b in a.button), "the index build")
    assert (tmp_path / "runs" / "fresh" / "index" / "manifest.json").is_file()


def test_a_synthetic_run_without_dataset_or_checkpoint(tmp_path, monkeypatch):
    import index
    run_dir = index.write_synthetic_run(tmp_path / "runs" / "syn", 400, seed=5)
    index.build_index(run_dir)
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    at = _app("overview")
    assert any("failed images" in e.label for e in at.expander)
    assert any("Untrained weights" in w.value for w in at.warning)
    at.switch_page("ui/pages/similar.py").run()
    assert any("records no checkpoint" in i.value for i in at.info)
    at.radio(key="sim_source").set_value("An image of this run").run()
    _no_exception(at)
    assert any("not on this machine" in w.value for w in at.warning)
    at.switch_page("ui/pages/groups.py").run()
    _no_exception(at)
    assert at.selectbox(key="grp_population").value == "detections"  # a run with matched detections


def test_two_users_on_one_run_share_a_map_only_its_starter_cancels(ui_demo, tmp_path, monkeypatch):
    """Two sessions at once on one run: the map one asks for is shared with the other, who
    cannot cancel it, and its other pages stay usable while the map computes."""
    from ui import projections as pj
    from ui.views import embedding_map

    # no cache/: the map is computed
    shutil.copytree(ui_demo.run_dir, tmp_path / "runs" / "demo", ignore=shutil.ignore_patterns("cache"))
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(embedding_map, "QUICK_WAIT_S", 0.0)
    entered, release = threading.Event(), threading.Event()
    real_project = pj.project

    def held_project(*args, **kwargs):  # a fit that takes as long as the test wants
        entered.set()
        assert release.wait(120)
        return real_project(*args, **kwargs)

    monkeypatch.setattr(pj, "project", held_project)
    try:
        alice = _app("map")
        assert entered.wait(60)
        bob = _app("map")
        cancel = [b for b in alice.button if b.key and b.key.startswith("cancel-")]
        assert len(cancel) == 1 and not any(b.key and b.key.startswith("cancel-") for b in bob.button)
        job = ui_app.jobs().get(cancel[0].key.removeprefix("cancel-"))
        key = job.key.rsplit(":", 1)[-1]  # the projection's cache key
        assert job.owner == alice.session_state[ui_app.OWNER_KEY] != bob.session_state[ui_app.OWNER_KEY]
        assert any("Another session started this computation" in c.value for c in bob.caption)
        bob.switch_page("ui/pages/overview.py").run()  # not blocked behind the map
        _no_exception(bob)
        assert bob.title[0].value == "Overview" and _charts(bob)
        cancel[0].click().run()
        _no_exception(alice)
        assert job.state == "cancelling"
        assert any("Cancelling" in c.value for c in alice.caption)
    finally:
        release.set()  # the fit ends; the job stops at its next step
    job.future.exception(60)
    assert job.state == "cancelled" and not pj.cache_paths(tmp_path / "runs" / "demo", key)[0].exists()
    alice.run()
    assert any("cancelled by you" in i.value for i in alice.info)
    bob.switch_page("ui/pages/map.py").run()
    assert any("cancelled by the session that started it" in i.value for i in bob.info)
    bob.button[-1].click().run()  # "Compute it again": bob starts (and owns) it now
    _rerun_until(bob, lambda a: bool(_charts(a)), "bob's map")
    assert pj.cache_paths(tmp_path / "runs" / "demo", key)[0].is_file()
