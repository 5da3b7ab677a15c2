"""Plotly figures of the explorer; pure functions of DataFrames, arrays and images."""
from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from PIL import Image

from extractor.rundir.facet import MST_HEX, UNKNOWN

SMALL_MARK = "†"
UNKNOWN_COLOUR = "#9e9e9e"
ALL_COLOUR = "#555555"  # the all-persons reference bar
BAND_COLOURS = {"lighter": MST_HEX[1], "medium": MST_HEX[4], "darker": MST_HEX[8], UNKNOWN: UNKNOWN_COLOUR}
BOX_COLOURS = ("#ff2d55", "#00c7be", "#ffcc00", "#5856d6", "#34c759", "#ff9500", "#af52de", "#007aff")
CATEGORY_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                    "#bcbd22", "#7f7f7f")
# Above this many points markers shrink: a 50k-point map stays legible.
DENSE_POINTS = 5_000


def small_note(min_group_size: int) -> str:
    return (f"{SMALL_MARK} fewer than {min_group_size} rows in the group: its interval is wide and its value "
            "unstable; read it with care.")


def group_labels(labels: Sequence[str], sizes: Sequence[int], min_group_size: int) -> list[str]:
    """Axis labels like ``7 (n=123)``, marked ``†`` when the group is small."""
    return [f"{lab} (n={int(n)})" + (SMALL_MARK if int(n) < min_group_size else "") for lab, n in zip(labels, sizes)]


def group_colours(labels: Sequence[str]) -> list[str]:
    """Monk swatches for tones and bands, a fixed palette otherwise, grey for unknown."""
    out = []
    for i, lab in enumerate(labels):
        lab = str(lab)
        if lab == UNKNOWN or lab == "none":
            out.append(UNKNOWN_COLOUR)
        elif lab == "all":
            out.append(ALL_COLOUR)
        elif lab.isdigit() and 1 <= int(lab) <= 10:
            out.append(MST_HEX[int(lab) - 1])
        elif lab in BAND_COLOURS:
            out.append(BAND_COLOURS[lab])
        else:
            out.append(CATEGORY_COLOURS[i % len(CATEGORY_COLOURS)])
    return out


def _ordered(values: pd.Series) -> list[str]:
    """Labels in first-appearance order (the index keeps groups in a stable order)."""
    return list(dict.fromkeys(values.astype(str)))


def _matrix(df: pd.DataFrame, metric: str) -> tuple[list[str], pd.DataFrame]:
    sub = df[df["metric"] == metric]
    if sub.empty:
        raise ValueError(f"the read-out holds no {metric!r} rows")
    return _ordered(sub["group_a"]), sub


def pair_heatmap(df: pd.DataFrame, metric: str, title: str, *, diverging_at: float | None = None,
                 zrange: tuple[float, float] | None = None, hide_empty: bool = True) -> go.Figure:
    """Heatmap of one pairwise metric of an ``index.compare`` frame (rows = group_a).

    Axis labels carry group sizes and the small-group mark; the hover shows the 95%
    interval and both sizes. ``diverging_at``: a diverging scale centred there (ratios: 1).
    Groups with no rows are left out (``empty_groups`` names them for a caption).
    """
    order, sub = _matrix(df, metric)
    min_size = int(sub["min_group_size"].iloc[0]) if "min_group_size" in sub.columns else 0
    if hide_empty:  # an empty group is a row and a column of blanks: say so in a caption instead
        filled = set(sub.loc[sub["n_a"] > 0, "group_a"].astype(str))
        order = [g for g in order if g in filled] or order
        sub = sub[sub["group_a"].astype(str).isin(order) & sub["group_b"].astype(str).isin(order)]
    pos = {g: i for i, g in enumerate(order)}
    G = len(order)
    a = sub["group_a"].astype(str).map(pos).to_numpy()
    b = sub["group_b"].astype(str).map(pos).to_numpy()
    z = np.full((G, G), np.nan)
    extra = np.full((G, G, 4), np.nan)
    z[a, b] = sub["value"].to_numpy(dtype=float)
    extra[a, b] = sub[["ci_low", "ci_high", "n_a", "n_b"]].to_numpy(dtype=float)
    sizes = np.zeros(G, dtype=np.int64)
    sizes[a] = sub["n_a"].to_numpy()
    labels = group_labels(order, sizes, min_size)
    heat = go.Heatmap(
        z=z, x=labels, y=labels, customdata=extra, texttemplate="%{z:.2f}", textfont={"size": 10},
        hovertemplate=("%{y} × %{x}<br>" + metric + " %{z:.3f}<br>95% CI [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
                       "<br>n %{customdata[2]:.0f} × %{customdata[3]:.0f}<extra></extra>"),
        colorscale="RdBu_r" if diverging_at is not None else "Viridis", zmid=diverging_at,
        colorbar={"title": {"text": metric.replace("_", " ")}})
    if zrange is not None:
        heat.update(zmin=zrange[0], zmax=zrange[1])
    fig = go.Figure(heat)
    fig.update_layout(title=title, height=max(360, 44 * G + 160), margin={"l": 10, "r": 10, "t": 50, "b": 10})
    fig.update_yaxes(autorange="reversed", title="group a")
    fig.update_xaxes(title="group b", tickangle=-35)
    return fig


