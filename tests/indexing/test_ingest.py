"""indexing.ingest: idempotent and resumable ingest, workers, burned-in text, day offsets,
and a store that holds nothing from the PS3.15 Basic profile (every byte scanned)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import generate_uid

from encoders.deid import BASIC_PROFILE_KEYWORDS, RETAINED_WITH_OPTIONS, Pseudonymizer
from encoders.dicom import SeriesRule
from encoders.synth import synth_cohort
from indexing.ingest import _CRASHED, _map_ordered, _Workers, ingest_folder
from indexing.store import CohortStore

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"0123456789abcdef-ingest-tests"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synth_cohort(out, patients=4, seed=11)
    return out / "dicom"


def _rows(store: CohortStore) -> list[dict]:
    return store.studies().drop_columns(["ingested_at"]).to_pylist()


def test_idempotent_and_workers_agree(cohort: Path, tmp_path: Path) -> None:
    pseudo = Pseudonymizer(SECRET)
    one = CohortStore(tmp_path / "one", create=True)
    r1 = ingest_folder(cohort, one, pseudonymizer=pseudo, workers=1)
    assert (r1.studies_found, r1.studies_ingested, r1.studies_rejected) == (4, 4, [])
    assert len(r1.studies) == 4 and all("series #" in s["series_reason"] for s in r1.studies)
    again = ingest_folder(cohort, one, pseudonymizer=pseudo, workers=1)
    assert (again.studies_ingested, again.studies_already_present) == (0, 4)
    assert len(one.studies(["study_uid"])) == 4
    two = CohortStore(tmp_path / "two", create=True)
    r2 = ingest_folder(cohort, two, pseudonymizer=pseudo, workers=2)
    assert r2.workers == 2 and r2.studies_ingested == 4
    assert _rows(one) == _rows(two)  # same rows, same order, same volumes


def test_one_store_holds_one_input_spec(cohort: Path, tmp_path: Path) -> None:
    """A store keeps the spec its first studies were resampled with: later ingests default
    to it, and a different spec is refused before anything is written."""
    from encoders.spec import InputSpec
    from indexing.errors import StoreError
    from indexing.ingest import store_spec

    coarse = InputSpec(spacing_mm=(4.0, 4.0, 4.0), shape=(16, 64, 64))
    pseudo = Pseudonymizer(SECRET)
    store = CohortStore(tmp_path / "s", create=True)
    assert store_spec(store) == InputSpec()  # empty: the default
    folders = sorted(p for p in cohort.iterdir() if p.is_dir())
    ingest_folder(folders[0], store, pseudonymizer=pseudo, workers=1, spec=coarse)
    assert store_spec(store) == coarse
    with pytest.raises(StoreError, match=r"resampled to \(4.0, 4.0, 4.0\) mm.*new store"):
        ingest_folder(folders[1], store, pseudonymizer=pseudo, workers=1, spec=InputSpec())
    assert len(store.studies(["study_uid"])) == 1
    report = ingest_folder(folders[1], store, pseudonymizer=pseudo, workers=1)  # store's spec
    assert report.studies_ingested == 1
    assert {tuple(s) for s in store.studies(["volume_shape"])["volume_shape"].to_pylist()} == {
        (16, 64, 64)}


def test_day_offsets_from_first_study(cohort: Path, tmp_path: Path) -> None:
    """A second, later study of one patient gets its day offset; the first gets 0."""
    folder = tmp_path / "in"
    first = sorted((cohort / "00000").rglob("*.dcm"))
    study = generate_uid(entropy_srcs=["later"])
    for src in first:
        for tag, ds in (("a", pydicom.dcmread(src)), ("b", pydicom.dcmread(src))):
            if tag == "b":
                day = dt.datetime.strptime(ds.StudyDate, "%Y%m%d") + dt.timedelta(days=45)
                ds.StudyDate = day.strftime("%Y%m%d")
                ds.StudyInstanceUID = study
                ds.SeriesInstanceUID = generate_uid(entropy_srcs=[ds.SeriesInstanceUID, "b"])
                ds.SOPInstanceUID = generate_uid(entropy_srcs=[ds.SOPInstanceUID, "b"])
            out = folder / tag / src.parent.name / src.name
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out, enforce_file_format=True)
    store = CohortStore(tmp_path / "s", create=True)
    ingest_folder(folder, store, pseudonymizer=Pseudonymizer(SECRET), workers=1)
    rows = store.studies(["patient_id", "study_day"]).to_pylist()
    assert len({r["patient_id"] for r in rows}) == 1
    assert sorted(r["study_day"] for r in rows) == [0, 45]


def test_burned_in_rejected_unless_allowed(cohort: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bia"
    for src in sorted((cohort / "00001").rglob("*.dcm")):
        ds = pydicom.dcmread(src)
        ds.BurnedInAnnotation = "YES"
        out = folder / src.parent.name / src.name
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
    store = CohortStore(tmp_path / "s", create=True)
    report = ingest_folder(folder, store, pseudonymizer=Pseudonymizer(SECRET), workers=1)
    assert report.studies_ingested == 0
    assert [r["reason"] for r in report.studies_rejected] == ["burned_in_annotation"]
    assert "--allow-burned-in" in report.studies_rejected[0]["message"]
    allowed = ingest_folder(
        folder,
        store,
        pseudonymizer=Pseudonymizer(SECRET),
        workers=1,
        series_rule=SeriesRule(allow_burned_in=True),
    )
    assert allowed.studies_ingested == 1


def _crash_on(x: int) -> int:
    if x == 3:
        os._exit(7)  # what a segfault in a native decoder looks like to the pool
    return x * 10


def test_a_crashing_worker_costs_one_task() -> None:
    with _Workers(2) as pool:
        got = list(_map_ordered(_crash_on, [(i,) for i in range(6)], pool))
    assert got[:3] == [0, 10, 20] and got[3] is _CRASHED and got[4:] == [40, 50]


_KILLABLE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from encoders.deid import Pseudonymizer
    from indexing.ingest import ingest_folder
    from indexing.store import CohortStore
    if __name__ == "__main__":
        store = CohortStore(Path(sys.argv[2]), create=True)
        ingest_folder(Path(sys.argv[1]), store, pseudonymizer=Pseudonymizer(sys.argv[3].encode()),
                      workers=1, batch_size=1, progress=lambda d, t: time.sleep(0.4))
    """
)


