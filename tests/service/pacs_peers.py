"""Real PACS peers for the inflow tests (not a test module): a temporary Orthanc with its
DICOMweb plugin, and dcmtk's storescu / echoscu.

Each is skipped with the reason when it is not installed (``.ci/run`` installs them with
apt where it runs as root: ``orthanc orthanc-dicomweb dcmtk``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
STORESCU = "/usr/bin/storescu"  # dcmtk's, never pynetdicom's script of the same name
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need_orthanc() -> None:
    if not (os.access(ORTHANC, os.X_OK) and Path(DICOMWEB_PLUGIN).is_file()):
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")


def need_dcmtk() -> None:
    if not all(os.access(p, os.X_OK) for p in (STORESCU, ECHOSCU, STORESCP)):
        pytest.skip("dcmtk is not installed (apt-get install dcmtk): /usr/bin/storescu, echoscu, storescp")


class Orthanc:
    """A running Orthanc: ``.url`` (REST), ``.dicomweb`` (DICOMweb root), ``.stop()``."""

    def __init__(self, root: Path, *, dicom_port: int | None = None, extra: dict | None = None) -> None:
        need_orthanc()
        self.root = root
        self.port = free_port()
        self.dicom_port = dicom_port
        storage = root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "cohortsim-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": dicom_port is not None,
            "DicomPort": dicom_port or 4242,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
            **(extra or {}),
        }
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = open(root / "orthanc.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start: {(root / 'orthanc.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/system", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("Orthanc did not answer within 30 s")

    def stow(self, files: list[Path]) -> None:
        """Load files by STOW-RS (dicomweb-client)."""
        import pydicom
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(self.dicomweb)
        datasets = [pydicom.dcmread(p) for p in files]
        for i in range(0, len(datasets), 50):
            client.store_instances(datasets[i : i + 50])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@contextmanager
def orthanc(root: Path, **kw: object) -> Iterator[Orthanc]:
    server = Orthanc(root, **kw)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


def storescu(port: int, files: list[Path], *, calling: str = "MODALITY", called: str = "COHORTSIM",
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu sending ``files`` to 127.0.0.1:port."""
    need_dcmtk()
    return subprocess.run(
        [STORESCU, "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def echoscu(port: int, *, calling: str = "MODALITY", called: str = "COHORTSIM") -> subprocess.CompletedProcess[str]:
    need_dcmtk()
    return subprocess.run(
        [ECHOSCU, "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=30, check=False,
    )


def which(name: str) -> str | None:
    return shutil.which(name)


# ----------------------------------------------------------------- a small site


def ct_study(folder: Path, seed: int, *, patient: str, n: int = 6) -> tuple[str, list[Path]]:
    """One small CT study (``n`` slices of 32 x 32) written by the encoders' factory;
    returns ``(StudyInstanceUID, files)``."""
    import sys

    from pydicom.uid import generate_uid

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "encoders"))
    import dicom_factory as factory

    uid = generate_uid(entropy_srcs=[str(folder), str(seed), "study"])
    files = factory.ct_series(folder, n=n, rows=32, seed=seed, study_uid=uid, patient_id=patient)
    return uid, files


def make_site(root: Path, *, studies: int = 3) -> dict:
    """A store of ``studies`` small CT studies, a tiny test_resnet encoder and a Flat index
    built from them; the site secret in ``root/secret`` (mode 0600)."""
    from encoders.deid import Pseudonymizer
    from encoders.model import EncoderCard, create_encoder, save_encoder
    from indexing.build import build_from_store
    from indexing.ingest import ingest_folder
    from indexing.store import CohortStore

    root.mkdir(parents=True, exist_ok=True)
    secret = root / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef")
    secret.chmod(0o600)
    pseudo = Pseudonymizer.from_env_or_file(secret)
    for i in range(studies):
        ct_study(root / "dicom" / f"s{i}", seed=100 + i, patient=f"SITE-{i}")
    store = CohortStore(root / "store", create=True)
    ingest_folder(root / "dicom", store, pseudonymizer=pseudo, workers=1)
    encoder = create_encoder("test_resnet", embedding_dim=16)
    save_encoder(encoder, EncoderCard.for_encoder(encoder, seed=0), root / "model")
    build_from_store(root / "store", root / "model", root / "index", device="cpu")
    return {"root": root, "store": root / "store", "index": root / "index", "model": root / "model",
            "secret": secret, "pseudo": pseudo}
