"""Find similar persons: a photo -> the run's DETR -> a chosen person -> k nearest in the index."""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import streamlit as st
from PIL import Image

import index
from extractor.infer import PhotoDetections
from extractor.preprocess import open_image
from index.spaces import space_index_dir
from ui import app, figures, gallery, photos, runs, spaces

log = logging.getLogger(__name__)

MAX_SHOWN = 20        # boxes drawn and offered at most
FALLBACK = 5          # queries offered when none passes the threshold
RUN_IMAGE_OPTIONS = 5000
SOURCES = ("Upload a photo", "An image of this run", "A person of this run (det_id)")
UPLOAD_KEY = "sim_upload"
KEPT_KEY = "sim_kept_upload"


@dataclass(frozen=True)
class Photo:
    digest: str
    image: Image.Image
    name: str


def render() -> None:
    st.title("Find similar persons")
    run = app.open_chosen_run()
    if run is None:
        return
    spec = app.DetectorSpec.of(run.manifest)
    if not spec.from_run:
        st.info("This run records no checkpoint (a synthetic run): photos go through seeded untrained DETR weights "
                "at 800-1333 px, whose embeddings live in another space than the run's. The page works; the "
                "neighbours mean nothing.")
    note = runs.perturbation_note(run.manifest)
    if note:
        st.info(note)
    srun = app.space_run(run, app.space_choice(run, "sim_space", "The search"))
    if srun is None:
        return
    source = st.radio("Query", SOURCES, horizontal=True, key="sim_source", persist_state="session")
    if source == SOURCES[2]:
        _from_det_id(run, srun)
        return
    photo = _uploaded() if source == SOURCES[0] else _run_image(run)
    if photo is None:
        return
    try:
        photos.check_model_size(photo.image.size, spec.min_size, spec.max_size, photo.name)
    except photos.PhotoError as exc:
        st.error(str(exc))
        return
    # Query space: the plain forward. Another space: every space the run has at once, so
    # switching between them does not run DETR again.
    features = () if srun.space == "query" else spaces.detector_features(run.manifest)
    try:
        det = app.detect(photo.digest, spec, photo.image, features)
    except (ValueError, OSError, RuntimeError) as exc:
        st.error(f"The run's DETR ({spec.checkpoint}) cannot run here: {str(exc).splitlines()[0]}")
        return
    _results(run, srun, photo, det)


def _from_det_id(run: index.Run, srun: index.Run) -> None:
    """A person of the run as the query: its stored row in the chosen space, itself left out."""
    det_id = int(st.number_input("det_id (a row of the run, as the tables and the Embedding map show it)", 0,
                                 max(run.n - 1, 0), 0, key="sim_det_id", persist_state="session"))
    person = gallery.neighbour_table(run.meta, np.array([np.nan]), np.array([det_id]))
    left, right = st.columns([1, 3])
    left.image(app.crops(person, app.image_paths(app.run_key(run))), width=gallery.CROP_SIZE,
               caption=f"det {det_id} · MST {person['mst_mode'].iloc[0]} · {person['lighting'].iloc[0]}")
    right.dataframe(person.drop(columns=["rank", "similarity"]), hide_index=True, width="stretch")
    k, where = _filters(run)
    try:
        D, I = srun.neighbours([det_id], k, where)
    except ValueError as exc:
        st.error(f"The search failed: {exc}")
        return
    _neighbours(run, srun, D[0], I[0], where, dict(query_det_id=det_id), f"neighbours-det{det_id}-{srun.space}.csv")


def _keep_upload() -> None:
    """The uploader forgets its file when the user visits another page; the session keeps it
    (only a user's own change of the uploader, including removing the file, replaces it)."""
    upload = st.session_state.get(UPLOAD_KEY)
    st.session_state[KEPT_KEY] = (upload.name, upload.getvalue()) if upload is not None else None


def _uploaded() -> Photo | None:
    upload = st.file_uploader(f"A photo with people (JPEG, PNG or WebP, up to {photos.MAX_UPLOAD_MB} MB)",
                              type=photos.UPLOAD_TYPES, max_upload_size=photos.MAX_UPLOAD_MB, key=UPLOAD_KEY,
                              on_change=_keep_upload)
    if upload is not None:
        name, data = upload.name, upload.getvalue()
    elif st.session_state.get(KEPT_KEY):
        name, data = st.session_state[KEPT_KEY]
        st.caption(f"Showing **{name}**, your last upload, kept while you visited other pages.")
    else:
        st.caption("The photo goes through the run's own DETR (same weights, resize and precision); pick a detected "
                   "person to find the most similar persons of the run in the chosen feature space.")
        return None
    try:
        img = _decoded(photos.digest(data), data, name)
    except photos.PhotoError as exc:
        st.error(str(exc))
        return None
    return Photo(photos.digest(data), img, name)


