"""Run discovery, the manifest in words, and the one-click demo build."""
from __future__ import annotations

import json
import os
import shutil
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

import index  # noqa: E402
from index import build as index_build  # noqa: E402
from ui import runs  # noqa: E402


def test_runs_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "elsewhere"))
    assert runs.runs_root() == (tmp_path / "elsewhere").resolve()
    monkeypatch.delenv("RUNS_DIR")
    assert runs.runs_root().name == "runs"


def test_list_runs_sorts_out_what_is_usable(ui_demo, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(ui_demo.run_dir, root / "good")
    shutil.copytree(ui_demo.run_dir, root / "noindex", ignore=shutil.ignore_patterns("index"))
    (root / "broken").mkdir()
    (root / "broken" / "manifest.json").write_text("{not json")
    (root / "unfinished" / ".work").mkdir(parents=True)
    (root / "notarun").mkdir()
    entries = runs.list_runs(root)
    assert [e.name for e in entries] == ["broken", "good", "noindex"]
    by = {e.name: e for e in entries}
    assert by["good"].usable and by["good"].index_kind == "flat"
    assert not by["noindex"].index_built and by["noindex"].error is None
    assert "not valid JSON" in by["broken"].error
    assert runs.unfinished_runs(root) == ["unfinished"]
    assert runs.default_run(entries).name == "good"
    assert runs.find_run(entries, "../good") is None and runs.find_run(entries, "good") is by["good"]
    table = runs.runs_table(entries)
    assert table.set_index("run").loc["noindex", "index"] == "not built"
    assert runs.list_runs(tmp_path / "absent") == []


def test_describe_manifest_in_words(ui_demo):
    manifest = json.loads((ui_demo.run_dir / "manifest.json").read_text())
    text = dict(runs.describe_manifest(manifest))
    assert runs.is_untrained(manifest)
    assert "untrained" in text["Checkpoint"] and "160" in text["Preprocessing"]
    assert "16 images, 0 failed" in text["Images"]
    assert str(ui_demo.data_dir) in text["Dataset"]
    assert runs.dataset_root(manifest) == ui_demo.data_dir.resolve()


def test_describe_a_synthetic_run_without_model_details(tmp_path):
    run_dir = index.write_synthetic_run(tmp_path / "syn", 300)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    text = dict(runs.describe_manifest(manifest))
    assert "synthetic" in text["Checkpoint"] and runs.dataset_root(manifest) is None
    assert "not recorded" in text["Dataset"]


def test_stamp_changes_when_the_index_is_rebuilt(ui_demo, tmp_path):
    run_dir = shutil.copytree(ui_demo.run_dir, tmp_path / "copy")
    before = runs.run_stamp(run_dir)
    os.utime(run_dir / "index" / "manifest.json", ns=(before[1] + 10**9, before[1] + 10**9))
    assert runs.run_stamp(run_dir) != before
    assert runs.run_stamp(tmp_path / "nothing") == (0, 0)


def test_exclusive_lock(tmp_path):
    with runs.exclusive(tmp_path / ".lock") as first:
        assert first
        with runs.exclusive(tmp_path / ".lock") as second:
            assert not second
    with runs.exclusive(tmp_path / ".lock") as again:
        assert again


def test_build_demo_reports_progress_and_opens(tmp_path):
    seen = []
    settings = runs.DemoSettings(n_images=4, min_size=128, max_size=160, shard_size=2)
    run_dir = runs.build_demo(tmp_path / "runs", settings, progress=lambda f, text: seen.append((f, text)))
    assert run_dir == tmp_path / "runs" / "demo" and (tmp_path / "data" / "demo" / "annotations.csv").is_file()
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert sum("extracting" in t for _, t in seen) >= 2  # one per shard
    run = index.load_run(run_dir)
    assert run.n > 0 and runs.is_untrained(run.manifest)
    with runs.exclusive(tmp_path / "runs" / ".demo.lock"):
        with pytest.raises(RuntimeError, match="another session"):
            runs.build_demo(tmp_path / "runs", settings)


def _unindexed_copy(ui_demo, tmp_path):
    return shutil.copytree(ui_demo.run_dir, tmp_path / "runs" / "fresh", ignore=shutil.ignore_patterns("index"))


def test_index_build_runs_under_the_run_lock(ui_demo, tmp_path, monkeypatch):
    """Two builds of one index at once: the second is refused while the first writes."""
    import threading

    run_dir = _unindexed_copy(ui_demo, tmp_path)
    inside, release, outcomes = threading.Event(), threading.Event(), []
    real = index_build._build_index

    def gated(path, *args, **kwargs):  # inside the lock, as a long build would be
        inside.set()
        assert release.wait(30)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(index_build, "_build_index", gated)
    first = threading.Thread(target=lambda: outcomes.append(runs.build_run_index(run_dir)))
    first.start()
    assert inside.wait(30)
    with pytest.raises(RuntimeError, match="another session is building the index of fresh"):
        runs.build_run_index(run_dir)
    release.set()
    first.join(60)
    assert len(outcomes) == 1 and (run_dir / "index" / "manifest.json").is_file()
    assert runs.list_runs(tmp_path / "runs")[0].index_built
    with runs.exclusive(run_dir / runs.INDEX_LOCK) as mine:  # released after the build
        assert mine


def test_cli_build_is_refused_while_the_app_builds(ui_demo, tmp_path, capsys):
    """The CLI takes the same lock: one line, no traceback, the finished index untouched."""
    from index.__main__ import main

    run_dir = shutil.copytree(ui_demo.run_dir, tmp_path / "runs" / "busy")
    before = (run_dir / "index" / "manifest.json").read_bytes()
    with runs.exclusive(run_dir / runs.INDEX_LOCK) as mine:
        assert mine
        with pytest.raises(index.IndexBusy, match="another process is building an index"):
            index.build_index(run_dir)
        assert main(["build", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "another process is building an index" in err and "\n" not in err and "Traceback" not in err
    assert (run_dir / "index" / "manifest.json").read_bytes() == before


def test_a_cancelled_demo_build_stops_between_shards_and_resumes(tmp_path):
    from ui.jobs import Cancelled, Jobs
    from ui.views.runs import _demo_job

    root = tmp_path / "runs"
    settings = runs.DemoSettings(n_images=4, min_size=128, max_size=160, shard_size=1)
    jobs = Jobs()
    job = jobs.submit("demo", "demo", _demo_job, root, settings, owner="me")
    deadline = time.monotonic() + 120
    while not job.progress[1].startswith("extracting: 1 "):
        assert time.monotonic() < deadline and not job.future.done(), job.progress
        time.sleep(0.02)
    assert jobs.cancel("demo", "me")
    with pytest.raises(Cancelled):
        job.future.result(120)
    assert runs.list_runs(root) == [] and runs.unfinished_runs(root) == ["demo"]
    with runs.exclusive(root / ".demo.lock") as mine:  # the lock went with the job
        assert mine
    jobs.forget("demo")  # what the page does before offering the button again
    again = jobs.submit("demo", "demo", _demo_job, root, settings, owner="me")
    assert again.future.result(120) == root / "demo"
    assert runs.list_runs(root)[0].usable
