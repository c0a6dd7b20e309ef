"""docs/pacs-orthanc-routing.md works: a real Orthanc running the routing script from the
doc sends a stable study to ``StoreListener`` (allow-listed by AE title), which ingests it."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from indexing.store import CohortStore
from service.pacs.inflow import Inflow
from service.pacs.listener import ListenerConfig, StoreListener

from . import pacs_peers as pp

DOC = Path(__file__).resolve().parents[2] / "docs" / "pacs-orthanc-routing.md"

pytest.importorskip("pynetdicom", reason="the pacs extra (pynetdicom) is not installed")


def test_orthanc_routes_a_stable_study_to_the_listener(tmp_path: Path) -> None:
    pp.need_orthanc()
    lua = re.search(r"```lua\n(.*?)```", DOC.read_text(), re.S)
    assert lua is not None, "the doc lost its routing script"
    (tmp_path / "route.lua").write_text(lua.group(1))
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef")
    secret.chmod(0o600)
    from encoders.deid import Pseudonymizer

    pseudo = Pseudonymizer.from_env_or_file(secret)
    inflow = Inflow(tmp_path / "store", pseudo, workers=1)
    lst = StoreListener(
        ListenerConfig(spool=tmp_path / "spool", port=0, stable_s=1.0, poll_s=0.3, allowed_aets=("ORTHANC",)),
        inflow,
    )
    lst.start()
    uid, files = pp.ct_study(tmp_path / "study", seed=31, patient="ROUTED-1")
    try:
        extra = {
            "DicomAet": "ORTHANC",
            "DicomModalities": {"cohortsim": ["COHORTSIM", "127.0.0.1", lst.port]},
            "LuaScripts": [str(tmp_path / "route.lua")],
            "StableAge": 1,
        }
        with pp.orthanc(tmp_path / "orthanc", dicom_port=pp.free_port(), extra=extra) as server:
            server.stow(files)
            t0 = time.monotonic()
            while lst.ingested_batches == 0:
                assert time.monotonic() - t0 < 90, (tmp_path / "orthanc" / "orthanc.log").read_text()[-3000:]
                time.sleep(0.3)
    finally:
        lst.stop()
    assert CohortStore(tmp_path / "store").study_uids() == {pseudo.study(uid)}
    assert inflow.last_report is not None and inflow.last_report.files_seen == len(files)
