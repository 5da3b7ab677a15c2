"""The Detection audit page's pure parts: the compare-runs table, its figures and tables.

Everything here takes the long frame of ``index.crossruns.compare_runs`` (the same
frame ``python -m index compare-runs`` writes), so the page's downloads are the CLI's
bytes and every figure can be tested without Streamlit.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from index.crossruns import CrossSettings, compare_runs
from index.export import to_csv_bytes
from index.groupings import ALL
from ui.figures import CATEGORY_COLOURS, SMALL_MARK, _error_bars, cell_heatmap

__all__ = ["cli_command", "csv_bytes", "did_table", "diff_table", "heatmaps", "lines_figure", "table"]


def table(run_dirs: Sequence[Path | str], metric: str, by: Sequence[str], where: str | None,
          settings: CrossSettings) -> pd.DataFrame:
    """``compare_runs`` with the page's arguments (the first run is the reference)."""
    return compare_runs([Path(r) for r in run_dirs], metric, list(by), settings, where=where)


def csv_bytes(df: pd.DataFrame) -> bytes:
    return to_csv_bytes(df)


def cli_command(run_dirs: Sequence[Path | str], metric: str, by: Sequence[str], where: str | None,
                settings: CrossSettings) -> str:
    """The ``python -m index compare-runs`` line that writes the same bytes as the download."""
    parts = ["python", "-m", "index", "compare-runs", *map(str, run_dirs), "--metric", metric,
             *[a for b in by for a in ("--by", b)]]
    if where:
        parts += ["--where", where]
    parts += ["--n-boot", str(settings.n_boot), "--seed", str(settings.seed),
              "--min-group-size", str(settings.min_group_size)]
    parts += [f"--{n.replace('_', '-')}" for n in ("include_unknown", "include_small") if getattr(settings, n)]
    return shlex.join(parts)


def lines_figure(df: pd.DataFrame, metric: str) -> go.Figure:
    """Groups on the x axis, one line per run with its 95% interval bars; small groups
    drawn as open markers and marked † on the axis (``all`` is left out: it is a row of its own)."""
    sub = df[(df["metric"] == metric) & (df["group_a"].astype(str) != ALL)]
    fig = go.Figure()
    runs = list(dict.fromkeys(sub["run"]))
    first = sub[sub["run"] == runs[0]] if runs else sub
    labels = [f"{g}{SMALL_MARK if s else ''}" for g, s in zip(first["group_a"].astype(str), first["small_group"])]
    for i, run in enumerate(runs):
        r = sub[sub["run"] == run]
        v = r["value"].to_numpy(float)
        small = r["small_group"].to_numpy(bool)
        fig.add_trace(go.Scatter(
            x=labels, y=v, mode="lines+markers", name=run + (" (reference)" if i == 0 else ""),
            line={"color": CATEGORY_COLOURS[i % len(CATEGORY_COLOURS)]},
            marker={"size": 9, "symbol": np.where(small, "circle-open", "circle").tolist()},
            error_y=_error_bars(v, r["ci_low"].to_numpy(float), r["ci_high"].to_numpy(float)),
            customdata=r[["ci_low", "ci_high", "n_a", "n_images_a"]].to_numpy(float),
            hovertemplate=(f"{run}<br>%{{x}}<br>{metric} %{{y:.3f}}<br>95% CI [%{{customdata[0]:.3f}}, "
                           "%{customdata[1]:.3f}]<br>n %{customdata[2]:.0f} in %{customdata[3]:.0f} photos"
                           "<extra></extra>")))
    grouping = str(df["grouping"].iloc[0]) if len(df) else ""
    fig.update_layout(title=f"{metric} per {grouping}, one line per run (95% intervals, the same photos resampled "
                            f"for every run; {SMALL_MARK} / open marker: small group)",
                      xaxis={"title": grouping}, yaxis={"title": metric}, height=420,
                      margin={"l": 10, "r": 10, "t": 60, "b": 10}, legend={"orientation": "h"})
    return fig


def heatmaps(df: pd.DataFrame, metric: str) -> dict[str, go.Figure]:
    """Per run, the intersection heatmap (a table by two groupings): run -> figure."""
    out = {}
    for run in dict.fromkeys(df["run"]):
        fig = cell_heatmap(df[df["run"] == run], metric)
        fig.update_layout(title=f"{run}: {fig.layout.title.text}")
        out[run] = fig
    return out


def _pretty(sub: pd.DataFrame, pair: bool) -> pd.DataFrame:
    cols = {"run": "run", "group_a": "group a" if pair else "group", "group_b": "group b", "value": "value",
            "ci_low": "low", "ci_high": "high", "p_value": "p", "p_holm": "p (Holm)", "n_a": "n a" if pair else "n",
            "n_b": "n b", "small_group": "small", "in_family": "in family"}
    keep = [c for c in cols if c in sub.columns and (pair or c not in ("group_b", "n_b"))]
    return sub[keep].rename(columns=cols).reset_index(drop=True)


def diff_table(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The paired differences (each run minus the reference, per group) for display."""
    return _pretty(df[df["metric"] == f"{metric}_diff"], pair=False)


def did_table(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The differences-in-differences (group a's paired difference minus group b's) for display."""
    return _pretty(df[df["metric"] == f"{metric}_did"], pair=True)


def headline(df: pd.DataFrame, metric: str) -> str | None:
    """The largest eligible difference-in-differences in words (None when there is none)."""
    from index.crossruns import did_sentence
    did = df[(df["metric"] == f"{metric}_did") & df["in_family"] & df["value"].notna()]
    if did.empty:
        return None
    return did_sentence(did.loc[did["value"].abs().idxmax()], metric)
