"""Scanner harmonisation: HU calibration of images, and ComBat on study embeddings.

**HU calibration to internal references** (:func:`calibrate_hu`, image level, per study,
nothing fitted). Scanners differ in calibration: observed ``HU' = g * HU + o`` with an
offset ``o`` of tens of HU and a gain ``g`` of a few per cent, which is as large as the
density difference between lesion types (solid vs necrotic, say). Two references inside
every chest CT pin ``g`` and ``o`` down: outside air (-1000 HU by definition) and the soft
tissue peak of the body (muscle, blood, organs; about +40 HU). Per study, the soft-tissue
level is the mode of the smoothed HU histogram in [-60, 140] and the air level the median
of voxels below -900 HU (the resampling pad value excluded); the volume is mapped
linearly so that they land on +40 and -1000 HU. Without enough outside air (< 1000
voxels) only the offset is corrected. Patient-to-patient variation of soft tissue (about
±10 HU) limits the precision; the calibration removes scanner offsets of tens of HU.

**ComBat on embeddings** (:class:`ComBat`, fitted on a cohort).

ComBat (Johnson, Li & Rabinovic 2007, *Biostatistics* 8:118; used for radiomics and
deep features by Fortin et al. 2018 and many since) models each embedding dimension ``g``
of study ``j`` from scanner (batch) ``i`` as

    x_ijg = alpha_g + gamma_ig + delta_ig * eps_ijg,   eps ~ N(0, sigma_g^2)

i.e. a scanner shifts (``gamma``) and scales (``delta``) every dimension. Fitting:

1. ``alpha_g`` = cohort mean; ``sigma_g^2`` = pooled within-scanner variance; the data are
   standardised ``z = (x - alpha) / sigma``.
2. Per scanner and dimension, the raw estimates ``gamma^_ig`` (mean of ``z``) and
   ``delta^2_ig`` (variance of ``z``).
3. Empirical Bayes: across the dimensions of one scanner, ``gamma`` gets a normal prior and
   ``delta^2`` an inverse-gamma prior (method of moments); the posterior means are found by
   the usual fixed-point iteration. Scanners with few studies are shrunk towards "no
   effect", so a small batch is not over-corrected.

Adjusting: ``x* = sigma * (z - gamma*_i) / delta*_i + alpha``. Studies from a scanner not
seen at fit time are only standardised and de-standardised (no batch term), which is the
identity, and :meth:`ComBat.transform` reports them in ``unknown``.

Caveat (why this is an option, evaluated with and without in ``encoders.evaluate``):
ComBat removes whatever differs on average between scanners. If disease prevalence
differs between scanners (a referral centre with one scanner model), it removes disease
signal too; it is sound only when scanner and disease are roughly independent in the
fitting cohort. No covariates are modelled here (a self-supervised cohort has no labels).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Values = Sequence[Any] | np.ndarray  # one value per study

__all__ = [
    "ComBat",
    "HarmonizeError",
    "calibrate_hu",
    "calibrate_with",
    "calibration_params",
    "hu_reference_levels",
]

SOFT_TISSUE_HU = 40.0
AIR_HU = -1000.0
_SOFT_WINDOW = (-60.0, 140.0)
_MIN_AIR_VOXELS = 1000

_MIN_BATCH = 2  # a scanner needs at least 2 studies to estimate a variance


class HarmonizeError(ValueError):
    """Bad input to ComBat (shapes, NaN, too few studies per scanner)."""


def hu_reference_levels(volume: np.ndarray, *, pad_value: float = -1024.0) -> tuple[float, float | None]:
    """``(soft-tissue level, air level or None)`` in observed HU of one ``(D, H, W)`` volume."""
    v = np.asarray(volume)
    soft = v[(v > _SOFT_WINDOW[0]) & (v < _SOFT_WINDOW[1])]
    if soft.size < 100:
        raise HarmonizeError(
            "the volume has almost no soft tissue (-60..140 HU): cannot calibrate HU on it; "
            "is it CT in HU?"
        )
    hist, edges = np.histogram(soft, bins=100, range=_SOFT_WINDOW)
    kernel = np.exp(-0.5 * (np.arange(-9, 10) / 3.0) ** 2)
    smooth = np.convolve(hist.astype(np.float64), kernel / kernel.sum(), mode="same")
    i = int(np.argmax(smooth))
    soft_level = float((edges[i] + edges[i + 1]) / 2)
    air = v[(v < -900) & (v != pad_value)]
    air_level = float(np.median(air)) if air.size >= _MIN_AIR_VOXELS else None
    return soft_level, air_level


def calibration_params(
    volume: np.ndarray, *, pad_value: float = -1024.0
) -> tuple[float, float] | None:
    """``(soft-tissue level, gain)`` that :func:`calibrate_hu` maps one ``(D, H, W)``
    volume with (``(v - soft) / gain + 40``), or None when it has no soft tissue."""
    try:
        soft, air = hu_reference_levels(volume, pad_value=pad_value)
    except HarmonizeError:
        return None
    gain = 1.0
    if air is not None and soft - air > 500.0:  # a plausible span; else offset only
        gain = (soft - air) / (SOFT_TISSUE_HU - AIR_HU)
    return soft, gain


def calibrate_hu(volumes: np.ndarray, *, pad_value: float = -1024.0) -> np.ndarray:
    """Map each volume of ``(n, D, H, W)`` (or one ``(D, H, W)``) linearly so that its
    soft-tissue level is +40 HU and its outside air -1000 HU (see the module docstring).
    Returns the same shape and dtype (int16 stays int16, rounded); pad voxels keep
    ``pad_value``. A volume without soft tissue is returned unchanged."""
    v = np.asarray(volumes)
    single = v.ndim == 3
    batch = v[None] if single else v
    if batch.ndim != 4:
        raise HarmonizeError(f"expected (n, D, H, W) or (D, H, W) volumes, got {v.shape}")
    out = np.empty_like(batch)
    for i, vol in enumerate(batch):
        out[i] = calibrate_with(vol, calibration_params(vol, pad_value=pad_value),
                                pad_value=pad_value)
    return out[0] if single else out


def calibrate_with(
    volume: np.ndarray, params: tuple[float, float] | None, *, pad_value: float = -1024.0
) -> np.ndarray:
    """Map ``volume`` (any shape) with calibration ``params`` ``(soft-tissue level, gain)``
    measured elsewhere, e.g. on the whole study a detail patch was cut from
    (:func:`calibration_params`): ``(v - soft) / gain + 40``. Same shape and dtype (integers
    rounded and clipped); ``pad_value`` voxels kept; ``params=None`` returns a copy."""
    vol = np.asarray(volume)
    if params is None:
        return vol.copy()
    soft, gain = params
    x = (vol.astype(np.float32) - soft) / gain + SOFT_TISSUE_HU
    x = np.where(vol == pad_value, pad_value, x)
    if np.issubdtype(vol.dtype, np.integer):
        info = np.iinfo(vol.dtype)
        x = np.clip(np.rint(x), info.min, info.max)
    return x.astype(vol.dtype)


def _check_x(x: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise HarmonizeError(f"{what} must be a non-empty (n, d) array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise HarmonizeError(f"{what} contains NaN or infinite values")
    return a


def _check_batches(batches: Values, n: int) -> np.ndarray:
    b = np.asarray([str(v) for v in batches], dtype=object)
    if b.shape != (n,):
        raise HarmonizeError(f"need one scanner key per study: {n} studies, {b.size} keys")
    return b


def _postmean(g_hat: np.ndarray, g_bar: float, n: int, d_star: np.ndarray, t2: float) -> np.ndarray:
    return (t2 * n * g_hat + d_star * g_bar) / (t2 * n + d_star)


def _postvar(sum2: np.ndarray, n: int, a: float, b: float) -> np.ndarray:
    return (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)


def _eb_fit(z: np.ndarray, max_iter: int = 100, tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Empirical-Bayes ``(gamma*, delta*^2)`` ``(d,)`` for one scanner's standardised ``z``."""
    n = z.shape[0]
    g_hat = z.mean(axis=0)
    d_hat = z.var(axis=0, ddof=1)
    g_bar = float(g_hat.mean())
    t2 = float(g_hat.var(ddof=1)) if g_hat.size > 1 else 0.0
    m = float(d_hat.mean())
    s2 = float(d_hat.var(ddof=1)) if d_hat.size > 1 else 0.0
    if t2 <= 0 or s2 <= 0 or m <= 0:  # too little spread across dimensions for a prior
        return g_hat, np.maximum(d_hat, 1e-8)
    a = (2.0 * s2 + m**2) / s2
    b = (m * s2 + m**3) / s2
    g_new, d_new = g_hat.copy(), d_hat.copy()
    for _ in range(max_iter):
        g_prev, d_prev = g_new, d_new
        g_new = _postmean(g_hat, g_bar, n, d_prev, t2)
        sum2 = ((z - g_new) ** 2).sum(axis=0)
        d_new = _postvar(sum2, n, a, b)
        change = max(
            float(np.max(np.abs(g_new - g_prev) / np.maximum(np.abs(g_prev), 1e-8))),
            float(np.max(np.abs(d_new - d_prev) / np.maximum(d_prev, 1e-8))),
        )
        if change < tol:
            break
    return g_new, np.maximum(d_new, 1e-8)


