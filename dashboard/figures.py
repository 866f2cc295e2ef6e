"""Plotly figures of the study dashboard (speed against accuracy, study comparison, importances).

Every figure takes rows from :func:`dashboard.logic.trial_rows`; both axes are minimised.
"""
from __future__ import annotations

from typing import Optional, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from dashboard import logic

PALETTE = qualitative.Plotly
FRONT_COLOUR = "#262730"
RECOMMENDED_COLOUR = "#f2b705"
LIMIT_COLOUR = "#d62728"
DOMINATED_OPACITY = 0.45
OUTSIDE_LIMITS_OPACITY = 0.6


def _axis(metric: str) -> dict:
    """Plotly axis settings: percent ticks for WER/CER, otherwise the title carries the unit."""
    if logic.METRICS[metric].kind == "percent":
        return {"title": logic.METRICS[metric].label, "tickformat": ".0%", "rangemode": "tozero"}
    return {"title": logic.axis_title(metric), "rangemode": "tozero"}


def _category_order(values: Sequence, knob: str) -> list[str]:
    """Distinct labels of a knob's values, numbers in numeric order, "as trained" first."""
    def key(value) -> tuple:
        if value is None:
            return (0, 0, "")
        if isinstance(value, (int, float)):
            return (1, value, "")
        return (2, 0, str(value))

    distinct = sorted({(key(v), logic.format_knob(knob, v)) for v in values})
    return list(dict.fromkeys(label for _, label in distinct))


def _layout(fig: go.Figure, x: str, y: str, legend_title: str, height_px: int) -> go.Figure:
    fig.update_layout(template="plotly_white", height=height_px, margin=dict(l=10, r=10, t=30, b=10),
                      xaxis=_axis(x), yaxis=_axis(y), hovermode="closest",
                      legend=dict(title=legend_title, orientation="v", yanchor="top", y=1, x=1.01,
                                  itemsizing="constant"))
    return fig


def _front_line(front: pd.DataFrame, x: str, y: str, name: str, colour: str, dash: str = "solid",
                width: float = 2.0) -> go.Scatter:
    """A staircase through the front points: everything above and right of it is dominated."""
    return go.Scatter(x=front[x], y=front[y], mode="lines", line=dict(shape="hv", color=colour, width=width, dash=dash),
                      name=name, hoverinfo="skip")


