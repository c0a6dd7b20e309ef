"""Self-supervised training: card, checkpoint/resume, budget, and that it learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.errors import EncoderError
from encoders.model import embed, load_encoder, save_encoder
from encoders.spec import InputSpec
from encoders.train import CHECKPOINT_FILE, train_ssl

# the test chests are on a 4 mm grid; the legacy grid, where lesion boxes are cut from the
# volume itself (test_train_lesion_on_detail_patches covers the whole-study grid)
SPEC = InputSpec(spacing_mm=(4.0, 4.0, 4.0), shape=(8, 32, 32), fit="crop")
FAST = {"backbone": "test_resnet", "spec": SPEC, "embedding_dim": 16, "device": "cpu"}


def _random_volumes(n: int, spec: InputSpec = SPEC, seed: int = 0) -> np.ndarray:
    """Random-ish body volumes: air, a soft-tissue ellipse, a bone blob, noise."""
    rng = np.random.default_rng(seed)
    d, h, w = spec.shape
    yy, xx = np.mgrid[:h, :w] / np.array([h, w])[:, None, None]
    out = np.full((n, d, h, w), -1000.0)
    for i in range(n):
        body = ((yy - 0.5) / rng.uniform(0.25, 0.4)) ** 2 + ((xx - 0.5) / 0.4) ** 2 < 1
        out[i][:, body] = rng.uniform(-50, 80)
        cy, cx = rng.uniform(0.35, 0.65, size=2)
        out[i][:, (yy - cy) ** 2 + (xx - cx) ** 2 < 0.01] = 700
    return (out + rng.normal(0, 15, out.shape)).astype(np.int16)


def _two_clusters(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two kinds of study: lungs (two dark ellipses) vs abdomen (bright organ, bone ring)."""
    rng = np.random.default_rng(seed)
    d, h, w = SPEC.shape
    yy, xx = np.mgrid[:h, :w] / np.array([h, w])[:, None, None]
    labels = np.arange(n) % 2
    out = np.full((n, d, h, w), -1000.0)
    for i, lab in enumerate(labels):
        dy, dx = rng.uniform(-0.05, 0.05, size=2)
        body = ((yy - 0.5 - dy) / 0.35) ** 2 + ((xx - 0.5 - dx) / 0.42) ** 2 < 1
        out[i][:, body] = rng.uniform(0, 60)
        if lab == 0:
            for side in (-1, 1):
                lung = ((yy - 0.5 - dy) / 0.22) ** 2 + ((xx - 0.5 - dx - side * 0.18) / 0.13) ** 2
                out[i][:, lung < 1] = rng.uniform(-880, -780)
        else:
            organ = ((yy - 0.45 - dy) / 0.15) ** 2 + ((xx - 0.4 - dx) / 0.2) ** 2 < 1
            out[i][:, organ] = rng.uniform(120, 180)
            ring = np.abs(np.hypot(yy - 0.7 - dy, xx - 0.5 - dx) - 0.06) < 0.025
            out[i][:, ring] = 900
    return (out + rng.normal(0, 20, out.shape)).astype(np.int16), labels


def test_train_two_epochs_card_and_embeddings() -> None:
    vols = _random_volumes(12)
    calls: list[tuple[int, int, float]] = []
    enc, card = train_ssl(
        vols,
        epochs=2,
        batch_size=6,
        seed=3,
        data_hash="cohort-1",
        progress=lambda s, t, loss: calls.append((s, t, loss)),
        **FAST,
    )
    assert (card.backbone, card.method, card.epochs, card.seed) == ("test_resnet", "simclr", 2, 3)
    assert card.data_hash == "cohort-1" and card.embedding_dim == 16 and card.input == SPEC
    assert card.version == ""  # set when saved
    assert [c[0] for c in calls] == [1, 2, 3, 4] and {c[1] for c in calls} == {4}
    assert all(np.isfinite(c[2]) for c in calls)
    assert not enc.training
    z = embed(enc, vols)
    assert z.shape == (12, 16) and np.isfinite(z).all()


def test_train_default_spec_runs_and_saves(tmp_path: Path) -> None:
    from encoders.spec import DEFAULT_SPEC

    vols = _random_volumes(4, DEFAULT_SPEC)
    enc, card = train_ssl(vols, backbone="test_resnet", epochs=1, batch_size=4, device="cpu")
    save_encoder(enc, card, tmp_path)
    loaded, card2 = load_encoder(tmp_path)
    assert card2.epochs == 1 and card2.version.startswith("enc-")
    np.testing.assert_array_equal(embed(enc, vols), embed(loaded, vols))