@dataclass
class ComBat:
    """Per-scanner location/scale harmonisation of embeddings (see the module docstring).

    ``ComBat().fit(x (n, d), scanners)`` then ``.transform(x, scanners) -> (x*, unknown)``.
    ``empirical_bayes=False`` uses the raw per-scanner estimates (no shrinkage).
    The fitted state is JSON-serialisable (:meth:`to_dict` / :meth:`from_dict`) so that it
    can travel with an index snapshot.
    """

    empirical_bayes: bool = True
    alpha: np.ndarray | None = None  # (d,)
    sigma: np.ndarray | None = None  # (d,)
    gamma: dict[str, np.ndarray] = field(default_factory=dict)  # scanner -> (d,)
    delta: dict[str, np.ndarray] = field(default_factory=dict)  # scanner -> (d,) std factor
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def fitted(self) -> bool:
        return self.alpha is not None

    def fit(self, x: np.ndarray, scanners: Values) -> ComBat:
        """Fit on ``x`` ``(n, d)`` with one scanner key per row. Needs >= 2 scanners and
        >= 2 studies for each scanner."""
        a = _check_x(x, "embeddings")
        b = _check_batches(scanners, a.shape[0])
        keys, inverse, counts = np.unique(b, return_inverse=True, return_counts=True)
        if keys.size < 2:
            raise HarmonizeError(
                f"ComBat needs studies from at least 2 scanners, got {keys.size}; "
                "harmonisation is pointless on a single-scanner cohort"
            )
        small = [f"{k} ({c})" for k, c in zip(keys, counts, strict=True) if c < _MIN_BATCH]
        if small:
            raise HarmonizeError(
                f"ComBat needs at least {_MIN_BATCH} studies per scanner; too few for "
                f"{len(small)} scanner(s): merge rare scanners or leave them out"
            )
        n = a.shape[0]
        alpha = a.mean(axis=0)
        means = np.stack([a[inverse == i].mean(axis=0) for i in range(keys.size)])
        resid = a - means[inverse]
        sigma = np.sqrt(np.maximum((resid**2).sum(axis=0) / max(n - keys.size, 1), 1e-12))
        z = (a - alpha) / sigma
        self.alpha, self.sigma = alpha, sigma
        self.gamma, self.delta, self.counts = {}, {}, {}
        for i, key in enumerate(keys):
            zi = z[inverse == i]
            if self.empirical_bayes:
                g, d2 = _eb_fit(zi)
            else:
                g, d2 = zi.mean(axis=0), np.maximum(zi.var(axis=0, ddof=1), 1e-8)
            self.gamma[str(key)] = g
            self.delta[str(key)] = np.sqrt(d2)
            self.counts[str(key)] = int(counts[i])
        return self

    def transform(self, x: np.ndarray, scanners: Values) -> tuple[np.ndarray, int]:
        """Harmonise ``x`` ``(m, d)``: returns ``(x* (m, d) float32, unknown)`` where
        ``unknown`` counts rows whose scanner was not seen at fit time (left unchanged)."""
        if self.alpha is None or self.sigma is None:
            raise HarmonizeError("ComBat is not fitted; call fit(embeddings, scanners) first")
        a = _check_x(x, "embeddings")
        if a.shape[1] != self.alpha.shape[0]:
            raise HarmonizeError(
                f"embeddings have dimension {a.shape[1]} but ComBat was fitted on "
                f"dimension {self.alpha.shape[0]}"
            )
        b = _check_batches(scanners, a.shape[0])
        z = (a - self.alpha) / self.sigma
        unknown = 0
        for key in np.unique(b):
            rows = b == key
            if key not in self.gamma:
                unknown += int(rows.sum())
                continue
            z[rows] = (z[rows] - self.gamma[key]) / self.delta[key]
        return (z * self.sigma + self.alpha).astype(np.float32), unknown

    def fit_transform(self, x: np.ndarray, scanners: Values) -> np.ndarray:
        """:meth:`fit` then :meth:`transform` on the same rows."""
        return self.fit(x, scanners).transform(x, scanners)[0]

    def to_dict(self) -> dict[str, Any]:
        if self.alpha is None or self.sigma is None:
            raise HarmonizeError("ComBat is not fitted; nothing to save")
        return {
            "method": "combat",
            "empirical_bayes": self.empirical_bayes,
            "alpha": self.alpha.tolist(),
            "sigma": self.sigma.tolist(),
            "gamma": {k: v.tolist() for k, v in self.gamma.items()},
            "delta": {k: v.tolist() for k, v in self.delta.items()},
            "counts": dict(self.counts),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ComBat:
        try:
            return cls(
                empirical_bayes=bool(d.get("empirical_bayes", True)),
                alpha=np.asarray(d["alpha"], dtype=np.float64),
                sigma=np.asarray(d["sigma"], dtype=np.float64),
                gamma={str(k): np.asarray(v, dtype=np.float64) for k, v in d["gamma"].items()},
                delta={str(k): np.asarray(v, dtype=np.float64) for k, v in d["delta"].items()},
                counts={str(k): int(v) for k, v in d.get("counts", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise HarmonizeError(f"not a saved ComBat state ({exc})") from exc
