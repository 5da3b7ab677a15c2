"""The Streamlit layer shared by the pages: cached resources, the chosen run, banners.

Caches are keyed only by their inputs (run path + manifest mtimes + parameters), so
sessions share work but never choices; each session's run lives in its own
``st.session_state``.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

import index
from extractor.infer import Detector, PhotoDetections
from index.spaces import DEFAULT_SPACE, space_status
from ui import gallery, runs, spaces
from ui.jobs import Job, Jobs

log = logging.getLogger(__name__)

RUN_KEY = "run_name"          # the session's chosen run
PICK_KEY = "run_pick"         # the sidebar widget
SEEN_KEY = "run_param_seen"   # the ?run= value already acted upon
OWNER_KEY = "job_owner"       # who this session is to the job pool
UNTRAINED_BANNER = ("**Untrained weights.** This run was made with seeded untrained (or synthetic) weights: "
                    "its detections, neighbours and group numbers are structural only. They show that the "
                    "pipeline works end to end, not how DETR treats skin tones or lighting.")

SIMULATED_BANNER = ("**Simulated.** This run is synthetic: its detections were drawn from planted probabilities "
                    "(the manifest's `planted` holds the truth; in the simulated audit, `python -m index "
                    "synthetic-audit`, darkened runs lose more darker tones). Use it to learn the pages and to check "
                    "the statistics against the truth; it says nothing about DETR.")


# ------------------------------------------------------------------ the chosen run
def sync_run_choice(entries: list[runs.RunEntry]) -> runs.RunEntry | None:
    """Resolve the session's run from ``?run=`` (a shared link), the session or a default,
    and write it back to the URL so the address always opens what is on screen."""
    state = st.session_state
    param = st.query_params.get("run")
    if param is not None and param != state.get(SEEN_KEY):
        if runs.find_run(entries, param) is not None:
            state[RUN_KEY] = param
        else:
            st.warning(f"There is no run named {param!r} under {runs.runs_root()}; showing another run.")
    chosen = runs.find_run(entries, state.get(RUN_KEY))
    if chosen is None:
        chosen = runs.default_run(entries)
        state[RUN_KEY] = chosen.name if chosen else None
    name = chosen.name if chosen else None
    state[SEEN_KEY] = name
    if name is not None and st.query_params.get("run") != name:
        st.query_params["run"] = name
    return chosen


def choose_run(name: str) -> None:
    st.session_state[RUN_KEY] = name


def _picked() -> None:
    choose_run(st.session_state[PICK_KEY])


def sidebar_picker(entries: list[runs.RunEntry], chosen: runs.RunEntry | None) -> None:
    names = [e.name for e in entries]
    if not names:
        st.sidebar.caption(f"No runs under {runs.runs_root()} yet.")
        return
    if chosen is not None and st.session_state.get(PICK_KEY) != chosen.name:
        st.session_state[PICK_KEY] = chosen.name
    st.sidebar.selectbox("Run", names, key=PICK_KEY, on_change=_picked,
                         help=f"Run directories under {runs.runs_root()} (set RUNS_DIR to look elsewhere)")


def untrained_banner(chosen: runs.RunEntry | None) -> None:
    """The banners every page shows above itself: simulated (planted truth) and untrained weights."""
    if chosen is not None and runs.is_simulated(chosen.manifest):
        st.warning(SIMULATED_BANNER, icon=":material/science:")
    if chosen is not None and runs.is_untrained(chosen.manifest):
        st.warning(UNTRAINED_BANNER, icon=":material/warning:")


@st.cache_resource(show_spinner="Opening the run and its index…", max_entries=8)
def _open_run(run_dir: str, stamp: tuple[int, int], space: str = "query") -> index.Run:
    return index.load_run(Path(run_dir), space)


def open_chosen_run() -> index.Run | None:
    """The session's run opened (cached across sessions), or None after saying why."""
    entries = runs.list_runs(runs.runs_root())
    entry = runs.find_run(entries, st.session_state.get(RUN_KEY))
    if entry is None:
        st.info("No run is open. Pick or build one on the **Runs** page.")
        return None
    if entry.error:
        st.error(f"Run {entry.name!r} cannot be used: {entry.error}.")
        return None
    if not entry.index_built:
        st.error(f"Run {entry.name!r} has no index yet: build it on the Runs page "
                 f"(or `python -m index build {entry.path}`).")
        return None
    try:
        return _open_run(str(entry.path), runs.run_stamp(entry.path))
    except (ValueError, OSError) as exc:
        st.error(f"Run {entry.name!r} cannot be opened: {exc}")
        return None


