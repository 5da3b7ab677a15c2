"""Group comparison: similarity matrices, neighbour composition and recall, with intervals."""
from __future__ import annotations

import shlex

import pandas as pd
import streamlit as st

import index
from index.groupings import REGISTRY, population_rows
from ui import app, figures, gallery

NONE = "(none)"


def cli_command(metric: str, by: tuple[str, ...], population: str | None, where: str | None,
                settings: index.GroupSettings, space: str = "query") -> str:
    """The ``python -m index compare`` line that writes the same bytes as the download."""
    parts = ["python", "-m", "index", "compare", "RUN", *[a for b in by for a in ("--by", b)], "--metric", metric]
    if space != "query" and metric != "recall":
        parts += ["--space", space]
    if metric != "recall":
        parts += ["--population", population or "detections"]
    if where:
        parts += ["--where", where]
    parts += ["--k", str(settings.k), "--n-boot", str(settings.n_boot), "--seed", str(settings.seed),
              "--min-group-size", str(settings.min_group_size),
              "--max-queries-per-group", str(settings.max_queries_per_group)]
    parts += [f"--{name.replace('_', '-')}" for name in ("include_unknown", "include_small", "same_image_neighbours")
              if getattr(settings, name)]
    return shlex.join(parts)


def render() -> None:
    st.title("Group comparison")
    run = app.open_chosen_run()
    if run is None:
        return
    c = st.columns([2, 2, 1, 1, 1, 1, 1])
    first = c[0].selectbox("Grouping", index.GROUPINGS, index=index.GROUPINGS.index("mst_band"), key="grp_by",
                           persist_state="session")
    second = c[1].selectbox("Second grouping (cells)", (NONE, *[g for g in index.GROUPINGS if g != first]),
                            key="grp_by2", persist_state="session",
                            help="intersect two groupings: a person is in cell 'a & b' when in both groups")
    by = (first,) if second == NONE else (first, second)
    # An untrained run matches no detection: start it on persons rather than on an empty population.
    start = 0 if int(run.meta["matched"].sum()) >= 2 else index.POPULATIONS.index("persons")
    population = c[2].selectbox("Population", index.POPULATIONS, index=start, key="grp_population",
                                persist_state="session", help=gallery.POPULATION_HELP)
    k = c[3].number_input("k", 1, 100, index.GroupSettings.k, key="grp_k", persist_state="session")
    n_boot = c[4].number_input("n_boot", 10, 10_000, index.GroupSettings.n_boot, step=100, key="grp_boot",
                               persist_state="session")
    seed = c[5].number_input("seed", 0, 2**31 - 1, index.GroupSettings.seed, key="grp_seed", persist_state="session")
    min_size = c[6].number_input("small below", 0, 10_000, index.GroupSettings.min_group_size, key="grp_min",
                                 persist_state="session", help="groups with fewer rows are marked †")
    where = st.text_input("where (restrict the persons / rows)", "", key="grp_where", persist_state="session",
                          placeholder="class1 == 'doctor'",
                          help="a pandas condition on the columns, as `python -m index compare --where`; "
                               "missing values count as false").strip() or None
    st.caption(" ".join(f"**{b}** ({REGISTRY[b].kind}): {REGISTRY[b].rule}." for b in by)
               + f" Populations: {gallery.POPULATION_HELP}. Intervals: 95% BCa, photos resampled with their persons.")
    settings = index.GroupSettings(k=int(k), n_boot=int(n_boot), seed=int(seed), min_group_size=int(min_size))
    key = app.run_key(run)
    space = app.space_choice(run, "grp_space", "The similarity and neighbour read-outs below")
    params = dict(by=by, population=population, where=where, settings=settings, space=space)

    try:
        n_rows = len(population_rows(run.meta, population, where))
    except ValueError as exc:
        st.error(str(exc))
        return
    small = False
    if n_rows >= 2:  # the similarity and neighbour read-outs need rows to compare
        small = _embedding_readouts(key, params)
    else:
        st.warning(f"The population {population!r} holds {n_rows} row{'s' if n_rows != 1 else ''} here "
                   "(a run with untrained weights matches no detection to a person): choose persons or all for "
                   "the similarity and neighbour read-outs.")
    rec = app.readout(key, by, "recall", None, settings, where)
    if rec is None:
        return
    st.subheader("Detection recall")
    if len(by) == 2:
        st.plotly_chart(figures.cell_heatmap(rec), width="stretch", key="grp_recall_cells")
    else:
        st.plotly_chart(figures.recall_bars(rec), width="stretch", key="grp_recall")
    st.caption(figures.recall_gap_text(rec) + " Recall always counts annotated persons of readable images. "
               "The design effect (hover) is the bootstrap variance over that of independent persons.")
    _disparities(rec)
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


def _disparities(rec: pd.DataFrame) -> None:
    table = figures.disparity_table(rec)
    fam = int(rec.loc[rec["metric"] == "recall_difference", "family_size"].max()) if len(rec) else 0
    with st.expander(f"Pairwise disparities ({fam} pairs of named groups with enough persons; Holm-adjusted p)"):
        st.dataframe(table, hide_index=True, width="stretch",
                     column_config={c: st.column_config.NumberColumn(format="%.3f")
                                    for c in ("difference", "diff low", "diff high", "ratio", "ratio low", "ratio high",
                                              "p", "p (Holm)")})


def _embedding_readouts(key: tuple, params: dict) -> bool:
    """Similarity matrices and neighbour composition; True when a group is small."""
    by, population, where, settings = params["by"], params["population"], params["where"], params["settings"]
    space = params.get("space", "query")
    sim = app.readout(key, by, "similarity", population, settings, where, space)
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
    right.plotly_chart(figures.pair_heatmap(sim, "corrected_cosine", "Bias-corrected cosine"),
                       width="stretch", key="grp_corrected")
    st.caption("The cosine of two group means is biased low for small groups (a mean's length is inflated by its "
               "own noise); the bias-corrected cosine divides the mean pairwise cosine between the groups by the "
               "geometric mean of the two within-group ones. The mean pairwise cosine is in the CSV.")
    _download(sim, "similarity", params)

    nb = app.readout(key, by, "neighbours", population, settings, where, space)
    if nb is None:
        return bool(sim["small_group"].any())
    st.subheader("Neighbour composition")
    st.caption(f"For queries in each row group (at most {settings.max_queries_per_group}, seeded), the share of their "
               f"{settings.k} nearest neighbours (not from the query's own photo) in each column group divided by "
               "that group's base rate.")
    st.plotly_chart(figures.ratio_heatmap(nb), width="stretch", key="grp_ratio")
    _download(nb, "neighbours", params)
    return bool(sim["small_group"].any() or nb["small_group"].any())


def _download(df: pd.DataFrame, metric: str, params: dict) -> None:
    """The same bytes as ``python -m index compare`` with these parameters."""
    population = "persons" if metric == "recall" else params["population"]
    cli = cli_command(metric, params["by"], population, params["where"], params["settings"],
                      params.get("space", "query"))
    name = "-".join(params["by"])
    st.download_button(f"{metric} (CSV)", index.to_csv_bytes(df), file_name=f"{metric}-{name}-{population}.csv",
                       mime="text/csv", key=f"grp_csv_{metric}", help=f"Identical to `{cli} --out FILE`")