def test_killed_ingest_resumes(cohort: Path, tmp_path: Path) -> None:
    """SIGKILL mid-ingest keeps the finished batches; re-running adds only the rest."""
    script = tmp_path / "ingest.py"
    script.write_text(_KILLABLE)
    store_dir = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(cohort), str(store_dir), SECRET.decode()],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((store_dir / "studies").glob("part-*.parquet"))) >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    store = CohortStore(store_dir)
    kept = len(store.studies(["study_uid"]))
    assert 1 <= kept < 4
    report = ingest_folder(cohort, store, pseudonymizer=Pseudonymizer(SECRET), workers=1)
    assert report.studies_already_present == kept
    assert report.studies_ingested == 4 - kept
    uids = store.studies(["study_uid"]).column("study_uid").to_pylist()
    assert len(uids) == len(set(uids)) == 4
    assert not list((store_dir / "studies").glob(".*tmp"))  # no half-written part left


# ------------------------------------------------------------------ de-identification

_TEXT_VRS = {"LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE", "PN", "DA", "TM", "DT"}
_KEEP_UIDS = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
              "MediaStorageSOPInstanceUID"}  # fmt: skip


def _marker(keyword: str, vr: str, i: int) -> str:
    if vr == "DA":
        return f"1931{1 + i % 12:02d}{1 + i % 28:02d}"
    if vr == "TM":
        return f"23{i % 60:02d}17.1717"
    if vr == "DT":
        return f"1931051723{i % 60:02d}17"
    if vr == "PN":
        return f"Zqname{i:03d}^Zqgiven{i:03d}"
    if vr == "CS":
        return f"ZQCS{i:03d}"[:16]
    if vr == "AE":
        return f"ZQAE{i:03d}"
    return f"ZQMK{i:03d}{keyword}"[:16]  # fits every text VR (SH: 16 characters)