def empty_groups(df: pd.DataFrame) -> list[str]:
    """Groups of a pairwise read-out with no rows at all."""
    sizes = df.drop_duplicates("group_a").set_index("group_a")["n_a"]
    return [str(g) for g, n in sizes.items() if n == 0]


def ratio_heatmap(df: pd.DataFrame) -> go.Figure:
    """Neighbour composition: share of group b among group a's neighbours / b's base rate."""
    sub = df[df["metric"] == "neighbour_ratio"]
    top = float(np.nanmax(sub["value"].to_numpy(dtype=float))) if sub["value"].notna().any() else 2.0
    return pair_heatmap(df, "neighbour_ratio", "Neighbour composition: share among the k nearest / base rate "
                        "(1 = as expected)", diverging_at=1.0, zrange=(0.0, max(2.0, top)))


def _error_bars(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> dict:
    return {"type": "data", "symmetric": False, "array": np.nan_to_num(hi - values),
            "arrayminus": np.nan_to_num(values - lo), "thickness": 1.5, "width": 4}


DETECTION_METRICS = {  # metric of compare -> its name on the page
    "ar": "AR (COCO, IoU .50:.05:.95)", "recall50": "recall@0.5 (COCO)", "recall75": "recall@0.75 (COCO)",
    "recall": "threshold recall (kept detections, IoU 0.5)",
}


def recall_bars(df: pd.DataFrame) -> go.Figure:
    """Detection recall or COCO AR per group with image-cluster 95% intervals (from ``compare(..., metric)``
    with a metric of ``DETECTION_METRICS``); ``all`` is the whole population. The hover adds the
    design effect (how much clustering by photo widened the interval)."""
    rec = df[df["metric"].isin(list(DETECTION_METRICS))]
    metric = str(rec["metric"].iloc[0]) if len(rec) else "recall"
    min_size = int(rec["min_group_size"].iloc[0]) if "min_group_size" in rec.columns and len(rec) else 0
    labels = group_labels(rec["group_a"].astype(str), rec["n_a"], min_size)
    values = rec["value"].to_numpy(dtype=float)
    fig = go.Figure(go.Bar(
        x=labels, y=values, error_y=_error_bars(values, rec["ci_low"].to_numpy(float), rec["ci_high"].to_numpy(float)),
        marker={"color": group_colours(rec["group_a"].astype(str)), "line": {"color": "#444", "width": 1}},
        customdata=rec[["ci_low", "ci_high", "n_a", "n_images_a", "design_effect"]].to_numpy(dtype=float),
        hovertemplate=(f"%{{x}}<br>{metric} %{{y:.3f}}<br>95% CI [%{{customdata[0]:.3f}}, %{{customdata[1]:.3f}}]"
                       "<br>%{customdata[2]:.0f} persons on %{customdata[3]:.0f} photos"
                       "<br>design effect %{customdata[4]:.2f}<extra></extra>")))
    name = DETECTION_METRICS[metric]
    fig.update_layout(title=f"{name[0].upper() + name[1:]} per group (95% intervals, photos resampled)",
                      yaxis={"range": [0, 1.05], "title": metric}, height=380, margin={"l": 10, "r": 10, "t": 50, "b": 10})
    return fig


def protocol_text(df: pd.DataFrame) -> str:
    """One line naming the protocol and the interval of a detection read-out."""
    rec = df[df["metric"].isin(list(DETECTION_METRICS))]
    if rec.empty or "protocol" not in rec.columns:
        return ""
    return f"Protocol: {rec['protocol'].iloc[0]}. Intervals: {rec['interval'].iloc[0]}; `all` = every evaluated person."


def recall_gap_text(df: pd.DataFrame) -> str:
    """The best-minus-worst gap of a detection read-out (recall, AR, ...) in one sentence."""
    gap = df[df["metric"].astype(str).str.endswith("_gap")]
    name = gap["metric"].iloc[0][:-len("_gap")] if len(gap) else "recall"
    if gap.empty or pd.isna(gap["value"].iloc[0]):
        return f"{name} gap: needs two groups in the choice (named, with at least the minimum group size)."
    g = gap.iloc[0]
    return (f"{name} gap (best {g['group_a']} minus worst {g['group_b']}, chosen among {int(g['family_size'])} "
            f"groups): {g['value']:.3f}, 95% CI [{g['ci_low']:.3f}, {g['ci_high']:.3f}]; both groups are "
            "chosen again in every bootstrap round, so the interval accounts for the choice.")


def cell_heatmap(df: pd.DataFrame, metric: str = "recall") -> go.Figure:
    """An intersection read-out (grouping ``a & b``) as a heatmap: rows = a's groups,
    columns = b's; the hover shows n, photos, the 95% interval and the design effect."""
    from index.groupings import ALL, CELL_SEP
    sub = df[(df["metric"] == metric) & (df["group_a"].astype(str) != ALL)]
    parts = sub["group_a"].astype(str).str.split(CELL_SEP, regex=False)
    if sub.empty or parts.map(len).max() != 2:
        raise ValueError("cell_heatmap needs a read-out by exactly two groupings (--by X --by Y)")
    rows, cols = _ordered(parts.str[0]), _ordered(parts.str[1])
    r = parts.str[0].map({g: i for i, g in enumerate(rows)}).to_numpy()
    c = parts.str[1].map({g: i for i, g in enumerate(cols)}).to_numpy()
    z = np.full((len(rows), len(cols)), np.nan)
    extra = np.full((len(rows), len(cols), 5), np.nan)
    z[r, c] = sub["value"].to_numpy(float)
    extra[r, c] = sub[["ci_low", "ci_high", "n_a", "n_images_a", "design_effect"]].to_numpy(float)
    min_size = int(sub["min_group_size"].iloc[0]) if "min_group_size" in sub.columns else 0
    text = np.where(np.isnan(z), "", np.char.add(np.char.mod("%.2f", np.nan_to_num(z)),
                    np.where(extra[..., 2] < min_size, SMALL_MARK, "")))
    names = str(sub["grouping"].iloc[0]).split(CELL_SEP) if "grouping" in sub.columns else ["a", "b"]
    fig = go.Figure(go.Heatmap(
        z=z, x=cols, y=rows, customdata=extra, text=text, texttemplate="%{text}", colorscale="Viridis",
        hovertemplate=("%{y} & %{x}<br>" + metric + " %{z:.3f}<br>95% CI [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
                       "<br>n %{customdata[2]:.0f} in %{customdata[3]:.0f} photos<br>design effect "
                       "%{customdata[4]:.2f}<extra></extra>"), colorbar={"title": {"text": metric}}))
    fig.update_layout(title=f"{metric} by {names[0]} and {names[-1]} ({SMALL_MARK}: small cell)",
                      height=max(320, 40 * len(rows) + 160), margin={"l": 10, "r": 10, "t": 50, "b": 10})
    fig.update_yaxes(autorange="reversed", title=names[0])
    fig.update_xaxes(title=names[-1])
    return fig


def disparity_table(df: pd.DataFrame, metric: str = "recall", family_only: bool = True) -> pd.DataFrame:
    """Pairwise differences and ratios of a per-group metric, Holm-adjusted p first."""
    diff = df[df["metric"] == f"{metric}_difference"]
    ratio = df[df["metric"] == f"{metric}_ratio"].set_index(["group_a", "group_b"])
    if family_only:
        diff = diff[diff["in_family"].astype(bool)]
    keys = list(zip(diff["group_a"], diff["group_b"]))
    out = pd.DataFrame({
        "group a": diff["group_a"].to_numpy(), "group b": diff["group_b"].to_numpy(),
        "difference": diff["value"].to_numpy(float), "diff low": diff["ci_low"].to_numpy(float),
        "diff high": diff["ci_high"].to_numpy(float),
        "ratio": ratio.loc[keys, "value"].to_numpy(float) if keys else [],
        "ratio low": ratio.loc[keys, "ci_low"].to_numpy(float) if keys else [],
        "ratio high": ratio.loc[keys, "ci_high"].to_numpy(float) if keys else [],
        "p": diff["p_value"].to_numpy(float), "p (Holm)": diff["p_holm"].to_numpy(float),
        "family": diff["family_size"].to_numpy(), "n a": diff["n_a"].to_numpy(), "n b": diff["n_b"].to_numpy(),
        "small": diff["small_group"].to_numpy(bool),
    })
    return out.sort_values(["p (Holm)", "p"], kind="stable", na_position="last").reset_index(drop=True)


def counts_bar(labels: Sequence[str], counts: Sequence[int], title: str, min_group_size: int = 0) -> go.Figure:
    fig = go.Figure(go.Bar(x=group_labels(labels, counts, min_group_size) if min_group_size else list(labels),
                           y=list(counts), marker={"color": group_colours(labels), "line": {"color": "#444", "width": 1}},
                           hovertemplate="%{x}: %{y}<extra></extra>"))
    fig.update_layout(title=title, height=340, margin={"l": 10, "r": 10, "t": 50, "b": 10}, yaxis={"title": "persons"})
    return fig


def composition_bars(comp: pd.DataFrame, by: str, what: str = "neighbours") -> go.Figure:
    """The share of each group among ``what`` (neighbours, a selection) beside its base rate."""
    fig = go.Figure([
        go.Bar(name=what, x=comp["group"], y=comp["share"], marker_color="#1f77b4",
               customdata=comp["neighbours"], hovertemplate="%{x}: %{y:.0%} (%{customdata})<extra>" + what + "</extra>"),
        go.Bar(name="base rate", x=comp["group"], y=comp["base_rate"], marker_color="#bbbbbb",
               customdata=comp["candidates"], hovertemplate="%{x}: %{y:.1%} of %{customdata}<extra>base rate</extra>"),
    ])
    fig.update_layout(barmode="group", title=f"{what.capitalize()} by {by} vs base rate", height=320,
                      yaxis={"tickformat": ".0%"}, margin={"l": 10, "r": 10, "t": 50, "b": 10},
                      legend={"orientation": "h", "y": -0.2})
    return fig


# ------------------------------------------------------------------ photos
def image_source(img: Image.Image, quality: int = 85) -> str:
    """A data URI (JPEG) for ``go.Image``: far smaller than sending the pixels as numbers."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def photo_figure(img: Image.Image, *, boxes: np.ndarray | None = None, box_labels: Sequence[str] = (),
                 highlight: int | None = None, overlay: np.ndarray | None = None,
                 grid: tuple[np.ndarray, np.ndarray] | None = None, marker: tuple[float, float] | None = None,
                 title: str | None = None, height: int | None = None) -> go.Figure:
    """The photo (coordinates = its pixels) with optional numbered boxes, an attention
    overlay on the feature grid, and clickable, near-transparent feature-cell centres.

    boxes: [n, 4] x1, y1, x2, y2 in the pixels of ``img``; overlay: [h, w] in 0..1;
    grid: (x, y) of the cell centres, their customdata = row-major cell index.
    """
    w, h = img.size
    height = height or int(min(720, max(240, 560 * h / max(w, 1))))
    fig = go.Figure(go.Image(source=image_source(img), hoverinfo="skip"))
    if overlay is not None:
        gh, gw = overlay.shape
        fig.add_trace(go.Heatmap(z=overlay, x=(np.arange(gw) + 0.5) * w / gw, y=(np.arange(gh) + 0.5) * h / gh,
                                 zsmooth="best", opacity=0.55, colorscale="Inferno", zmin=0, zmax=1,
                                 showscale=False, hoverinfo="skip"))
    if grid is not None:
        xs, ys = grid
        # Squares about one cell wide (markers are sized in screen pixels; the photo fills the
        # figure's height), so a click anywhere on the photo lands on a cell.
        cell_px = float(np.clip(0.95 * height / max(len(np.unique(ys)), 1), 6, 80))
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", customdata=np.arange(len(xs)), name="cells",
                                 marker={"size": cell_px, "symbol": "square", "color": "white", "opacity": 0.03},
                                 hovertemplate="click: encoder attention here<extra></extra>", showlegend=False))
    if boxes is not None:
        for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, dtype=float)):
            colour = BOX_COLOURS[i % len(BOX_COLOURS)]
            wide = highlight is not None and i == highlight
            fig.add_shape(type="rect", x0=x1, y0=y1, x1=x2, y1=y2,
                          line={"color": colour, "width": 4 if wide else 2, "dash": "solid" if wide or highlight is None
                                else "dot"})
            if i < len(box_labels):
                fig.add_annotation(x=x1, y=y1, text=box_labels[i], showarrow=False, xanchor="left", yanchor="bottom",
                                   font={"color": "white", "size": 12}, bgcolor=colour, opacity=0.9)
    if marker is not None:
        fig.add_trace(go.Scatter(x=[marker[0]], y=[marker[1]], mode="markers", showlegend=False, hoverinfo="skip",
                                 marker={"symbol": "x", "size": 14, "color": "#00e5ff", "line": {"width": 2}}))
    fig.update_xaxes(visible=False, range=[0, w])
    fig.update_yaxes(visible=False, range=[h, 0], scaleanchor="x")
    fig.update_layout(margin={"l": 0, "r": 0, "t": 30 if title else 0, "b": 0}, title=title,
                      height=height, clickmode="event+select",
                      dragmode=False, showlegend=False)
    return fig


# ------------------------------------------------------------------ embedding map
def embedding_scatter(frame: pd.DataFrame, colour: str, title: str = "") -> go.Figure:
    """WebGL scatter of a projection joined with metadata (``x``, ``y``, ``det_id``, ``colour``).

    Categorical colours give one trace per category (a handful, never per point);
    numeric ones (score) a single trace with a colour bar. customdata = det_id, for
    the box / lasso selection.
    """
    n = len(frame)
    size = 4 if n > DENSE_POINTS else 7
    # float32: half the bytes on the wire and exact enough for a screen position
    x, y = frame["x"].to_numpy(np.float32), frame["y"].to_numpy(np.float32)
    ids = frame["det_id"].to_numpy().astype(np.int32)  # half the bytes of int64 on the wire
    values = frame[colour]
    traces = []
    if pd.api.types.is_float_dtype(values.dtype):
        traces.append(go.Scattergl(
            x=x, y=y, mode="markers", customdata=ids, name=colour,
            marker={"size": size, "color": values.to_numpy(dtype=float), "colorscale": "Viridis",
                    "colorbar": {"title": {"text": colour}}, "showscale": True},
            hovertemplate="det_id %{customdata}<br>" + colour + " %{marker.color:.3f}<extra></extra>"))
    else:
        labels = values.astype(str).to_numpy()
        cats = sorted(set(labels), key=_category_order)
        codes = pd.Categorical(labels, categories=cats).codes
        for cat, col in zip(cats, group_colours(cats)):
            mask = codes == cats.index(cat)
            traces.append(go.Scattergl(
                x=x[mask], y=y[mask], mode="markers", customdata=ids[mask], name=f"{cat} ({int(mask.sum())})",
                marker={"size": size, "color": col, "line": {"width": 0.4, "color": "#555"}},
                hovertemplate="det_id %{customdata}<br>" + f"{colour} = {cat}<extra></extra>"))
    fig = go.Figure(traces)
    fig.update_layout(title=title, height=620, dragmode="lasso",
                      legend={"title": {"text": colour}, "itemsizing": "constant"},
                      margin={"l": 10, "r": 10, "t": 50, "b": 10}, xaxis={"showticklabels": False, "title": ""},
                      yaxis={"showticklabels": False, "title": ""})
    return fig


def _category_order(label: str) -> tuple:
    """Tones numerically, bands light to dark, unknown / none last."""
    bands = ("lighter", "medium", "darker")
    if label in (UNKNOWN, "none", "<NA>"):
        return (3, 0, label)
    if label.isdigit():
        return (0, int(label), label)
    if label in bands:
        return (1, bands.index(label), label)
    return (2, 0, label)


def probe_by_depth(df: pd.DataFrame, metric: str = "balanced_accuracy") -> go.Figure:
    """Attribute information by depth: ``metric`` per feature space (in the frame's order) with
    its interval, the nuisance baseline and chance as horizontal lines; one trace per task of
    ``df`` (an ``index.probe`` frame)."""
    fig = go.Figure()
    chance_metric = "chance_macro_auc" if metric == "macro_auc" else "chance_balanced_accuracy"
    for task, part in df.groupby("group_b", sort=False):
        rows = part[part["metric"] == metric]
        spaces = rows[rows["group_a"] != "nuisance"]
        fig.add_trace(go.Scatter(
            x=spaces["group_a"], y=spaces["value"], mode="lines+markers", name=task or metric,
            error_y=dict(type="data", symmetric=False, array=spaces["ci_high"] - spaces["value"],
                         arrayminus=spaces["value"] - spaces["ci_low"]),
            hovertemplate="%{x}: %{y:.3f}<extra>" + (task or metric) + "</extra>"))
        base = rows[rows["group_a"] == "nuisance"]
        if len(base):
            fig.add_hline(y=float(base["value"].iloc[0]), line_dash="dot",
                          annotation_text=f"nuisance baseline{' ' + task if task else ''}")
    chance = df.loc[df["metric"] == chance_metric, "value"]
    if len(chance):
        fig.add_hline(y=float(chance.iloc[0]), line_dash="dash", line_color="grey", annotation_text="chance")
    fig.update_layout(xaxis_title="feature space", yaxis_title=metric.replace("_", " "), height=380,
                      margin=dict(l=10, r=10, t=30, b=10))
    return fig
