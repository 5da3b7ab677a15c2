"""Embedding map: PCA / t-SNE / UMAP of a population, coloured by group, with selection."""
from __future__ import annotations

import concurrent.futures
import logging

import pandas as pd
import streamlit as st

import index
from ui import app, figures, gallery, projections as pj
from ui.jobs import JobContext, JobLimit

log = logging.getLogger(__name__)

REQUEST_KEY = "map_request"
QUICK_WAIT_S = 3.0      # PCA and small maps finish within this: shown without a polling round
MAX_SELECTED_CROPS = 24


def render() -> None:
    st.title("Embedding map")
    run = app.open_chosen_run()
    if run is None:
        return
    space = app.space_choice(run, "map_space", "The map")
    srun = app.space_run(run, space)
    if srun is None:
        return
    _form()
    method, population, params = st.session_state.get(REQUEST_KEY) or ("pca", "persons", pj.ProjectionParams())
    try:
        key = pj.run_projection_key(srun, method, population, params)
    except (KeyError, ValueError) as exc:
        st.error(f"This map cannot be made: {exc}")
        return
    projection = _projection(srun, key, method, population, params)
    if projection is None:
        return
    _describe(projection.info, method)
    table = _table(app.run_key(run), key, projection.frame)
    colour = st.selectbox("Colour by", pj.COLOUR_OPTIONS, key="map_colour", persist_state="session")
    title = f"{pj.METHOD_LABELS[method]} of {population} in {space} ({len(table)} points)"
    # plotGlPixelRatio 1 (plotly's default is 2) draws a quarter of the pixels: without a GPU
    # the browser renders WebGL in software, and this cut the map's page switch from ~2 s to ~1 s.
    event = st.plotly_chart(figures.embedding_scatter(table, colour, title), on_select="rerun",
                            selection_mode=("box", "lasso"), key=f"map_chart-{key}", width="stretch",
                            config={"plotGlPixelRatio": 1})
    # Built only when clicked: formatting 50k rows takes over a second, too long for every rerun.
    st.download_button("Map coordinates with metadata (CSV)", lambda: index.to_csv_bytes(table),
                       file_name=f"map-{method}-{population}-{key[:8]}.csv", mime="text/csv", key="map_csv",
                       on_click="ignore")
    points = (event.get("selection") or {}).get("points") or [] if event else []
    _selection(run, population, [_det_id(p) for p in points if _det_id(p) is not None])


def _form() -> None:
    with st.form("map_form"):
        c = st.columns(4)
        method = c[0].selectbox("Method", pj.METHODS, format_func=pj.METHOD_LABELS.get, key="map_method",
                                persist_state="session")
        population = c[1].selectbox("Population", index.POPULATIONS, index=1, key="map_population",
                                    help=gallery.POPULATION_HELP, persist_state="session")
        seed = c[2].number_input("random_state", 0, 2**31 - 1, 0, key="map_seed", persist_state="session")
        cap = c[3].number_input("Sample cap (0 = default)", 0, 1_000_000, 0, step=1000, key="map_cap",
                                persist_state="session",
                                help=f"t-SNE runs on a stratified sample above {pj.DEFAULT_CAPS['tsne']} rows; UMAP is "
                                     f"fitted on one above {pj.DEFAULT_CAPS['umap']} and places the rest by transform.")
        d = st.columns(3)
        n_neighbors = d[0].slider("UMAP n_neighbors", 2, 200, 15, key="map_nn", persist_state="session")
        min_dist = d[1].slider("UMAP min_dist", 0.0, 1.0, 0.1, 0.05, key="map_md", persist_state="session")
        perplexity = d[2].slider("t-SNE perplexity", 5.0, 100.0, 30.0, 1.0, key="map_perp", persist_state="session")
        if st.form_submit_button("Show map", type="primary"):
            try:
                params = pj.ProjectionParams(n_neighbors=int(n_neighbors), min_dist=float(min_dist),
                                             perplexity=float(perplexity), sample_cap=int(cap) or None,
                                             random_state=int(seed))
            except ValueError as exc:
                st.error(str(exc))
                return
            st.session_state[REQUEST_KEY] = (method, population, params)


@st.cache_data(max_entries=32, show_spinner=False)
def _load(run_dir: str, key: str) -> pj.Projection:
    cached = pj.load_cached(run_dir, key)
    if cached is None:
        raise LookupError(key)  # exceptions are not cached: a later call looks again
    return cached


def _compute(ctx: JobContext, run: index.Run, method: str, population: str,
             params: pj.ProjectionParams) -> pj.Projection:
    return pj.load_or_compute(run, method, population, params, step=ctx.step)[0]