def _fill_identifying(src: Path, dst: Path, study_shift: int) -> list[str]:
    """Rewrite ``src`` with a distinct identifying value in every settable Basic-profile
    text attribute, a private block and a protocol name that holds the patient's name."""
    ds = pydicom.dcmread(src)
    markers: list[str] = []
    for i, keyword in enumerate(sorted(BASIC_PROFILE_KEYWORDS)):
        if keyword in _KEEP_UIDS or keyword in RETAINED_WITH_OPTIONS:
            continue
        tag = tag_for_keyword(keyword)
        vr = dictionary_VR(tag)
        if vr not in _TEXT_VRS or tag >> 16 == 0x0002:  # file meta: not in the dataset
            continue
        value = _marker(keyword, vr, i)
        if keyword == "StudyDate":
            value = f"19310{study_shift + 1}17"
        setattr(ds, keyword, value)
        markers.extend(p for p in value.replace("^", " ").split() if len(p) >= 6)
    ds.PatientID = f"ZQPATIENT{study_shift}"  # one patient per source patient
    markers.append(ds.PatientID)
    block = ds.private_block(0x0019, "ZQ PRIVATE CREATOR", create=True)
    block.add_new(0x10, "LO", "ZQPRIVATEVALUE")
    protocol = f"{ds.PatientName.family_name} chest"  # holds the patient's name: dropped
    ds.ProtocolName = protocol
    markers += ["ZQPRIVATEVALUE", "ZQ PRIVATE CREATOR", protocol]
    markers += [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]
    markers += [str(ds.FrameOfReferenceUID)] if "FrameOfReferenceUID" in ds else []
    for keyword in ("PatientID", "PatientName"):  # the synthetic originals, too
        markers.append(str(pydicom.dcmread(src, stop_before_pixels=True).get(keyword, "")))
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return [m for m in markers if len(m) >= 6]


def test_store_holds_nothing_from_the_basic_profile(
    cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "identifying"
    markers: set[str] = set()
    for n, patient in enumerate(("00002", "00003")):
        for src in sorted((cohort / patient).rglob("*.dcm")):
            markers.update(_fill_identifying(src, folder / patient / src.parent.name / src.name, n))
    assert len(markers) > 150
    caplog.set_level(logging.DEBUG)
    store = CohortStore(tmp_path / "store", create=True)
    report = ingest_folder(folder, store, pseudonymizer=Pseudonymizer(SECRET), workers=1)
    assert report.studies_ingested == 2, report.studies_rejected
    rows = store.studies().to_pylist()
    assert all(r["protocol"] is None for r in rows)  # the name-bearing protocol was dropped
    assert all(r["study_day"] == 0 for r in rows)  # dates became offsets

    raw = b""
    for path in sorted(p for p in (tmp_path / "store").rglob("*") if p.is_file()):
        raw += path.read_bytes()
        if path.suffix == ".parquet":  # decoded too: values, schema and metadata
            table = pq.read_table(path)
            raw += json.dumps(table.drop_columns(["volume"]).to_pylist(), default=str).encode()
            raw += b"".join(table.column("volume").to_pylist())
            raw += str(table.schema).encode() + str(pq.read_metadata(path)).encode()
    texts = {
        "store": raw.lower(),
        "log": caplog.text.encode().lower(),
        "report series reasons": json.dumps(report.studies).encode().lower(),
    }
    for where, blob in texts.items():
        found = sorted(m for m in markers if m.lower().encode() in blob)
        assert not found, f"identifying values in the {where}: {found[:10]}"
