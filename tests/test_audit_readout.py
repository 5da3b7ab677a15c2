"""The AR read-out: per-group means with an image-cluster bootstrap, the CLI and its CSV."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from index import GroupSettings, build_index, compare, load_run, membership, read_csv_bytes, to_csv_bytes, write_synthetic_run
from index.__main__ import main
from index.audit import PROTOCOLS, run_audit


def _without_predictions(run_dir, out):
    """A copy of the run as one made before predictions.parquet (or migrated from version 1) looks."""
    import json
    import shutil
    shutil.copytree(run_dir, out)
    (out / "predictions.parquet").unlink()
    doc = json.loads((out / "manifest.json").read_text())
    doc["tables"] = [t for t in doc["tables"] if t != "predictions.parquet"]
    doc["files"].pop("predictions.parquet", None)
    (out / "manifest.json").write_text(json.dumps(doc))
    return out


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    run_dir = write_synthetic_run(tmp_path_factory.mktemp("ar") / "run", 1500, seed=6)
    build_index(run_dir)
    return run_dir


@pytest.mark.parametrize("metric", ["ar", "recall50", "recall75"])
def test_ar_readout_per_group_and_all(ar_run, metric):
    run = load_run(ar_run)
    full = compare(run, "mst_band", metric, settings=GroupSettings(n_boot=100))
    df = full[full["metric"] == metric]  # per group; the pairwise differences and the gap follow
    audit = run_audit(ar_run)
    persons = run.persons.set_index("person_id").loc[audit["person_id"]]
    labels, M = membership(persons, "mst_band")
    per = df.set_index("group_a")
    assert list(df["group_a"]) == [*labels, "all"] and (df["metric"] == metric).all()
    for g, label in enumerate(labels):
        assert per.loc[label, "value"] == pytest.approx(audit[metric].to_numpy()[M[:, g]].mean())
        assert per.loc[label, "n_a"] == M[:, g].sum()
    assert per.loc["all", "value"] == pytest.approx(audit[metric].mean()) and per.loc["all", "n_a"] == len(audit)
    assert (df["ci_low"] <= df["value"]).all() and (df["value"] <= df["ci_high"]).all()
    assert (full["protocol"] == PROTOCOLS[metric]).all() and df["group_b"].eq("").all()
    assert {f"{metric}_difference", f"{metric}_ratio", f"{metric}_gap"} <= set(full["metric"])


def test_cli_ar_writes_the_apps_bytes(ar_run, tmp_path):
    out = tmp_path / "ar.csv"
    assert main(["compare", str(ar_run), "--by", "lighting", "--metric", "ar", "--n-boot", "50", "--out", str(out)]) == 0
    expected = to_csv_bytes(compare(load_run(ar_run), "lighting", "ar", settings=GroupSettings(n_boot=50)))
    assert out.read_bytes() == expected
    df = read_csv_bytes(expected)
    assert "all" in set(df["group_a"]) and df["protocol"].str.startswith("COCO AR@100 IoU .50:.05:.95").all()


def test_a_run_without_predictions_says_to_re_extract(ar_run, tmp_path, capsys):
    old = _without_predictions(ar_run, tmp_path / "old")
    assert main(["compare", str(old), "--by", "mst_band", "--metric", "ar", "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "extract it again" in err
    # the threshold recall still works on such a run
    assert main(["compare", str(old), "--by", "mst_band", "--metric", "recall", "--out", str(tmp_path / "r.csv")]) == 0
    assert pd.read_csv(tmp_path / "r.csv")["protocol"].str.startswith("kept detection").all()


def test_overview_chart_shows_the_readouts_values_and_protocol(ar_run):
    from ui import figures
    run = load_run(ar_run)
    for metric in figures.DETECTION_METRICS:
        df = compare(run, "mst_band", metric, settings=GroupSettings(n_boot=50))
        bar = figures.recall_bars(df).data[0]
        rows = df[df["metric"] == metric]
        assert len(bar.x) == len(rows) and bar.x[-1].startswith("all")
        np.testing.assert_allclose(np.asarray(bar.y, float), rows["value"].to_numpy(float))
        text = figures.protocol_text(df)
        assert rows["protocol"].iloc[0] in text and rows["interval"].iloc[0] in text
    assert "COCO AR@100" in figures.protocol_text(compare(run, "mst_band", "ar", settings=GroupSettings(n_boot=20)))
