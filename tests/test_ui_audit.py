"""The Detection audit page's pure functions: figures, tables and the CLI's CSV bytes."""
from __future__ import annotations

import shlex

import numpy as np
import pytest

from index.__main__ import main
from index.crossruns import CrossSettings
from ui import audit

SETTINGS = CrossSettings(n_boot=60, seed=1, min_group_size=80)


@pytest.fixture(scope="module")
def sim(simulated_audit):
    return simulated_audit


@pytest.fixture(scope="module")
def tone(sim):
    return audit.table(sim, "recall", ["mst_mode"], None, SETTINGS)


def test_download_is_the_cli_bytes(sim, tmp_path):
    out = tmp_path / "x.csv"
    cmd = audit.cli_command(sim, "recall", ["mst_mode", "lighting"], "age_mode == 'middle'", SETTINGS)
    argv = shlex.split(cmd)[3:] + ["--out", str(out)]
    assert main(argv) == 0
    page = audit.csv_bytes(audit.table(sim, "recall", ["mst_mode", "lighting"], "age_mode == 'middle'", SETTINGS))
    assert page == out.read_bytes()


def test_lines_one_per_run_with_intervals_and_small_groups_marked(tone):
    fig = audit.lines_figure(tone, "recall")
    assert [t.name for t in fig.data] == ["base (reference)", "darken-0.5", "darken-0.1"]
    per_run = tone[(tone.metric == "recall") & (tone.group_a != "all")]
    for t, run in zip(fig.data, ("base", "darken-0.5", "darken-0.1")):
        r = per_run[per_run.run == run]
        np.testing.assert_allclose(np.asarray(t.y, float), r.value.to_numpy(float))
        np.testing.assert_allclose(np.asarray(t.error_y.array) + r.value, r.ci_high.to_numpy(float))
        symbols = list(t.marker.symbol)
        assert symbols == ["circle-open" if s else "circle" for s in r.small_group]
    assert list(fig.data[0].x[:10]) == [f"{k}{'†' if s else ''}" for k, s in
                                        zip(range(1, 11), per_run[per_run.run == "base"].small_group[:10])]
    assert per_run.small_group.any() and (~per_run.small_group).any()  # both kinds drawn here


def test_tables_and_heatmaps(sim, tone):
    diff, did = audit.diff_table(tone, "recall"), audit.did_table(tone, "recall")
    assert set(diff.run) == {"darken-0.5", "darken-0.1"} and len(diff) == 2 * 12  # 10 tones, unknown, all
    assert len(did) == 2 * 11 * 10 // 2 and {"group a", "group b", "p (Holm)"} <= set(did.columns)
    cells = audit.table(sim, "recall", ["mst_band", "lighting_dimly_lit"], None, SETTINGS)
    figs = audit.heatmaps(cells, "recall")
    assert list(figs) == ["base", "darken-0.5", "darken-0.1"]
    z = np.asarray(figs["darken-0.1"].data[0].z, float)
    assert z.shape == (4, 2)
    row = cells[(cells.run == "darken-0.1") & (cells.metric == "recall") & (cells.group_a == "darker & yes")]
    assert z[2, 0] == pytest.approx(row.value.iloc[0])
    assert "costs" in audit.headline(tone, "recall")
