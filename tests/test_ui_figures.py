"""Figure builders: the right traces, axes, labels and hover data."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import index  # noqa: E402
from ui import figures  # noqa: E402


@pytest.fixture(scope="module")
def ui_readouts(tmp_path_factory):
    run_dir = index.write_synthetic_run(tmp_path_factory.mktemp("ui_fig") / "syn", 800, seed=2)
    index.build_index(run_dir)
    run = index.load_run(run_dir)
    s = index.GroupSettings(n_boot=30, min_group_size=60)
    out = {m: index.compare(run, "mst_band", m, None, s) for m in ("similarity", "neighbours", "recall")}
    return {**out, "run": run}


def test_similarity_heatmap_labels_sizes_and_intervals(ui_readouts):
    df = ui_readouts["similarity"]
    fig = figures.pair_heatmap(df, "centroid_cosine", "t")
    (heat,) = fig.data
    assert isinstance(heat, go.Heatmap)
    z = np.asarray(heat.z, dtype=float)
    assert z.shape[0] == z.shape[1] >= 3 and np.allclose(np.diag(z)[:3], 1.0)  # a centroid with itself
    sizes = df[(df.metric == "centroid_cosine") & (df.group_a == df.group_b)].set_index("group_a")["n_a"]
    assert heat.y[0] == f"lighter (n={sizes['lighter']})" + ("†" if sizes["lighter"] < 60 else "")
    assert any(label.endswith("†") for label in heat.y)  # unknown is small
    assert np.asarray(heat.customdata).shape == z.shape + (4,) and "95% CI" in heat.hovertemplate
    assert fig.layout.yaxis.autorange == "reversed"
    with pytest.raises(ValueError, match="no 'neighbour_ratio'"):
        figures.pair_heatmap(df, "neighbour_ratio", "t")


def test_ratio_heatmap_diverges_at_one(ui_readouts):
    fig = figures.ratio_heatmap(ui_readouts["neighbours"])
    heat = fig.data[0]
    assert heat.zmid == 1.0 and heat.zmin == 0.0 and heat.zmax >= 2.0 and heat.colorscale is not None


def test_recall_bars_with_bootstrap_error_bars(ui_readouts):
    df = ui_readouts["recall"]
    fig = figures.recall_bars(df)
    (bar,) = fig.data
    rec = df[df.metric == "recall"]
    assert len(bar.x) == len(rec) == 5  # 4 bands and all persons; the recall_gap row is text, not a bar
    assert bar.x[-1].startswith("all (n=") and bar.marker.color[-1] == figures.ALL_COLOUR
    assert np.allclose(bar.error_y.array, np.nan_to_num(rec.ci_high - rec.value))
    assert np.allclose(bar.error_y.arrayminus, np.nan_to_num(rec.value - rec.ci_low))
    assert "design effect" in bar.hovertemplate and np.asarray(bar.customdata).shape == (5, 5)
    gap = df[df.metric == "recall_gap"].iloc[0]
    assert f"best {gap.group_a} minus worst {gap.group_b}" in figures.recall_gap_text(df)


def test_cell_heatmap_of_an_intersection(ui_readouts):
    run = ui_readouts["run"]
    df = index.compare(run, ["mst_band", "lighting"], "recall", settings=index.GroupSettings(n_boot=30))
    heat = figures.cell_heatmap(df).data[0]
    assert list(heat.y) == ["lighter", "medium", "darker", "unknown"]
    assert list(heat.x) == ["well_lit", "dimly_lit", "underexposed", "overexposed", "unknown"]
    cell = df[(df.metric == "recall") & (df.group_a == "darker & dimly_lit")].iloc[0]
    z, extra = np.asarray(heat.z, dtype=float), np.asarray(heat.customdata, dtype=float)
    assert z[2, 1] == pytest.approx(cell.value) and extra[2, 1, 2] == cell.n_a and extra[2, 1, 0] == pytest.approx(cell.ci_low)
    with pytest.raises(ValueError, match="two groupings"):
        figures.cell_heatmap(ui_readouts["recall"])


def test_disparity_table_sorted_by_holm(ui_readouts):
    df = ui_readouts["recall"]
    table = figures.disparity_table(df)
    diff = df[(df.metric == "recall_difference") & df.in_family]
    assert len(table) == len(diff) and table["p (Holm)"].is_monotonic_increasing
    row = table.iloc[0]
    want = diff[(diff.group_a == row["group a"]) & (diff.group_b == row["group b"])].iloc[0]
    assert row["difference"] == want.value and row["p"] == want.p_value
    assert len(figures.disparity_table(df, family_only=False)) == (df.metric == "recall_difference").sum()


def test_group_colours_use_the_monk_palette():
    cols = figures.group_colours(["1", "10", "darker", "unknown", "masc"])
    assert cols[0] == figures.MST_HEX[0] and cols[1] == figures.MST_HEX[9]
    assert cols[2] == figures.BAND_COLOURS["darker"] and cols[3] == figures.UNKNOWN_COLOUR
    assert figures.group_labels(["a", "b"], [5, 50], 10) == ["a (n=5)†", "b (n=50)"]


def test_embedding_scatter_is_webgl_one_trace_per_category():
    n = 6000
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"det_id": np.arange(n), "x": rng.random(n), "y": rng.random(n),
                          "mst_band": rng.choice(["lighter", "darker", "unknown"], n), "score": rng.random(n)})
    fig = figures.embedding_scatter(frame, "mst_band")
    assert all(isinstance(t, go.Scattergl) for t in fig.data)
    assert [t.name.split(" ")[0] for t in fig.data] == ["lighter", "darker", "unknown"]
    assert sum(len(t.x) for t in fig.data) == n
    ids = np.concatenate([np.asarray(t.customdata) for t in fig.data])
    assert sorted(ids.tolist()) == list(range(n))
    assert fig.data[0].marker.size == 4  # dense map: small markers
    fig = figures.embedding_scatter(frame, "score")
    assert len(fig.data) == 1 and fig.data[0].marker.showscale


def test_photo_figure_boxes_grid_and_overlay():
    img = Image.new("RGB", (200, 100), "white")
    boxes = np.array([[10, 10, 50, 90], [100, 20, 150, 80]], dtype=float)
    grid = (np.array([25.0, 75.0]), np.array([50.0, 50.0]))
    fig = figures.photo_figure(img, boxes=boxes, box_labels=["#1 0.9", "#2 0.8"], highlight=1, grid=grid,
                               overlay=np.ones((2, 4)))
    kinds = [type(t).__name__ for t in fig.data]
    assert kinds == ["Image", "Heatmap", "Scatter"]
    assert fig.data[0].source.startswith("data:image/jpeg;base64,")
    assert list(fig.data[2].customdata) == [0, 1] and fig.data[2].marker.opacity < 0.1
    assert len(fig.layout.shapes) == 2 and fig.layout.shapes[1].line.width == 4
    assert [a.text for a in fig.layout.annotations] == ["#1 0.9", "#2 0.8"]
    assert tuple(fig.layout.yaxis.range) == (100, 0)


def test_composition_and_count_bars():
    comp = pd.DataFrame({"group": ["a", "b"], "neighbours": [3, 1], "share": [0.75, 0.25], "candidates": [10, 30],
                         "base_rate": [0.25, 0.75], "ratio": [3.0, 1 / 3]})
    fig = figures.composition_bars(comp, "mst_band")
    assert [t.name for t in fig.data] == ["neighbours", "base rate"] and fig.layout.barmode == "group"
    fig = figures.counts_bar(["1", "2"], [3, 40], "t", min_group_size=30)
    assert list(fig.data[0].x) == ["1 (n=3)†", "2 (n=40)"]


def test_empty_groups_are_left_out_of_heatmaps_and_named():
    rows = [(a, b, 0.5, 10 if a != "unknown" else 0, 10 if b != "unknown" else 0)
            for a in ("lighter", "darker", "unknown") for b in ("lighter", "darker", "unknown")]
    df = pd.DataFrame(rows, columns=["group_a", "group_b", "value", "n_a", "n_b"]).assign(
        metric="centroid_cosine", ci_low=0.4, ci_high=0.6, min_group_size=5)
    assert figures.empty_groups(df) == ["unknown"]
    heat = figures.pair_heatmap(df, "centroid_cosine", "t").data[0]
    assert list(heat.y) == ["lighter (n=10)", "darker (n=10)"]
    assert len(figures.pair_heatmap(df, "centroid_cosine", "t", hide_empty=False).data[0].y) == 3


def test_probe_by_depth_draws_every_space_with_its_interval(tmp_path):
    import numpy as np

    from index import ProbeSettings, probe, write_synthetic_run
    from ui.figures import probe_by_depth

    run = write_synthetic_run(tmp_path / "run", 400, seed=2)
    rng = np.random.default_rng(0)
    n = len(np.load(run / "embeddings.npy"))
    arrays = {"decoder_1": rng.normal(size=(n, 16)).astype(np.float32), "query": np.load(run / "embeddings.npy")}
    df = probe(run, "mst_band", None, "persons", ProbeSettings(n_boot=50), arrays=arrays)
    fig = probe_by_depth(df)
    (trace,) = fig.data
    assert list(trace.x) == ["decoder_1", "query"]
    want = df[(df["metric"] == "balanced_accuracy") & (df["group_a"] != "nuisance")]
    np.testing.assert_allclose(trace.y, want["value"])
    np.testing.assert_allclose(np.asarray(trace.error_y.array) + trace.y, want["ci_high"])
    # chance and the nuisance baseline as reference lines
    assert {a.text for a in fig.layout.annotations} >= {"chance", "nuisance baseline"}