def test_seeded_training_is_reproducible() -> None:
    vols = _random_volumes(6)
    a, _ = train_ssl(vols, epochs=1, batch_size=3, seed=5, **FAST)
    b, _ = train_ssl(vols, epochs=1, batch_size=3, seed=5, **FAST)
    np.testing.assert_allclose(embed(a, vols), embed(b, vols), atol=1e-5)


def test_batch_of_one_is_dropped() -> None:
    steps: list[int] = []
    train_ssl(
        _random_volumes(5), epochs=1, batch_size=4, progress=lambda s, t, _: steps.append(t), **FAST
    )
    assert steps == [1]  # 5 = 4 + 1: the single left-over study is skipped


def test_resume_continues_epochs_and_matches_uninterrupted(tmp_path: Path) -> None:
    vols = _random_volumes(8)
    kw = {"epochs": 3, "batch_size": 4, "seed": 1, **FAST}
    full, _ = train_ssl(vols, **kw)

    class Crash(Exception):
        pass

    def crash_in_epoch_3(step: int, total: int, loss: float) -> None:
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train_ssl(vols, checkpoint_dir=tmp_path, progress=crash_in_epoch_3, **kw)
    assert (tmp_path / CHECKPOINT_FILE).is_file()
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["epoch"] == 2
    steps: list[int] = []
    resumed, card = train_ssl(
        vols, checkpoint_dir=tmp_path, progress=lambda s, t, _: steps.append(s), **kw
    )
    assert card.epochs == 3 and "resumed at epoch 2" in card.notes
    assert steps == [5, 6]
    np.testing.assert_allclose(embed(resumed, vols), embed(full, vols), atol=1e-4)
    # asking for more epochs continues the count
    _, card4 = train_ssl(vols, checkpoint_dir=tmp_path, **{**kw, "epochs": 4})
    assert card4.epochs == 4


