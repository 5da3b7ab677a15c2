"""Group comparison: similarity matrices, neighbour composition and recall, with intervals."""
from __future__ import annotations

import streamlit as st

import index
from index.groups import population_rows
from ui import app, figures, gallery

RULES = {
    "mst_any": "a person is in tone k when at least one annotator chose k (overlapping, FACET-style)",
    "mst_mode": "the most-chosen tone (exclusive; ties go to the lower median)",
    "mst_band": "the most-chosen tone in bands lighter 1-3, medium 4-6, darker 7-10 (exclusive)",
    "lighting": "one group per lighting flag (flags are not exclusive)",
    "gender_mode": "the most-chosen gender presentation (exclusive)",
    "gender_any": "every gender presentation at least one annotator chose (overlapping)",
    "age_mode": "the most-chosen age presentation (exclusive)",
    "age_any": "every age presentation at least one annotator chose (overlapping)",
}


def _rule(by: str) -> str:
    return RULES.get(by, f"yes / no on the flag {by}")


def render() -> None:
    st.title("Group comparison")
    run = app.open_chosen_run()
    if run is None:
        return
    c = st.columns([2, 1, 1, 1, 1, 1])
    by = c[0].selectbox("Grouping", index.GROUPINGS, index=index.GROUPINGS.index("mst_band"), key="grp_by",
                        persist_state="session", format_func=lambda g: g)
    # An untrained run matches no detection: start it on persons rather than on an empty population.
    start = 0 if int(run.meta["matched"].sum()) >= 2 else index.POPULATIONS.index("persons")
    population = c[1].selectbox("Population", index.POPULATIONS, index=start, key="grp_population",
                                persist_state="session", help=gallery.POPULATION_HELP)
    k = c[2].number_input("k", 1, 100, index.GroupSettings.k, key="grp_k", persist_state="session")
    n_boot = c[3].number_input("n_boot", 10, 10_000, index.GroupSettings.n_boot, step=100, key="grp_boot",
                               persist_state="session")
    seed = c[4].number_input("seed", 0, 2**31 - 1, index.GroupSettings.seed, key="grp_seed", persist_state="session")
    min_size = c[5].number_input("small below", 0, 10_000, index.GroupSettings.min_group_size, key="grp_min",
                                 persist_state="session", help="groups with fewer rows are marked †")
    st.caption(f"Membership rule of **{by}**: {_rule(by)}. Populations: {gallery.POPULATION_HELP}.")
    settings = index.GroupSettings(k=int(k), n_boot=int(n_boot), seed=int(seed), min_group_size=int(min_size))
    key = app.run_key(run)
    params = dict(by=by, population=population, settings=settings)

    n_rows = len(population_rows(run.meta, population))
    small = False
    if n_rows >= 2:  # the similarity and neighbour read-outs need rows to compare
        small = _embedding_readouts(key, by, population, settings, params)
    else:
        st.warning(f"The population {population!r} holds {n_rows} row{'s' if n_rows != 1 else ''} in this run "
                   "(a run with untrained weights matches no detection to a person): choose persons or all for "
                   "the similarity and neighbour read-outs.")
    rec = app.readout(key, by, "recall", None, settings)
    if rec is None:
        return
    st.subheader("Detection recall")
    st.plotly_chart(figures.recall_bars(rec), width="stretch", key="grp_recall")
    st.caption(figures.recall_gap_text(rec) + " Recall always counts annotated persons of readable images.")
    _download(rec, "recall", params)
    if small or rec["small_group"].any():
        st.info(figures.small_note(settings.min_group_size))
    _probe_section(run, key, by, population, settings)


