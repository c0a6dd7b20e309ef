"""Regions of interest: embed the lesion, not the whole chest.

A lesion fills well under 1 % of a chest CT volume, so an embedding pooled over the whole
volume is dominated by body size, anatomy and scanner. In ``region="lesion"`` mode the
encoder embeds a fixed-size box (``roi_size`` voxels of the input grid) centred on the
lesion. The centre comes from the caller (a bounding box or a mask, :func:`roi_from_box`,
:func:`roi_from_mask`) or from :func:`propose_lesion`, a classical, label-free proposal
for chest CT:

1. **Lung region** (:func:`lung_region`): per axial slice, air (< -400 HU) that does not
   touch the image border (outside air does) is lung; a morphological closing and hole
   filling bring back what lies inside or against the lung (nodules, vessels, juxta-pleural
   lesions).
2. **Thin structures removed** (:func:`remove_thin`): a grey-scale opening with a ball of
   radius ``thin_mm`` (3 mm) flattens every bright structure narrower than 6 mm, i.e. the
   peripheral vessels and their crossings, which are the blob filter's main false
   positives, and also vessels running through a ground-glass nodule, while a nodule of
   6 mm or more keeps its core (Fleischner 2017 recommends no follow-up below 6 mm).
   Only the search sees the opened volume; the encoder embeds the original voxels.
3. **Blob score** (:func:`blob_score`): the multi-scale Hessian "dot" enhancement filter of
   Li, Sone & Doi (Med. Phys. 30:2040, 2003): with the scale-normalised Hessian eigenvalues
   ``l1 <= l2 <= l3`` of the HU volume (clipped to [-1000, 100] so bone and contrast do not
   dominate) at Gaussian scales ``sigmas`` (mm), a bright blob has all three negative
   and the response is ``l3^2 / |l1|``; tubes (vessels, ``l3 ~ 0``) and plates (pleura,
   fissures) score ~0. The maximum over scales is taken. Known weakness: the score grows
   with contrast, so without step 2 vessel crossings outscore faint ground-glass nodules
   (found for 0.55 of small ones on cohort seed 11, 0.90 with it;
   ``benchmarks/eval_proposal.py``).
4. The proposed centre is the highest-scoring voxel inside the lung region.

Nothing here is fitted to data; the only assumptions are CT physics (HU) and that the
lesion of interest is a focal density inside aerated lung. For other anatomy (liver,
brain) pass explicit boxes or masks, or use ``region="whole"``. When no lung is found the
proposal falls back to the volume centre and says so (``Roi.source == "centre"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from encoders.errors import EncoderError
from encoders.grid import block_mean

__all__ = [
    "DEFAULT_PROPOSAL",
    "FIRST_PROPOSAL",
    "PROPOSALS",
    "RANKED_CLIP_HU",
    "Roi",
    "blob_score",
    "crop_around",
    "lung_region",
    "propose_lesion",
    "propose_lesions",
    "remove_thin",
    "roi_from_box",
    "roi_from_mask",
    "rois_for",
]

DEFAULT_SIGMAS_MM: tuple[float, ...] = (4.0, 6.0, 8.0, 12.0)
THIN_MM = 3.0  # bright structures narrower than 2 * THIN_MM are removed before the search
#: proposal name (stored in an encoder's card, ``RegionSpec.proposal``) -> ``thin_mm``; an
#: encoder keeps proposing regions the way it was trained
FIRST_PROPOSAL = "lung-dot-li2003"  # without thin-structure removal (encoder cards that name it)
DEFAULT_PROPOSAL = "lung-open3-dot-li2003"
PROPOSALS: dict[str, float | None] = {FIRST_PROPOSAL: None, DEFAULT_PROPOSAL: THIN_MM}
COARSE_MM = 4.0  # finer grids are searched coarse to fine (propose_lesion)
_AIR_HU = -400.0
_LUNG_HU = -850.0  # aerated lung parenchyma
DENSE_RADIUS_MM = 25.0  # the largest lesion radius a proposal is centred on
_CLIP_HU = (-1000.0, 100.0)
#: the ranked proposals' clip (:func:`propose_lesions`): every density above the top of
#: the ground-glass range (about -300 HU) counts alike, so focal densities are ranked by
#: shape and size, not by how dense they are, and a ground-glass nodule is not outranked
#: by a solid vessel crossing of its size for its contrast alone (small ground-glass
#: lesions inserted in real chest CT: top proposal for 0.44 of them with a top of +100 HU,
#: 0.69 with -300; benchmarks/RESULTS.md, issue #18 session 9). The single proposal of
#: legacy encoders (:func:`propose_lesion`, named in their cards) keeps :data:`_CLIP_HU`.
RANKED_CLIP_HU = (-1000.0, -300.0)


@dataclass(frozen=True)
class Roi:
    """A region centre in voxel indices ``(z, y, x)`` of the preprocessed volume.

    ``source``: ``"proposal"`` (:func:`propose_lesion`), ``"box"``, ``"mask"`` or
    ``"centre"`` (fallback: no lung found); ``score`` is the blob score of a proposal.
    """

    centre: tuple[int, int, int]
    source: str = "proposal"
    score: float = 0.0


def _check_volume(volume: np.ndarray) -> np.ndarray:
    v = np.asarray(volume)
    if v.ndim != 3 or min(v.shape) < 1:
        raise EncoderError(f"expected one (D, H, W) volume, got shape {v.shape}")
    return v


def _body_span(tissue: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool tissue of one slice -> what lies between the first and last pixel of
    its largest connected component (the body; couch and arms are separate components)
    along a row or along a column: the body with its concavities and what it encloses."""
    lab, n = ndimage.label(tissue)
    if n == 0:
        return np.zeros(tissue.shape, dtype=bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = lab == int(np.argmax(sizes))
    out = np.zeros(tissue.shape, dtype=bool)
    for axis in (0, 1):
        b = body if axis == 1 else body.T
        any_ = b.any(axis=1)
        first = np.argmax(b, axis=1)
        last = b.shape[1] - 1 - np.argmax(b[:, ::-1], axis=1)
        idx = np.arange(b.shape[1])
        span = (idx >= first[:, None]) & (idx <= last[:, None]) & any_[:, None]
        out |= span if axis == 1 else span.T
    return out


def lung_region(volume: np.ndarray, *, air_hu: float = _AIR_HU,
                min_fraction: float = 0.02) -> np.ndarray:
    """``(D, H, W)`` HU -> bool mask of the lungs and what lies inside or against them.

    Per axial slice, air (< -400 HU) is lung unless it is outside air: air connected to the
    image border that lies mostly (> half) outside the body's span (between its first and
    last pixel along rows or columns, :func:`_body_span`). A field of view that cuts
    through the chest wall leaves the lungs touching the border, but still inside the
    body's span, so they are kept on any FOV. Across slices, connected air
    pockets smaller than ``min_fraction`` of the largest one (gas in the bowel, noise) are
    dropped. A morphological closing and hole filling then bring back what lies inside or
    against the lung (nodules, vessels, juxta-pleural lesions)."""
    v = _check_volume(volume)
    air = v < air_hu
    mask = np.zeros(v.shape, dtype=bool)
    for z in range(v.shape[0]):
        lab, n = ndimage.label(air[z])
        if n == 0:
            continue
        keep = np.ones(n + 1, dtype=bool)
        keep[0] = False
        edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        edge = edge[edge > 0]
        if len(edge):
            hull = _body_span(~air[z])
            total = np.bincount(lab.ravel(), minlength=n + 1)
            inside = np.bincount(lab[hull].ravel(), minlength=n + 1)
            for k in edge:
                keep[k] = inside[k] > 0.5 * total[k]
        mask[z] = keep[lab]
    if not mask.any():
        return mask
    lab3, n3 = ndimage.label(mask)
    if n3 > 1:
        sizes = np.bincount(lab3.ravel())
        sizes[0] = 0
        mask = sizes[lab3] >= min_fraction * sizes.max()
    mask = ndimage.binary_closing(mask, structure=np.ones((1, 5, 5), bool), iterations=2)
    for z in range(v.shape[0]):
        mask[z] = ndimage.binary_fill_holes(mask[z])
    return mask


def _sym3_eigvals(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, e: np.ndarray,
                  f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ascending eigenvalues of ``[[a, d, e], [d, b, f], [e, f, c]]`` elementwise
    (closed form, trigonometric; Smith 1961)."""
    q = (a + b + c) / 3.0
    p1 = d * d + e * e + f * f
    p2 = (a - q) ** 2 + (b - q) ** 2 + (c - q) ** 2 + 2.0 * p1
    p = np.sqrt(np.maximum(p2, 0.0) / 6.0)
    safe = np.where(p > 1e-12, p, 1.0)
    ba, bb, bc = (a - q) / safe, (b - q) / safe, (c - q) / safe
    bd, be, bf = d / safe, e / safe, f / safe
    det = ba * (bb * bc - bf * bf) - bd * (bd * bc - bf * be) + be * (bd * bf - bb * be)
    r = np.clip(det / 2.0, -1.0, 1.0)
    phi = np.arccos(r) / 3.0
    l_hi = q + 2.0 * p * np.cos(phi)
    l_lo = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    l_mid = 3.0 * q - l_hi - l_lo
    degenerate = p <= 1e-12
    l_lo = np.where(degenerate, q, l_lo)
    l_mid = np.where(degenerate, q, l_mid)
    l_hi = np.where(degenerate, q, l_hi)
    return l_lo, l_mid, l_hi


def blob_score(
    volume: np.ndarray,
    *,
    spacing_mm: Sequence[float] = (4.0, 4.0, 4.0),
    sigmas_mm: Sequence[float] = DEFAULT_SIGMAS_MM,
    mask: np.ndarray | None = None,
    clip_hu: tuple[float, float] = _CLIP_HU,
) -> np.ndarray:
    """Multi-scale Hessian dot filter (Li et al. 2003): ``(D, H, W)`` HU -> ``(D, H, W)``
    float32 score >= 0, large on bright roughly spherical blobs; 0 outside ``mask``.
    Derivatives are taken in mm (``spacing_mm`` (z, y, x)), so the score does not depend
    on the grid. The HU are clipped to ``clip_hu`` first."""
    v = _check_volume(volume)
    sp = np.asarray([float(a) for a in spacing_mm])
    if sp.shape != (3,) or not (sp > 0).all():
        raise EncoderError(f"spacing_mm must be 3 positive numbers, got {spacing_mm!r}")
    x = np.clip(v.astype(np.float32), *clip_hu)
    best = np.zeros(v.shape, dtype=np.float32)
    sel = np.ones(v.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if not sel.any():
        return best
    for s in sigmas_mm:
        s2 = float(s) ** 2
        sig_vox = tuple(float(s) / a for a in sp)
        h = {}
        for name, order in (
            ("zz", (2, 0, 0)), ("yy", (0, 2, 0)), ("xx", (0, 0, 2)),
            ("zy", (1, 1, 0)), ("zx", (1, 0, 1)), ("yx", (0, 1, 1)),
        ):
            # d/dmm = d/dvoxel / spacing; scale-normalised by sigma^2 (mm^2)
            unit = float(np.prod([sp[i] ** o for i, o in enumerate(order)]))
            d = ndimage.gaussian_filter(x, sig_vox, order=order, mode="nearest")
            h[name] = d[sel] * (s2 / unit)
        l1, _l2, l3 = _sym3_eigvals(h["zz"], h["yy"], h["xx"], h["zy"], h["zx"], h["yx"])
        dot = np.where(l3 < 0, l3 * l3 / np.maximum(np.abs(l1), 1e-6), 0.0)
        best[sel] = np.maximum(best[sel], dot.astype(np.float32))
    return best


def remove_thin(
    volume: np.ndarray, *, spacing_mm: Sequence[float] = (4.0, 4.0, 4.0),
    radius_mm: float = THIN_MM,
) -> np.ndarray:
    """Grey-scale opening of a ``(D, H, W)`` HU volume with a ball of ``radius_mm`` (an
    ellipsoid in voxels of ``spacing_mm``): bright structures the ball does not fit in
    (vessels, their crossings, noise specks) drop to their surroundings, larger ones keep
    their shape. A no-op where the ball is a single voxel (grids coarser than the radius)."""
    v = _check_volume(volume)
    sp = [float(a) for a in spacing_mm]
    reach = [int(np.floor(radius_mm / a)) for a in sp]
    if not any(reach):
        return v
    grid = np.meshgrid(*[np.arange(-k, k + 1) * a for k, a in zip(reach, sp, strict=True)],
                       indexing="ij")
    ball = sum(g * g for g in grid) <= radius_mm * radius_mm + 1e-9
    return ndimage.grey_opening(v, footprint=ball, mode="nearest")


def propose_lesion(
    volume: np.ndarray,
    *,
    spacing_mm: Sequence[float] = (4.0, 4.0, 4.0),
    sigmas_mm: Sequence[float] = DEFAULT_SIGMAS_MM,
    coarse_mm: float | None = COARSE_MM,
    thin_mm: float | None = THIN_MM,
) -> Roi:
    """The most blob-like focal density inside the lungs of one ``(D, H, W)`` HU volume
    on a grid of ``spacing_mm``, after bright structures narrower than ``2 * thin_mm``
    are removed (:func:`remove_thin`; ``None`` keeps them).

    On grids finer than ``coarse_mm`` the search runs coarse to fine: the volume is
    block-averaged to about ``coarse_mm`` (the smallest filter scale is 4 mm, so nothing
    the filter sees is lost), the best coarse voxel is found, and the score is recomputed
    on the full grid only in a window of two coarse voxels around it. A 2 mm grid then
    costs about as much as a 4 mm one instead of 8x more. ``coarse_mm=None`` searches the
    full grid."""
    v = _check_volume(volume)
    sp = [float(a) for a in spacing_mm]
    if thin_mm:
        v = remove_thin(v, spacing_mm=sp, radius_mm=thin_mm)
    factors = [max(1, int(coarse_mm // a)) for a in sp] if coarse_mm else [1, 1, 1]
    if max(factors) > 1 and all(n >= 4 * f for n, f in zip(v.shape, factors, strict=True)):
        return _propose_coarse_to_fine(v, sp, sigmas_mm, factors)
    lung = lung_region(v)
    centre = tuple(int(s) // 2 for s in v.shape)
    if not lung.any():
        return Roi(centre=centre, source="centre")  # type: ignore[arg-type]
    score = blob_score(v, spacing_mm=sp, sigmas_mm=sigmas_mm, mask=lung)
    flat = int(np.argmax(score))
    if score.flat[flat] <= 0:
        return Roi(centre=centre, source="centre")  # type: ignore[arg-type]
    c = np.unravel_index(flat, v.shape)
    return Roi(centre=(int(c[0]), int(c[1]), int(c[2])), source="proposal",
               score=float(score.flat[flat]))


def _local_maxima(score: np.ndarray, sp: Sequence[float], min_sep_mm: float,
                  k: int) -> list[tuple[int, int, int]]:
    """The ``k`` highest local maxima of ``score`` (> 0) at least ``min_sep_mm`` apart
    (greedy non-maximum suppression), best first."""
    reach = [max(1, round(min_sep_mm / 2 / a)) for a in sp]
    peak = (score == ndimage.maximum_filter(score, size=[2 * r + 1 for r in reach],
                                            mode="constant")) & (score > 0)
    idx = np.argwhere(peak)
    if len(idx) == 0:
        return []
    order = np.argsort(-score[tuple(idx.T)], kind="stable")
    picked: list[np.ndarray] = []
    spa = np.asarray(sp, dtype=np.float64)
    for i in order:
        c = idx[i]
        if all(np.linalg.norm((c - p) * spa) >= min_sep_mm for p in picked):
            picked.append(c)
            if len(picked) == k:
                break
    return [(int(c[0]), int(c[1]), int(c[2])) for c in picked]


def _dense_centre(
    v: np.ndarray, lung: np.ndarray, peak: tuple[int, int, int], sp: Sequence[float],
    radius_mm: float = DENSE_RADIUS_MM,
) -> tuple[int, int, int]:
    """The centroid of the dense region around a blob peak: voxels of ``v`` (thin
    structures already removed) inside the lung mask and within ``radius_mm`` of
    ``peak``, denser than halfway between the peak's HU and aerated lung (-850), connected
    to the peak. The blob filter's maximum of a large lesion (or of one with a darker
    core) lies off its centre; the centroid does not. Falls back to ``peak``."""
    reach = [max(1, int(radius_mm / a)) for a in sp]
    lo = [max(0, c - r) for c, r in zip(peak, reach, strict=True)]
    hi = [min(n, c + r + 1) for c, r, n in zip(peak, reach, v.shape, strict=True)]
    win = v[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32)
    at = tuple(c - a for c, a in zip(peak, lo, strict=True))
    grids = np.ogrid[tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, peak, strict=True))]
    ball = sum((g * s) ** 2 for g, s in zip(grids, sp, strict=True)) <= radius_mm**2
    dense = (win > (float(win[at]) + _LUNG_HU) / 2) & ball
    dense &= lung[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    if not dense[at]:
        return peak
    lab, _n = ndimage.label(dense)
    comp = lab == lab[at]
    c = ndimage.center_of_mass(comp)
    return (round(c[0]) + lo[0], round(c[1]) + lo[1], round(c[2]) + lo[2])


def propose_lesions(
    volume: np.ndarray,
    *,
    spacing_mm: Sequence[float] = (2.0, 2.0, 2.0),
    n: int = 4,
    sigmas_mm: Sequence[float] = DEFAULT_SIGMAS_MM,
    coarse_mm: float = COARSE_MM,
    thin_mm: float | None = THIN_MM,
    min_sep_mm: float = 15.0,
) -> list[Roi]:
    """The ``n`` most blob-like focal densities inside the lungs of one ``(D, H, W)`` HU
    volume (any extent and field of view), ranked by score, best first; each at least
    ``min_sep_mm`` from a better one.

    As :func:`propose_lesion`, but with the blob filter on HU clipped to
    :data:`RANKED_CLIP_HU` (ground glass counts as much as solid tissue): thin bright
    structures are removed first (``thin_mm``),
    the lungs found (:func:`lung_region`, on the unopened volume), then the blob score is
    computed on a grid block-averaged to about ``coarse_mm``; its ``2 n`` best local
    maxima are each refined on the full grid in a window of two coarse voxels (the score
    there ranks them), and the proposal is centred on the dense region around the peak
    (:func:`_dense_centre`: the blob filter peaks off-centre on large lesions). With no lung (or no blob in it) the list holds one ``Roi`` at the
    volume centre with ``source == "centre"``."""
    v = _check_volume(volume)
    sp = [float(a) for a in spacing_mm]
    if int(n) < 1:
        raise EncoderError(f"n must be >= 1, got {n}")
    centre = [Roi(centre=tuple(int(s) // 2 for s in v.shape),  # type: ignore[arg-type]
                  source="centre")]
    lung_fine = lung_region(v)
    if not lung_fine.any():
        return centre
    opened = remove_thin(v, spacing_mm=sp, radius_mm=thin_mm) if thin_mm else v
    factors = [max(1, round(coarse_mm / a)) for a in sp]
    small = block_mean(opened.astype(np.float32), tuple(factors))
    start = [(m % f) // 2 for m, f in zip(v.shape, factors, strict=True)]
    csp = [a * f for a, f in zip(sp, factors, strict=True)]
    lung_small = block_mean(lung_fine.astype(np.float32), tuple(factors)) > 0.5
    score = blob_score(small, spacing_mm=csp, sigmas_mm=sigmas_mm, mask=lung_small,
                       clip_hu=RANKED_CLIP_HU)
    peaks = _local_maxima(score, csp, min_sep_mm, 2 * int(n))
    if not peaks:
        return centre
    reach = [int(np.ceil(3 * max(sigmas_mm) / a)) for a in sp]
    refined: list[Roi] = []
    for pk in peaks:
        lo, hi, inner = [], [], []
        for c, f, r, m, s0 in zip(pk, factors, reach, v.shape, start, strict=True):
            a, b = s0 + c * f - 2 * f, s0 + (c + 1) * f + 2 * f
            inner.append((max(a, 0), min(b, m)))
            lo.append(max(a - r, 0))
            hi.append(min(b + r, m))
        win = opened[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        sel = np.zeros(win.shape, dtype=bool)
        sel[tuple(slice(a - o, b - o) for (a, b), o in zip(inner, lo, strict=True))] = True
        sel &= lung_fine[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        fine = blob_score(win, spacing_mm=sp, sigmas_mm=sigmas_mm, mask=sel,
                          clip_hu=RANKED_CLIP_HU)
        flat = int(np.argmax(fine))
        if fine.flat[flat] > 0:
            b3 = np.unravel_index(flat, win.shape)
            c3 = (int(b3[0]) + lo[0], int(b3[1]) + lo[1], int(b3[2]) + lo[2])
            c3 = _dense_centre(opened, lung_fine, c3, sp)
            refined.append(Roi(centre=c3, source="proposal", score=float(fine.flat[flat])))
        else:
            mid = tuple(int(s0 + c * f + f // 2) for c, f, s0 in zip(pk, factors, start,
                                                                      strict=True))
            refined.append(Roi(centre=mid, source="proposal",  # type: ignore[arg-type]
                               score=float(score[pk])))
    refined.sort(key=lambda r: -r.score)
    out: list[Roi] = []
    spa = np.asarray(sp)
    for cand in refined:
        at = np.asarray(cand.centre)
        if all(np.linalg.norm((at - np.asarray(o.centre)) * spa) >= min_sep_mm / 2 for o in out):
            out.append(cand)
        if len(out) == int(n):
            break
    return out


def _propose_coarse_to_fine(
    v: np.ndarray, sp: list[float], sigmas_mm: Sequence[float], factors: list[int]
) -> Roi:
    small = block_mean(v.astype(np.float32), tuple(factors))
    # block_mean drops the remainder of each axis evenly at both ends
    start = [(n % f) // 2 for n, f in zip(v.shape, factors, strict=True)]
    coarse = propose_lesion(small, spacing_mm=[a * f for a, f in zip(sp, factors, strict=True)],
                            sigmas_mm=sigmas_mm, coarse_mm=None, thin_mm=None)
    if coarse.source != "proposal":
        centre = tuple(int(s) // 2 for s in v.shape)
        return Roi(centre=centre, source=coarse.source)  # type: ignore[arg-type]
    # The coarse voxel's block on the full grid, widened by two coarse voxels per side (and
    # by the filter's reach, so the window's edges do not change the score inside it).
    reach = [int(np.ceil(3 * max(sigmas_mm) / a)) for a in sp]
    lo, hi, inner = [], [], []
    for c, f, r, n, s0 in zip(coarse.centre, factors, reach, v.shape, start, strict=True):
        a, b = s0 + c * f - 2 * f, s0 + (c + 1) * f + 2 * f
        inner.append((max(a, 0), min(b, n)))
        lo.append(max(a - r, 0))
        hi.append(min(b + r, n))
    win = v[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    lung = lung_region(v[lo[0] : hi[0]])[:, lo[1] : hi[1], lo[2] : hi[2]]
    sel = np.zeros(win.shape, dtype=bool)
    sel[tuple(slice(a - o, b - o) for (a, b), o in zip(inner, lo, strict=True))] = True
    score = blob_score(win, spacing_mm=sp, sigmas_mm=sigmas_mm, mask=sel & lung)
    flat = int(np.argmax(score))
    if score.flat[flat] <= 0:  # the fine grid disagrees: keep the coarse voxel's centre
        mid = tuple(int(s0 + cc * f + f // 2)
                    for cc, f, s0 in zip(coarse.centre, factors, start, strict=True))
        return Roi(centre=mid, source="proposal", score=coarse.score)  # type: ignore[arg-type]
    best = np.unravel_index(flat, win.shape)
    return Roi(centre=(int(best[0]) + lo[0], int(best[1]) + lo[1], int(best[2]) + lo[2]),
               source="proposal", score=float(score.flat[flat]))


def roi_from_box(box: Sequence[float], shape: Sequence[int]) -> Roi:
    """A box ``(z0, y0, x0, z1, y1, x1)`` in voxels of the preprocessed volume (half-open)
    -> its centre."""
    b = [float(v) for v in box]
    if len(b) != 6 or not all(np.isfinite(b)):
        raise EncoderError(f"a box is (z0, y0, x0, z1, y1, x1) voxel indices, got {box!r}")
    lo, hi = b[:3], b[3:]
    if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
        raise EncoderError(f"box {box!r} is empty: each upper bound must exceed the lower one")
    if any(h <= 0 or lo_ >= n for lo_, h, n in zip(lo, hi, shape, strict=True)):
        raise EncoderError(f"box {box!r} lies outside the volume of shape {tuple(shape)}")
    c = tuple(int(np.clip((lo_ + h - 1) / 2.0, 0, n - 1) + 0.5)
              for lo_, h, n in zip(lo, hi, shape, strict=True))
    return Roi(centre=c, source="box")  # type: ignore[arg-type]


def roi_from_mask(mask: np.ndarray) -> Roi:
    """A ``(D, H, W)`` lesion mask (non-zero = lesion) -> the centre of its mass."""
    m = np.asarray(mask)
    if m.ndim != 3:
        raise EncoderError(f"a mask must be (D, H, W) like the volume, got shape {m.shape}")
    if not m.any():
        raise EncoderError("the lesion mask is empty; pass a mask with at least one voxel set")
    c = ndimage.center_of_mass(m != 0)
    return Roi(centre=tuple(round(v) for v in c), source="mask")


def rois_for(
    volumes: np.ndarray,
    rois: Sequence[Roi | Sequence[float] | np.ndarray | None] | None = None,
    *,
    spacing_mm: Sequence[float] = (4.0, 4.0, 4.0),
    proposal: str = DEFAULT_PROPOSAL,
) -> list[Roi]:
    """One :class:`Roi` per volume of ``(n, D, H, W)``: given ones (a :class:`Roi`, a box of
    6 numbers, or a mask array) are converted, ``None`` entries (or ``rois=None``) proposed
    by the named ``proposal`` (:data:`PROPOSALS`)."""
    if proposal not in PROPOSALS:
        raise EncoderError(f"unknown lesion proposal {proposal!r}; known: {sorted(PROPOSALS)}")
    thin_mm = PROPOSALS[proposal]
    n = volumes.shape[0]
    given = [None] * n if rois is None else list(rois)
    if len(given) != n:
        raise EncoderError(f"rois must have one entry per volume ({n}), got {len(given)}")
    out: list[Roi] = []
    shape = volumes.shape[1:]
    for vol, r in zip(volumes, given, strict=True):
        if r is None:
            out.append(propose_lesion(vol, spacing_mm=spacing_mm, thin_mm=thin_mm))
        elif isinstance(r, Roi):
            out.append(r)
        elif isinstance(r, np.ndarray) and r.ndim == 3:
            if r.shape != shape:
                raise EncoderError(f"mask shape {r.shape} differs from the volume's {shape}")
            out.append(roi_from_mask(r))
        else:
            out.append(roi_from_box(r, shape))  # type: ignore[arg-type]
    return out


def crop_around(
    volume: np.ndarray, centre: Sequence[int], size: Sequence[int], *, pad_value: float = -1024.0
) -> np.ndarray:
    """The ``size`` box of ``volume`` ``(D, H, W)`` centred on ``centre`` (the centre voxel
    at index ``size // 2``), padded with ``pad_value`` where it leaves the volume."""
    v = _check_volume(volume)
    sz = [int(s) for s in size]
    out = np.full(sz, pad_value, dtype=v.dtype)
    src, dst = [], []
    for c, s, n in zip(centre, sz, v.shape, strict=True):
        lo = int(c) - s // 2
        a, b = max(lo, 0), min(lo + s, n)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[tuple(dst)] = v[tuple(src)]
    return out