@st.cache_data(max_entries=16, show_spinner=False)
def _decoded(digest: str, _data: bytes, name: str) -> Image.Image:
    return photos.decode_photo(_data, name)


def _run_image(run: index.Run) -> Photo | None:
    root = runs.dataset_root(run.manifest)
    if root is None:
        where = (run.manifest.get("dataset") or {}).get("root")
        st.warning(f"The dataset of this run ({where or 'not recorded'}) is not on this machine, so its images "
                   "cannot be shown: upload a photo instead.")
        return None
    ok = run.images[run.images["status"].astype(str) == "ok"]
    ids = ok["image_id"].to_numpy()[:RUN_IMAGE_OPTIONS]
    names = dict(zip(ok["image_id"], ok["filename"].astype(str) + " (" + ok["n_persons"].astype(str) + " persons)"))
    if len(ok) > RUN_IMAGE_OPTIONS:
        st.caption(f"Offering the first {RUN_IMAGE_OPTIONS} of {len(ok)} readable images.")
    image_id = st.selectbox("Image", ids, format_func=lambda i: names.get(i, str(i)), key="sim_image")
    if image_id is None:
        return None
    rel = ok.loc[ok["image_id"] == image_id, "path" if "path" in ok.columns else "filename"].iloc[0]
    path = root / str(rel)
    try:
        data = path.read_bytes()
        # Dataset images are read as stored, like the extraction (their boxes refer to the stored pixels).
        img = open_image(io.BytesIO(data))
    except (OSError, ValueError) as exc:
        st.error(f"{path.name} cannot be read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return None
    return Photo(photos.digest(data), img, path.name)


def _filters(run: index.Run) -> tuple[int, str | None]:
    c1, c2, c3, c4 = st.columns([1, 1, 2, 2])
    k = c1.slider("k neighbours", 1, 48, 12, key="sim_k", persist_state="session")
    population = c2.selectbox("Search among", tuple(gallery.POPULATION_WHERE), index=1, key="sim_population",
                              help=gallery.POPULATION_HELP, persist_state="session")
    bands = c3.multiselect("Skin band (MST mode)", gallery.BANDS, key="sim_bands", placeholder="any band",
                           persist_state="session")
    lighting = c4.multiselect("Lighting (any of)", gallery.LIGHTINGS, key="sim_lighting",
                              placeholder="any lighting", persist_state="session")
    return k, gallery.build_where(population, bands, lighting)


def _results(run: index.Run, srun: index.Run, photo: Photo, det: PhotoDetections) -> None:
    threshold = st.slider("Person threshold P(person)", 0.0, 1.0, float(run.manifest.get("threshold", 0.7)), 0.01,
                          key="sim_threshold", help="Starts at the run's own threshold.")
    shown = det.ranked(threshold, fallback=FALLBACK)[:MAX_SHOWN]
    passing = det.scores[shown] >= threshold
    if not passing.any():
        st.warning(f"No person reaches P(person) >= {threshold:.2f} in this photo; offering the {len(shown)} queries "
                   "with the highest person probability instead.")
    labels = [f"#{i + 1} {det.scores[q]:.2f}" for i, q in enumerate(shown)]
    choice = st.selectbox("Person", range(len(shown)), key=f"sim_person-{photo.digest[:16]}",
                          format_func=lambda i: f"#{i + 1} · query {shown[i]} · P(person) {det.scores[shown[i]]:.3f}")
    choice = 0 if choice is None or choice >= len(shown) else choice
    q = int(shown[choice])

    disp, scale = photos.display_image(photo.image)
    feature = det.feature_size
    cell_key = f"sim_cell-{photo.digest[:16]}"
    left, right = st.columns([3, 2])
    with left:
        fig = figures.photo_figure(disp, boxes=det.boxes[shown] * scale, box_labels=labels, highlight=choice,
                                   grid=photos.cell_centres(feature, disp.size) if feature else None)
        event = st.plotly_chart(fig, on_select="rerun", selection_mode="points", key=f"sim_photo-{photo.digest[:16]}",
                                width="stretch")
        points = (event.get("selection") or {}).get("points") or [] if event else []
        if points and feature and points[0].get("x") is not None:
            st.session_state[cell_key] = photos.cell_at(float(points[0]["x"]), float(points[0]["y"]), feature, disp.size)
        st.caption(f"{photo.name}: {det.size[0]}x{det.size[1]} px, seen by DETR at {det.input_size[0]}x"
                   f"{det.input_size[1]}. Click a point for the encoder's self-attention there.")
    with right:
        _attention(det, disp, q, choice, st.session_state.get(cell_key))

    k, where = _filters(run)
    try:
        D, I = srun.search(spaces.photo_vectors(det, srun.space)[q], k, where)
    except ValueError as exc:
        st.error(f"The search failed: {exc}")
        return
    extra = dict(query_photo=photo.name, query_idx=q, query_score=float(det.scores[q]))
    _neighbours(run, srun, D[0], I[0], where, extra, f"neighbours-{photo.digest[:8]}-q{q}-{srun.space}.csv")


def _neighbours(run: index.Run, srun: index.Run, D: np.ndarray, I: np.ndarray, where: str | None,
                query: dict, file_name: str) -> None:
    """The gallery, table, CSV and group composition of one query's neighbours (D, I [k])."""
    table = gallery.neighbour_table(run.meta, D, I)
    if table.empty:
        st.warning("No row of the run matches these filters: widen them.")
        return
    index_dir = space_index_dir(srun.run_dir, srun.space).relative_to(srun.run_dir)
    st.caption(f"Searched in **{srun.space}** (`RUN/{index_dir.as_posix()}/`). "
               f"Filter inside the index: `{where or 'none'}` ({int(run.mask(where).sum())} candidate rows).")
    g_col, c_col = st.columns([2, 1])
    with g_col:
        st.subheader(f"Nearest persons in the index: {len(table)}")
        paths = app.image_paths(app.run_key(run))
        st.image(app.crops(table, paths), caption=[gallery.caption(r) for _, r in table.iterrows()],
                 width=gallery.CROP_SIZE)
        st.dataframe(table, hide_index=True, width="stretch")
        csv = index.to_csv_bytes(table.assign(**query, space=srun.space, where=where or ""))
        st.download_button("Neighbours (CSV)", csv, file_name=file_name, mime="text/csv", key="sim_csv")
    with c_col:
        by = st.selectbox("Composition by", index.GROUPINGS, index=index.GROUPINGS.index("mst_band"), key="sim_by",
                          persist_state="session")
        comp = gallery.composition(run.meta, I, by, app.base_rates(app.run_key(run), where, by))
        st.plotly_chart(figures.composition_bars(comp, by), width="stretch", key="sim_comp")
        st.dataframe(comp[["group", "neighbours", "share", "base_rate", "ratio"]], hide_index=True, width="stretch",
                     column_config={"share": st.column_config.NumberColumn(format="percent"),
                                    "base_rate": st.column_config.NumberColumn("base rate", format="percent"),
                                    "ratio": st.column_config.NumberColumn(format="%.2f")})
        st.caption("Base rate: the group's share among the rows the filter allows. Ratio > 1: over-represented.")


def _attention(det: PhotoDetections, disp: Image.Image, q: int, choice: int, cell: int | None) -> None:
    if det.decoder_attention is None:
        st.caption("This model returned no attention maps.")
        return
    st.plotly_chart(figures.photo_figure(disp, overlay=photos.normalise_map(det.decoder_attention[q]),
                                         title=f"Decoder cross-attention of person #{choice + 1}", height=300),
                    width="stretch", key="sim_dec", config={"displayModeBar": False})
    feature = det.feature_size
    if cell is None or det.encoder_attention is None or not feature or cell >= feature[0] * feature[1]:
        st.caption("Click a point of the photo to see where the encoder attends from there.")
        return
    xs, ys = photos.cell_centres(feature, disp.size)
    st.plotly_chart(figures.photo_figure(disp, overlay=photos.normalise_map(
        photos.encoder_map(det.encoder_attention, cell, feature)), marker=(xs[cell], ys[cell]),
        title=f"Encoder self-attention from cell {cell}", height=300),
        width="stretch", key="sim_enc", config={"displayModeBar": False})
