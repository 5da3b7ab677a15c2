"""Per-row features: the pooling rule against a hand computation, and a run with every space."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from extractor import rundir
from extractor.checkpoints import build_model
from extractor.demo import write_demo
from extractor.features import feature_spaces, parse_features, pool_boxes
from extractor.infer import forward
from extractor.pipeline import run_extraction
from extractor.preprocess import collate, load_prepared
from extractor.settings import ExtractSettings
from index.spaces import SPACES


def _reference_pool(fmap: np.ndarray, valid: tuple[int, int], box: np.ndarray, stride: int) -> np.ndarray:
    """The documented rule written out: 7x7 bins of 2x2 bilinear samples at x / stride - 0.5 over the
    unpadded cells (a sample past the last cell centre takes the border value), averaged."""
    hv, wv = valid
    f = fmap[:, :hv, :wv].astype(np.float64)
    x1, y1, x2, y2 = np.asarray(box, dtype=np.float64) / stride - 0.5
    total = np.zeros(f.shape[0])
    n = 0
    for i in range(7):
        for j in range(7):
            for si in range(2):
                for sj in range(2):
                    y = y1 + (i + (si + 0.5) / 2) * (y2 - y1) / 7
                    x = x1 + (j + (sj + 0.5) / 2) * (x2 - x1) / 7
                    y, x = min(max(y, 0.0), hv - 1), min(max(x, 0.0), wv - 1)
                    y0, x0 = int(np.floor(y)), int(np.floor(x))
                    ya, xa = min(y0 + 1, hv - 1), min(x0 + 1, wv - 1)
                    dy, dx = y - y0, x - x0
                    total += ((1 - dy) * (1 - dx) * f[:, y0, x0] + (1 - dy) * dx * f[:, y0, xa]
                              + dy * (1 - dx) * f[:, ya, x0] + dy * dx * f[:, ya, xa])
                    n += 1
    return total / n


def test_pool_of_a_linear_map_is_its_value_at_the_box_centre():
    # f_c(u, v) = a_c * u + b_c * v + c_c on cell indices: bilinear sampling reproduces it exactly
    # inside the grid, and the mean over symmetric samples is its value at the box centre.
    h, w, stride = 6, 8, 32
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(3, 5))
    v, u = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    fmap = a[:, None, None] * u + b[:, None, None] * v + c[:, None, None]
    box = np.array([[40.0, 50.0, 180.0, 150.0]])  # centre (110, 100) px; every sample inside the cells
    got = pool_boxes(torch.tensor(fmap, dtype=torch.float32), (h, w), box, stride).numpy()[0]
    cu, cv = 110 / stride - 0.5, 100 / stride - 0.5
    np.testing.assert_allclose(got, a * cu + b * cv + c, rtol=1e-5, atol=1e-5)


def test_pool_excludes_padding_and_matches_the_reference_at_the_edges():
    rng = np.random.default_rng(1)
    h, w, valid, stride = 7, 9, (4, 6), 16
    fmap = rng.normal(size=(3, h, w)).astype(np.float32)
    fmap[:, valid[0]:, :] = 1e6  # padding cells: must never reach the result
    fmap[:, :, valid[1]:] = 1e6
    # a box over the whole unpadded image (4 x 6 cells of 16 px), one at its bottom-right corner, a tiny one
    boxes = np.array([[0, 0, 96, 64], [70, 40, 96, 64], [20.0, 20.0, 21.0, 22.0]], dtype=np.float64)
    got = pool_boxes(torch.tensor(fmap), valid, boxes, stride).numpy()
    assert np.abs(got).max() < 10
    for k, box in enumerate(boxes):
        np.testing.assert_allclose(got[k], _reference_pool(fmap, valid, box, stride), rtol=1e-5, atol=1e-5)
    # the padded map gives what the unpadded map alone gives
    alone = pool_boxes(torch.tensor(fmap[:, :valid[0], :valid[1]].copy()), valid, boxes, stride).numpy()
    np.testing.assert_array_equal(got, alone)


def test_parse_features_and_spaces():
    assert parse_features("decoder, backbone") == ("query", "decoder", "backbone")
    assert parse_features(None) == ("query",)
    with pytest.raises(ValueError, match="unknown --features nope"):
        parse_features("query,nope")
    assert feature_spaces(("query", "encoder")) == ["query", "encoder_roi"]
    assert len(feature_spaces(parse_features("query,decoder,encoder,backbone"))) == 9


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory):
    data = write_demo(tmp_path_factory.mktemp("demo") / "data", n_images=6, seed=5).root
    out = tmp_path_factory.mktemp("runs") / "all"
    s = ExtractSettings(data=data, out=out, checkpoint="none", min_size=128, max_size=192, shard_size=4,
                        features=("query", "decoder", "encoder", "backbone"))
    run_extraction(s)
    return data, out


def test_run_writes_every_space_row_aligned(feature_run):
    data, out = feature_run
    emb = np.load(out / rundir.EMBEDDINGS)
    dec, enc, bb = (np.load(out / f) for f in (rundir.DECODER_LAYERS, rundir.ENCODER_ROI, rundir.BACKBONE_ROI))
    n = len(pd.read_parquet(out / rundir.DETECTIONS))
    assert dec.shape == (n, 6, 256) and dec.dtype == np.float32
    assert enc.shape == (n, 256) and enc.dtype == np.float32
    assert bb.shape == (n, 2048) and bb.dtype == np.float16
    np.testing.assert_array_equal(dec[:, -1], emb)
    m = json.loads((out / rundir.MANIFEST).read_text())
    assert sorted(m["feature_spaces"]) == ["backbone", "decoder", "encoder", "query"]
    assert "roi_align" in m["preprocessing"]["feature_pooling"]
    assert m["settings"]["features"] == ["query", "decoder", "encoder", "backbone"]


def test_run_features_equal_a_recomputation_of_one_image(feature_run):
    data, out = feature_run
    det = pd.read_parquet(out / rundir.DETECTIONS)
    images = pd.read_parquet(out / rundir.IMAGES).set_index("image_id")
    image_id = int(det["image_id"].iloc[0])
    rows = det[det["image_id"] == image_id]
    model, _ = build_model("none", seed=0)
    prepared = load_prepared(data / images.loc[image_id, "path"], 128, 192, draft=False)
    pixels, _ = collate([prepared.pixels])
    o = forward(model.eval(), pixels, None, "cpu", "fp32", return_features=True)
    H, W = prepared.pixels.shape[:2]
    q = rows["query_idx"].to_numpy().copy()
    cx, cy, bw, bh = o["pred_boxes"][0, q].double().numpy().T
    boxes = np.clip(np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1) * [W, H, W, H], 0, [W, H, W, H])
    fmap = o["backbone_features"][0].numpy()
    grid = fmap.shape[1:]
    mem = o["encoder_memory"][0].numpy().T.reshape(256, *grid)
    bb = np.load(out / rundir.BACKBONE_ROI)[rows["det_id"].to_numpy()].astype(np.float64)
    enc = np.load(out / rundir.ENCODER_ROI)[rows["det_id"].to_numpy()]
    for k, box in enumerate(boxes):
        want_bb = _reference_pool(fmap, grid, box, model.stride)
        np.testing.assert_allclose(bb[k], want_bb, rtol=2e-3, atol=2e-3 * np.abs(want_bb).max())
        want_enc = _reference_pool(mem, grid, box, model.stride)
        np.testing.assert_allclose(enc[k], want_enc, rtol=1e-3, atol=1e-3 * np.abs(want_enc).max())


def test_index_per_space_and_probe_from_the_cli(feature_run, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from index import load_run, read_csv_bytes

    _, out = feature_run
    root = Path(__file__).resolve().parents[1]

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "index", *map(str, args)], cwd=root, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]

    cli("build", out, "--space", "all")
    assert (out / "index" / "manifest.json").is_file()  # query stays where it always was
    for space in list(SPACES)[1:]:
        m = json.loads((out / "index" / space / "manifest.json").read_text())
        assert m["space"] == space and m["n"] == len(np.load(out / rundir.EMBEDDINGS))
    query, last, bb = load_run(out), load_run(out, "decoder_6"), load_run(out, "backbone_roi")
    assert (last.dim, bb.dim, bb.space) == (256, 2048, "backbone_roi")
    ids = np.arange(min(5, query.n))
    # decoder_6 holds the query embeddings: the same neighbours
    np.testing.assert_array_equal(last.neighbours(ids, 3)[1], query.neighbours(ids, 3)[1])
    cli("compare", out, "--metric", "similarity", "--by", "mst_band", "--space", "encoder_roi",
        "--population", "all", "--n-boot", "20", "--out", tmp_path / "sim.csv")
    sim = read_csv_bytes((tmp_path / "sim.csv").read_bytes())
    assert len(sim) and sim["metric"].iloc[0] == "centroid_cosine"
    cli("compare", out, "--metric", "probe", "--by", "lighting_well_lit", "--population", "all",
        "--n-boot", "50", "--out", tmp_path / "probe.csv")
    df = read_csv_bytes((tmp_path / "probe.csv").read_bytes())
    assert set(df["group_a"]) == {"nuisance", *SPACES}


def test_a_space_the_run_lacks_is_a_clear_error(tmp_path):
    from index import build_index, write_synthetic_run

    run = write_synthetic_run(tmp_path / "run", 50, seed=0)
    with pytest.raises(ValueError, match="has no decoder_2 features"):
        build_index(run, space="decoder_2")
    with pytest.raises(ValueError, match="unknown feature space"):
        build_index(run, space="decoder_7")


def test_space_status_says_what_is_missing(feature_run):
    from index.spaces import space_status

    _, out = feature_run
    m = json.loads((out / rundir.MANIFEST).read_text())
    status = space_status(out, m)
    # every space was extracted; those with an index (built by the CLI test or not) say so
    assert set(status) == set(SPACES)
    assert all(v == "" or v.startswith("no index yet") for v in status.values())
    assert space_status(out, {"feature_spaces": ["query"]})["decoder_2"].startswith("not extracted")
