"""Runs: the run directories, which one is open, index builds, the one-click demo."""
from __future__ import annotations

import concurrent.futures
import logging
from pathlib import Path

import streamlit as st

from ui import app, runs
from ui.jobs import JobContext, JobLimit
from ui.views import switch_to

log = logging.getLogger(__name__)

DEMO_WAIT_KEY = "demo_wait"   # this session asked for the demo and opens it once built
QUICK_WAIT_S = 3.0            # a small index builds within this: no polling round


def _index_key(run_dir: Path) -> str:
    return f"index:{run_dir}"


def _demo_key(root: Path) -> str:
    return f"demo:{root}"


def _index_job(ctx: JobContext, run_dir: Path) -> dict:
    # One step: index.build_index has no points to stop at, so a cancel only stops it before it starts.
    ctx.step(None, "building the index")
    return runs.build_run_index(run_dir)


def _demo_job(ctx: JobContext, root: Path, settings: runs.DemoSettings) -> Path:
    # Stops between shards of the extraction; building it again resumes from there.
    return runs.build_demo(root, settings, progress=ctx.step)


def render() -> None:
    st.title("Runs")
    root = runs.runs_root()
    if _follow_demo(root):
        return
    entries = runs.list_runs(root)
    st.caption(f"Run directories under `{root}` (set `RUNS_DIR` to look elsewhere). "
               "Open one here or with a link ending in `?run=<name>`.")
    if not entries:
        _no_runs(root)
        return

    current = st.session_state.get(app.RUN_KEY)
    st.dataframe(runs.runs_table(entries), hide_index=True, width="stretch")
    for unfinished in runs.unfinished_runs(root):
        st.info(f"`{unfinished}` holds an interrupted extraction: run the same `python -m extractor run` "
                "command again to resume it.")

    for entry in entries:
        with st.container(border=True):
            left, right = st.columns([4, 1], vertical_alignment="center")
            opened = " — **open**" if entry.name == current else ""
            left.markdown(f"**{entry.name}**{opened}  \n{runs.checkpoint_label(entry.manifest)}")
            if entry.error:
                left.error(f"Cannot be used: {entry.error}.")
            elif not entry.index_built:
                left.warning("The index is not built yet.")
                _index_build(entry, left, right)
            elif right.button("Open", key=f"open-{entry.name}", type="primary" if entry.name == current else "secondary"):
                app.choose_run(entry.name)
                switch_to("overview")
    with st.expander("Extract another dataset"):
        st.markdown(runs.EXTRACT_HELP)


def _index_build(entry: runs.RunEntry, left, right) -> None:
    """The Build index button, or the running build (shared by every session asking)."""
    jobs, key = app.jobs(), _index_key(entry.path)
    job = jobs.get(key)
    if job is not None and not job.future.done():
        with left:
            app.poll_job(key, "Its Open button appears once it is built.")
        return
    if job is not None and job.state in ("failed", "cancelled"):
        jobs.forget(key)
        if job.state == "failed":
            exc = job.future.exception()
            left.error(f"The index of {entry.name!r} could not be built: {exc}")
    if not right.button("Build index", key=f"build-{entry.name}"):
        return
    try:
        job = jobs.submit(key, f"index of {entry.name}", _index_job, entry.path, owner=app.session_owner())
        job.future.result(timeout=QUICK_WAIT_S)
    except concurrent.futures.TimeoutError:
        pass  # still building: the next run of the page shows its progress
    except JobLimit as exc:
        left.warning(str(exc))
        return
    except concurrent.futures.CancelledError:
        pass
    except Exception as exc:  # noqa: BLE001 - shown in one line, the log has the traceback
        left.error(f"The index of {entry.name!r} could not be built: {exc}")
        return
    st.rerun()


def _follow_demo(root: Path) -> bool:
    """While this session's demo builds: its progress (True). Once built: open it."""
    if not st.session_state.get(DEMO_WAIT_KEY):
        return False
    job = app.jobs().get(_demo_key(root))
    if job is None:  # another session following the same build saw it finish first
        st.session_state.pop(DEMO_WAIT_KEY)
        demo = runs.find_run(runs.list_runs(root), runs.DEMO_NAME)
        if demo is not None and demo.usable:
            app.choose_run(runs.DEMO_NAME)
            switch_to("overview")
        return False
    if not job.future.done():
        app.poll_job(job.key, "The demo opens when it is ready.")
        return True
    st.session_state.pop(DEMO_WAIT_KEY)
    if job.state == "done":
        app.jobs().forget(job.key)
        app.choose_run(runs.DEMO_NAME)
        switch_to("overview")
    elif job.state == "cancelled":
        st.info("The demo build was cancelled; building it again resumes where it stopped.")
    else:
        st.error(f"The demo could not be built: {job.future.exception()}")
    app.jobs().forget(job.key)
    return False


def _no_runs(root) -> None:
    st.info(f"There is no run under `{root}` yet.")
    st.markdown("#### Extract FACET\nDownload FACET from https://facet.metademolab.com/ and run:")
    st.markdown(runs.EXTRACT_HELP)
    st.markdown("#### Or try the offline demo\nA synthetic FACET-format dataset (people-like figures painted with the "
                "Monk Skin Tone palette) extracted with **seeded untrained weights**: every page works, but the "
                "numbers are structural only.")
    settings = runs.DemoSettings()
    data_dir, run_dir = runs.demo_paths(root)
    st.caption(f"{settings.n_images} images at {settings.min_size}-{settings.max_size} px, about a minute on two CPU "
               f"cores; writes `{data_dir}` and `{run_dir}`.")
    if st.button("Build the offline demo", type="primary"):
        try:
            app.jobs().submit(_demo_key(root), "offline demo", _demo_job, root, settings, owner=app.session_owner())
        except JobLimit as exc:
            st.warning(str(exc))
            return
        st.session_state[DEMO_WAIT_KEY] = True
        st.rerun()
