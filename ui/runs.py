"""Run directories as the app sees them: discovery, a manifest in words, the demo build."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from extractor import rundir
from extractor.rundir import INDEX_DIR, INDEX_LOCK, MANIFEST, SWEEP_FILE, WORK_DIR, exclusive  # noqa: F401
from index import build as index_build

log = logging.getLogger(__name__)

RUNS_ENV = "RUNS_DIR"
INDEX_MANIFEST = Path(INDEX_DIR) / index_build.INDEX_MANIFEST
DEMO_NAME = "demo"

# The README's commands, shown when there is no run yet.
EXTRACT_HELP = """\
```bash
# FACET release (annotations.csv + sa_*.jpg in any sub-folders)
.venv/bin/python -m extractor run --data /data/facet --out runs/facet-r50
# a subset of persons
.venv/bin/python -m extractor run --data /data/facet --out runs/facet-dark-dim \\
    --where "mst_mode in [7,8,9,10] and lighting_dimly_lit"
# a COCO-style conversion
.venv/bin/python -m extractor run --data /data/facet-coco --annotations annotations/skin3.json --out runs/skin3
# then index each run
.venv/bin/python -m index build runs/facet-r50
```"""


def runs_root() -> Path:
    """``$RUNS_DIR`` or ``./runs``; it need not exist yet."""
    return Path(os.environ.get(RUNS_ENV) or "runs").expanduser().resolve()


@dataclass(frozen=True)
class RunEntry:
    """One directory under the runs root that holds a manifest."""

    name: str
    path: Path
    manifest: dict
    error: str | None        # why the manifest cannot be used, if it cannot
    index_built: bool
    index_kind: str | None

    @property
    def usable(self) -> bool:
        return self.error is None and self.index_built


def _read_json(path: Path) -> tuple[dict, str | None]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {}, f"{path.name} is unreadable ({type(exc).__name__})"
    return (doc, None) if isinstance(doc, dict) else ({}, f"{path.name} is not a JSON object")


def _candidate_dirs(root: Path) -> list[tuple[str, Path]]:
    """(name, dir) of every directory directly under ``root``, and of those inside a sweep
    folder (``python -m extractor sweep``), named ``sweep/run``; by name."""
    if not root.is_dir():
        return []
    out = []
    for p in sorted(q for q in root.iterdir() if q.is_dir()):
        out.append((p.name, p))
        if (p / SWEEP_FILE).is_file():
            out.extend((f"{p.name}/{q.name}", q) for q in sorted(q for q in p.iterdir() if q.is_dir()))
    return out


def sweep_order(folder: Path) -> list[str]:
    """The run directories of a sweep (or simulated audit) folder in the order its sweep.json gives."""
    doc, error = _read_json(folder / SWEEP_FILE) if (folder / SWEEP_FILE).is_file() else ({}, "absent")
    return [str(r.get("dir")) for r in doc.get("runs", []) if isinstance(r, dict)] if error is None else []


def list_runs(root: Path) -> list[RunEntry]:
    """Run directories under ``root`` (a dir with manifest.json; sweeps' runs too), by name."""
    out = []
    for name, path in _candidate_dirs(root):
        if not (path / MANIFEST).is_file():
            continue
        try:
            manifest, error = rundir.load_manifest(path).to_json(), None
        except ValueError as exc:  # unreadable, or another schema version: say what to do
            manifest, error = _read_json(path / MANIFEST)[0], str(exc)
        if error is None and manifest.get("status", "complete") != "complete":
            error = f"the run is not complete (status {manifest.get('status')!r})"
        index_doc, index_error = _read_json(path / INDEX_MANIFEST) if (path / INDEX_MANIFEST).is_file() else ({}, "")
        out.append(RunEntry(name, path, manifest, error, index_error is None, index_doc.get("kind")))
    return out


def unfinished_runs(root: Path) -> list[str]:
    """Names of directories holding an interrupted extraction (no manifest yet)."""
    return [name for name, p in _candidate_dirs(root) if (p / WORK_DIR).is_dir() and not (p / MANIFEST).is_file()]


def find_run(entries: list[RunEntry], name: str | None) -> RunEntry | None:
    """The entry called ``name``; names come from URLs, so only listed names resolve."""
    return next((e for e in entries if e.name == name), None)


def default_run(entries: list[RunEntry]) -> RunEntry | None:
    """The newest usable run, so a first visit lands somewhere useful."""
    usable = [e for e in entries if e.usable]
    return max(usable, key=lambda e: (str(e.manifest.get("created", "")), e.name)) if usable else None


def is_untrained(manifest: dict) -> bool:
    return bool((manifest.get("checkpoint") or {}).get("untrained", False))


def is_simulated(manifest: dict) -> bool:
    """A run with planted truth (``python -m index synthetic-audit``): its numbers are simulated."""
    return bool(manifest.get("planted"))


def checkpoint_label(manifest: dict) -> str:
    ck = manifest.get("checkpoint") or {}
    name = ck.get("name") or ck.get("spec") or "unknown"
    sha = ck.get("sha256")
    label = f"{name} (sha256 {sha[:12]})" if sha else str(name)
    return label + (" — untrained weights" if ck.get("untrained") else "")


def runs_table(entries: list[RunEntry]) -> pd.DataFrame:
    """One row per run for the Runs page."""
    rows = []
    for e in entries:
        c = e.manifest.get("counts") or {}
        rows.append({
            "run": e.name,
            "checkpoint": checkpoint_label(e.manifest) if not e.error else "",
            "perturbation": (e.manifest.get("perturbation") or {}).get("spec") or "none",
            "images": c.get("images"),
            "persons": c.get("persons"),
            "detected": c.get("persons_detected"),
            "rows": c.get("rows"),
            "index": (e.index_kind or "built") if e.index_built else "not built",
            "created": e.manifest.get("created", ""),
            "problem": e.error or "",
        })
    cols = ["run", "checkpoint", "perturbation", "images", "persons", "detected", "rows", "index", "created", "problem"]
    return pd.DataFrame(rows, columns=cols)


def run_stamp(run_dir: Path) -> tuple[int, int]:
    """Modification times of the run and index manifests: the key of every cached read-out,
    so a rebuilt index or a re-extracted run is never served stale numbers."""
    def mtime(p: Path) -> int:
        try:
            return p.stat().st_mtime_ns
        except OSError:
            return 0
    return mtime(run_dir / MANIFEST), mtime(run_dir / INDEX_MANIFEST)


def dataset_root(manifest: dict) -> Path | None:
    """The dataset folder the run was extracted from, when it exists on this machine."""
    root = (manifest.get("dataset") or {}).get("root")
    if not root:
        return None
    path = Path(root)
    return path if path.is_dir() else None


def describe_manifest(manifest: dict) -> list[tuple[str, str]]:
    """(label, sentence) pairs: the manifest in words for the Overview page."""
    model = manifest.get("model") or {}
    pre = manifest.get("preprocessing") or {}
    ds = manifest.get("dataset") or {}
    c = manifest.get("counts") or {}
    filters = manifest.get("filters") or {}
    out: list[tuple[str, str]] = []
    arch = model.get("architecture") or model.get("name") or "unknown"
    backbone = model.get("backbone")
    out.append(("Model", f"{arch}" + (f", {backbone}{' DC5' if model.get('dilation') else ''}" if backbone else "")
                + (f", {model.get('num_queries')} queries" if model.get("num_queries") else "")))
    out.append(("Checkpoint", checkpoint_label(manifest)))
    if "threshold" in manifest:
        iou = f"; matched to an annotated person at IoU >= {manifest['min_iou']}" if "min_iou" in manifest else ""
        out.append(("Threshold", f"a query is kept when P(person) >= {manifest['threshold']}{iou}"))
    if pre:
        out.append(("Preprocessing", f"shorter side {pre.get('min_size')}, longer side at most {pre.get('max_size')}, "
                    f"{pre.get('precision', '?')} on {pre.get('device', '?')}, batch {pre.get('batch_size', '?')}"))
    pert = manifest.get("perturbation") or {}
    if pert:  # runs from before perturbations have no entry: they were not perturbed
        spec = pert.get("spec") or "none"
        out.append(("Perturbation", (pert.get("words") or spec) + ("" if spec == "none" else f" — `{spec}`")))
    where = ds.get("root") or "not recorded"
    out.append(("Dataset", f"{ds.get('format', 'unknown')} at {where}"
                + ("" if ds.get("root") is None or Path(str(ds.get("root"))).is_dir() else " (not on this machine)")))
    if filters.get("where") or filters.get("limit"):
        out.append(("Filters", f"where {filters.get('where')!r}, limit {filters.get('limit')}"))
    failed = c.get("images_failed", 0)
    reasons = c.get("images_failed_by_reason") or {}
    out.append(("Images", f"{c.get('images', '?')} images, {failed} failed"
                + (" (" + ", ".join(f"{k}: {v}" for k, v in reasons.items()) + ")" if reasons else "")))
    skipped = ds.get("skipped_rows", 0)
    by_reason = ds.get("skipped_by_reason") or {}
    out.append(("Annotation rows", f"{ds.get('rows_read', '?')} read, {skipped} skipped"
                + (" (" + ", ".join(f"{k}: {v}" for k, v in by_reason.items()) + ")" if by_reason else "")))
    persons = c.get("persons", "?")
    detected = c.get("persons_detected", "?")
    out.append(("Persons", f"{persons} annotated persons, {c.get('persons_evaluated', persons)} on readable images, "
                f"{detected} detected"))
    kept = c.get("detections_kept", "?")
    parts = [f"{c.get('rows', '?')} embeddings: {kept} kept detections"]
    if "fallback_rows" in c:
        parts.append(f"{c['fallback_rows']} rows of missed persons")
    if "detections_unmatched" in c:
        parts.append(f"{c['detections_unmatched']} kept detections matching nobody")
    out.append(("Rows", ", ".join(parts)))
    return out


def perturbation_note(manifest: dict) -> str | None:
    """What the photo query page says about a perturbed run (None for a plain run)."""
    pert = manifest.get("perturbation") or {}
    # settings.perturb is recorded only when the perturbation changes pixels (not for darken:1.0).
    effective = (manifest.get("settings") or {}).get("perturb")
    if not effective:
        return None
    return (f"This run's dataset images were perturbed ({pert.get('words') or effective}). The query photo is "
            "not: it is your photo, and it goes through the run's DETR as it is (an image of this run too, as "
            "stored), so its embedding is not the run's row for that image.")


def skipped_examples(manifest: dict) -> pd.DataFrame:
    rows = (manifest.get("dataset") or {}).get("skipped_examples") or []
    return pd.DataFrame(rows, columns=["where", "reason"])


# ------------------------------------------------------------------ the offline demo
@dataclass(frozen=True)
class DemoSettings:
    """The one-click demo. 96 images (145 persons) at these sizes took 38 s to write,
    extract and index on 2 shared CPU cores (120 images: 42 s), leaving room under the
    2-3 minutes a first visit should wait on a slower machine."""

    n_images: int = 96
    min_size: int = 320
    max_size: int = 512
    seed: int = 0
    # Small shards: the progress callback fires once per shard.
    shard_size: int = 8


def demo_paths(root: Path) -> tuple[Path, Path]:
    """(dataset dir, run dir) of the demo: ``<runs>/../data/demo`` and ``<runs>/demo``."""
    return root.parent / "data" / DEMO_NAME, root / DEMO_NAME


def build_run_index(run_dir: Path) -> dict:
    """``index.build_index``, which holds the run's index lock: two clicks, sessions, app
    processes or a CLI build cannot write the index at once; -> the index manifest."""
    from index import IndexBusy, build_index

    try:
        return build_index(Path(run_dir))
    except IndexBusy:
        raise RuntimeError(f"another session is building the index of {Path(run_dir).name} right now; "
                           "open the Runs page again in a minute") from None


def build_demo(root: Path, settings: DemoSettings = DemoSettings(),
               progress: Callable[[float, str], None] | None = None) -> Path:
    """Write the synthetic dataset, extract it with seeded weights, index it; -> run dir.

    ``progress(fraction, text)`` is called along the way. Re-running resumes an
    interrupted extraction (the extractor's own crash safety).
    """
    from extractor.demo import write_demo
    from extractor.pipeline import run_extraction
    from extractor.settings import ExtractSettings
    from index import build_index

    report = progress or (lambda f, t: None)
    data_dir, run_dir = demo_paths(root)
    with exclusive(root / ".demo.lock") as mine:
        if not mine:
            raise RuntimeError("another session is building the demo right now; open the Runs page again in a minute")
        report(0.0, f"writing {settings.n_images} synthetic images to {data_dir}")
        if not (data_dir / "annotations.csv").is_file():
            write_demo(data_dir, n_images=settings.n_images, seed=settings.seed)
        report(0.05, "loading seeded untrained DETR weights")
        extract = ExtractSettings(data=data_dir, out=run_dir, checkpoint="none", min_size=settings.min_size,
                                  max_size=settings.max_size, seed=settings.seed, shard_size=settings.shard_size)
        run_extraction(extract, progress=lambda done, total: report(
            0.05 + 0.9 * done / max(total, 1), f"extracting: {done} / {total} images"))
        report(0.96, "building the index")
        build_index(run_dir)
        report(1.0, "done")
    return run_dir


# ------------------------------------------------------------------ the simulated audit
SIMULATED_NAME = "simulated-audit"


def build_simulated_audit(root: Path, rows: int = 4000, seed: int = 0) -> list[Path]:
    """Write ``<runs>/simulated-audit/{base,darken-0.5,darken-0.1}`` (``index.synthetic_audit``),
    each indexed; rebuilt from scratch when it is there already. 4000 rows: ~30 s on 2 cores."""
    from index.synthetic_audit import AuditSettings, write_synthetic_audit

    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / ".simulated.lock") as mine:
        if not mine:
            raise RuntimeError("another session is building the simulated audit right now; try again in a minute")
        return write_synthetic_audit(root / SIMULATED_NAME, AuditSettings(seed=seed, rows=rows), overwrite=True)
