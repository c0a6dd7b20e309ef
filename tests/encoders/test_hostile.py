"""Hostile and broken files: each is refused with a specific reason, never a crash, and
reading a folder full of them stays within bounded memory (measured in a subprocess)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import ct_series
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from encoders import dicom
from encoders.dicom import read_study, scan_folder
from encoders.errors import DicomError

ROOT = Path(__file__).resolve().parents[2]

# Reasons that name what is wrong; "unexpected" (the last-resort wrapper) is not one.
SPECIFIC = {
    "not_dicom", "not_a_file", "truncated", "missing_tag", "no_pixel_data", "too_large",
    "too_deep", "bad_rescale", "transfer_syntax_mismatch", "executable_preamble",
    "inconsistent_header", "unsupported", "corrupt", "not_image", "burned_in_annotation",
    "missing_codec", "inconsistent_geometry", "no_usable_series",
}  # fmt: skip


def _reason(sources) -> tuple[str, str]:
    with pytest.raises(DicomError) as info:
        read_study(sources)
    msg = str(info.value)
    assert "\n" not in msg and info.value.reason in SPECIFIC, msg
    return info.value.reason, msg


def _rewrite(files: list[Path], out: Path, edit: Callable[[Dataset], None]) -> list[Path]:
    """Copies of ``files`` in a new study (so they never mix with the good one), edited."""
    out.mkdir(parents=True)
    study = generate_uid(entropy_srcs=[str(out)])
    paths = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study
        edit(ds)
        ds.save_as(out / f.name, enforce_file_format=True)
        paths.append(out / f.name)
    return paths


def _meta_and_dataset(**elements) -> bytes:
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = "H"
    ds.StudyInstanceUID = generate_uid()
    for k, v in elements.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _explicit(group: int, elem: int, vr: bytes, length: int) -> bytes:
    return struct.pack("<HH2sHI", group, elem, vr, 0, length)


def make_hostile(good: list[Path], out: Path) -> dict[str, tuple[list[Path], set[str]]]:
    """A corpus of broken / hostile inputs: name -> (files, acceptable reasons)."""
    out.mkdir(parents=True, exist_ok=True)
    data = good[0].read_bytes()
    cases: dict[str, tuple[list[Path], set[str]]] = {}

    def file(name: str, content: bytes, reasons: set[str]) -> None:
        path = out / name
        path.write_bytes(content)
        cases[name] = ([path], reasons)

    def series(name: str, edit: Callable[[Dataset], None], reasons: set[str]) -> None:
        cases[name] = (_rewrite(good[:3], out / name, edit), reasons)

    file("empty.dcm", b"", {"not_dicom"})
    file("notes.txt", b"this is not DICOM\n" * 40, {"not_dicom"})
    file("cut_in_meta.dcm", data[:150], {"truncated", "corrupt", "not_dicom"})
    file("cut_in_header.dcm", data[: data.index(b"Model 9") + 3], {"truncated"})
    file("cut_in_pixels.dcm", data[:-100], {"truncated"})
    # A 4 GiB length claim: must not allocate 4 GiB (checked under an address-space cap).
    file("claims_4gib.dcm", _meta_and_dataset() + _explicit(0x0009, 0x1000, b"OB", 0xFFFFFFF0) + b"\0" * 64, {"truncated"})
    # 1,200 nested sequences of undefined length.
    nest = _explicit(0x0009, 0x1010, b"SQ", 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    file("nested_1200.dcm", _meta_and_dataset() + nest * 1200 + close * 1200, {"too_deep"})
    file("mz_preamble.dcm", b"MZ\x90\x00" + data[4:], {"executable_preamble"})
    # A deflated dataset that inflates to 600 MiB (a zip bomb).
    ds = pydicom.dcmread(io.BytesIO(_meta_and_dataset()))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    written = pydicom.dcmread(io.BytesIO(buf.getvalue()), stop_before_pixels=True)
    meta_end = 132 + 12 + int(written.file_meta.FileMetaInformationGroupLength)
    bomb = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = bomb.compress(b"\0" * (16 << 20)) + bomb.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()  # final empty block
    body = block * 38 + end  # self-contained blocks: ~600 MiB of zeros once inflated
    file("deflate_bomb.dcm", buf.getvalue()[:meta_end] + body, {"too_large"})

    def short_pixels(ds: Dataset) -> None:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]

    def absurd(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 60000

    def no_pixels(ds: Dataset) -> None:
        del ds.PixelData

    def no_study(ds: Dataset) -> None:
        del ds.StudyInstanceUID

    def zero_slope(ds: Dataset) -> None:
        ds.RescaleSlope = "0"


    def rgb_one_sample(ds: Dataset) -> None:
        ds.PhotometricInterpretation = "RGB"

    def mono_three_samples(ds: Dataset) -> None:
        ds.SamplesPerPixel = 3

    series("short_pixels", short_pixels, {"truncated"})
    series("absurd_size", absurd, {"too_large"})
    series("no_pixel_data", no_pixels, {"no_pixel_data"})
    series("zero_slope", zero_slope, {"bad_rescale"})
    lying = _rewrite(good[:3], out / "lying_syntax", lambda ds: None)
    for f in lying:  # say RLE (same UID length) while the pixels stay native
        f.write_bytes(f.read_bytes().replace(b"1.2.840.10008.1.2.1\0", b"1.2.840.10008.1.2.5\0", 1))
    cases["lying_syntax"] = (lying, {"transfer_syntax_mismatch"})
    series("rgb_1_sample", rgb_one_sample, {"inconsistent_header"})
    series("mono_3_samples", mono_three_samples, {"inconsistent_header"})
    no_uid = _rewrite(good[:1], out / "no_study_uid", no_study)
    cases["no_study_uid"] = (no_uid, {"missing_tag"})
    # Non-numeric rescale slope: a DS value pydicom will not write, patched in the bytes.
    text_slope = _rewrite(good[:3], out / "text_slope", lambda ds: None)
    for f in text_slope:
        raw = bytearray(f.read_bytes())
        at = raw.index(b"\x28\x00\x53\x10DS")
        length = struct.unpack("<H", raw[at + 6 : at + 8])[0]
        raw[at + 8 : at + 8 + length] = b"x".ljust(length)
        f.write_bytes(bytes(raw))
    cases["text_slope"] = (text_slope, {"bad_rescale"})
    return cases


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return ct_series(tmp_path_factory.mktemp("good"), n=6, rows=32)


@pytest.fixture(scope="module")
def corpus(good: list[Path], tmp_path_factory: pytest.TempPathFactory):
    return make_hostile(good, tmp_path_factory.mktemp("hostile"))


def test_each_hostile_input_has_a_specific_reason(good: list[Path], corpus) -> None:
    for name, (files, reasons) in corpus.items():
        sources = [*files, *good[1:]] if len(files) == 1 else files  # one bad slice
        reason, msg = _reason(sources)
        assert reason in reasons, f"{name}: {reason}: {msg}"
        assert any(str(f) in msg for f in sources), f"{name}: message names no file: {msg}"
    assert read_study(good).volume.shape == (6, 32, 32)  # the good series still reads


def test_element_bomb_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Millions of tiny elements would cost GBs of Python objects: a read budget stops them."""
    monkeypatch.setattr(dicom.reading, "MAX_HEADER_READS", 5_000)
    elems = b"".join(
        struct.pack("<HH2sH", g, e, b"SH", 0) for g in range(0x0009, 0x0100, 2) for e in range(0x1000, 0x1040)
    )
    with pytest.raises(DicomError) as info:
        read_study([_meta_and_dataset() + elems])
    assert info.value.reason == "too_large" and "element" in str(info.value)


