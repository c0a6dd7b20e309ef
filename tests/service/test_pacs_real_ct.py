"""The three ways in on a real CT (LIDC-IDRI-0001, 133 slices of 512 x 512): a folder,
C-STORE from dcmtk's storescu, and a DICOMweb pull from a real Orthanc give the same
store row (pseudonym, acquisition, preprocessed volume bit for bit)."""

from __future__ import annotations

import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from encoders.deid import Pseudonymizer
from indexing.store import CohortStore
from service.pacs.dicomweb import DicomwebConfig
from service.pacs.inflow import Inflow
from service.pacs.listener import ListenerConfig, StoreListener
from service.pacs.pull import pull_studies

from . import pacs_peers as pp

ARCHIVE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lidc-idri-0001.tar.xz"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lidc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not ARCHIVE.is_file():
        pytest.skip(f"real CT not found at {ARCHIVE} (see ../shared/data/README.md: LIDC-IDRI-0001, TCIA)")
    root = tmp_path_factory.mktemp("lidc")
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(root, filter="data")
    return root


def _row(store: Path) -> tuple[dict, np.ndarray]:
    cohort = CohortStore(store)
    table = cohort.studies(columns=["study_uid", "patient_id", "manufacturer", "kernel", "slice_thickness"])
    assert table.num_rows == 1
    _uids, volumes = cohort.load_volumes()
    return table.to_pylist()[0], volumes[0]


def test_folder_cstore_and_dicomweb_give_the_same_study(lidc: Path, tmp_path: Path) -> None:
    pp.need_dcmtk()
    pp.need_orthanc()
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef")
    secret.chmod(0o600)
    pseudo = Pseudonymizer.from_env_or_file(secret)
    files = sorted(p for p in lidc.rglob("*.dcm"))
    assert len(files) >= 133

    folder = Inflow(tmp_path / "folder", pseudo, workers=1)
    folder.ingest(lidc)
    row, volume = _row(tmp_path / "folder")
    assert row["manufacturer"] == "GE MEDICAL SYSTEMS"

    inflow = Inflow(tmp_path / "cstore", pseudo, workers=1)
    lst = StoreListener(ListenerConfig(spool=tmp_path / "spool", port=0, stable_s=1.0, poll_s=0.3), inflow)
    lst.start()
    try:
        assert pp.storescu(lst.port, files, timeout=600).returncode == 0
        t0 = time.monotonic()
        while lst.ingested_batches == 0:
            assert time.monotonic() - t0 < 300
            time.sleep(0.2)
    finally:
        lst.stop()
    row_c, volume_c = _row(tmp_path / "cstore")

    with pp.orthanc(tmp_path / "orthanc") as server:
        server.stow(files)
        pulled = Inflow(tmp_path / "dicomweb", pseudo, workers=1)
        pull_studies(DicomwebConfig(server.dicomweb, timeout_s=120), pulled.store(), pseudonymizer=pseudo,
                     spool=tmp_path / "pull-spool", ingest=pulled.ingest)
    row_w, volume_w = _row(tmp_path / "dicomweb")

    assert row == row_c == row_w
    np.testing.assert_array_equal(volume, volume_c)
    np.testing.assert_array_equal(volume, volume_w)
    assert "LIDC" not in str(row)  # pseudonyms only
