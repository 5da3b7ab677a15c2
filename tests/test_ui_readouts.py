"""The app's CSV downloads are byte-identical to ``python -m index compare``."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

import index  # noqa: E402
from ui import app  # noqa: E402
from ui.views.groups import cli_command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("by, metric, population, where", [
    (("mst_mode",), "similarity", "persons", None),
    (("lighting",), "neighbours", "all", None),
    (("mst_band",), "recall", None, None),
    (("mst_band", "lighting"), "recall", None, "class1 != 'doctor'"),
])
def test_download_bytes_equal_the_cli(ui_demo, tmp_path, by, metric, population, where):
    settings = index.GroupSettings(k=5, n_boot=50, seed=4, min_group_size=3)
    run = index.load_run(ui_demo.run_dir)
    # What the Group comparison page hands to st.download_button, and the command its help shows.
    app_bytes = index.to_csv_bytes(app.compare(app.run_key(run), by, metric, population, settings, where))
    out = tmp_path / "cli.csv"
    cmd = shlex.split(cli_command(metric, by, population, where, settings))
    assert cmd[:5] == ["python", "-m", "index", "compare", "RUN"]
    args = [sys.executable, "-m", "index", "compare", str(ui_demo.run_dir), *cmd[5:], "--out", str(out)]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == app_bytes
    assert app_bytes.startswith(b"group_a,group_b,metric,value,ci_low,ci_high,n_a,n_b")


def test_probe_download_equals_the_cli(tmp_path):
    run_dir = index.write_synthetic_run(tmp_path / "run", 300, seed=1)
    settings = index.ProbeSettings(n_boot=40, seed=2, min_group_size=3)
    app_bytes = index.to_csv_bytes(app.probe((str(run_dir), (0, 0)), "mst_band", "persons", settings))
    out = tmp_path / "cli.csv"
    args = [sys.executable, "-m", "index", "compare", str(run_dir), "--by", "mst_band", "--metric", "probe",
            "--space", "all", "--population", "persons", "--n-boot", "40", "--seed", "2", "--min-group-size", "3",
            "--out", str(out)]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == app_bytes
