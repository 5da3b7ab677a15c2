"""The run format's one writer and one reader: schemas, versions, resume safety, permissions."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from extractor import rundir
from extractor.demo import write_demo
from extractor.pipeline import run_extraction
from extractor.rundir import schema
from extractor.settings import ExtractSettings
from index import load_run
from kill import kill_after_shards
from index.build import build_index
from index.synthetic import write_synthetic_run

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--checkpoint", "none", "--min-size", "128", "--max-size", "192", "--shard-size", "2", "--batch-size", "1"]


def _tables(run: Path) -> dict:
    files = rundir.open_run(run)
    return {"det": files.detections(), "persons": files.persons(), "images": files.images(),
            "emb": np.asarray(files.embeddings()), "counts": files.manifest.counts}


def _assert_same_run(a: Path, b: Path) -> None:
    ta, tb = _tables(a), _tables(b)
    for key in ("det", "persons", "images"):
        pd.testing.assert_frame_equal(ta[key], tb[key])
    np.testing.assert_array_equal(ta["emb"], tb["emb"])
    assert ta["counts"] == tb["counts"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("demo") / "data", n_images=10, seed=5).root


def _images(data: Path) -> list[Path]:
    return sorted(data.rglob("*.jpg"))


# ------------------------------------------------------------------ reader and writer
def test_synthetic_and_extracted_runs_pass_the_same_reader(demo, tmp_path):
    syn = write_synthetic_run(tmp_path / "syn", 200)
    ext = run_extraction(ExtractSettings(data=demo, out=tmp_path / "ext", checkpoint="none", min_size=128,
                                         max_size=160, limit=3)).out
    opened = [rundir.open_run(r) for r in (syn, ext)]
    assert [o.manifest.kind for o in opened] == ["synthetic", "extracted"]
    # One writer computes the counts, so both kinds carry the same keys.
    assert opened[0].manifest.counts.keys() == opened[1].manifest.counts.keys()
    for o in opened:
        for table in (rundir.IMAGES, rundir.PERSONS, rundir.DETECTIONS):
            df = o._table(table)
            assert list(df.columns) == [c.name for c in rundir.SCHEMAS[table]]
        assert o.embeddings().shape == (o.n, 256)
        assert set(o.manifest.files) >= {rundir.EMBEDDINGS, rundir.DETECTIONS}


def test_writer_refuses_tables_that_break_the_format(tmp_path):
    run = write_synthetic_run(tmp_path / "run", 120)
    files = rundir.open_run(run)
    det, persons, images = files.detections(), files.persons(), files.images()
    xb = np.asarray(files.embeddings())
    m = files.manifest
    kw = dict(images=images, persons=persons, embeddings=xb)
    with pytest.raises(ValueError, match="unexpected columns \\['extra'\\]"):
        rundir.write_run(tmp_path / "x", m, detections=det.assign(extra=1), **kw)
    with pytest.raises(ValueError, match="column score cannot be stored as float32"):
        rundir.write_run(tmp_path / "x", m, detections=det.assign(score="high"), **kw)
    with pytest.raises(ValueError, match="det_id must equal the row number"):
        rundir.write_run(tmp_path / "x", m, detections=det.iloc[::-1].reset_index(drop=True), **kw)
    with pytest.raises(ValueError, match="embeddings must be float32"):
        rundir.write_run(tmp_path / "x", m, detections=det, images=images, persons=persons, embeddings=xb[:-1])
    with pytest.raises(ValueError, match="person_id that persons.parquet does not hold"):
        rundir.write_run(tmp_path / "x", m, detections=det, images=images, persons=persons.iloc[1:], embeddings=xb)
    assert not (tmp_path / "x" / rundir.MANIFEST).exists()


def test_reader_names_a_file_that_disagrees_with_the_schema(tmp_path):
    run = write_synthetic_run(tmp_path / "run", 120)
    det = pd.read_parquet(run / rundir.DETECTIONS)
    det.assign(score=det["score"].astype("float64")).to_parquet(run / rundir.DETECTIONS, index=False)
    with pytest.raises(ValueError, match="detections.parquet does not match the run format .score is double"):
        rundir.open_run(run)


def test_old_schema_run_gets_one_line_and_migrates(tmp_path):
    run = write_synthetic_run(tmp_path / "run", 150)
    build_index(run)
    # A version-1 manifest as the first release wrote it (other count names, no kind).
    doc = json.loads((run / rundir.MANIFEST).read_text())
    old = {k: doc[k] for k in ("embedding_dim", "threshold", "checkpoint", "model", "dataset", "settings")}
    old.update(schema_version=1, status="complete", counts={"matched": 1, "detections": 2, "rows": 150})
    (run / rundir.MANIFEST).write_text(json.dumps(old))
    with pytest.raises(ValueError) as err:
        load_run(run)
    assert f"python -m extractor migrate {run}" in str(err.value) and "\n" not in str(err.value)

    done = subprocess.run([sys.executable, "-m", "extractor", "migrate", str(run)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = load_run(run)  # the index is still valid: the embeddings' bytes are unchanged
    assert loaded.manifest["migrated_from"] == 1 and loaded.manifest["counts"]["rows"] == 150
    with pytest.raises(ValueError, match="extract it again for the detection audit"):
        rundir.open_run(run).predictions()
    again = subprocess.run([sys.executable, "-m", "extractor", "migrate", str(run)], cwd=ROOT,
                           capture_output=True, text=True)
    assert again.returncode == 2 and "nothing to migrate" in again.stderr


def test_newer_manifest_fields_are_refused(tmp_path):
    run = write_synthetic_run(tmp_path / "run", 60)
    doc = json.loads((run / rundir.MANIFEST).read_text())
    doc["hologram"] = True
    (run / rundir.MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="written by a newer version"):
        rundir.open_run(run)


def test_readme_documents_every_table_from_the_schema():
    readme = (ROOT / "README.md").read_text()
    for table in rundir.SCHEMAS:
        assert rundir.markdown_table(table) in readme, f"README's table for {table} is not the schema's"


# ------------------------------------------------------------------ permissions
@pytest.mark.parametrize("umask,file_mode", [(0o022, 0o644), (0o027, 0o640)])
def test_files_get_the_users_umask(tmp_path, umask, file_mode):
    before = os.umask(umask)
    try:
        run = write_synthetic_run(tmp_path / "run", 120)
        build_index(run)
    finally:
        os.umask(before)
    written = [p for p in run.rglob("*") if p.is_file()]
    assert len(written) >= 7
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    assert stat.S_IMODE((run / rundir.INDEX_DIR).stat().st_mode) == 0o777 & ~umask


# ------------------------------------------------------------------ resume
def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "extractor", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_sigkill_then_dataset_change_then_resume_equals_a_clean_run(demo, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo, data)
    images = _images(data)
    broken, deleted = images[1], images[-2]
    good_bytes = broken.read_bytes()
    broken.write_bytes(b"not a jpeg")  # unreadable when the run starts
    killed = tmp_path / "killed"
    kill_after_shards(["run", "--data", str(data), *SMALL], killed)

    broken.write_bytes(good_bytes)   # made readable
    deleted.unlink()                 # removed
    resumed = _cli("run", "--data", str(data), *SMALL, "--out", str(killed))
    assert "the dataset changed since this run started" in resumed.stderr
    assert "1 image(s) removed" in resumed.stderr and "1 image(s) made readable" in resumed.stderr

    clean = tmp_path / "clean"
    _cli("run", "--data", str(data), *SMALL, "--out", str(clean))
    _assert_same_run(clean, killed)
    status = _tables(killed)["images"].set_index("filename")["status"]
    assert status[broken.name] == "ok" and status[deleted.name].startswith("missing")


def test_kill_during_the_final_write_resumes_cleanly(demo, tmp_path, monkeypatch):
    settings = ExtractSettings(data=demo, out=tmp_path / "run", checkpoint="none", min_size=128, max_size=160,
                               limit=4, shard_size=2)
    real = rundir.io.write_table
    calls = []

    def dies_on_the_second_table(df, table, path):
        calls.append(table)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is gone between two files of the final write
        return real(df, table, path)

    monkeypatch.setattr(rundir.io, "write_table", dies_on_the_second_table)
    with pytest.raises(KeyboardInterrupt):
        run_extraction(settings)
    monkeypatch.setattr(rundir.io, "write_table", real)
    assert not (settings.out / rundir.MANIFEST).exists() and (settings.out / rundir.WORK_DIR).is_dir()
    resumed = run_extraction(settings)
    assert resumed.processed_shards == 0 and resumed.resumed_shards == 2
    clean = run_extraction(ExtractSettings(**{**settings.__dict__, "out": tmp_path / "clean"}))
    _assert_same_run(clean.out, resumed.out)

    # Killed after the manifest but before the clean-up: the rerun finishes the clean-up.
    (resumed.out / rundir.WORK_DIR / "shards").mkdir(parents=True)
    again = run_extraction(settings)
    assert again.processed_shards == 0 and not (resumed.out / rundir.WORK_DIR).exists()


def test_changed_annotations_stop_the_resume_before_any_work(demo, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(demo, data)
    settings = ExtractSettings(data=data, out=tmp_path / "run", checkpoint="none", min_size=128, max_size=160,
                               limit=4, shard_size=2)
    import extractor.pipeline as pipeline
    real = pipeline._write_shard

    def dies_after_one_shard(path, results, key):
        if any(p.name.startswith("shard-") for p in path.parent.iterdir()):
            raise KeyboardInterrupt
        real(path, results, key)

    monkeypatch.setattr(pipeline, "_write_shard", dies_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        run_extraction(settings)
    monkeypatch.setattr(pipeline, "_write_shard", real)
    ann = data / "annotations.csv"
    lines = ann.read_text().splitlines(keepends=True)
    ann.write_text("".join(lines[:-1]))
    with pytest.raises(ValueError, match="the annotations changed since it was made.*--overwrite"):
        run_extraction(settings)
    shards = list((settings.out / rundir.WORK_DIR / "shards").glob("shard-*"))
    assert len(shards) == 1  # finished work is never lost by a refusal
    assert run_extraction(ExtractSettings(**{**settings.__dict__, "overwrite": True})).manifest["status"] == "complete"


def test_schema_column_meanings_are_written():
    for table, cols in rundir.SCHEMAS.items():
        assert len({c.name for c in cols}) == len(cols), table
        assert all(len(c.meaning) > 5 for c in cols), table
    assert schema.arrow_schema(rundir.PREDICTIONS).names[:2] == ["image_id", "query_idx"]


def test_low_cardinality_strings_read_as_categoricals_and_round_trip(tmp_path):
    from extractor.where import evaluate_where

    run = write_synthetic_run(tmp_path / "syn", 400)
    det = rundir.open_run(run).detections()
    declared = {c.name for c in rundir.SCHEMAS[rundir.DETECTIONS] if c.categorical}
    assert declared == {"class1", "class2", "mst_band", "gender_mode", "age_mode"}
    assert {c for c in det.columns if isinstance(det[c].dtype, pd.CategoricalDtype)} == declared
    # The categories are the file's values: nothing invented, nothing lost.
    raw = pd.read_parquet(run / rundir.DETECTIONS)
    for c in declared:
        assert list(det[c].astype(str)) == list(raw[c].astype(str))
        assert set(det[c].cat.categories) == set(raw[c])
    # Written back through the one writer, the file is the same bytes.
    schema.write_table(det, rundir.DETECTIONS, tmp_path / "again.parquet")
    assert (tmp_path / "again.parquet").read_bytes() == (run / rundir.DETECTIONS).read_bytes()
    # Filters behave as on strings, ordering included (an unordered categorical refuses '<').
    for where in ("mst_band == 'darker'", "class1 in ['nurse', 'doctor']", "class1 < 'f'", "class2 == ''"):
        expected = raw.eval(where, engine="python").to_numpy(dtype=bool)
        np.testing.assert_array_equal(evaluate_where(det, where), expected)
    assert det.memory_usage(deep=True).sum() < raw.memory_usage(deep=True).sum()