def test_scan_reports_every_bad_file(corpus, tmp_path: Path) -> None:
    for name, (files, _) in corpus.items():
        for f in files:
            (tmp_path / f"{name}-{f.name}").write_bytes(f.read_bytes())
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    _, rejections = scan_folder(tmp_path)
    rejected = {Path(r.path).name for r in rejections}
    assert {"empty.dcm-empty.dcm", "notes.txt-notes.txt", "nested_1200.dcm-nested_1200.dcm",
            "mz_preamble.dcm-mz_preamble.dcm", "dangling"} <= rejected  # fmt: skip
    assert all(r.reason and "\n" not in r.reason for r in rejections)


_HOSTILE_INGEST = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from encoders.deid import Pseudonymizer
    from indexing.ingest import ingest_folder
    from indexing.store import CohortStore

    def peak_kib():  # VmHWM: this process's own peak (ru_maxrss would include the
        for line in open("/proc/self/status"):  # parent's, copied before exec)
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    if __name__ == "__main__":
        folder, store, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
        report = ingest_folder(folder, CohortStore(store, create=True),
                               pseudonymizer=Pseudonymizer(b"0123456789abcdef-hostile"),
                               workers=workers)
        print(json.dumps({"report": report.to_dict(), "peak_kib": peak_kib()}))
    """
)


def _ingest_subprocess(folder: Path, store: Path, workers: int, script: Path) -> dict:
    script.write_text(_HOSTILE_INGEST)
    run = subprocess.run(
        [sys.executable, str(script), str(folder), str(store), str(workers)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_hostile_folder_ingest_bounded_memory(good: list[Path], corpus, tmp_path: Path) -> None:
    """The whole corpus plus two good studies in one folder, ingested in a subprocess:
    good studies all go in, every bad file is reported, and the peak RSS of reading it
    all in one process (workers=1: every byte read in the measured process) stays well
    under 2 GiB; with two workers the report is the same."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name, (files, _) in corpus.items():
        for f in files:
            (folder / f"{name}-{f.name}").write_bytes(f.read_bytes())
    ct_series(folder / "good1", n=5, rows=32, seed=1)
    ct_series(folder / "good2", n=5, rows=32, seed=2, patient_id="PAT-0002")
    out = _ingest_subprocess(folder, tmp_path / "store", 1, tmp_path / "run.py")
    report = out["report"]
    assert report["studies_ingested"] == 2
    text = json.dumps(report["files_rejected"]) + json.dumps(report["studies_rejected"])
    for name, (files, _) in corpus.items():
        assert any(f"{name}-{f.name}" in text for f in files), f"{name} not reported"
    for r in report["studies_rejected"]:
        assert r["reason"] in SPECIFIC, r
    assert out["peak_kib"] < 512 * 1024, f"peak RSS {out['peak_kib'] / 1024:.0f} MiB"
    two = _ingest_subprocess(folder, tmp_path / "store2", 2, tmp_path / "run2.py")["report"]
    assert two["studies_ingested"] == 2
    assert two["files_rejected"] == report["files_rejected"]
    assert [r["reason"] for r in two["studies_rejected"]] == [
        r["reason"] for r in report["studies_rejected"]
    ]


