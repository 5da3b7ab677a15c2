"""compare-runs (paired differences across runs) and the simulated audit with planted losses."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from extractor.rundir import open_run, write_run
from index import GroupSettings, compare, load_run, read_csv_bytes, to_csv_bytes
from index.__main__ import main
from index.bootstrap import BootSettings, group_means
from index.crossruns import METRIC_FUNCS, CrossSettings, compare_runs, did_sentence, run_values
from index.groupings import groups_of
from index.synthetic_audit import AuditSettings, planted_difference, write_synthetic_audit

N_BOOT = 300


@pytest.fixture(scope="module")
def audit_runs(simulated_audit):
    return simulated_audit


@pytest.fixture(scope="module")
def table(audit_runs):
    return compare_runs(audit_runs, "recall", "mst_band", CrossSettings(n_boot=N_BOOT, seed=2))


def test_runs_share_images_and_persons_but_not_detections(audit_runs):
    p = [open_run(r).persons() for r in audit_runs]
    for q in p[1:]:
        same = ["person_id", "image_id", "filename", "gt_x1", "gt_y1", "gt_x2", "gt_y2", "mst_mode", "mst_band",
                "lighting_dimly_lit", "class1", "evaluated"]
        pd.testing.assert_frame_equal(q[same], p[0][same])
        assert q.detected.sum() < p[0].detected.sum()
    assert all(open_run(r).manifest.planted["ar"]["mst_band"]["darker"] > 0 for r in audit_runs)
    xb = [np.asarray(open_run(r).embeddings()) for r in audit_runs]
    assert all(np.array_equal(x, xb[0]) for x in xb[1:])


def test_per_run_rows_equal_single_run_compare(audit_runs, table):
    for r in audit_runs:
        single = compare(load_run(r), "mst_band", "recall", settings=GroupSettings(n_boot=N_BOOT, seed=2))
        single = single[single.metric == "recall"].reset_index(drop=True)
        mine = table[(table.run == r.name) & (table.metric == "recall")].reset_index(drop=True)
        assert mine.group_a.tolist() == single.group_a.tolist()
        for col in ("value", "ci_low", "ci_high", "design_effect"):
            np.testing.assert_allclose(mine[col], single[col], rtol=1e-9, atol=1e-12, err_msg=col)
        for col in ("n_a", "n_images_a", "small_group"):
            assert mine[col].tolist() == single[col].tolist(), col


def _best_iou(run_dir) -> pd.Series:
    """A continuous per-person metric (no ties between rounds, so float rounding cannot move an interval end)."""
    p = open_run(run_dir).persons()
    v = np.where(p.evaluated, p.best_iou.fillna(0).to_numpy(float), np.nan)
    return pd.Series(v, index=p.person_id.to_numpy())


def test_paired_difference_is_b_minus_a_resampled_on_the_same_photos(audit_runs, monkeypatch):
    monkeypatch.setitem(METRIC_FUNCS, "best_iou", _best_iou)
    table = compare_runs(audit_runs, "best_iou", "mst_band", CrossSettings(n_boot=N_BOOT, seed=2))
    persons, V = run_values(audit_runs, "best_iou")
    keep = np.isfinite(V).all(axis=1)
    persons, V = persons[keep], V[keep]
    groups = groups_of(persons, "mst_band")
    # The mean of per-person differences resampled alone gives the interval of the difference
    # of the two runs' means only if both runs drew the same photos in every round.
    ref = group_means(V[:, 2] - V[:, 0], groups.M, persons.image_id.to_numpy(), BootSettings(n_boot=N_BOOT, seed=2))
    rows = table[(table.run == "darken-0.1") & (table.metric == "best_iou_diff") & (table.group_a != "all")]
    per_run = table[table.metric == "best_iou"].set_index(["run", "group_a"]).value
    assert len(rows) == 4
    for i, row in enumerate(rows.itertuples()):
        assert row.value == pytest.approx(per_run["darken-0.1", row.group_a] - per_run["base", row.group_a], abs=1e-12)
        assert (row.ci_low, row.ci_high) == pytest.approx((ref.ci_low[i, 0], ref.ci_high[i, 0]), abs=1e-9)
        assert row.ci_low < row.value < row.ci_high


def test_did_is_difference_of_diffs_and_holm_family(table):
    diff = table[table.metric == "recall_diff"].set_index(["run", "group_a"]).value
    did = table[table.metric == "recall_did"]
    for row in did.itertuples():
        assert row.value == pytest.approx(diff[row.run, row.group_a] - diff[row.run, row.group_b], abs=1e-12)
    fam = did[did.in_family]
    # 2 later runs x 3 pairs of the eligible bands (unknown is out by default).
    assert len(fam) == 6 and (did.family_size == 6).all()
    assert (fam.p_holm >= fam.p_value - 1e-15).all() and did[~did.in_family].p_holm.isna().all()


@pytest.mark.parametrize("metric", ["ar", "recall"])
def test_recovers_the_planted_difference_in_differences(audit_runs, metric):
    table = compare_runs(audit_runs, metric, "mst_band", CrossSettings(n_boot=N_BOOT, seed=2))
    planted = {r.name: open_run(r).manifest.planted for r in audit_runs}
    did = table[table.metric == f"{metric}_did"]
    misses = []
    for run in ("darken-0.5", "darken-0.1"):
        for a, b in (("lighter", "darker"), ("medium", "darker"), ("lighter", "medium")):
            truth = planted_difference(planted["base"], planted[run], a, b, metric)
            row = did[(did.run == run) & (did.group_a == a) & (did.group_b == b)].iloc[0]
            if not row.ci_low <= truth <= row.ci_high:
                misses.append((run, a, b, truth, row.value, row.ci_low, row.ci_high))
        row = did[(did.run == run) & (did.group_a == "lighter") & (did.group_b == "darker")].iloc[0]
        assert row.ci_low > 0  # the planted loss (darker tones lose more) is found, not just covered
        assert "costs lighter" in did_sentence(row, metric) and "less" in did_sentence(row, metric)
    # 95% intervals: one miss in six is within chance (P(>= 2 misses) ~ 3% for independent ones).
    assert len(misses) <= 1, misses


def test_persons_evaluated_in_every_run_are_the_population(audit_runs, tmp_path, table):
    files = open_run(audit_runs[1])
    persons, images = files.persons(), files.images()
    first = persons.image_id.iloc[0]
    lost = persons.image_id == first
    persons.loc[lost, ["evaluated", "detected"]] = False
    persons["det_id"] = persons["det_id"].where(~lost, pd.NA)
    images.loc[images.image_id == first, "status"] = "error: simulated"
    run = tmp_path / "lost-one-image"
    write_run(run, files.manifest.replace(counts={}, files={}), images=images, persons=persons,
              detections=files.detections(), embeddings=np.asarray(files.embeddings()))
    out = compare_runs([audit_runs[0], run], "recall", "mst_band", CrossSettings(n_boot=50))
    assert (out.persons_dropped == int(lost.sum())).all() and lost.sum() > 0
    all_row = out[(out.metric == "recall") & (out.group_a == "all")]
    full = table[(table.metric == "recall") & (table.group_a == "all") & (table.run == "base")]
    assert (all_row.n_a == int(full.n_a.iloc[0]) - int(lost.sum())).all()


def test_other_dataset_is_refused_in_one_line(audit_runs, tmp_path):
    other = tmp_path / "other"
    write_synthetic_audit(other, AuditSettings(seed=5, rows=1600, factors=(1.0,)))
    with pytest.raises(ValueError, match="not of the same dataset") as exc:
        compare_runs([audit_runs[0], other / "base"], "recall", "mst_band", CrossSettings(n_boot=10))
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="at least two runs"):
        compare_runs([audit_runs[0]], "recall", "mst_band")


def test_cli_writes_the_same_bytes(audit_runs, tmp_path, table):
    out = tmp_path / "cross.csv"
    args = ["compare-runs", *map(str, audit_runs), "--metric", "recall", "--by", "mst_band", "--by", "lighting",
            "--where", "class1 != 'chef'", "--n-boot", "40", "--seed", "1", "--out", str(out)]
    assert main(args) == 0
    df = compare_runs(audit_runs, "recall", ["mst_band", "lighting"], CrossSettings(n_boot=40, seed=1),
                      where="class1 != 'chef'")
    assert out.read_bytes() == to_csv_bytes(df)
    back = read_csv_bytes(out.read_bytes())
    assert set(back.metric) == {"recall", "recall_diff", "recall_did"}
    assert "darker & dimly_lit" in set(back.group_a) and set(back.run) == {"base", "darken-0.5", "darken-0.1"}
    assert main(["compare-runs", str(audit_runs[0]), str(audit_runs[0]), "--metric", "recall", "--by", "mst_band",
                 "--out", str(out)]) == 2
