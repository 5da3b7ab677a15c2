"""CSV export and the ``python -m index`` command line, end to end."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from index import GroupSettings, compare, load_run, read_csv_bytes, to_csv_bytes
from index.__main__ import _parser, main

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "index", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    assert main(["synthetic", str(run_dir), "--rows", "500", "--seed", "1"]) == 0
    assert main(["build", str(run_dir)]) == 0
    return run_dir


def test_csv_round_trip(cli_run):
    df = compare(load_run(cli_run), "mst_any", "similarity", settings=GroupSettings(n_boot=30))
    data = to_csv_bytes(df)
    assert b"\r" not in data and data.endswith(b"\n") and data.startswith(b"group_a,group_b,metric,value")
    back = read_csv_bytes(data)
    pd.testing.assert_frame_equal(back, df, check_dtype=False, rtol=1e-5)
    assert to_csv_bytes(back) == data
    assert to_csv_bytes(df) == data  # deterministic


def test_csv_keeps_empty_labels_and_nan():
    df = pd.DataFrame({"group_a": ["1", "unknown"], "group_b": ["", "2"], "value": [np.nan, 1 / 3]})
    data = to_csv_bytes(df)
    assert data == b"group_a,group_b,value\n1,,NaN\nunknown,2,0.333333\n"
    back = read_csv_bytes(data)
    assert back.group_b.tolist() == ["", "2"] and np.isnan(back.value[0])


@pytest.mark.parametrize("metric", ["similarity", "neighbours", "recall"])
def test_cli_compare_writes_the_apps_bytes(cli_run, tmp_path, metric):
    out = tmp_path / f"{metric}.csv"
    args = ["compare", str(cli_run), "--by", "mst_band", "--metric", metric, "--n-boot", "40", "--seed", "3",
            "--k", "5", "--out", str(out)]
    assert main(args) == 0
    settings = GroupSettings(k=5, n_boot=40, seed=3)
    assert out.read_bytes() == to_csv_bytes(compare(load_run(cli_run), "mst_band", metric, settings=settings))
    df = read_csv_bytes(out.read_bytes())
    assert set(df.group_a) >= {"lighter", "medium", "darker", "unknown"}


def test_cli_subprocess_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    assert _cli("synthetic", run_dir, "--rows", "300").returncode == 0
    missing = _cli("compare", run_dir, "--by", "mst_mode", "--metric", "similarity", "--out", tmp_path / "x.csv")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"python -m index build {run_dir}" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    built = _cli("build", run_dir, "--kind", "flat")
    assert built.returncode == 0, built.stderr
    done = _cli("compare", run_dir, "--by", "lighting", "--metric", "neighbours", "--population", "all",
                "--n-boot", "20", "--out", tmp_path / "n.csv")
    assert done.returncode == 0, done.stderr
    assert set(pd.read_csv(tmp_path / "n.csv").metric) == {"neighbour_share", "neighbour_ratio"}


@pytest.mark.parametrize("args, expected", [
    (["compare", "{run}", "--by", "skin", "--metric", "similarity", "--out", "x.csv"], "invalid choice: 'skin'"),
    (["compare", "{run}", "--by", "mst_mode", "--metric", "recall", "--population", "all", "--out", "x.csv"],
     "population must be 'persons'"),
    (["compare", "{run}", "--by", "mst_mode", "--metric", "similarity", "--k", "0", "--out", "x.csv"], "k must be >= 1"),
    (["build", "{run}", "--kind", "lsh"], "invalid choice: 'lsh'"),
    (["build", "/nonexistent/run"], "is not a run directory"),
])
def test_cli_errors_are_one_line_exit_2(cli_run, tmp_path, capsys, args, expected):
    args = [a.replace("{run}", str(cli_run)).replace("x.csv", str(tmp_path / "x.csv")) for a in args]
    with pytest.raises(SystemExit) as exc:
        code = main(args)
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_every_option_has_help():
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"build", "compare", "compare-runs", "synthetic", "synthetic-audit"}
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    assert "--population" in _cli("compare", "--help").stdout
