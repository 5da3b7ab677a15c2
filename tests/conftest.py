"""Shared fixtures. UI fixtures are prefixed ``ui_``."""
from __future__ import annotations

import os

# Before torch is imported anywhere: OpenMP threads that spin while waiting make every
# forward 10-40x slower when the test's subprocesses or other programs want a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One seeded-weight cache per test session, shared by the tests' subprocesses (they inherit
# the environment), so the weights are computed once and the user's ~/.cache is left alone.
if "DETR_EXPLORER_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile
    _cache = tempfile.mkdtemp(prefix="detr-explorer-cache-")
    os.environ["DETR_EXPLORER_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of model tests (bit-stable sums), restored after."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class UiDemo:
    """A tiny demo run built once per test session for the app's tests."""

    root: Path       # holds data/demo and runs/demo
    runs_dir: Path
    run_dir: Path
    data_dir: Path


@pytest.fixture(scope="session")
def ui_demo(tmp_path_factory) -> UiDemo:
    """16 synthetic images, seeded untrained DETR at 160-192 px, indexed (~10 s on 2 cores)."""
    from extractor.demo import write_demo
    from extractor.pipeline import run_extraction
    from extractor.settings import ExtractSettings
    from index import build_index

    root = tmp_path_factory.mktemp("ui_demo")
    data_dir, runs_dir = root / "data" / "demo", root / "runs"
    run_dir = runs_dir / "demo"
    write_demo(data_dir, n_images=16, seed=0)
    run_extraction(ExtractSettings(data=data_dir, out=run_dir, checkpoint="none", min_size=160, max_size=192))
    build_index(run_dir)
    return UiDemo(root, runs_dir, run_dir, data_dir)


@pytest.fixture()
def ui_runs_env(ui_demo, monkeypatch) -> UiDemo:
    """``RUNS_DIR`` pointing at the demo's runs for the duration of one test."""
    monkeypatch.setenv("RUNS_DIR", str(ui_demo.runs_dir))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    return ui_demo


@pytest.fixture(scope="session")
def simulated_audit(tmp_path_factory) -> list:
    """The simulated audit (``python -m index synthetic-audit``, 1600 rows, seed 4): its three run dirs in order."""
    from index.__main__ import main
    root = tmp_path_factory.mktemp("sim") / "audit"
    assert main(["synthetic-audit", str(root), "--rows", "1600", "--seed", "4"]) == 0
    return [root / "base", root / "darken-0.5", root / "darken-0.1"]
