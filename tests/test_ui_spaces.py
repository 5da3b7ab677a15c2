"""The feature-space selector of Find similar persons and Embedding map, on a small run with
three indexed spaces (query, decoder_3, encoder_roi; backbone not extracted, decoder_1 not indexed)."""
from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from test_ui_app import ROOT, _charts, _no_exception, _rerun_until  # noqa: E402

SPACES_BUILT = ("query", "decoder_3", "encoder_roi")


@pytest.fixture(scope="module")
def space_run(tmp_path_factory):
    """6 demo images, seeded untrained DETR at 128-160 px, with decoder and encoder features."""
    from extractor.demo import write_demo
    from extractor.pipeline import run_extraction
    from extractor.settings import ExtractSettings
    from index import build_index

    root = tmp_path_factory.mktemp("ui_spaces")
    data = write_demo(root / "data", n_images=6, seed=2).root
    run_dir = root / "runs" / "deep"
    run_extraction(ExtractSettings(data=data, out=run_dir, checkpoint="none", min_size=128, max_size=160,
                                   features=("query", "decoder", "encoder")))
    for space in SPACES_BUILT:
        build_index(run_dir, space=space)
    return run_dir


@pytest.fixture()
def env(space_run, monkeypatch):
    monkeypatch.setenv("RUNS_DIR", str(space_run.parent))
    return space_run


def _page(page: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=180)
    at.run()
    at.switch_page(f"ui/pages/{page}.py").run()
    _no_exception(at)
    return at


# ---------------------------------------------------------------- pure functions
def test_a_photo_in_a_space_is_the_row_the_extractor_wrote(space_run):
    """The app's query vectors of a dataset image (the run's DETR, the extractor's pooling) equal
    that image's rows of the run in every space."""
    import pandas as pd

    from extractor.checkpoints import build_model
    from extractor.infer import Detector
    from extractor.preprocess import open_image
    from index.spaces import open_space
    from ui import runs, spaces

    manifest = json.loads((space_run / "manifest.json").read_text())
    assert spaces.detector_features(manifest) == ("decoder", "encoder")
    det_rows = pd.read_parquet(space_run / "detections.parquet")
    images = pd.read_parquet(space_run / "images.parquet").set_index("image_id")
    image_id = int(det_rows["image_id"].iloc[0])
    rows = det_rows[det_rows["image_id"] == image_id]
    model, _ = build_model("none", seed=0)
    detector = Detector(model, min_size=128, max_size=160)
    det = detector.detect(open_image(runs.dataset_root(manifest) / images.loc[image_id, "path"]),
                          features=spaces.detector_features(manifest))
    q, ids = rows["query_idx"].to_numpy(), rows["det_id"].to_numpy()
    for space in ("query", "decoder_1", "decoder_3", "encoder_roi"):
        want = np.asarray(open_space(space_run, space))[ids]
        got = spaces.photo_vectors(det, space)[q]
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    np.testing.assert_array_equal(spaces.photo_vectors(det, "decoder_6"), det.embeddings)
    plain = detector.detect(open_image(runs.dataset_root(manifest) / images.loc[image_id, "path"]))
    assert plain.features == {}
    with pytest.raises(ValueError, match="without its encoder_roi features"):
        spaces.photo_vectors(plain, "encoder_roi")


def test_space_notes_say_how_to_get_a_space(space_run):
    from index.spaces import space_status
    from ui import spaces

    status = space_status(space_run, json.loads((space_run / "manifest.json").read_text()))
    assert [s for s, why in status.items() if not why] == list(SPACES_BUILT)
    assert spaces.space_label("backbone_roi", status) == "backbone_roi (unavailable)"
    assert spaces.space_label("decoder_3", status) == "decoder_3"
    note = spaces.unavailable_note("backbone_roi", status["backbone_roi"], "The search")
    assert "--features query,backbone" in note and "python -m index build RUN --space backbone_roi" in note
    assert "python -m index build RUN --space decoder_1" in status["decoder_1"]