def space_run(run: index.Run, space: str) -> index.Run | None:
    """``run`` opened in another feature space (cached like the run), or None after saying why."""
    if space == run.space:
        return run
    try:
        return _open_run(str(run.run_dir), runs.run_stamp(run.run_dir), space)
    except (ValueError, OSError) as exc:
        st.error(f"The {space} index of this run cannot be opened: {exc}")
        return None


def space_choice(run: index.Run, key: str, fallback: str) -> str:
    """The feature-space selector of a page (every page that searches or compares in a space):
    a space the run lacks (or has no index for) is listed as unavailable, and choosing it says
    how to get it and falls back to query. ``fallback`` names what then uses query."""
    status = space_status(run.run_dir, run.manifest)
    space = st.selectbox("Feature space", index.SPACES, key=key, persist_state="session",
                         format_func=lambda s: spaces.space_label(s, status), help=spaces.SPACE_HELP)
    if status[space]:
        st.info(spaces.unavailable_note(space, status[space], fallback))
        return DEFAULT_SPACE
    return space


def run_key(run: index.Run) -> tuple[str, tuple[int, int]]:
    """What identifies a run's content for ``st.cache_data``."""
    return str(run.run_dir), runs.run_stamp(run.run_dir)


# ------------------------------------------------------------------ cached read-outs
@st.cache_data(max_entries=64, show_spinner="Computing the read-out (bootstrap intervals)…")
def compare(key: tuple[str, tuple[int, int]], by: str | tuple[str, ...], metric: str, population: str | None,
            settings: index.GroupSettings, where: str | None = None, space: str = "query") -> pd.DataFrame:
    """``index.compare`` cached by run content and parameters (switching back is instant)."""
    return index.compare(_open_run(*key, space), list(by) if isinstance(by, tuple) else by, metric, population,
                         settings, where=where)


@st.cache_data(max_entries=16, show_spinner="Probing every feature space (cross-validated, bootstrap intervals)…")
def probe(key: tuple[str, tuple[int, int]], by: str, population: str, settings: index.ProbeSettings) -> pd.DataFrame:
    """``index.probe`` over every feature space of the run, cached like ``compare``."""
    return index.probe(key[0], by, None, population, settings)


def readout(key: tuple[str, tuple[int, int]], by: str | tuple[str, ...], metric: str, population: str | None,
            settings: index.GroupSettings, where: str | None = None, space: str = "query") -> pd.DataFrame | None:
    """``compare`` for a page: a read-out that cannot be computed is one line of error, not a traceback."""
    try:
        return compare(key, by, metric, population, settings, where, space)
    except (ValueError, OSError) as exc:
        name = " x ".join(by) if isinstance(by, tuple) else by
        st.error(f"The {metric} read-out by {name} cannot be computed: {exc}")
        return None


@st.cache_data(max_entries=128, show_spinner=False)
def base_rates(key: tuple[str, tuple[int, int]], where: str | None, by: str) -> pd.DataFrame:
    run = _open_run(*key)
    return gallery.base_rates(run.meta, run.mask(where), by)


# 512 crops of 160x160 RGB are ~40 MB: a few galleries and map selections of every session.
@st.cache_data(max_entries=512, show_spinner=False)
def crop(path: str | None, box: tuple[float, float, float, float], size: int = gallery.CROP_SIZE) -> np.ndarray:
    return gallery.crop_person(Path(path) if path else None, box, size)


def crops(table: pd.DataFrame, paths: dict[int, Path | None]) -> list[np.ndarray]:
    return [crop(str(paths.get(int(r.image_id))) if paths.get(int(r.image_id)) else None,
                 (float(r.x1), float(r.y1), float(r.x2), float(r.y2)))
            for r in table.itertuples()]


