"""Figures of a search answer (matplotlib, no display needed): survival curves, thumbnails.

    plot_survival(result, "km.png")          # neighbours' weighted KM + band vs the cohort
    plot_thumbnails(result, "strip.png")     # query and neighbours' embedded regions
    plot_explanations(result, "why.png")     # per neighbour: what in the query drove it

When the index has shown no prognostic skill, the survival figure says so above its title
(:func:`skill_banner`).

``result`` is a :class:`service.client.SearchResult`. matplotlib is imported on first use
(the Agg backend: files only), so importing this module costs nothing.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NEIGHBOUR_COLOUR = "#1f5fa8"
COHORT_COLOUR = "#6b6b6b"
WARNING_COLOUR = "#b00020"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _steps(curve: Sequence[Any], attr: str) -> tuple[list[float], list[float]]:
    return [float(p.time) for p in curve], [float(getattr(p, attr)) for p in curve]


def _at_risk(curve: Sequence[Any], t: float) -> int | None:
    """Number still at risk at time ``t``: ``at_risk`` of the first point at or after t."""
    for p in curve:
        if p.time >= t:
            return int(p.at_risk)
    return 0 if curve else None


def _ticks(t_max: float) -> list[float]:
    if t_max <= 0:
        return [0.0]
    for step in (1, 2, 3, 6, 12, 24, 60, 120, 240, 600):
        if t_max / step <= 8:
            break
    return [float(step * i) for i in range(math.floor(t_max / step) + 1)]


def skill_banner(result: Any) -> str:
    """One line naming the index-level skill warnings of ``result`` (empty when none):
    e.g. ``"NO PROGNOSTIC SKILL: not a prognosis (C-index interval includes 0.5)"``."""
    codes = [w.code for w in getattr(result.prognosis, "skill_warnings", [])]
    if not codes:
        return ""
    parts = []
    if "NO_PROGNOSTIC_SKILL" in codes:
        parts.append("NO PROGNOSTIC SKILL SHOWN by this index: not a prognosis")
    if "FEW_OUTCOMES" in codes:
        parts.append("index built from too few outcomes")
    return "; ".join(parts)


def plot_survival(result: Any, path: Path | str, *, title: str | None = None) -> Path:
    """Neighbours' similarity-weighted Kaplan–Meier with its 95 % band against the whole
    cohort's curve, horizons marked, and the numbers at risk below; writes a PNG."""
    plt = _pyplot()
    p = result.prognosis
    unit = p.time_unit or "months"
    nb, co = p.survival, p.cohort_survival
    t_max = max([pt.time for pt in nb] + [pt.time for pt in co] + [1.0])
    if nb:
        # beyond the neighbours' follow-up, show the cohort only up to a bit further
        t_max = min(t_max, max(pt.time for pt in nb) * 1.5 if co else t_max)
    ticks = _ticks(t_max)

    fig = plt.figure(figsize=(7.5, 5.6), dpi=120)
    ax = fig.add_axes((0.15, 0.34, 0.81, 0.56))
    if co:
        x, y = _steps(co, "survival")
        ax.step(x, y, where="post", color=COHORT_COLOUR, lw=1.6, ls="--", label="whole cohort")
        _, lo = _steps(co, "lower")
        _, hi = _steps(co, "upper")
        ax.fill_between(x, lo, hi, step="post", color=COHORT_COLOUR, alpha=0.12, lw=0)
    if nb:
        x, y = _steps(nb, "survival")
        ax.step(
            x,
            y,
            where="post",
            color=NEIGHBOUR_COLOUR,
            lw=2.2,
            label=f"{len(result.neighbors)} most similar patients (weighted)",
        )
        _, lo = _steps(nb, "lower")
        _, hi = _steps(nb, "upper")
        ax.fill_between(
            x, lo, hi, step="post", color=NEIGHBOUR_COLOUR, alpha=0.22, lw=0, label="95% band"
        )
        # censored neighbours: ticks where the curve does not drop
        for n in result.neighbors:
            if n.time is not None and n.event is False and n.time <= t_max:
                s = next((pt.survival for pt in reversed(nb) if pt.time <= n.time), 1.0)
                ax.plot([n.time], [s], marker="|", ms=9, color=NEIGHBOUR_COLOUR)
    if p.median_survival is not None:
        ax.axhline(0.5, color="black", lw=0.6, ls=":")
        ax.plot([p.median_survival], [0.5], "o", color=NEIGHBOUR_COLOUR, ms=5)
    for h in p.at_horizons:
        if h.time <= t_max:
            ax.axvline(h.time, color="black", lw=0.5, alpha=0.25)
    ax.set_xlim(0, t_max)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(ticks)
    ax.set_ylabel("event-free probability")
    ax.set_xlabel(f"time ({unit})")
    ax.grid(alpha=0.25)
    ax.legend(loc="upper right", fontsize=8.5, frameon=False)
    med = "not reached" if p.median_survival is None else f"{p.median_survival:.1f}"
    cmed = "not reached" if p.cohort_median_survival is None else f"{p.cohort_median_survival:.1f}"
    ax.set_title(
        title
        or f"median {med} vs cohort {cmed} {unit}; effective n {p.effective_sample_size:.1f}",
        fontsize=10.5,
    )
    skill = skill_banner(result)
    if skill:  # above the title, in red: the figure cannot be read without it
        fig.suptitle(skill, fontsize=10.5, color=WARNING_COLOUR, weight="bold", y=0.985)

    # numbers at risk
    table = fig.add_axes((0.15, 0.04, 0.81, 0.17))
    table.set_xlim(0, t_max)
    table.set_ylim(0, 3)
    table.axis("off")
    table.text(-0.16, 2.75, "number at risk", fontsize=9, weight="bold", va="center",
               ha="left", transform=table.get_yaxis_transform())
    rows = [("neighbours", nb, NEIGHBOUR_COLOUR, 1.85), ("cohort", co, COHORT_COLOUR, 0.85)]
    for label, curve, colour, yy in rows:
        if not curve:
            continue
        table.text(-0.04, yy, label, ha="right", va="center", fontsize=8.5, color=colour,
                   transform=table.get_yaxis_transform())
        for t in ticks:
            n = _at_risk(curve, t)
            table.text(t, yy, "–" if n is None else str(n), ha="center", va="center", fontsize=8.5)
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_explanations(result: Any, path: Path | str, *, columns: int = 5) -> Path:
    """Per neighbour, the query's slice with the occlusion map over its embedded region
    (red = the part whose blanking lowered the similarity to that neighbour most); writes a
    PNG. Raises ValueError when the answer carries no explanations."""
    items = [(i, n) for i, n in enumerate(result.neighbors, start=1) if n.explanation is not None]
    if not items:
        raise ValueError(
            "the answer carries no explanations (ask with include_explanations, DICOM queries only)"
        )
    plt = _pyplot()
    cols = max(1, min(columns, len(items)))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.3 * rows), dpi=120, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (i, n) in zip(axes.ravel(), items, strict=False):
        ex = n.explanation
        if ex.overlay_png:
            ax.imshow(plt.imread(io.BytesIO(ex.overlay_png), format="png"), interpolation="nearest")
        ax.set_title(f"why #{i}  sim {n.similarity:.3f}", fontsize=8.5)
    skill = skill_banner(result)
    if skill:
        fig.suptitle(skill, fontsize=9, color=WARNING_COLOUR, weight="bold")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_thumbnails(result: Any, path: Path | str, *, columns: int = 6) -> Path:
    """The query's and the neighbours' thumbnails side by side (the slice through each
    embedded region, box drawn, where the index stores regions; for whole-volume encoders
    each side's slice of the strongest match), with similarity, outcome and the slice
    shown; writes a PNG. Raises ValueError when the answer carries no thumbnails."""
    unit = (result.prognosis.time_unit or "months")[:2]
    items: list[tuple[str, bytes | None, str]] = []
    def where(region: Any) -> str:
        """The slice shown (whole-volume encoders: the slice of the strongest match)."""
        return "" if region is None else f"slice {region.slice_index}"

    if result.query_thumbnail_png:
        items.append(("query", result.query_thumbnail_png, where(getattr(result, "query_region", None))))
    for i, n in enumerate(result.neighbors, start=1):
        outcome = "–"
        if n.time is not None:
            outcome = f"{n.time:.0f} {unit}, " + ("event" if n.event else "censored")
        shown = where(getattr(n, "region", None))
        items.append((f"#{i}  sim {n.similarity:.3f}", n.thumbnail_png,
                      f"{outcome}\n{shown}" if shown else outcome))
    if not any(png for _, png, _ in items):
        raise ValueError(
            "the answer carries no thumbnails (the index was built without them, or the "
            "server did not send them)"
        )
    plt = _pyplot()
    cols = max(1, min(columns, len(items)))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.75 * cols, 2.2 * rows), dpi=120, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (label, png, outcome) in zip(axes.ravel(), items, strict=False):
        if png:
            img = plt.imread(io.BytesIO(png), format="png")  # (h, w) grey or (h, w, 3) RGB
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.text(0.5, 0.5, "no thumbnail", ha="center", va="center", fontsize=8)
        colour = "#b03030" if label == "query" else "black"
        ax.set_title(label, fontsize=8.5, color=colour, weight="bold" if label == "query" else None)
        if outcome:
            ax.text(0.5, -0.06, outcome, transform=ax.transAxes, ha="center", va="top", fontsize=8)
    skill = skill_banner(result)
    if skill:
        fig.suptitle(skill, fontsize=9, color=WARNING_COLOUR, weight="bold")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


__all__ = ["plot_explanations", "plot_survival", "plot_thumbnails", "skill_banner"]
