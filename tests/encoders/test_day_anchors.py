"""Day offsets across ingest runs: encoders.deid.DateAnchors and its use by ingest.

The store keeps ``study_day`` = days from the patient's anchor (the earliest study of the
first ingest that saw the patient), kept site-side in a keyed file, never in the store.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from encoders.deid import ANCHORS_ENV_VAR, ENV_VAR, DateAnchors, Pseudonymizer
from encoders.synth import synth_cohort
from indexing.errors import StoreError
from indexing.ingest import ingest_folder
from indexing.store import CohortStore

SECRET = b"0123456789abcdef-anchor-tests"
DAY0 = dt.date(2019, 7, 3)


def test_anchor_kept_across_objects_and_never_moves(tmp_path: Path) -> None:
    path = tmp_path / "site" / "date-anchors.json"
    first = DateAnchors(Pseudonymizer(SECRET), path)
    assert first.resolve({"PAT-ONE": DAY0}) == {"PAT-ONE": DAY0}
    # A new process (new objects, same secret and file): the recorded anchor wins, also
    # over an earlier date (no re-anchoring: offsets already stored stay valid).
    again = DateAnchors(Pseudonymizer(SECRET), path)
    got = again.resolve({"PAT-ONE": DAY0 - dt.timedelta(days=30), "PAT-TWO": DAY0})
    assert got == {"PAT-ONE": DAY0, "PAT-TWO": DAY0}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Nothing identifying in the clear: no id, no pseudonym, no date, no day number.
    text = path.read_text()
    p = Pseudonymizer(SECRET)
    for needle in ("PAT-ONE", p.patient("PAT-ONE")[2:], "2019", str(DAY0.toordinal())):
        assert needle not in text
    doc = json.loads(text)
    assert len(doc["anchors"]) == 2
    # Another site secret reads nothing from this file (keys differ): its own anchors.
    other = DateAnchors(Pseudonymizer(SECRET + b"!"), path)
    assert other.resolve({"PAT-ONE": DAY0 + dt.timedelta(days=9)}) == {
        "PAT-ONE": DAY0 + dt.timedelta(days=9)
    }


def test_anchors_file_refused_when_open_or_damaged(tmp_path: Path) -> None:
    path = tmp_path / "date-anchors.json"
    anchors = DateAnchors(Pseudonymizer(SECRET), path)
    anchors.resolve({"PAT-ONE": DAY0})
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        anchors.resolve({"PAT-ONE": DAY0})
    os.chmod(path, 0o600)
    doc = json.loads(path.read_text())
    doc["anchors"] = {k: 5 for k in doc["anchors"]}  # not a masked day number
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="does not decode"):
        anchors.resolve({"PAT-ONE": DAY0})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        anchors.resolve({"PAT-ONE": DAY0})


def test_anchors_file_placement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv(ANCHORS_ENV_VAR, raising=False)
    secret = tmp_path / "cfg" / "site-secret"
    assert Pseudonymizer.from_env_or_file(secret).anchors_path == secret.with_name(
        "date-anchors.json"
    )
    monkeypatch.setenv(ANCHORS_ENV_VAR, str(tmp_path / "elsewhere.json"))
    assert Pseudonymizer.from_env_or_file(secret).anchors_path == tmp_path / "elsewhere.json"
    # Without a file, anchors live in memory: consistent for the life of the object.
    mem = Pseudonymizer(SECRET)
    assert mem.anchors_path is None
    mem.date_anchors.resolve({"PAT-ONE": DAY0})
    assert mem.date_anchors.resolve({"PAT-ONE": DAY0 - dt.timedelta(1)}) == {"PAT-ONE": DAY0}


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One patient's study copied to three studies dated DAY0, DAY0+45 and DAY0-10."""
    root = tmp_path_factory.mktemp("anchors")
    synth_cohort(root / "synth", patients=1, seed=5)
    src = sorted((root / "synth" / "dicom").rglob("*.dcm"))
    out: dict[str, Path] = {}
    for name, shift in (("a", 0), ("b", 45), ("c", -10)):
        study = generate_uid(entropy_srcs=["anchor-study", name])
        for f in src:
            ds = pydicom.dcmread(f)
            ds.StudyDate = (DAY0 + dt.timedelta(days=shift)).strftime("%Y%m%d")
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = generate_uid(entropy_srcs=[ds.SeriesInstanceUID, name])
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[ds.SOPInstanceUID, name])
            dst = root / name / f.relative_to(root / "synth" / "dicom")
            dst.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(dst, enforce_file_format=True)
        out[name] = root / name
    return out


def _days(store: CohortStore) -> list[int]:
    return sorted(r["study_day"] for r in store.studies(["study_day"]).to_pylist())


def test_two_ingests_give_the_offsets_of_one(studies: dict[str, Path], tmp_path: Path) -> None:
    # One run over both studies.
    one_dir = tmp_path / "one-run"
    for name in ("a", "b"):
        for f in studies[name].rglob("*.dcm"):
            dst = one_dir / name / f.relative_to(studies[name])
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes())
    single = CohortStore(tmp_path / "single", create=True)
    ingest_folder(
        one_dir, single,
        pseudonymizer=Pseudonymizer(SECRET, anchors_path=tmp_path / "single.json"), workers=1,
    )  # fmt: skip
    assert _days(single) == [0, 45]

    # Two runs, each in a "new process" (new Pseudonymizer, same secret and anchors file).
    anchors = tmp_path / "split.json"
    split = CohortStore(tmp_path / "split", create=True)
    for name in ("a", "b"):
        ingest_folder(
            studies[name], split,
            pseudonymizer=Pseudonymizer(SECRET, anchors_path=anchors), workers=1,
        )  # fmt: skip
    assert _days(split) == _days(single) == [0, 45]

    # A study older than the anchor, found later: negative offset, the others unchanged.
    ingest_folder(
        studies["c"], split, pseudonymizer=Pseudonymizer(SECRET, anchors_path=anchors), workers=1
    )
    assert _days(split) == [-10, 0, 45]
    assert len({r["patient_id"] for r in split.studies(["patient_id"]).to_pylist()}) == 1


def test_unusable_anchors_file_stops_the_ingest(studies: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "anchors.json"
    bad.write_text("[]")
    os.chmod(bad, 0o600)
    store = CohortStore(tmp_path / "s", create=True)
    with pytest.raises(StoreError, match="date anchors"):
        ingest_folder(
            studies["a"], store, pseudonymizer=Pseudonymizer(SECRET, anchors_path=bad), workers=1
        )
    assert not store.study_uids()