def test_checkpoint_of_other_run_is_refused(tmp_path: Path) -> None:
    vols = _random_volumes(4)
    train_ssl(vols, epochs=1, batch_size=4, seed=0, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(EncoderError, match="different run"):
        train_ssl(vols, epochs=1, batch_size=4, seed=1, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(EncoderError, match="different run"):  # same shape, other studies
        train_ssl(vols[::-1].copy(), epochs=1, batch_size=4, checkpoint_dir=tmp_path, **FAST)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"garbage")
    with pytest.raises(EncoderError, match="delete it"):
        train_ssl(vols, epochs=1, batch_size=4, seed=0, checkpoint_dir=tmp_path, **FAST)


def test_time_budget_stops_cleanly() -> None:
    steps: list[int] = []
    enc, card = train_ssl(
        _random_volumes(8),
        epochs=5,
        batch_size=4,
        time_budget_s=0.0,
        progress=lambda s, t, _: steps.append(s),
        **FAST,
    )
    assert steps == [1] and card.epochs == 0
    assert "time budget" in card.notes
    assert np.isfinite(embed(enc, _random_volumes(2))).all()


def test_time_budget_at_epoch_end_counts_the_epoch(tmp_path: Path) -> None:
    vols = _random_volumes(4)
    _, card = train_ssl(
        vols, epochs=3, batch_size=4, time_budget_s=0.0, checkpoint_dir=tmp_path, **FAST
    )
    assert card.epochs == 1 and "after 1 of 3 epochs" in card.notes
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["epoch"] == 1


def test_vicreg_trains() -> None:
    losses: list[float] = []
    _, card = train_ssl(
        _random_volumes(8),
        method="vicreg",
        epochs=1,
        batch_size=4,
        pooling="attention",
        train_slices=None,
        progress=lambda s, t, loss: losses.append(loss),
        **FAST,
    )
    assert card.method == "vicreg" and card.pooling == "attention"
    assert all(np.isfinite(losses)) and "slices per view" not in card.notes


def test_invalid_arguments() -> None:
    vols = _random_volumes(4)
    with pytest.raises(EncoderError, match="method"):
        train_ssl(vols, method="byol", **FAST)
    with pytest.raises(EncoderError, match="shape"):
        train_ssl(vols[:, :4], **FAST)
    with pytest.raises(EncoderError, match="at least 2"):
        train_ssl(vols[:1], **FAST)
    with pytest.raises(EncoderError, match="batch_size"):
        train_ssl(vols, batch_size=1, **FAST)
    if not torch.cuda.is_available():
        with pytest.raises(EncoderError, match="CUDA"):
            train_ssl(vols, **{**FAST, "device": "cuda"})


def test_learns_two_clusters() -> None:
    vols, labels = _two_clusters(24)
    losses: list[float] = []
    enc, card = train_ssl(
        vols,
        epochs=8,
        batch_size=8,
        seed=0,
        lr=2e-3,
        progress=lambda s, t, loss: losses.append(loss),
        **FAST,
    )
    per_epoch = np.array(losses).reshape(card.epochs, -1).mean(axis=1)
    assert per_epoch[-2:].mean() < per_epoch[:2].mean()
    z = embed(enc, vols)
    sims = z @ z.T
    np.fill_diagonal(sims, -np.inf)
    nn1 = sims.argmax(axis=1)
    purity = float((labels[nn1] == labels).mean())
    assert purity >= 0.75  # chance is ~0.5


def _chests(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Chests whose anatomy varies a lot (body and lung size, position), each with one
    nodule: small and dense (label 0) or large and faint (label 1)."""
    rng = np.random.default_rng(seed)
    d, h, w = SPEC.shape
    z, y, x = np.mgrid[:d, :h, :w].astype(float)
    labels = np.arange(n) % 2
    out = np.full((n, d, h, w), -1000.0)
    for i, lab in enumerate(labels):
        cy, cx = rng.uniform(14, 18, size=2)
        ry, rx = rng.uniform(10, 15), rng.uniform(12, 15)
        body = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
        out[i][body] = rng.uniform(20, 60)
        lr = rng.uniform(0.55, 0.75)
        for side in (-1, 1):
            lung = ((y - cy) / (ry * lr)) ** 2 + ((x - cx - side * rx * 0.45) / (rx * 0.35)) ** 2
            out[i][body & (lung < 1)] = -850
        nz, ny, nx = rng.integers(3, 5), cy + rng.uniform(-2, 2), cx + rng.choice([-1, 1]) * rx * 0.45
        r, hu = (1.2, 40.0) if lab == 0 else (2.6, -450.0)
        out[i][(z - nz) ** 2 + (y - ny) ** 2 + (x - nx) ** 2 <= r**2] = hu
    return (out + rng.normal(0, 15, out.shape)).astype(np.int16), labels


def test_lesion_region_trains_saves_and_embeds(tmp_path: Path) -> None:
    from encoders.model import RegionSpec

    vols, _ = _chests(8)
    region = RegionSpec(mode="lesion", size=(4, 8, 8), px=32)
    enc, card = train_ssl(vols, epochs=1, batch_size=4, region=region, **FAST)
    assert card.region == region and enc.input_shape == (4, 8, 8)
    assert "lesion boxes 4x8x8" in card.notes and "slices per view" not in card.notes
    save_encoder(enc, card, tmp_path)
    loaded, card2 = load_encoder(tmp_path)
    assert card2.region == region
    np.testing.assert_array_equal(embed(enc, vols), embed(loaded, vols))
    # explicit regions are honoured: a box far from the nodule embeds differently
    far = [(0, 0, 0, 2, 4, 4)] * len(vols)
    assert not np.allclose(embed(enc, vols), embed(enc, vols, rois=far), atol=1e-4)
    with pytest.raises(EncoderError, match="roi_jitter"):
        train_ssl(vols, region="lesion", roi_jitter=-1, **FAST)


def test_lesion_region_checkpoint_is_part_of_the_run(tmp_path: Path) -> None:
    vols, _ = _chests(4)
    train_ssl(vols, epochs=1, batch_size=4, region="lesion", checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(EncoderError, match="different run"):
        train_ssl(vols, epochs=1, batch_size=4, region="whole", checkpoint_dir=tmp_path, **FAST)


def _purity(z: np.ndarray, labels: np.ndarray) -> float:
    sims = z @ z.T
    np.fill_diagonal(sims, -np.inf)
    return float((labels[sims.argmax(axis=1)] == labels).mean())


def test_lesion_region_sees_the_nodule_not_the_anatomy() -> None:
    """Nodules of two kinds in chests whose anatomy varies a lot: lesion-region neighbours
    share the nodule kind (before and after training), whole-volume ones much less."""
    from encoders.model import create_encoder

    vols, labels = _chests(24, seed=1)
    torch.manual_seed(0)
    whole = create_encoder("test_resnet", spec=SPEC, embedding_dim=16)
    torch.manual_seed(0)
    lesion = create_encoder("test_resnet", spec=SPEC, embedding_dim=16, region="lesion")
    p_whole, p_lesion = _purity(embed(whole, vols), labels), _purity(embed(lesion, vols), labels)
    assert p_lesion >= 0.75 and p_lesion >= p_whole + 0.1  # chance is ~0.5
    enc, _ = train_ssl(vols, epochs=3, batch_size=8, lr=2e-3, region="lesion", **FAST)
    assert _purity(embed(enc, vols), labels) >= 0.7


def _memmap(vols: np.ndarray, path: Path) -> np.ndarray:
    np.save(path, vols)
    return np.load(path, mmap_mode="r")


def test_memory_mapped_volumes_train_as_in_memory_ones(tmp_path: Path) -> None:
    """cohortsim train hands train_ssl a read-only memory map of the store's volumes: the
    result equals training on the same volumes in memory, lesion and whole, calibrated."""
    vols, _ = _chests(6)
    mm = _memmap(vols, tmp_path / "v.npy")
    for region in ("lesion", "whole"):
        kw = dict(epochs=1, batch_size=3, seed=2, region=region, calibration="tissue", **FAST)
        a, _ = train_ssl(vols, **kw)  # type: ignore[arg-type]
        b, _ = train_ssl(mm, checkpoint_dir=tmp_path / region, **kw)  # type: ignore[arg-type]
        np.testing.assert_array_equal(embed(a, vols), embed(b, vols))


def test_whole_volumes_are_calibrated_batch_by_batch_as_before() -> None:
    """Whole-volume training calibrates each batch on the device with levels measured once;
    the network sees exactly what it saw when the cohort was calibrated up front."""
    from encoders.harmonize import calibrate_hu

    vols = _random_volumes(6)
    vols[2] = -1000  # no soft tissue: left as it is
    kw = dict(epochs=1, batch_size=3, seed=4, region="whole", **FAST)
    a, _ = train_ssl(vols, calibration="tissue", **kw)  # type: ignore[arg-type]
    b, _ = train_ssl(calibrate_hu(vols), calibration="none", **kw)  # type: ignore[arg-type]
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)


def test_training_does_not_copy_the_cohort(tmp_path: Path) -> None:
    """No copy of the whole cohort in memory (numpy allocations traced): neither the
    calibration nor the checkpoint's digest of the volumes."""
    import tracemalloc

    spec = InputSpec(spacing_mm=(4.0, 4.0, 4.0), shape=(8, 64, 64), fit="crop")
    vols = _random_volumes(96, spec)
    mm = _memmap(vols, tmp_path / "v.npy")
    del vols
    fast = dict(FAST, spec=spec)
    tracemalloc.start()
    try:
        train_ssl(mm, epochs=1, batch_size=4, region="whole", calibration="tissue",
                  checkpoint_dir=tmp_path / "ckpt", **fast)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < mm.nbytes / 3, (peak, mm.nbytes)


def test_volumes_digest_is_that_of_the_whole_array() -> None:
    """Checkpoints written before the digest was streamed still match their run."""
    import hashlib

    from encoders.train import _volumes_sha256

    vols = _random_volumes(5)
    assert _volumes_sha256(vols) == hashlib.sha256(vols.tobytes()).hexdigest()
    view = vols[:, ::2]  # not contiguous: hashed as its C-order copy would be
    assert _volumes_sha256(view) == hashlib.sha256(np.ascontiguousarray(view).tobytes()).hexdigest()


def test_indices_train_as_the_selected_rows(tmp_path: Path) -> None:
    """``indices`` trains on those rows of a memory map as ``volumes[indices]`` would,
    lesion and whole (the evaluation trains on its reference studies this way)."""
    vols, _ = _chests(9)
    mm = _memmap(vols, tmp_path / "v.npy")
    rows = np.array([7, 0, 2, 5, 8, 3])
    for region in ("lesion", "whole"):
        kw = dict(epochs=1, batch_size=3, seed=2, region=region, calibration="tissue", **FAST)
        a, ca = train_ssl(vols[rows], **kw)  # type: ignore[arg-type]
        b, cb = train_ssl(mm, indices=rows, checkpoint_dir=tmp_path / region, **kw)  # type: ignore[arg-type]
        np.testing.assert_array_equal(embed(a, vols), embed(b, vols))
        assert ca.notes == cb.notes


def test_indices_do_not_copy_the_rows(tmp_path: Path) -> None:
    import tracemalloc

    spec = InputSpec(spacing_mm=(4.0, 4.0, 4.0), shape=(8, 64, 64), fit="crop")
    vols = _random_volumes(192, spec)
    mm = _memmap(vols, tmp_path / "v.npy")
    del vols
    rows = np.arange(1, 192, 2)[::-1]
    tracemalloc.start()
    try:
        train_ssl(mm, indices=rows, epochs=1, batch_size=4, region="whole",  # type: ignore[arg-type]
                  calibration="tissue", checkpoint_dir=tmp_path / "ckpt", **dict(FAST, spec=spec))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < mm.nbytes / 2 / 3, (peak, mm.nbytes)  # the rows are half of it


@pytest.mark.parametrize(
    ("indices", "match"),
    [
        ([3], "at least 2 studies"),
        ([0, 6], r"in \[0, 6\)"),
        ([-1, 2], r"in \[0, 6\)"),
        ([[0, 1]], "1-D"),
        ([0.0, 1.0], "row numbers"),
    ],
)
def test_bad_indices_are_refused(indices: list, match: str) -> None:
    with pytest.raises(EncoderError, match=match):
        train_ssl(_random_volumes(6), indices=indices, epochs=1, **FAST)  # type: ignore[arg-type]


def test_views_per_study() -> None:
    """Lesion boxes train on 4 views per step by default, whole volumes on 2; any count
    from 2 to 16 can be asked for, and each is noted on the card."""
    vols, _ = _chests(4)
    steps: list[float] = []
    _, card = train_ssl(vols, epochs=1, batch_size=4, region="lesion",
                        progress=lambda s, t, loss: steps.append(loss), **FAST)
    assert "4 views" in card.notes and len(steps) == 1 and np.isfinite(steps).all()
    _, card = train_ssl(vols, epochs=1, batch_size=4, **FAST)
    assert "2 views" in card.notes
    _, card = train_ssl(vols, epochs=1, batch_size=4, views=3, method="vicreg", **FAST)
    assert "3 views" in card.notes and "final loss" in card.notes
    for bad in (1, 17, 2.5, True):
        with pytest.raises(EncoderError, match="views must be"):
            train_ssl(vols, epochs=1, batch_size=4, views=bad, **FAST)  # type: ignore[arg-type]


def test_view_count_is_seeded_and_changes_the_encoder() -> None:
    """A views=2 lesion encoder is reproducible under its seed and differs from the
    default four-view one. (views=2 was also checked once to give embeddings identical to
    the two-view loop it replaced, lesion and whole, SimCLR and VICReg.)"""
    vols, _ = _chests(6)
    kw = {"epochs": 1, "batch_size": 3, "region": "lesion", **FAST}
    a, _ = train_ssl(vols, views=2, **kw)  # type: ignore[arg-type]
    b, _ = train_ssl(vols, views=2, **kw)  # type: ignore[arg-type]
    c, _ = train_ssl(vols, **kw)  # type: ignore[arg-type]
    np.testing.assert_array_equal(embed(a, vols), embed(b, vols))
    assert not np.allclose(embed(a, vols), embed(c, vols), atol=1e-5)


def test_views_are_part_of_the_checkpointed_run(tmp_path: Path) -> None:
    vols, _ = _chests(4)
    train_ssl(vols, epochs=1, batch_size=4, region="lesion", checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(EncoderError, match="different run"):
        train_ssl(vols, epochs=1, batch_size=4, region="lesion", views=2,
                  checkpoint_dir=tmp_path, **FAST)


def test_lesion_jitter_on_detail_patches_keeps_the_lesion_in_the_box() -> None:
    """Default jitter on the whole-study grid: at most a quarter of the box per axis (the
    lesion centre stays in the box's central half) and never past the stored patch."""
    from encoders.model import RegionSpec
    from encoders.train import ROI_JITTER_MM, _margins

    grid = InputSpec()
    reg = RegionSpec.for_spec("lesion", grid)
    m = _margins(grid, reg, None)
    for j, size, n, s in zip(m, reg.size, grid.patch_shape, grid.patch_spacing_mm, strict=True):
        assert 0 < j <= size // 4 and j * s <= ROI_JITTER_MM
        assert size + 2 * j <= n
    assert m == (2, 8, 8)  # 4 x 8 x 8 mm on the 16 x 32 x 32 mm box
    assert _margins(grid, reg, 3) == (3, 3, 3)  # an explicit jitter is taken as given