def front_figure(rows: pd.DataFrame, x: str, y: str, colour_by: str, limits: logic.Limits,
                 recommended: Optional[int], baselines: Sequence[int], height_px: int = 560,
                 undecided: Sequence[int] = ()) -> go.Figure:
    """Speed (``x``) against accuracy (``y``), one colour per value of the knob ``colour_by``.

    Points on the Pareto front within ``limits`` are solid with a dark outline and joined by a
    staircase; dominated points are faded; points outside the limits are hollow. The
    unconstrained front is dotted when the limits change it. The recommended trial is a star,
    the baseline trials are open diamonds. Each point carries its 95 % interval as error bars
    where the study keeps one (:func:`logic.error_bar`); trials whose order against another the
    timing or WER noise leaves open (``undecided``) are ringed. Each point's ``customdata`` is
    its trial number.
    """
    plotted = rows[rows[x].notna() & rows[y].notna()]
    feasible = logic.feasible_mask(plotted, limits)
    front = logic.pareto_front(plotted[feasible], x, y)
    on_front = plotted["trial"].isin(front["trial"])
    hover = plotted.apply(logic.hover_text, axis=1) if len(plotted) else pd.Series(dtype=str)

    fig = go.Figure()
    labels = plotted[colour_by].map(lambda v: logic.format_knob(colour_by, v))
    for i, label in enumerate(_category_order(plotted[colour_by].tolist(), colour_by)):
        part = labels == label
        bars = {}
        for axis, metric in (("error_x", x), ("error_y", y)):
            spans = logic.error_bar(plotted[part], metric)
            if spans is not None:
                bars[axis] = dict(type="data", symmetric=False, arrayminus=spans[0], array=spans[1],
                                  thickness=1, width=3, color=PALETTE[i % len(PALETTE)])
        fig.add_trace(go.Scatter(
            x=plotted.loc[part, x], y=plotted.loc[part, y], mode="markers", name=label, **bars,
            customdata=plotted.loc[part, "trial"], hovertext=hover[part], hoverinfo="text",
            marker=dict(
                color=PALETTE[i % len(PALETTE)], size=[13 if f else 10 for f in on_front[part]],
                symbol=["circle" if ok else "circle-open" for ok in feasible[part]],
                opacity=[1.0 if f else DOMINATED_OPACITY if ok else OUTSIDE_LIMITS_OPACITY
                         for f, ok in zip(on_front[part], feasible[part])],
                line=dict(color=FRONT_COLOUR, width=[1.8 if f else 0 for f in on_front[part]]))))

    full_front = logic.pareto_front(plotted, x, y)
    if set(full_front["trial"]) != set(front["trial"]):
        fig.add_trace(_front_line(full_front, x, y, "Pareto front, all trials", "#9a9a9a", dash="dot", width=1.5))
    if len(front):
        fig.add_trace(_front_line(front, x, y, "Pareto front within limits", FRONT_COLOUR))

    base = plotted[plotted["trial"].isin(baselines)]
    if len(base):
        fig.add_trace(go.Scatter(
            x=base[x], y=base[y], mode="markers+text", name="baseline", text=["baseline"] * len(base),
            textposition="bottom center", hoverinfo="skip",
            marker=dict(symbol="diamond-open", size=20, color=FRONT_COLOUR, line=dict(width=2))))
    open_order = plotted[plotted["trial"].isin(undecided)]
    if len(open_order):
        fig.add_trace(go.Scatter(
            x=open_order[x], y=open_order[y], mode="markers", name="undecided under noise", hoverinfo="skip",
            marker=dict(symbol="circle-open-dot", size=26, color=LIMIT_COLOUR, line=dict(width=1.5))))
    chosen = plotted[plotted["trial"] == recommended]
    if len(chosen):
        fig.add_trace(go.Scatter(
            x=chosen[x], y=chosen[y], mode="markers+text", name="recommended",
            text=[f"recommended: trial {recommended}"], textposition="top right", hoverinfo="skip",
            textfont=dict(size=13, color=FRONT_COLOUR),
            marker=dict(symbol="star", size=24, color=RECOMMENDED_COLOUR, line=dict(color=FRONT_COLOUR, width=1.5))))

    for metric, bound in limits.bounds().items():
        if not (plotted[metric] > bound).any():
            continue  # a limit that rules nothing out would only clutter the plot
        label = f"max {logic.METRICS[metric].label} {logic.format_metric(metric, bound)}"
        if metric == y:
            fig.add_hline(y=bound, line=dict(color=LIMIT_COLOUR, dash="dash", width=1),
                          annotation_text=label, annotation_position="top left",
                          annotation_font_color=LIMIT_COLOUR)
        elif metric == x:
            fig.add_vline(x=bound, line=dict(color=LIMIT_COLOUR, dash="dash", width=1),
                          annotation_text=label, annotation_position="top right",
                          annotation_font_color=LIMIT_COLOUR)
    return _layout(fig, x, y, colour_by, height_px)


def studies_figure(rows: pd.DataFrame, x: str, y: str, height_px: int = 520) -> go.Figure:
    """Several studies on the same axes: one colour per study, each study's front as a staircase."""
    plotted = rows[rows[x].notna() & rows[y].notna()]
    hover = plotted.apply(logic.hover_text, axis=1) if len(plotted) else pd.Series(dtype=str)
    fig = go.Figure()
    for i, (study, part) in enumerate(plotted.groupby("study", sort=False)):
        colour = PALETTE[i % len(PALETTE)]
        front = logic.pareto_front(part, x, y)
        on_front = part["trial"].isin(front["trial"])
        fig.add_trace(go.Scatter(
            x=part[x], y=part[y], mode="markers", name=study, legendgroup=study,
            customdata=part["trial"], hovertext=hover[part.index], hoverinfo="text",
            marker=dict(color=colour, size=11, opacity=[1.0 if f else DOMINATED_OPACITY for f in on_front])))
        fig.add_trace(_front_line(front, x, y, f"{study} front", colour))
        fig.data[-1].update(legendgroup=study, showlegend=False)
    return _layout(fig, x, y, "study", height_px)


def importance_figure(importances: dict[str, dict[str, float]], height_px: int = 360) -> go.Figure:
    """Horizontal bars: each knob's share of importance, one bar colour per objective."""
    fig = go.Figure()
    knobs = sorted({k for per in importances.values() for k in per},
                   key=lambda k: sum(per.get(k, 0.0) for per in importances.values()))
    for i, (metric, per) in enumerate(importances.items()):
        label = logic.METRICS[metric].label if metric in logic.METRICS else metric
        fig.add_trace(go.Bar(y=knobs, x=[per.get(k, 0.0) for k in knobs], orientation="h", name=label,
                             marker_color=PALETTE[i % len(PALETTE)],
                             hovertemplate="%{y}: %{x:.0%}<extra>" + label + "</extra>"))
    fig.update_layout(template="plotly_white", height=height_px, barmode="group",
                      margin=dict(l=10, r=10, t=30, b=10), xaxis=dict(title="share of importance", tickformat=".0%"),
                      legend=dict(title="objective"))
    return fig
