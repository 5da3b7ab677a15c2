"""Runs: the run directories, which one is open, index builds, the one-click demo."""
from __future__ import annotations

import logging

import streamlit as st

import index
from ui import app, runs
from ui.views import switch_to

log = logging.getLogger(__name__)


def render() -> None:
    st.title("Runs")
    root = runs.runs_root()
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
                if right.button("Build index", key=f"build-{entry.name}"):
                    _build_index(entry)
            elif right.button("Open", key=f"open-{entry.name}", type="primary" if entry.name == current else "secondary"):
                app.choose_run(entry.name)
                switch_to("overview")
    with st.expander("Extract another dataset"):
        st.markdown(runs.EXTRACT_HELP)


def _build_index(entry: runs.RunEntry) -> None:
    try:
        with st.spinner(f"Building the index of {entry.name}…"):
            index.build_index(entry.path)
    except (ValueError, OSError) as exc:
        st.error(f"The index of {entry.name!r} could not be built: {exc}")
        return
    st.rerun()


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
        bar = st.progress(0.0, text="starting")
        try:
            runs.build_demo(root, settings, progress=lambda f, text: bar.progress(min(1.0, f), text=text))
        except (ValueError, RuntimeError, OSError) as exc:
            st.error(f"The demo could not be built: {exc}")
            return
        app.choose_run(runs.DEMO_NAME)
        switch_to("overview")
