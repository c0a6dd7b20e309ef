"""Scanner-imitating augmentations on batches of HU volumes (torch, any device).

Every function takes ``x: Tensor (b, D, H, W)`` float HU and a ``torch.Generator`` and
returns a new tensor of the same shape; parameters are drawn independently per sample from
the given ranges, so results are reproducible from the generator's seed. The generator may
live on the CPU while ``x`` is on a GPU.

The augmentations imitate what differs between scanners and protocols rather than
anatomy: noise level (dose), reconstruction kernel (smooth vs sharp), calibration
(HU offset/scale), slice thickness, field of view / patient positioning and the
z-extent of the scan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AugmentConfig",
    "augment",
    "fov_zoom",
    "gaussian_noise",
    "hu_offset_scale",
    "inplane_shift",
    "kernel_sharpness",
    "rot_flip",
    "slice_thickness",
    "slice_window_crop",
    "two_views",
]


def _check(x: Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a (batch, depth, height, width) tensor, got {tuple(x.shape)}")


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, like: Tensor) -> Tensor:
    """``(n,)`` uniform draws in [lo, hi] from ``gen``, moved to ``like``'s device."""
    r = torch.rand(n, generator=gen, device=gen.device, dtype=torch.float32)
    return (lo + (hi - lo) * r).to(like.device)


