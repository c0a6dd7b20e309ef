"""The input specification that travels with an encoder (timm-style config).

Everything a caller needs to turn a decoded study into encoder input is derived from an
:class:`InputSpec`, which is stored in the encoder's card, so preprocessing is never
re-typed by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# CT intensity windows (centre, width) in HU; each becomes one input channel (2.5D input).
DEFAULT_CT_WINDOWS: tuple[tuple[float, float], ...] = (
    (40.0, 400.0),  # soft tissue / mediastinum
    (-600.0, 1500.0),  # lung
    (0.0, 2000.0),  # wide (bone + soft tissue)
)


@dataclass(frozen=True)
class InputSpec:
    """How a study volume is resampled before it is stored and encoded.

    Volumes are resampled to ``spacing_mm`` (z, y, x) and centre-cropped / padded to
    ``shape`` (depth, height, width); the stored volume is int16 HU of that shape.
    ``windows`` are (centre, width) HU windows; each is one channel of the 2D backbone.

    The default grid is 2 mm (64 x 256 x 256 mm, 1 MiB per study): lesion texture (the
    spicules of a 12-20 mm nodule) survives it and does not survive a 4 mm grid
    (retrieval P@10 of the same method 0.63 at 4 mm vs 0.79 at 2 mm on a cohort scanned at
    about 2 mm; benchmarks/RESULTS.md).
    """

    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    shape: tuple[int, int, int] = (32, 128, 128)
    windows: tuple[tuple[float, float], ...] = field(default=DEFAULT_CT_WINDOWS)
    pad_value_hu: float = -1024.0

    @property
    def in_chans(self) -> int:
        return len(self.windows)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spacing_mm"] = list(self.spacing_mm)
        d["shape"] = list(self.shape)
        d["windows"] = [list(w) for w in self.windows]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        return cls(
            spacing_mm=tuple(float(v) for v in d["spacing_mm"]),  # type: ignore[arg-type]
            shape=tuple(int(v) for v in d["shape"]),  # type: ignore[arg-type]
            windows=tuple((float(c), float(w)) for c, w in d["windows"]),
            pad_value_hu=float(d.get("pad_value_hu", -1024.0)),
        )


DEFAULT_SPEC = InputSpec()
