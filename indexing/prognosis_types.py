"""The plain value types of a prognosis, shared by the engine and the Python client.

:mod:`indexing.prognosis` computes them and ``service.client`` returns them: one
definition, standard library only, so the thin client (``clients/python``) ships this
module without numpy-heavy or server-side imports. Fields are those of the proto messages
of the same names (``cohortsim.v1.SurvivalPoint``, ``HorizonEstimate``, ``LabelShare``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HorizonEstimate", "LabelShare", "SurvivalPoint"]


@dataclass(frozen=True)
class SurvivalPoint:
    """One step of the weighted Kaplan–Meier curve at ``time``: survival and its 95% band;
    ``at_risk`` = neighbours still at risk (unweighted)."""

    time: float
    survival: float
    lower: float
    upper: float
    at_risk: int


@dataclass
class HorizonEstimate:
    """Survival at a fixed horizon with its 95% interval; None beyond the follow-up."""

    time: float
    survival: float | None
    lower: float | None
    upper: float | None


@dataclass
class LabelShare:
    """Weighted share of one category of a categorical outcome, Wilson interval on the
    effective sample size; ``count`` = neighbours in the category."""

    label: str
    share: float
    lower: float
    upper: float
    count: int