def _projection(run: index.Run, key: str, method: str, population: str,
                params: pj.ProjectionParams) -> pj.Projection | None:
    try:
        return _load(str(run.run_dir), key)
    except LookupError:
        pass
    jobs = app.jobs()
    label = f"{pj.METHOD_LABELS[method]} of {population} ({run.space}) in {run.run_dir.name}"
    # The run in the job's key too: a copy of a run has the same embeddings, hence cache key,
    # but its own cache/ to fill.
    cache_key, key = key, f"map:{run.run_dir}:{key}"
    try:
        job = jobs.submit(key, label, _compute, run, method, population, params, owner=app.session_owner())
    except JobLimit as exc:
        st.warning(str(exc))
        return None
    try:
        projection = job.future.result(timeout=QUICK_WAIT_S)
    except concurrent.futures.TimeoutError:
        app.poll_job(key, "The map appears here when it is done and is cached for everyone; the other pages "
                          "stay usable meanwhile.")
        return None
    except concurrent.futures.CancelledError:
        who = "you" if job.owner == app.session_owner() else "the session that started it"
        st.info(f"The {label} was cancelled by {who}.")
        if st.button("Compute it again"):
            jobs.forget(key)
            st.rerun()
        return None
    except Exception as exc:  # shown in one line; the log has the traceback
        st.error(f"The {label} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        if st.button("Try again"):
            jobs.forget(key)
            st.rerun()
        return None
    if pj.cache_paths(run.run_dir, cache_key)[0].is_file():
        jobs.forget(key)  # on disk now; without a writable cache/ the job keeps the result in memory
    return projection


def _describe(info: dict, method: str) -> None:
    n_pop, n_shown, n_fit = info.get("n_population"), info.get("n_shown"), info.get("n_fitted")
    params = ", ".join(f"{k}={v}" for k, v in (info.get("params") or {}).items())
    text = (f"{pj.METHOD_LABELS[method]} ({info.get('library', '')}; {params}) of L2-normalised "
            f"{info.get('space', 'query')} vectors")
    if method == "tsne" and n_shown is not None and n_pop is not None and n_shown < n_pop:
        text += (f". **Sampled:** t-SNE shows a seeded sample of {n_shown} of {n_pop} rows, stratified by MST mode "
                 "(each tone in proportion, none left out)")
    elif method == "umap" and n_fit is not None and n_shown is not None and n_fit < n_shown:
        text += (f". UMAP was fitted on a seeded sample of {n_fit} of {n_shown} rows stratified by MST mode; the "
                 "other rows were placed with `transform` (`fitted` = False in the CSV)")
    st.caption(text + f". Computed in {info.get('seconds', '?')} s, cached in the run's `cache/` folder.")


@st.cache_data(max_entries=16, show_spinner=False)
def _table(run_key: tuple, key: str, _frame: pd.DataFrame) -> pd.DataFrame:
    return pj.map_table(app._open_run(*run_key).meta, _frame)


def _det_id(point: dict) -> int | None:
    cd = point.get("customdata")
    if isinstance(cd, (list, tuple)):
        cd = cd[0] if cd else None
    try:
        return int(cd) if cd is not None else None
    except (TypeError, ValueError):
        return None


def _selection(run: index.Run, population: str, det_ids: list[int]) -> None:
    if not det_ids:
        st.caption("Select points with the box or lasso tool to see those persons and their group mix.")
        return
    st.subheader(f"{len(det_ids)} selected")
    left, right = st.columns([3, 1])
    shown = run.meta.iloc[det_ids[:MAX_SELECTED_CROPS]]
    paths = app.image_paths(app.run_key(run))
    with left:
        table = shown.assign(rank=range(1, len(shown) + 1), similarity=float("nan"))
        st.image(app.crops(table, paths), width=120,
                 caption=[f"det {r.det_id} · MST {r.mst_mode} · {r.mst_band}" for r in shown.itertuples()])
        if len(det_ids) > MAX_SELECTED_CROPS:
            st.caption(f"The first {MAX_SELECTED_CROPS} crops of {len(det_ids)}.")
    with right:
        by = st.selectbox("Group mix by", index.GROUPINGS, index=index.GROUPINGS.index("mst_band"), key="map_by",
                          persist_state="session")
        where = gallery.POPULATION_WHERE[population]
        comp = gallery.composition(run.meta, det_ids, by, app.base_rates(app.run_key(run), where, by))
        st.plotly_chart(figures.composition_bars(comp, by, what="selected"), width="stretch", key="map_mix")
        st.caption(f"Base rate: the group's share of the {population} population.")
