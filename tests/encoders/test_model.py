"""StudyEncoder, EncoderCard, embed, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.errors import EncoderError
from encoders.model import (
    CARD_FILE,
    WEIGHTS_FILE,
    EncoderCard,
    StudyEncoder,
    create_encoder,
    embed,
    list_encoders,
    load_encoder,
    resolve_device,
    save_encoder,
    weights_version,
)
from encoders.spec import DEFAULT_SPEC, InputSpec

SMALL = InputSpec(shape=(4, 32, 32), fit="crop")  # lesion boxes cut from the volume itself


def _volumes(n: int, spec: InputSpec = SMALL, seed: int = 0) -> np.ndarray:
    """Seeded body-like HU volumes: air background, a soft-tissue disc, noise."""
    rng = np.random.default_rng(seed)
    d, h, w = spec.shape
    yy, xx = np.mgrid[:h, :w]
    out = np.full((n, d, h, w), -1000.0)
    for i in range(n):
        r = rng.uniform(0.25, 0.45) * h
        cy, cx = rng.uniform(0.4, 0.6, size=2) * (h, w)
        out[i][:, (yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(-100, 200)
    out += rng.normal(0, 20, out.shape)
    return out.astype(np.int16)


@pytest.fixture(scope="module")
def enc() -> StudyEncoder:
    torch.manual_seed(0)
    return create_encoder("test_resnet", spec=SMALL, embedding_dim=16)


@pytest.fixture()
def saved(tmp_path: Path, enc: StudyEncoder) -> Path:
    card = EncoderCard.for_encoder(enc, method="simclr", epochs=3, seed=1, data_hash="d-1")
    save_encoder(enc, card, tmp_path / "model")
    return tmp_path / "model"


def test_forward_shape_default_spec_resnet10t() -> None:
    model = create_encoder()
    assert model.backbone_name == "resnet10t" and model.spec == DEFAULT_SPEC
    x = torch.full((1, *DEFAULT_SPEC.shape), -500.0)
    with torch.inference_mode():
        assert model.eval()(x).shape == (1, 128)


def test_default_lesion_box_is_the_same_millimetres_on_any_grid() -> None:
    from encoders.model import LESION_BOX_MM, LESION_PATCH_BOX_MM, RegionSpec

    for spacing, size in (((4.0, 4.0, 4.0), (6, 12, 12)), ((2.0, 2.0, 2.0), (12, 24, 24)),
                          ((3.0, 1.5, 1.5), (8, 32, 32))):
        legacy = InputSpec(spacing_mm=spacing, shape=(8, 32, 32), fit="crop")
        r = RegionSpec.for_spec("lesion", legacy)
        assert r.size == size
        assert [n * s for n, s in zip(r.size, spacing, strict=True)] == list(LESION_BOX_MM)
    assert RegionSpec.for_spec("whole", DEFAULT_SPEC) == RegionSpec(mode="whole")
    # on the whole-study grid the box is cut from a detail patch, on the patch's grid, at
    # the lesion's scale (smaller than the legacy box, and than the patch)
    enc = create_encoder("test_resnet", spec=DEFAULT_SPEC, embedding_dim=8, region="lesion")
    assert enc.input_shape == (8, 32, 32)
    assert [n * s for n, s in zip(enc.input_shape, DEFAULT_SPEC.patch_spacing_mm,
                                  strict=True)] == list(LESION_PATCH_BOX_MM)
    assert all(b < p for b, p in zip(enc.input_shape, DEFAULT_SPEC.patch_shape, strict=True))
    assert enc.stored_shape == DEFAULT_SPEC.patch_shape


def test_forward_shapes_test_resnet(enc: StudyEncoder) -> None:
    x = torch.from_numpy(_volumes(3)).float()
    with torch.inference_mode():
        out = enc.eval()(x)
        feats = enc.slice_features(x)
    assert out.shape == (3, 16)
    assert feats.shape == (3, SMALL.shape[0], enc.num_features)
    # fewer slices than the spec are fine for forward (training uses subsets)
    with torch.inference_mode():
        assert enc(x[:, :2]).shape == (3, 16)


def test_windows_map_hu_to_unit_range_then_standardise(enc: StudyEncoder) -> None:
    x = torch.tensor([-3000.0, 40.0, 3000.0]).view(1, 3, 1, 1)
    ch = enc.to_channels(x)  # (1, 3, C, 1, 1)
    assert ch.shape == (1, 3, SMALL.in_chans, 1, 1)
    assert torch.allclose(ch[0, 0], torch.tensor(-1.0))  # below every window
    assert torch.allclose(ch[0, 2], torch.tensor(1.0))  # above every window
    assert ch[0, 1, 0].item() == pytest.approx(0.0)  # soft-tissue centre (40 HU)


def test_attention_pooling_forward_and_roundtrip(tmp_path: Path) -> None:
    model = create_encoder("test_resnet", spec=SMALL, embedding_dim=8, pooling="attention")
    v = _volumes(2)
    with torch.inference_mode():
        assert model.eval()(torch.from_numpy(v).float()).shape == (2, 8)
    card = save_encoder(model, EncoderCard.for_encoder(model), tmp_path)
    loaded, card2 = load_encoder(tmp_path)
    assert card2.pooling == "attention" == card.pooling
    np.testing.assert_array_equal(embed(model, v), embed(loaded, v))


def test_embed_l2_normalised_and_deterministic(enc: StudyEncoder) -> None:
    v = _volumes(5)
    a = embed(enc, v, batch_size=2)
    b = embed(enc, v, batch_size=4)
    assert a.shape == (5, 16) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, embed(enc, v.astype(np.float32)), atol=1e-6)
    assert embed(enc, v[:0]).shape == (0, 16)


def test_embed_restores_training_mode(enc: StudyEncoder) -> None:
    enc.train()
    embed(enc, _volumes(2))
    assert enc.training
    enc.eval()


@pytest.mark.parametrize(
    "shape",
    [(2, 4, 32, 31), (2, 5, 32, 32), (4, 32, 32), (2, 1, 4, 32, 32)],
)
def test_embed_wrong_shape_raises(enc: StudyEncoder, shape: tuple[int, ...]) -> None:
    with pytest.raises(EncoderError, match=r"\(n, 4, 32, 32\)"):
        embed(enc, np.zeros(shape, np.int16))


def test_embed_rejects_bad_values(enc: StudyEncoder) -> None:
    v = _volumes(1).astype(np.float32)
    v[0, 0, 0, 0] = np.nan
    with pytest.raises(EncoderError, match="NaN"):
        embed(enc, v)
    with pytest.raises(EncoderError, match="dtype"):
        embed(enc, np.zeros((1, *SMALL.shape), dtype=bool))
    with pytest.raises(EncoderError, match="numpy"):
        embed(enc, torch.zeros(1, *SMALL.shape))  # type: ignore[arg-type]


def test_card_json_roundtrip() -> None:
    card = EncoderCard(
        backbone="test_resnet",
        method="vicreg",
        embedding_dim=32,
        input=SMALL,
        data_hash="abc",
        version="enc-0123456789ab",
        epochs=4,
        seed=7,
        notes="n",
        pooling="attention",
    )
    again = EncoderCard.from_json(card.to_json())
    assert again == card
    assert json.loads(card.to_json())["input"]["shape"] == [4, 32, 32]
    assert card.torch_version == torch.__version__ and card.timm_version


def test_card_from_json_errors() -> None:
    with pytest.raises(EncoderError, match="not valid JSON"):
        EncoderCard.from_json("{nope")
    with pytest.raises(EncoderError, match="backbone"):
        EncoderCard.from_json('{"embedding_dim": 3}')
    with pytest.raises(EncoderError, match="JSON object"):
        EncoderCard.from_json("[1, 2]")


def test_save_load_roundtrip(saved: Path, enc: StudyEncoder) -> None:
    loaded, card = load_encoder(saved)
    assert card.version == weights_version(saved / WEIGHTS_FILE)
    assert card.version.startswith("enc-") and len(card.version) == 16
    assert (card.method, card.epochs, card.seed, card.data_hash) == ("simclr", 3, 1, "d-1")
    assert card.input == SMALL and not loaded.training
    v = _volumes(4, seed=3)
    np.testing.assert_array_equal(embed(enc, v), embed(loaded, v))


def test_save_is_content_addressed(tmp_path: Path, enc: StudyEncoder) -> None:
    c1 = save_encoder(enc, EncoderCard.for_encoder(enc), tmp_path / "a")
    c2 = save_encoder(enc, EncoderCard.for_encoder(enc), tmp_path / "b")
    assert c1.version == c2.version
    other = create_encoder("test_resnet", spec=SMALL, embedding_dim=16)
    with pytest.raises(EncoderError, match=r"does not match the weights"):
        save_encoder(other, c1, tmp_path / "c")


def test_save_rejects_card_of_other_architecture(tmp_path: Path, enc: StudyEncoder) -> None:
    card = EncoderCard(backbone="resnet10t", embedding_dim=16, input=SMALL)
    with pytest.raises(EncoderError, match="backbone"):
        save_encoder(enc, card, tmp_path)


def test_load_missing_files(tmp_path: Path, saved: Path) -> None:
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder(tmp_path / "nowhere")
    (saved / CARD_FILE).rename(tmp_path / "card.bak")
    with pytest.raises(EncoderError, match=r"card\.json is missing"):
        load_encoder(saved)
    (tmp_path / "card.bak").rename(saved / CARD_FILE)
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(EncoderError, match=r"model\.safetensors is missing"):
        load_encoder(saved)


def test_load_corrupt_card(saved: Path) -> None:
    (saved / CARD_FILE).write_text("{ this is not json")
    with pytest.raises(EncoderError, match="not valid JSON"):
        load_encoder(saved)


def test_load_modified_weights_fail_version_check(saved: Path) -> None:
    w = saved / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(EncoderError, match="content id"):
        load_encoder(saved)


def test_load_truncated_weights_unreadable(saved: Path) -> None:
    w = saved / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:100])
    card = EncoderCard.from_json((saved / CARD_FILE).read_text())
    card.version = weights_version(w)  # a consistent card, but the file is broken
    (saved / CARD_FILE).write_text(card.to_json())
    with pytest.raises(EncoderError, match="safetensors"):
        load_encoder(saved)


@pytest.mark.parametrize(
    ("field", "value"), [("embedding_dim", 32), ("pooling", "attention"), ("backbone", "resnet10t")]
)
def test_load_card_architecture_mismatch(saved: Path, field: str, value: object) -> None:
    d = json.loads((saved / CARD_FILE).read_text())
    d[field] = value
    (saved / CARD_FILE).write_text(json.dumps(d))
    with pytest.raises(EncoderError, match="does not fit the architecture"):
        load_encoder(saved)


def test_unknown_backbone_and_bad_args() -> None:
    with pytest.raises(EncoderError, match=r"timm\.list_models"):
        create_encoder("no_such_model_xyz")
    with pytest.raises(EncoderError, match="pooling"):
        create_encoder("test_resnet", pooling="max")
    with pytest.raises(EncoderError, match="embedding_dim"):
        create_encoder("test_resnet", embedding_dim=0)


def test_list_encoders() -> None:
    names = list_encoders()
    assert names[0] == "resnet10t" and "test_resnet" in names
    assert len(set(names)) == len(names)


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(EncoderError, match="unknown device"):
        resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(EncoderError, match="CUDA is not available"):
            resolve_device("cuda")


def test_lesion_region_card_and_inputs(tmp_path: Path) -> None:
    from encoders.model import RegionSpec

    region = RegionSpec(mode="lesion", size=(2, 8, 8), px=32)
    model = create_encoder("test_resnet", spec=SMALL, embedding_dim=8, region=region)
    assert model.input_shape == (2, 8, 8)
    v = _volumes(2)
    boxes = [(0, 0, 0, 2, 8, 8), (2, 24, 24, 4, 32, 32)]
    crops = model.regions(v, boxes)
    assert crops.shape == (2, 2, 8, 8) and crops.dtype == v.dtype
    # a box of the region's size is cropped exactly
    np.testing.assert_array_equal(crops[0], v[0, :2, :8, :8])
    np.testing.assert_array_equal(crops[1], v[1, 2:4, 24:32, 24:32])
    z = embed(model, v, rois=boxes)
    assert z.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    card = save_encoder(model, EncoderCard.for_encoder(model), tmp_path)
    assert json.loads((tmp_path / CARD_FILE).read_text())["region"] == {
        "mode": "lesion", "size": [2, 8, 8], "px": 32, "proposal": "lung-open3-dot-li2003"
    }
    loaded, card2 = load_encoder(tmp_path)
    assert card2.region == region == card.region
    np.testing.assert_array_equal(z, embed(loaded, v, rois=boxes))


def test_an_encoder_keeps_the_lesion_proposal_it_was_trained_with() -> None:
    """New encoders use the default proposal; a card from before proposals were named, or
    naming the first one, keeps proposing without thin-structure removal; an unknown name
    is refused when the card is read."""
    from encoders.model import RegionSpec
    from encoders.roi import DEFAULT_PROPOSAL, PROPOSALS

    assert RegionSpec(mode="lesion").proposal == DEFAULT_PROPOSAL
    assert PROPOSALS[DEFAULT_PROPOSAL] is not None
    old = RegionSpec.from_dict({"mode": "lesion", "size": [2, 8, 8], "px": 32})
    assert old.proposal == "lung-dot-li2003" and PROPOSALS[old.proposal] is None
    with pytest.raises(EncoderError, match="unknown lesion proposal"):
        RegionSpec.from_dict({"mode": "lesion", "proposal": "lung-dot-v99"})


def test_region_errors(saved: Path, enc: StudyEncoder) -> None:
    with pytest.raises(EncoderError, match="region"):
        create_encoder("test_resnet", region="liver")
    with pytest.raises(EncoderError, match="region='lesion'"):
        embed(enc, _volumes(1), rois=[(0, 0, 0, 1, 1, 1)])
    d = json.loads((saved / CARD_FILE).read_text())
    assert d["region"] == {"mode": "whole"}
    d["region"] = {"mode": "lesion"}
    (saved / CARD_FILE).write_text(json.dumps(d))
    with pytest.raises(EncoderError, match=r"does not fit the architecture|region"):
        load_encoder(saved)


def test_card_without_region_is_whole_volume() -> None:
    d = json.loads(EncoderCard(backbone="test_resnet").to_json())
    del d["region"]
    assert EncoderCard.from_dict(d).region.mode == "whole"  # cards written before regions


def test_calibration_in_card_and_weights(tmp_path: Path) -> None:
    model = create_encoder("test_resnet", spec=SMALL, embedding_dim=8, calibration="tissue")
    rng = np.random.default_rng(0)
    v = np.full((2, *SMALL.shape), -1000.0)
    v[:, :, 6:26, 4:28] = 45.0  # body
    v[:, :, 10:20, 8:14] = -850.0  # lung
    v = (v + rng.normal(0, 10, v.shape)).astype(np.int16)
    scanner_b = (v * 1.03 + 25).astype(np.int16)  # another calibration
    # both "scanners" give (almost) the same encoder input after calibration
    a, b = model.regions(v), model.regions(scanner_b)
    assert np.abs(a.astype(float) - b).mean() < 3.0 < np.abs(v.astype(float) - scanner_b).mean()
    card = save_encoder(model, EncoderCard.for_encoder(model), tmp_path)
    assert card.calibration == "tissue"
    assert load_encoder(tmp_path)[1].calibration == "tissue"
    d = json.loads((tmp_path / CARD_FILE).read_text())
    d["calibration"] = "none"  # an edited card no longer matches the weights' architecture
    (tmp_path / CARD_FILE).write_text(json.dumps(d))
    with pytest.raises(EncoderError, match="architecture"):
        load_encoder(tmp_path)
    with pytest.raises(EncoderError, match="calibration"):
        create_encoder("test_resnet", calibration="zscore")


def test_embed_cuts_regions_a_batch_at_a_time(tmp_path: Path) -> None:
    """Regions (calibration, lesion boxes) are made per batch: the result does not depend
    on the batch size, given boxes stay with their study, and a memory-mapped cohort is
    embedded without a cohort-sized copy (numpy allocations traced)."""
    import tracemalloc

    from encoders.model import RegionSpec

    v = _volumes(7)
    boxes = [(0, i, i, 2, i + 8, i + 8) for i in range(7)]
    lesion = create_encoder("test_resnet", spec=SMALL, embedding_dim=8,
                            region=RegionSpec(mode="lesion", size=(2, 8, 8), px=32))
    one = embed(lesion, v, rois=boxes, batch_size=7)
    np.testing.assert_allclose(embed(lesion, v, rois=boxes, batch_size=3), one, atol=1e-6)
    np.testing.assert_allclose(embed(lesion, v[4:5], rois=boxes[4:5]), one[4:5], atol=1e-6)
    with pytest.raises(EncoderError, match=r"one entry per volume \(7\), got 6"):
        embed(lesion, v, rois=boxes[:6])

    spec = InputSpec(spacing_mm=(4.0, 4.0, 4.0), shape=(8, 64, 64), fit="crop")
    whole = create_encoder("test_resnet", spec=spec, embedding_dim=8, calibration="tissue")
    np.save(tmp_path / "v.npy", _volumes(96, spec))
    mm = np.load(tmp_path / "v.npy", mmap_mode="r")
    tracemalloc.start()
    try:
        z = embed(whole, mm, batch_size=4)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < mm.nbytes / 3, (peak, mm.nbytes)
    np.testing.assert_allclose(z[:4], embed(whole, np.asarray(mm[:4])), atol=1e-6)