_ADDRESS_CAP = textwrap.dedent(
    """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
    from pathlib import Path
    from encoders.dicom import read_study
    from encoders.errors import DicomError
    for p in sys.argv[1:]:
        try:
            read_study([Path(p)])
            print(p, "read")
        except DicomError as e:
            print(p, e.reason)
    """
)


def test_length_claims_never_allocate(corpus, tmp_path: Path) -> None:
    """Under a 1.5 GiB address-space cap, the 4 GiB claim and the zip bomb are refused for
    what they are, not by running out of memory."""
    files = [str(corpus[n][0][0]) for n in ("claims_4gib.dcm", "deflate_bomb.dcm")]
    run = subprocess.run(
        [sys.executable, "-c", _ADDRESS_CAP, *files],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    got = dict(line.rsplit(" ", 1) for line in run.stdout.strip().splitlines())
    assert got[files[0]] == "truncated", got
    assert got[files[1]] == "too_large", got


def test_no_allocation_before_size_check(good: list[Path], tmp_path: Path) -> None:
    """A file much larger than its declared image is refused before its pixels are read."""
    big = _rewrite(good[:3], tmp_path / "big", lambda ds: None)
    with open(big[0], "ab") as fh:
        fh.write(b"\0" * ((dicom.MAX_EXTRA_FILE_BYTES) + 4096))
    reason, msg = _reason(big)
    assert reason == "too_large" and "unexpected data" in msg
    assert np.all(read_study(good).volume >= -1024)
