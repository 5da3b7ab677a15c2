"""Overview: the manifest in words, persons per group, detection AR / recall per group."""
from __future__ import annotations

import pandas as pd
import streamlit as st

import index
from ui import app, figures, runs

GROUP_HELP = "Membership rules: " + "; ".join(f"*{g.name}* ({g.kind}): {g.rule}" for g in index.REGISTRY.values())


def render() -> None:
    st.title("Overview")
    run = app.open_chosen_run()
    if run is None:
        return
    m = run.manifest
    st.subheader(f"Run `{run.run_dir.name}`")
    st.markdown("\n".join(f"- **{label}:** {text}" for label, text in runs.describe_manifest(m)))
    st.caption(f"Index: {run.kind}, {run.n} rows; recall@10 of the index "
               f"{(run.index_manifest.get('recall_at_10') or {}).get('value', '?')}.")

    failed = run.images[run.images["status"].astype(str) != "ok"]
    if len(failed):
        with st.expander(f"{len(failed)} failed images and why"):
            st.dataframe(failed[["image_id", "filename", "status"]].head(200), hide_index=True, width="stretch")
    skipped = runs.skipped_examples(m)
    if len(skipped):
        with st.expander(f"Skipped annotation rows: examples ({(m.get('dataset') or {}).get('skipped_rows', 0)} in all)"):
            st.dataframe(skipped, hide_index=True, width="stretch")

    by = st.selectbox("Grouping", index.GROUPINGS, index=index.GROUPINGS.index("mst_band"), help=GROUP_HELP,
                      key="overview_by", persist_state="session")
    metric = st.selectbox("Detection metric", list(figures.DETECTION_METRICS), format_func=figures.DETECTION_METRICS.get,
                          key="overview_metric", persist_state="session",
                          help="COCO AR / recall@IoU: every query labelled person, scored by its class probability, "
                               "matched to all annotated persons as pycocotools does (needs predictions.parquet). "
                               "Threshold recall: a kept detection (P(person) >= the run's threshold) matched at IoU 0.5.")
    settings = index.GroupSettings()
    recall = app.readout(app.run_key(run), by, metric, None, settings)
    left, right = st.columns(2)
    counts = _persons_per_group(run, by)
    left.plotly_chart(figures.counts_bar(counts["group"], counts["persons"], f"Annotated persons per {by}"),
                      width="stretch", key="overview_counts")
    if recall is None:
        return
    right.plotly_chart(figures.recall_bars(recall), width="stretch", key="overview_recall")
    right.caption(figures.protocol_text(recall))
    right.caption(figures.recall_gap_text(recall))
    if recall["small_group"].any():
        st.caption(figures.small_note(settings.min_group_size))
    st.download_button(f"{metric} per group (CSV)", index.to_csv_bytes(recall), file_name=f"{metric}-{by}.csv",
                       mime="text/csv", key="overview_csv")
    st.caption(f"The same table from the command line: `python -m index compare {run.run_dir} --metric {metric} "
               f"--by {by} --out {metric}.csv`")


def _persons_per_group(run: index.Run, by: str) -> pd.DataFrame:
    labels, M = index.membership(run.persons, by)
    return pd.DataFrame({"group": labels, "persons": M.sum(axis=0)})
