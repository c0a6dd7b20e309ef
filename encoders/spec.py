"""The input specification that travels with an encoder (timm-style config).

Everything a caller needs to turn a decoded study into encoder input is derived from an
:class:`InputSpec`, which is stored in the encoder's card, so preprocessing is never
re-typed by hand.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# CT intensity windows (centre, width) in HU; each becomes one input channel (2.5D input).
DEFAULT_CT_WINDOWS: tuple[tuple[float, float], ...] = (
    (40.0, 400.0),  # soft tissue / mediastinum
    (-600.0, 1500.0),  # lung
    (0.0, 2000.0),  # wide (bone + soft tissue)
)


#: how a study is fitted to ``InputSpec.shape``: the whole study at a per-study spacing
#: (``"extent"``, the default), or the legacy centre crop at a fixed spacing (``"crop"``,
#: cards and stores written before the whole-study grid; kept so they still load)
FITS = ("extent", "crop")


@dataclass(frozen=True)
class InputSpec:
    """How a study becomes encoder input: a coarse whole-study *context* volume plus
    fixed-size lesion-scale *detail patches* around the regions that matter.

    Context (``fit="extent"``): the whole study (any z extent and field of view) is
    resampled to ``shape`` (depth, height, width) at a per-study spacing: along z
    ``max(spacing_mm[0], z extent / depth)``, in-plane one spacing for both axes,
    ``max(spacing_mm[1], FOV / size)``; what is left over is padded centrally, nothing is
    cropped. ``spacing_mm`` is thus the *finest* context spacing. The per-study spacing and
    origin are stored with the study (:class:`encoders.grid.ContextGrid`), so voxel <-> mm
    maps are exact. With the default 64 x 128 x 128 a 350 mm chest with a 500 mm FOV is
    kept at 5.5 x 3.9 x 3.9 mm, a 2 m whole body at 31 mm along z.

    Detail: each patch is ``patch_shape`` voxels at ``patch_spacing_mm`` (default
    16 x 64 x 64 at 2 x 1 x 1 mm = 32 x 64 x 64 mm) cut from the full-resolution study
    around a region: every reader region given at ingest and the top ``proposals``
    label-free proposals (:func:`encoders.roi.propose_lesions`), at most ``max_patches``
    per study. The lesion encoder embeds the central 16 x 32 x 32 mm of a patch
    (``encoders.model.LESION_PATCH_BOX_MM``); the margin is room for the training jitter.

    Bytes per study are bounded whatever the CT (:meth:`max_study_bytes`): context
    64 x 128 x 128 int16 = 2 MiB plus at most 12 patches x 128 KiB = 1.5 MiB, 3.5 MiB.

    ``fit="crop"`` is the legacy grid: resampled to ``spacing_mm`` exactly and
    centre-cropped / padded to ``shape`` (most of a chest lost), no patches; lesion
    encoders on it cut their box from the volume. ``windows`` are (centre, width) HU
    windows; each is one channel of the 2D backbone.
    """

    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    shape: tuple[int, int, int] = (64, 128, 128)
    windows: tuple[tuple[float, float], ...] = field(default=DEFAULT_CT_WINDOWS)
    pad_value_hu: float = -1024.0
    fit: str = "extent"
    patch_spacing_mm: tuple[float, float, float] = (2.0, 1.0, 1.0)
    patch_shape: tuple[int, int, int] = (16, 64, 64)
    proposals: int = 4
    max_patches: int = 12

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"InputSpec.fit must be one of {FITS}, got {self.fit!r}")
        if len(self.patch_shape) != 3 or min(int(v) for v in self.patch_shape) < 1:
            raise ValueError(f"patch_shape must be 3 positive sizes, got {self.patch_shape}")
        if int(self.max_patches) < 1 or int(self.proposals) < 0:
            raise ValueError("max_patches must be >= 1 and proposals >= 0")

    @property
    def in_chans(self) -> int:
        return len(self.windows)

    @property
    def has_patches(self) -> bool:
        """Whether studies carry detail patches (the whole-study grid) or not (legacy)."""
        return self.fit == "extent"

    @property
    def patch_mm(self) -> tuple[float, float, float]:
        """The patch's extent ``(z, y, x)`` in mm."""
        return tuple(float(n) * float(s) for n, s in  # type: ignore[return-value]
                     zip(self.patch_shape, self.patch_spacing_mm, strict=True))

    def max_study_bytes(self) -> int:
        """Upper bound of the voxel bytes stored per study (int16 context + patches)."""
        context = 2 * math.prod(int(v) for v in self.shape)
        if not self.has_patches:
            return context
        return context + 2 * int(self.max_patches) * math.prod(int(v) for v in self.patch_shape)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spacing_mm"] = list(self.spacing_mm)
        d["shape"] = list(self.shape)
        d["windows"] = [list(w) for w in self.windows]
        if not self.has_patches:  # the legacy grid: exactly what such cards and stores hold
            for k in ("fit", "patch_spacing_mm", "patch_shape", "proposals", "max_patches"):
                d.pop(k)
            return d
        d["patch_spacing_mm"] = list(self.patch_spacing_mm)
        d["patch_shape"] = list(self.patch_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        """The spec of a card or store; one without ``fit`` predates the whole-study grid
        and is the legacy centre crop."""
        if not isinstance(d, dict):
            raise TypeError(f"an input spec is a JSON object, got {type(d).__name__}")
        default = cls()
        fit = str(d.get("fit", "crop"))
        return cls(
            spacing_mm=tuple(float(v) for v in d["spacing_mm"]),  # type: ignore[arg-type]
            shape=tuple(int(v) for v in d["shape"]),  # type: ignore[arg-type]
            windows=tuple((float(c), float(w)) for c, w in d["windows"]),
            pad_value_hu=float(d.get("pad_value_hu", -1024.0)),
            fit=fit,
            patch_spacing_mm=tuple(float(v) for v in  # type: ignore[arg-type]
                                   d.get("patch_spacing_mm", default.patch_spacing_mm)),
            patch_shape=tuple(int(v) for v in  # type: ignore[arg-type]
                              d.get("patch_shape", default.patch_shape)),
            proposals=int(d.get("proposals", default.proposals)),
            max_patches=int(d.get("max_patches", default.max_patches)),
        )


DEFAULT_SPEC = InputSpec()
