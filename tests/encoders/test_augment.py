"""Scanner-imitating augmentations."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from encoders import augment as A

FUNCS: list[Callable[..., torch.Tensor]] = [
    A.gaussian_noise,
    A.kernel_sharpness,
    A.hu_offset_scale,
    A.slice_thickness,
    A.fov_zoom,
    A.inplane_shift,
    A.slice_window_crop,
    A.augment,
]


def _batch(b: int = 3, d: int = 6, h: int = 24, w: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    x = torch.full((b, d, h, w), -1000.0)
    x[:, :, 6:18, 5:15] = 40.0
    x[:, :, 10:12, 8:10] = 700.0
    return (
        x
        + torch.arange(d, dtype=torch.float32).view(1, d, 1, 1) * 10
        + 5 * torch.randn(x.shape, generator=g)
    )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("fn", FUNCS, ids=lambda f: f.__name__)
def test_shape_preserved_and_seeded(fn: Callable[..., torch.Tensor]) -> None:
    x = _batch()
    a = fn(x, _gen(0))
    b = fn(x, _gen(0))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    if fn is not A.inplane_shift:  # every other transform is random enough to differ
        assert not torch.equal(fn(x, _gen(1)), a)
    assert torch.equal(x, _batch())  # input untouched


@pytest.mark.parametrize("fn", FUNCS, ids=lambda f: f.__name__)
def test_rejects_non_4d(fn: Callable[..., torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="batch, depth, height, width"):
        fn(torch.zeros(6, 24, 20), _gen(0))


def test_offset_changes_mean_by_offset() -> None:
    x = _batch()
    y = A.hu_offset_scale(x, _gen(0), offset=(25.0, 25.0), scale=(1.0, 1.0))
    torch.testing.assert_close(
        y.mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3)), torch.full((3,), 25.0), rtol=0, atol=1e-2
    )
    z = A.hu_offset_scale(x, _gen(0), scale=(1.0, 1.0))  # offsets in ±30
    diff = z.mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3))
    assert bool((diff.abs() <= 30.0 + 1e-3).all()) and diff.std() > 0


def test_noise_level_and_zero_mean() -> None:
    x = torch.zeros(4, 8, 32, 32)
    y = A.gaussian_noise(x, _gen(0), sigma=(20.0, 20.0))
    assert y.std().item() == pytest.approx(20.0, rel=0.05)
    assert abs(y.mean().item()) < 1.0
    torch.testing.assert_close(A.gaussian_noise(x, _gen(0), sigma=(0.0, 0.0)), x)


def test_blur_and_sharpen_keep_constant_images() -> None:
    x = torch.full((4, 2, 16, 16), 123.0)
    torch.testing.assert_close(A.kernel_sharpness(x, _gen(0)), x)
    step = torch.zeros(2, 1, 16, 16)
    step[..., 8:] = 100.0
    blurred = A.kernel_sharpness(step, _gen(0), p_sharpen=0.0)
    sharp = A.kernel_sharpness(step, _gen(0), p_sharpen=1.0)
    assert blurred.max() <= 100.0 + 1e-4 and blurred.min() >= -1e-4
    assert sharp.max() > 100.0 and sharp.min() < 0.0  # overshoot at the edge


def test_thickness_averages_neighbours() -> None:
    x = torch.arange(6, dtype=torch.float32).view(1, 6, 1, 1).expand(2, 6, 3, 3).contiguous()
    torch.testing.assert_close(A.slice_thickness(x, _gen(0), max_slices=1), x)
    y = A.slice_thickness(x, _gen(0), max_slices=3)
    # interior slices of a linear ramp are unchanged by any centred box average
    torch.testing.assert_close(y[:, 1:5], x[:, 1:5])


def test_fov_zoom_identity_and_padding() -> None:
    x = _batch()
    torch.testing.assert_close(A.fov_zoom(x, _gen(0), zoom=(1.0, 1.0)), x, atol=1e-3, rtol=0)
    out = A.fov_zoom(x + 1000.0 + 500.0, _gen(0), zoom=(0.5, 0.5), pad_value=-1024.0)
    assert out[:, :, 0, 0].max().item() == pytest.approx(-1024.0)  # corner is padding
    shifted = A.inplane_shift(x, _gen(0), max_shift_px=3.0)
    assert not torch.allclose(shifted, x)


def test_slice_window_crop() -> None:
    x = _batch()
    torch.testing.assert_close(A.slice_window_crop(x, _gen(0), min_fraction=1.0), x)
    y = A.slice_window_crop(x, _gen(0), min_fraction=0.5)
    # slices carry a +10 HU per-slice ramp: a crop keeps the order (monotone means)
    means = y.mean(dim=(2, 3))
    assert bool((means[:, 1:] >= means[:, :-1] - 1.0).all())
    with pytest.raises(ValueError, match="min_fraction"):
        A.slice_window_crop(x, _gen(0), min_fraction=0.0)


def test_two_views() -> None:
    x = _batch().to(torch.int16)
    v1, v2 = A.two_views(x, _gen(0))
    assert v1.shape == v2.shape == x.shape and v1.dtype == torch.float32
    assert not torch.equal(v1, v2)
    w1, w2 = A.two_views(x, _gen(0))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