def _probe_section(run: index.Run, key: tuple, by: str, population: str, settings: index.GroupSettings) -> None:
    """How linearly decodable the grouping is from every feature space of the run (on request: it fits
    one cross-validated probe per space)."""
    st.subheader("Probe: attribute information by depth")
    spaces = index.run_spaces(run.manifest)
    st.caption(f"Class-balanced logistic regression on each feature space ({', '.join(spaces)}; PCA to 128 "
               "dimensions), 5 folds grouped by image, balanced accuracy with image-bootstrap intervals, against "
               "chance and a baseline on box geometry, score and image size. "
               + ("" if len(spaces) > 1 else "This run has the final query embedding only: extract it with "
                  "`--features query,decoder,encoder,backbone` to compare depths."))
    if not st.toggle("Run the probe", key="grp_probe", help="a few seconds on the demo, about a minute at 50k rows"):
        return
    ps = index.ProbeSettings(n_boot=settings.n_boot, seed=settings.seed, min_group_size=settings.min_group_size)
    pop = "persons" if population == "detections" and int(run.meta["matched"].sum()) < 2 else population
    try:
        df = app.probe(key, by, pop, ps)
    except (ValueError, OSError) as exc:
        st.error(f"The probe by {by} cannot be computed: {exc}")
        return
    metric = st.radio("Probe metric", ("balanced_accuracy", "macro_auc"), horizontal=True, key="grp_probe_metric")
    st.plotly_chart(figures.probe_by_depth(df, metric), width="stretch", key="grp_probe_fig")
    cli = (f"python -m index compare RUN --by {by} --metric probe --space all --population {pop} "
           f"--n-boot {ps.n_boot} --seed {ps.seed} --min-group-size {ps.min_group_size}")
    st.download_button("probe (CSV)", index.to_csv_bytes(df), file_name=f"probe-{by}-{pop}.csv", mime="text/csv",
                       key="grp_csv_probe", help=f"Identical to `{cli} --out FILE`")


def _embedding_readouts(key: tuple, by: str, population: str, settings: index.GroupSettings, params: dict) -> bool:
    """Similarity matrices and neighbour composition; True when a group is small."""
    sim = app.readout(key, by, "similarity", population, settings)
    if sim is None:
        return False
    st.subheader("Similarity between groups")
    empty = figures.empty_groups(sim)
    if empty:
        st.caption(f"Groups with no row in this population, left out of the charts (kept in the CSVs): "
                   f"{', '.join(empty)}.")
    left, right = st.columns(2)
    left.plotly_chart(figures.pair_heatmap(sim, "centroid_cosine", "Cosine of the group centroids"),
                      width="stretch", key="grp_centroid")
    right.plotly_chart(figures.pair_heatmap(sim, "mean_pairwise_cosine", "Mean pairwise cosine"),
                       width="stretch", key="grp_pairwise")
    st.caption("The cosine of two group means is biased low for small groups, more so in a bootstrap resample, "
               "so it can sit above its interval there; the mean pairwise cosine has no such bias.")
    _download(sim, "similarity", params)

    nb = app.readout(key, by, "neighbours", population, settings)
    if nb is None:
        return bool(sim["small_group"].any())
    st.subheader("Neighbour composition")
    st.caption(f"For queries in each row group (at most {settings.max_queries_per_group}, seeded), the share of their "
               f"{settings.k} nearest neighbours in each column group divided by that group's base rate.")
    st.plotly_chart(figures.ratio_heatmap(nb), width="stretch", key="grp_ratio")
    _download(nb, "neighbours", params)
    return bool(sim["small_group"].any() or nb["small_group"].any())


def _download(df, metric: str, params: dict) -> None:
    """The same bytes as ``python -m index compare`` with these parameters."""
    s = params["settings"]
    population = "persons" if metric == "recall" else params["population"]
    cli = (f"python -m index compare RUN --by {params['by']} --metric {metric}"
           + ("" if metric == "recall" else f" --population {population}")
           + f" --k {s.k} --n-boot {s.n_boot} --seed {s.seed} --min-group-size {s.min_group_size}")
    st.download_button(f"{metric} (CSV)", index.to_csv_bytes(df), file_name=f"{metric}-{params['by']}-{population}.csv",
                       mime="text/csv", key=f"grp_csv_{metric}", help=f"Identical to `{cli} --out FILE`")
