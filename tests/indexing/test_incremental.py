"""New studies of the store published into the index without a full rebuild
(indexing.incremental): same vectors as a full build, exact and approximate kinds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from encoders.model import EncoderCard, create_encoder, save_encoder
from encoders.spec import InputSpec
from indexing.build import build_from_store
from indexing.errors import ModelVersionError
from indexing.incremental import INCREMENTAL_KEY, publish_new_studies
from indexing.snapshot import current_version, load_snapshot, read_manifest
from indexing.store import CohortStore, StudyRecord

SPEC = InputSpec(shape=(4, 32, 32))


def _records(start: int, n: int, spec: InputSpec = SPEC) -> list[StudyRecord]:
    rng = np.random.default_rng(start)
    return [
        StudyRecord(
            patient_id=f"P-{i:016x}",
            study_uid=f"S-{i:024x}",
            volume=rng.integers(-1000, 400, size=spec.shape, dtype=np.int16),
            spec=spec,
            site="north",
            manufacturer="GE",
        )
        for i in range(start, start + n)
    ]


@pytest.fixture()
def setup(tmp_path: Path) -> dict[str, Path]:
    store = CohortStore(tmp_path / "store", create=True)
    store.add_studies(_records(0, 12))
    store.set_outcomes(pa.table({"patient_id": [f"P-{i:016x}" for i in range(12)], "time": [3.0] * 12}))
    encoder = create_encoder("test_resnet", spec=SPEC, embedding_dim=8)
    save_encoder(encoder, EncoderCard.for_encoder(encoder, seed=0), tmp_path / "model")
    return {"root": tmp_path, "store": tmp_path / "store", "model": tmp_path / "model"}


def _full_build_vectors(setup: dict[str, Path], name: str) -> dict[str, np.ndarray]:
    index = setup["root"] / name
    build_from_store(setup["store"], setup["model"], index, device="cpu")
    snap = load_snapshot(index, device="cpu")
    uids = snap.metadata.column("study_uid").to_pylist()
    return {u: np.asarray(snap.vectors[i], np.float32) for i, u in enumerate(uids)}


def test_flat_add_matches_full_build_and_is_searchable(setup: dict[str, Path]) -> None:
    index = setup["root"] / "index"
    first = build_from_store(setup["store"], setup["model"], index, device="cpu")
    store = CohortStore(setup["store"])
    assert publish_new_studies(store, index) is None  # nothing new: no version
    store.add_studies(_records(100, 3))
    result = publish_new_studies(store, index)
    assert result is not None and result.added == 3 and result.num_studies == 15
    assert current_version(index) == result.version != first
    snap = load_snapshot(index, device="cpu")
    uids = snap.metadata.column("study_uid").to_pylist()
    assert uids[:12] == [f"S-{i:024x}" for i in range(12)]
    assert set(uids[12:]) == {f"S-{i:024x}" for i in range(100, 103)}
    assert snap.metadata.column("row_id").to_pylist() == list(range(15))
    assert snap.metadata.column("thumbnail").null_count == 0
    full = _full_build_vectors(setup, "full")
    for i, u in enumerate(uids):
        np.testing.assert_allclose(snap.vectors[i], full[u], atol=1e-5)
    # each new study is its own nearest neighbour in the published version
    sims, rows = snap.search(np.asarray(snap.vectors[12:], np.float32), 1)
    assert rows[:, 0].tolist() == [12, 13, 14]
    assert np.all(sims[:, 0] > 0.999)
    assert publish_new_studies(store, index) is None


def test_ivf_adds_without_training_until_the_threshold(setup: dict[str, Path]) -> None:
    index = setup["root"] / "ivf"
    build_from_store(setup["store"], setup["model"], index, kind="IVF2,Flat", device="cpu")
    store = CohortStore(setup["store"])
    store.add_studies(_records(200, 3))
    first = publish_new_studies(store, index, rebuild_threshold=0.5)
    assert first is not None and not first.retrained
    state = read_manifest(index, first.version)[INCREMENTAL_KEY]
    assert state == {"trained_on": 12, "added_since_training": 3}
    store.add_studies(_records(300, 4))  # 7 added since training > 0.5 x 12
    second = publish_new_studies(store, index, rebuild_threshold=0.5)
    assert second is not None and second.retrained and second.num_studies == 19
    manifest = read_manifest(index, second.version)
    assert manifest[INCREMENTAL_KEY] == {"trained_on": 19, "added_since_training": 0}
    assert manifest["index_kind"] == "IVF2,Flat"
    snap = load_snapshot(index, device="cpu")
    q = np.asarray(snap.vectors[-4:], np.float32)
    _, rows = snap.search(q, 1)
    assert rows[:, 0].tolist() == [15, 16, 17, 18]
    assert json.loads(json.dumps(manifest))["num_studies"] == 19


def test_store_of_another_spec_is_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    index = setup["root"] / "index"
    build_from_store(setup["store"], setup["model"], index, device="cpu")
    other = CohortStore(tmp_path / "other", create=True)
    other.add_studies(_records(400, 1, InputSpec(shape=(4, 32, 32), spacing_mm=(3.0, 3.0, 3.0))))
    with pytest.raises(ModelVersionError, match="expects input"):
        publish_new_studies(other, index)
