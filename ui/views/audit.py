"""Detection audit: runs of one dataset side by side, paired differences, differences-in-differences."""
from __future__ import annotations

import pandas as pd
import streamlit as st

import index
from index.crossruns import CROSS_METRICS, CrossSettings
from index.groupings import REGISTRY
from ui import app, audit, runs
from ui.figures import small_note

NONE = "(none)"


@st.cache_data(max_entries=32, show_spinner="Resampling the photos for every run at once (bootstrap)…")
def _table(run_dirs: tuple[str, ...], stamps: tuple, metric: str, by: tuple[str, ...], where: str | None,
           settings: CrossSettings) -> pd.DataFrame:
    return audit.table(run_dirs, metric, by, where, settings)


def _default(entries: list[runs.RunEntry]) -> list[str]:
    """The open run and its siblings in a sweep / simulated audit folder, else the open run."""
    chosen = st.session_state.get(app.RUN_KEY)
    if chosen and "/" in chosen:
        folder = chosen.split("/", 1)[0]
        siblings = [e.name for e in entries if e.name.startswith(folder + "/")]
        order = runs.sweep_order(runs.runs_root() / folder)
        return sorted(siblings, key=lambda n: order.index(n.split("/", 1)[1]) if n.split("/", 1)[1] in order
                      else len(order))
    return [chosen] if chosen in {e.name for e in entries} else []


def render() -> None:
    st.title("Detection audit")
    entries = [e for e in runs.list_runs(runs.runs_root()) if e.error is None]
    if len(entries) < 2:
        st.info("The audit compares runs of one dataset (a sweep such as `python -m extractor sweep ... --perturb "
                "darken:1.0,0.5,0.1`, or checkpoints). There are fewer than two runs: make a sweep, or build the "
                "simulated audit on the **Runs** page.")
        return
    names = [e.name for e in entries]
    picked = st.multiselect("Runs of one dataset (the first is the reference)", names, default=_default(entries),
                            key="aud_runs", help="every run must have the same annotations and persons")
    c = st.columns([1, 2, 2, 1, 1, 1])
    # AR by default where the audit is built in (a migrated run without predictions says so in one line).
    metric = c[0].selectbox("Metric", CROSS_METRICS, index=0, key="aud_metric",
                            help="recall = threshold recall (a kept detection at IoU 0.5); ar / recall50 / recall75 "
                                 "= COCO per-person metrics of the detection audit")
    first = c[1].selectbox("Grouping", index.GROUPINGS, index=index.GROUPINGS.index("mst_band"), key="aud_by")
    second = c[2].selectbox("Second grouping (heatmaps)", (NONE, *[g for g in index.GROUPINGS if g != first]),
                            key="aud_by2", help="the intersection heatmap per run (e.g. tone x lighting)")
    n_boot = c[3].number_input("n_boot", 10, 10_000, 1000, step=100, key="aud_boot")
    seed = c[4].number_input("seed", 0, 2**31 - 1, 0, key="aud_seed")
    min_size = c[5].number_input("small below", 0, 10_000, CrossSettings.min_group_size, key="aud_min")
    where = st.text_input("where (restrict the persons)", "", key="aud_where", placeholder="class1 == 'doctor'",
                          help="a pandas condition, as `python -m index compare-runs --where`").strip() or None
    if len(picked) < 2:
        st.info("Pick at least two runs: the first is the reference the others are compared with.")
        return
    chosen = [runs.find_run(entries, n) for n in picked]
    current = runs.find_run(entries, st.session_state.get(app.RUN_KEY))
    shown = current is not None and runs.is_simulated(current.manifest)  # the banner above every page says it
    if not shown and any(runs.is_simulated(e.manifest) for e in chosen):
        st.warning(app.SIMULATED_BANNER, icon=":material/science:")
    settings = CrossSettings(n_boot=int(n_boot), seed=int(seed), min_group_size=int(min_size))
    dirs = tuple(str(e.path) for e in chosen)
    stamps = tuple(runs.run_stamp(e.path) for e in chosen)
    try:
        df = _table(dirs, stamps, metric, (first,), where, settings)
    except (ValueError, OSError) as exc:
        st.error(f"These runs cannot be compared: {exc}")
        return
    st.caption(f"**{first}** ({REGISTRY[first].kind}): {REGISTRY[first].rule}. Population: persons evaluated in "
               f"every run ({int(df['persons_dropped'].iloc[0])} evaluated in some run but not all were left out). "
               "Intervals: 95% BCa, the same photos resampled for every run (a paired comparison).")
    st.plotly_chart(audit.lines_figure(df, metric), width="stretch", key="aud_lines")
    if df["small_group"].any():
        st.caption(small_note(settings.min_group_size))
    line = audit.headline(df, metric)
    if line:
        st.markdown(f"**Largest difference-in-differences:** {line}.")
    st.subheader("Paired differences (each run minus the reference)")
    st.dataframe(audit.diff_table(df, metric), hide_index=True, width="stretch")
    st.subheader("Differences-in-differences (group a's difference minus group b's)")
    st.caption("Negative: the run costs group a more than group b. p (Holm): adjusted over every eligible row of "
               f"the table ({int(df.loc[df['metric'] == metric + '_did', 'family_size'].max() or 0)} rows).")
    st.dataframe(audit.did_table(df, metric), hide_index=True, width="stretch")
    by = (first,)
    st.download_button("compare-runs (CSV)", audit.csv_bytes(df), file_name=f"compare-runs-{metric}-{first}.csv",
                       mime="text/csv", key="aud_csv",
                       help=f"Identical to `{audit.cli_command(dirs, metric, by, where, settings)} --out FILE`")
    if second != NONE:
        by2 = (first, second)
        try:
            cells = _table(dirs, stamps, metric, by2, where, settings)
        except (ValueError, OSError) as exc:
            st.error(f"The intersection cannot be computed: {exc}")
            return
        st.subheader(f"{metric} by {first} and {second}, per run")
        for run, fig in audit.heatmaps(cells, metric).items():
            st.plotly_chart(fig, width="stretch", key=f"aud_cells_{run}")
        st.download_button("compare-runs by both (CSV)", audit.csv_bytes(cells),
                           file_name=f"compare-runs-{metric}-{first}-{second}.csv", mime="text/csv", key="aud_csv2",
                           help=f"Identical to `{audit.cli_command(dirs, metric, by2, where, settings)} --out FILE`")