# A resource, not data: read-only, and copying ~30k paths on every rerun would cost more than the gallery.
@st.cache_resource(max_entries=4, show_spinner=False)
def image_paths(key: tuple[str, tuple[int, int]]) -> dict[int, Path | None]:
    run = _open_run(*key)
    return gallery.image_paths(run.images, runs.dataset_root(run.manifest))


# ------------------------------------------------------------------ the run's DETR
@dataclass(frozen=True)
class DetectorSpec:
    """What makes the app's DETR the run's DETR: weights, seed, resize, precision."""

    checkpoint: str
    seed: int
    min_size: int
    max_size: int
    precision: str
    from_run: bool   # False: the run records no checkpoint; seeded weights stand in

    @classmethod
    def of(cls, manifest: dict) -> "DetectorSpec":
        ck = manifest.get("checkpoint") or {}
        pre = manifest.get("preprocessing") or {}
        spec = ck.get("spec")
        precision = pre.get("precision", "auto")
        # fp16 and tf32 exist only on CUDA; a GPU-made run opened on a CPU uses the CPU's choice.
        if precision not in ("fp32", "bf16"):
            precision = "auto"
        return cls(checkpoint=spec or "none", seed=int(ck.get("seed") or 0), min_size=int(pre.get("min_size", 800)),
                   max_size=int(pre.get("max_size", 1333)), precision=precision, from_run=bool(spec))


@st.cache_resource(show_spinner="Loading the run's DETR weights…", max_entries=2)
def detector(spec: DetectorSpec) -> Detector:
    from extractor.checkpoints import build_model
    model, _ = build_model(spec.checkpoint, seed=spec.seed)
    return Detector(model, min_size=spec.min_size, max_size=spec.max_size, precision=spec.precision)


@st.cache_data(max_entries=32, show_spinner="Running DETR on the photo…")
def detect(photo_digest: str, spec: DetectorSpec, _img, features: tuple[str, ...] = ()) -> PhotoDetections:
    """Detections of one photo, keyed by its content hash: reruns never repeat the forward.
    ``features``: the per-query rows of those ``--features`` too (``ui.spaces.detector_features``)."""
    return detector(spec).detect(_img, return_attention=True, features=features)


@st.cache_resource
def jobs() -> Jobs:
    """One pool for every session of the process: 2 jobs at once, 1 per session (ui.jobs)."""
    return Jobs(max_workers=2, per_owner_running=1)


def session_owner() -> str:
    """This session's id for job ownership: only the session that started a job may cancel it."""
    return st.session_state.setdefault(OWNER_KEY, uuid.uuid4().hex)


@st.fragment(run_every=1.5)
def poll_job(key: str, note: str = "") -> None:
    """The job's status, refreshed every 1.5 s; the whole page reruns once it has finished."""
    job = jobs().get(key)
    if job is None or job.future.done():
        st.rerun(scope="app")
    job_status(job, note)


def job_status(job: Job, note: str = "") -> None:
    """A job's progress, and a Cancel button for the session that started it."""
    fraction, text = job.progress
    if job.state == "waiting":
        pool = jobs()
        st.info(f"The {job.label} is waiting for a free worker ({len(pool.running())} computing, "
                f"{len(pool.waiting())} waiting; a session runs one computation at a time). {note}",
                icon=":material/hourglass_top:")
    else:
        st.info(f"Computing the {job.label}: {text}, {job.elapsed:.0f} s so far. {note}",
                icon=":material/hourglass_top:")
        if fraction is not None:
            st.progress(fraction)
    if job.owner != session_owner():
        st.caption("Another session started this computation and shares it with you; only it can cancel it.")
    elif job.state == "cancelling":
        st.caption("Cancelling: it stops at its next step (a UMAP or t-SNE fit and an index build run to their end).")
    elif st.button("Cancel", key=f"cancel-{job.key}"):
        jobs().cancel(job.key, session_owner())
        st.rerun(scope="app")


def settings_caption(settings: index.GroupSettings) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(settings).items())