def _bcast(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def gaussian_noise(
    x: Tensor, gen: torch.Generator, *, sigma: tuple[float, float] = (0.0, 30.0)
) -> Tensor:
    """Add white Gaussian noise; per-sample standard deviation uniform in ``sigma`` (HU).

    Imitates dose / detector noise differences between protocols.
    """
    _check(x)
    s = _uniform(x.shape[0], *sigma, gen, x)
    noise = torch.randn(x.shape, generator=gen, device=gen.device, dtype=torch.float32)
    return x + _bcast(s) * noise.to(x.device, x.dtype)


def _gaussian_kernels(sigmas: Tensor, radius: int) -> Tensor:
    """``(b,)`` sigmas -> ``(b, 2r+1)`` normalised 1D Gaussian kernels."""
    t = torch.arange(-radius, radius + 1, device=sigmas.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None, :] / sigmas.clamp_min(1e-3)[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def _blur_inplane(x: Tensor, sigmas: Tensor, radius: int = 2) -> Tensor:
    """Separable in-plane Gaussian blur with one sigma per sample (reflect padding)."""
    b, d, h, w = x.shape
    k = _gaussian_kernels(sigmas, radius).to(x.dtype)  # (b, K)
    kk = k.repeat_interleave(d, dim=0)  # (b*d, K): same kernel for all slices of a sample
    y = x.reshape(1, b * d, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kk.view(b * d, 1, 1, -1), groups=b * d)
    y = F.conv2d(y, kk.view(b * d, 1, -1, 1), groups=b * d)
    return y.view(b, d, h, w)


def kernel_sharpness(
    x: Tensor,
    gen: torch.Generator,
    *,
    sigma: tuple[float, float] = (0.3, 1.2),
    amount: tuple[float, float] = (0.2, 1.0),
    p_sharpen: float = 0.5,
) -> Tensor:
    """Imitate the reconstruction kernel: per sample, either blur or sharpen in-plane.

    With probability ``p_sharpen`` a sample gets an unsharp mask
    ``x + a * (x - blur(x, s))`` with ``a`` uniform in ``amount`` (a "sharp"/bone kernel);
    otherwise it is Gaussian-blurred with ``s`` uniform in ``sigma`` pixels (a "smooth"
    kernel). The blur uses a 5x5 separable kernel.
    """
    _check(x)
    b = x.shape[0]
    s = _uniform(b, *sigma, gen, x)
    a = _uniform(b, *amount, gen, x)
    sharpen = _uniform(b, 0.0, 1.0, gen, x) < p_sharpen
    blurred = _blur_inplane(x, s)
    sharp = x + _bcast(a) * (x - blurred)
    return torch.where(_bcast(sharpen), sharp, blurred)


def hu_offset_scale(
    x: Tensor,
    gen: torch.Generator,
    *,
    offset: tuple[float, float] = (-30.0, 30.0),
    scale: tuple[float, float] = (0.95, 1.05),
) -> Tensor:
    """Calibration drift: ``x * s + o`` with ``s`` uniform in ``scale`` (about water, 0 HU)
    and ``o`` uniform in ``offset`` (HU), per sample."""
    _check(x)
    s = _uniform(x.shape[0], *scale, gen, x)
    o = _uniform(x.shape[0], *offset, gen, x)
    return x * _bcast(s) + _bcast(o)


def slice_thickness(x: Tensor, gen: torch.Generator, *, max_slices: int = 3) -> Tensor:
    """Thicker slices: per sample, average each slice with its neighbours over a window of
    ``k`` slices, ``k`` uniform in ``1..max_slices`` (``k = 1`` leaves the sample unchanged).
    Edges are replicated; the depth is unchanged."""
    _check(x)
    if max_slices < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices}")
    b, _, h, w = x.shape
    ks = torch.randint(1, max_slices + 1, (b,), generator=gen, device=gen.device).to(x.device)
    out = x.clone()
    for k in range(2, max_slices + 1):
        sel = ks == k
        if not bool(sel.any()):
            continue
        lo, hi = (k - 1) // 2, k // 2
        xs = x[sel]  # (m, d, h, w)
        padded = torch.cat(
            [xs[:, :1].expand(-1, lo, h, w), xs, xs[:, -1:].expand(-1, hi, h, w)], dim=1
        )
        avg = padded.unfold(1, k, 1).mean(dim=-1)  # (m, d, h, w)
        out[sel] = avg
    return out


def _affine_inplane(x: Tensor, zoom: Tensor, shift: Tensor, pad_value: float) -> Tensor:
    """Zoom about the centre by ``zoom`` (b,) and shift by ``shift`` (b, 2) (fractions of
    the half-width, x then y); outside areas become ``pad_value``."""
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = 1.0 / zoom
    theta[:, 1, 1] = 1.0 / zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(
        (x - pad_value).float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return y.to(x.dtype) + pad_value


def fov_zoom(
    x: Tensor,
    gen: torch.Generator,
    *,
    zoom: tuple[float, float] = (0.85, 1.15),
    max_shift_px: float = 0.0,
    pad_value: float = -1024.0,
) -> Tensor:
    """Field-of-view change: zoom in-plane by a factor uniform in ``zoom`` (> 1 magnifies,
    cropping the edges; < 1 shrinks, padding with ``pad_value`` HU), optionally with a
    shift uniform in ``±max_shift_px`` pixels per axis; output size unchanged."""
    _check(x)
    b, _, h, w = x.shape
    z = _uniform(b, *zoom, gen, x)
    sx = _uniform(b, -max_shift_px, max_shift_px, gen, x) * (2.0 / w)
    sy = _uniform(b, -max_shift_px, max_shift_px, gen, x) * (2.0 / h)
    return _affine_inplane(x, z, torch.stack([sx, sy], dim=1), pad_value)


def inplane_shift(
    x: Tensor, gen: torch.Generator, *, max_shift_px: float = 4.0, pad_value: float = -1024.0
) -> Tensor:
    """Patient positioning: shift in-plane by up to ``±max_shift_px`` pixels per axis."""
    return fov_zoom(x, gen, zoom=(1.0, 1.0), max_shift_px=max_shift_px, pad_value=pad_value)


def slice_window_crop(x: Tensor, gen: torch.Generator, *, min_fraction: float = 0.7) -> Tensor:
    """Scan z-extent: per sample keep a contiguous run of ``L`` slices (``L`` uniform in
    ``[ceil(min_fraction * D), D]``, random start) and linearly resample it back to ``D``."""
    _check(x)
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    b, d, h, w = x.shape
    if d < 2:
        return x.clone()
    lmin = min(d, max(2, math.ceil(min_fraction * d)))
    length = lmin + torch.floor(_uniform(b, 0.0, 1.0, gen, x) * (d - lmin + 1)).clamp_max(d - lmin)
    start = torch.floor(_uniform(b, 0.0, 1.0, gen, x) * (d - length + 1)).clamp_max(d - length)
    t = torch.linspace(0.0, 1.0, d, device=x.device)
    pos = start[:, None] + t[None, :] * (length[:, None] - 1)  # (b, d) fractional slice index
    i0 = pos.floor().long().clamp(0, d - 1)
    i1 = (i0 + 1).clamp_max(d - 1)
    frac = (pos - i0.float()).to(x.dtype).view(b, d, 1, 1)
    idx0 = i0.view(b, d, 1, 1).expand(b, d, h, w)
    idx1 = i1.view(b, d, 1, 1).expand(b, d, h, w)
    return torch.gather(x, 1, idx0) * (1 - frac) + torch.gather(x, 1, idx1) * frac


def rot_flip(x: Tensor, gen: torch.Generator) -> Tensor:
    """Orientation: per sample, one of the 8 in-plane rotations / reflections (dihedral
    group of the square; needs H == W) and, with probability 1/2, a flip along z.

    For lesion boxes: a lesion's appearance does not depend on which way it faces.
    """
    _check(x)
    b, _, h, w = x.shape
    if h != w:
        raise ValueError(f"rot_flip needs square slices, got {h} x {w}")
    codes = torch.randint(0, 16, (b,), generator=gen, device=gen.device).tolist()
    out = torch.empty_like(x)
    for i, c in enumerate(codes):
        y = torch.rot90(x[i], c % 4, dims=(1, 2))
        if (c // 4) % 2:
            y = y.flip(2)
        if c // 8:
            y = y.flip(0)
        out[i] = y
    return out


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges used by :func:`two_views` (see each function for meaning)."""

    slice_min_fraction: float = 0.7
    zoom: tuple[float, float] = (0.85, 1.15)
    max_shift_px: float = 4.0
    max_thickness_slices: int = 3
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    sharpen_amount: tuple[float, float] = (0.2, 1.0)
    hu_offset: tuple[float, float] = (-30.0, 30.0)
    hu_scale: tuple[float, float] = (0.95, 1.05)
    noise_sigma: tuple[float, float] = (0.0, 30.0)
    pad_value: float = -1024.0
    rot_flip: bool = False

    @classmethod
    def for_lesion(cls, *, calibrated: bool = False) -> AugmentConfig:
        """Views of a lesion box: no z-stretch and little zoom (size is disease signal,
        and the box is already in mm), orientation-free, wider noise and kernel ranges.

        Noise (up to 60 HU), blur (up to 1.5 voxels) and slice thickness (up to 3 slices)
        are wide because on the 2 mm grid the scanners' noise texture, kernels and slice
        thickness are visible: with 40 HU / 1.0 / 2 the neighbours' scanner excess was
        0.10 on one cohort, with these 0.04, at the same P@10 (benchmarks/RESULTS.md).

        HU offset / scale: without calibration, wide (±40 HU, ±7 %) so the network cannot
        tell a scanner by its calibration; after per-study calibration on air and soft
        tissue (``calibrated=True``) only the residual error (±12 HU, ±2 %) — a wider
        range would also teach the network to ignore real density differences between
        lesions (tens of HU), which it then cannot tell apart.
        """
        hu_offset, hu_scale = ((-12.0, 12.0), (0.98, 1.02)) if calibrated else (
            (-40.0, 40.0),
            (0.93, 1.07),
        )
        return cls(
            slice_min_fraction=1.0,
            zoom=(0.92, 1.08),
            max_shift_px=0.0,
            max_thickness_slices=3,
            blur_sigma=(0.3, 1.5),
            sharpen_amount=(0.2, 1.0),
            hu_offset=hu_offset,
            hu_scale=hu_scale,
            noise_sigma=(0.0, 60.0),
            rot_flip=True,
        )


def augment(x: Tensor, gen: torch.Generator, cfg: AugmentConfig | None = None) -> Tensor:
    """One random scanner-like view of each volume in ``x`` ``(b, D, H, W)`` HU."""
    c = cfg or AugmentConfig()
    if c.rot_flip:
        x = rot_flip(x, gen)
    if c.slice_min_fraction < 1.0:
        x = slice_window_crop(x, gen, min_fraction=c.slice_min_fraction)
    x = fov_zoom(x, gen, zoom=c.zoom, max_shift_px=c.max_shift_px, pad_value=c.pad_value)
    x = slice_thickness(x, gen, max_slices=c.max_thickness_slices)
    x = kernel_sharpness(x, gen, sigma=c.blur_sigma, amount=c.sharpen_amount)
    x = hu_offset_scale(x, gen, offset=c.hu_offset, scale=c.hu_scale)
    return gaussian_noise(x, gen, sigma=c.noise_sigma)


def two_views(
    batch: Tensor, gen: torch.Generator, cfg: AugmentConfig | None = None
) -> tuple[Tensor, Tensor]:
    """Two independent augmented views ``(v1, v2)`` of ``batch`` ``(b, D, H, W)`` HU."""
    x = batch.float()
    return augment(x, gen, cfg), augment(x, gen, cfg)
