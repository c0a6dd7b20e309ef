"""DICOM queries through gRPC: the server embeds the study with the index's own encoder."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from encoders.dicom import preprocess, read_study
from encoders.model import EncoderCard, create_encoder, embed, save_encoder
from encoders.synth import synth_cohort
from indexing.snapshot import build_snapshot
from service.api import cohortsim_pb2, cohortsim_pb2_grpc
from service.background import BackgroundServer
from service.client import (
    AsyncCohortsimClient,
    CohortsimClient,
    CohortsimClientError,
    SearchResult,
)
from service.convert import UNVERSIONED_EMBEDDING_WARNING

from .conftest import make_cohort

EMBED_DIM = 16
N_ROWS = 30


@pytest.fixture(scope="module")
def dicom_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two synthetic studies, a tiny untrained encoder, and an index holding study 0."""
    root = tmp_path_factory.mktemp("dicom")
    synth_cohort(root / "synth", patients=2, seed=1)
    folders = sorted((root / "synth" / "dicom").iterdir())
    studies = [sorted(f.rglob("*.dcm")) for f in folders]
    encoder = create_encoder("test_resnet", embedding_dim=EMBED_DIM)
    card = save_encoder(encoder, EncoderCard.for_encoder(encoder, seed=0), root / "model")
    own = [embed(encoder, preprocess(read_study(files), card.input)[None])[0] for files in studies]

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(N_ROWS, EMBED_DIM)).astype(np.float32)
    emb[0] = own[0]
    _, table = make_cohort(seed=3)
    table = table.slice(0, N_ROWS)
    index = root / "index"
    build_snapshot(index, emb, table, model_version=card.version, encoder_dir=root / "model")
    mismatched = root / "index-other-model"
    build_snapshot(
        mismatched, emb, table, model_version="enc-0123456789ab", encoder_dir=root / "model"
    )
    return {
        "studies": studies,
        "own": own,
        "card": card,
        "index": index,
        "mismatched": mismatched,
        "study0_uid": table.column("study_uid")[0].as_py(),
    }


@pytest.fixture(scope="module")
def dicom_server(dicom_setup: dict) -> Iterator[BackgroundServer]:
    with BackgroundServer(dicom_setup["index"], device="cpu") as srv:
        yield srv


def test_dicom_query_finds_the_study_itself(
    dicom_server: BackgroundServer, dicom_setup: dict
) -> None:
    with CohortsimClient(dicom_server.target, timeout=60) as client:
        assert client.index_info().dicom_supported is True
        result = client.search(dicom_paths=dicom_setup["studies"][0], k=5)
        vector, version = client.embed(dicom_setup["studies"][1])
    top = result.neighbors[0]
    assert top.study_uid == dicom_setup["study0_uid"]
    assert top.similarity == pytest.approx(1.0, abs=1e-4)
    assert result.model_version == dicom_setup["card"].version
    # the query's scanner is known from its DICOM headers, so the scanner check ran
    assert result.diagnostics.same_scanner_share is not None
    assert result.diagnostics.cohort_scanner_share is not None
    # EmbedStudy gives what in-process embedding gives
    assert version == dicom_setup["card"].version
    np.testing.assert_allclose(vector, dicom_setup["own"][1], atol=1e-5)


def test_embedding_from_embed_study_is_resent_with_its_version(
    dicom_server: BackgroundServer, dicom_setup: dict
) -> None:
    with CohortsimClient(dicom_server.target, timeout=60) as client:
        study = client.embed(dicom_setup["studies"][0])
        checked = client.search(embedding=study, k=3)  # sends study.model_version
        unchecked = client.search(embedding=study.vector, k=3)

    async def run() -> SearchResult:
        async with AsyncCohortsimClient(dicom_server.target, timeout=60) as aclient:
            return await aclient.search(embedding=await aclient.embed(dicom_setup["studies"][0]), k=3)

    for res in (checked, asyncio.run(run())):
        assert UNVERSIONED_EMBEDDING_WARNING not in res.diagnostics.warnings
        assert res.neighbors[0].study_uid == dicom_setup["study0_uid"]
    assert UNVERSIONED_EMBEDDING_WARNING in unchecked.diagnostics.warnings


def test_not_dicom_is_invalid_argument(dicom_server: BackgroundServer) -> None:
    with (
        CohortsimClient(dicom_server.target, timeout=60) as client,
        pytest.raises(CohortsimClientError) as info,
    ):
        client.search(dicom_paths=[b"this is not a DICOM file" * 10], k=3)
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.reason is not None and info.value.reason.startswith("DICOM_")


def test_too_many_files_is_refused(dicom_setup: dict, tmp_path: Path) -> None:
    with (
        BackgroundServer(dicom_setup["index"], device="cpu", max_files=3) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
        req = cohortsim_pb2.EmbedStudyRequest(dicom=cohortsim_pb2.DicomStudy(files=[b"x"] * 4))
        with pytest.raises(grpc.RpcError) as info:
            stub.EmbedStudy(req, timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_oversized_request_is_refused(dicom_setup: dict) -> None:
    with (
        BackgroundServer(dicom_setup["index"], device="cpu", max_receive_mb=1) as srv,
        CohortsimClient(srv.target, timeout=20) as client,
        pytest.raises(CohortsimClientError) as info,
    ):
        client.embed([b"\0" * (2 * 1024 * 1024)])
    assert info.value.code == "RESOURCE_EXHAUSTED"


def test_encoder_of_another_model_version(dicom_setup: dict) -> None:
    with (
        BackgroundServer(dicom_setup["mismatched"], device="cpu") as srv,
        CohortsimClient(srv.target, timeout=60) as client,
        pytest.raises(CohortsimClientError) as info,
    ):
        client.search(dicom_paths=dicom_setup["studies"][0], k=3)
    assert info.value.code == "FAILED_PRECONDITION"
    assert info.value.reason == "MODEL_VERSION_MISMATCH"


def test_dicom_query_reports_stability_and_thumbnail(
    dicom_server: BackgroundServer, dicom_setup: dict
) -> None:
    with CohortsimClient(dicom_server.target, timeout=60) as client:
        result = client.search(dicom_paths=dicom_setup["studies"][0], k=5, include_thumbnails=True)
    st = result.diagnostics.stability
    assert st is not None and st.view_count == 4  # test-time augmentation on DICOM queries
    assert 0.0 <= st.min_neighbor_overlap <= st.mean_neighbor_overlap <= 1.0
    assert {c.attribute for c in result.diagnostics.acquisition_checks} >= {"scanner"}
    # the query's thumbnail is made from its preprocessed volume; this index stores none
    assert result.query_thumbnail_png is not None and result.query_thumbnail_png[:4] == b"\x89PNG"
    assert all(n.thumbnail_png is None for n in result.neighbors)