def test_map_cache_key_depends_on_the_space(space_run):
    from index import load_run
    from ui import projections as pj

    p = pj.ProjectionParams()
    keys = {s: pj.run_projection_key(load_run(space_run, s), "pca", "all", p) for s in SPACES_BUILT}
    assert len(set(keys.values())) == 3
    # the query key is the one from before spaces existed (old caches stay valid)
    q = load_run(space_run)
    assert keys["query"] == pj.projection_key("pca", "all", p, q.index_manifest["embeddings"]["checksum"])
    d3 = load_run(space_run, "decoder_3")
    assert pj.run_projection_key(d3, "pca", "all", p) != pj.projection_key(
        "pca", "all", p, d3.index_manifest["embeddings"]["checksum"], "decoder_4")  # same file, another layer


# ---------------------------------------------------------------- the pages
def test_similar_by_det_id_switches_space_and_notes_a_missing_one(env):
    at = _page("similar")
    assert at.selectbox(key="sim_space").options[:3] == ["query", "decoder_1 (unavailable)", "decoder_2 (unavailable)"]
    at.radio(key="sim_source").set_value("A person of this run (det_id)").run()
    at.number_input(key="sim_det_id").set_value(2).run()
    _no_exception(at)
    import pandas as pd
    persons = pd.read_parquet(env / "detections.parquet")["has_person"].to_numpy(dtype=bool)  # "persons" population
    k = min(12, int(persons.sum()) - int(persons[2]))
    by_space = {}
    for space in SPACES_BUILT:
        at.selectbox(key="sim_space").set_value(space).run()
        _no_exception(at)
        table = at.dataframe[1].value
        assert 2 not in table["det_id"].tolist() and len(table) == k
        assert any(f"Searched in **{space}**" in c.value for c in at.caption)
        by_space[space] = (tuple(table["det_id"]), tuple(np.round(table["similarity"], 6)))
    assert len(set(by_space.values())) == 3  # each space has its own neighbours / similarities
    # brute force in decoder_3: the page's neighbours are the top cosines of the stored rows
    from index.spaces import open_space
    x = np.asarray(open_space(env, "decoder_3"), dtype=np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cos = x @ x[2]
    cos[2] = -np.inf
    cos[~persons] = -np.inf
    np.testing.assert_allclose(by_space["decoder_3"][1], np.sort(cos)[::-1][:k], atol=1e-5)
    # a space the run lacks: the note, and the search falls back to query
    at.selectbox(key="sim_space").set_value("backbone_roi").run()
    _no_exception(at)
    assert any("backbone_roi** is unavailable" in i.value and "--features query,backbone" in i.value for i in at.info)
    assert tuple(at.dataframe[1].value["det_id"]) == by_space["query"][0]


def test_similar_photo_searches_the_chosen_space(env):
    at = _page("similar")
    at.radio(key="sim_source").set_value("An image of this run").run()
    _no_exception(at)
    query = at.dataframe[0].value
    at.selectbox(key="sim_space").set_value("encoder_roi").run()
    _no_exception(at)
    assert any("Searched in **encoder_roi**" in c.value for c in at.caption)
    enc = at.dataframe[0].value
    assert len(enc) == len(query) and list(enc["similarity"]) != list(query["similarity"])


def test_embedding_map_per_space(env):
    at = _page("map")
    _rerun_until(at, lambda a: bool(_charts(a)), "the query PCA map")
    before = _charts(at)[0]
    at.selectbox(key="map_space").set_value("decoder_3").run()
    _no_exception(at)
    _rerun_until(at, lambda a: bool(_charts(a)) and "decoder_3" in _charts(a)[0]["layout"]["title"]["text"],
                 "the decoder_3 PCA map")
    after = _charts(at)[0]
    assert before["layout"]["title"]["text"] != after["layout"]["title"]["text"]
    infos = [json.loads(p.read_text()) for p in (env / "cache").glob("projection-*.json")]
    assert {i.get("space") for i in infos} >= {"query", "decoder_3"} and len({i["key"] for i in infos}) >= 2
    assert any("decoder_3 vectors" in c.value for c in at.caption)
    at.selectbox(key="map_space").set_value("decoder_1").run()
    _no_exception(at)
    assert any("decoder_1** is unavailable" in i.value and "--space decoder_1" in i.value for i in at.info)
