"""SearchSimilarStream with a 40 MB DICOM study: over a server whose message cap is gRPC's
default 4 MiB, unary SearchSimilar is refused (RESOURCE_EXHAUSTED) and the stream answers
exactly what the small study answers."""

from __future__ import annotations

import io

import pydicom
import pytest

from service.background import BackgroundServer
from service.client import CohortsimClient, CohortsimClientError

from .test_dicom_query import dicom_setup  # noqa: F401  (the module fixture)

TARGET_MB = 40


def _padded(files: list, total_mb: int) -> list[bytes]:
    """The study's files, each with a private OB element so the study weighs ``total_mb``."""
    pad = (total_mb << 20) // len(files) + 1
    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        block = ds.private_block(0x0011, "cohortsim test padding", create=True)
        block.add_new(0x01, "OB", b"\0" * pad)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def test_a_40_mb_study_streams(dicom_setup: dict) -> None:  # noqa: F811
    big = _padded(dicom_setup["studies"][0], TARGET_MB)
    assert sum(map(len, big)) >= TARGET_MB << 20
    srv = BackgroundServer(dicom_setup["index"], device="cpu", max_receive_mb=4, watch_interval=None)
    with srv, CohortsimClient(srv.target, timeout=120, max_message_mb=64) as c:
            with pytest.raises(CohortsimClientError) as err:
                c.search(dicom_paths=big, k=3)
            assert err.value.code == "RESOURCE_EXHAUSTED"
            small = c.search(dicom_paths=dicom_setup["studies"][0], k=3)
            streamed = c.search_stream(big, k=3)
    assert [n.study_uid for n in streamed.neighbors] == [n.study_uid for n in small.neighbors]
    assert streamed.neighbors[0].study_uid == dicom_setup["study0_uid"]
    assert streamed.neighbors[0].similarity == pytest.approx(small.neighbors[0].similarity, abs=1e-5)
