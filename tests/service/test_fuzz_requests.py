"""Fuzzing request validation: any request is either a valid query or INVALID_ARGUMENT.

Also the researcher filter check and the bearer-header parser. Run briefly here
(``COHORTSIM_FUZZ_EXAMPLES``, default 60); ``benchmarks/fuzz_security.py`` runs longer.
"""

from __future__ import annotations

import math
import os

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexing.errors import FilterError
from service import convert
from service.api import cohortsim_pb2 as pb
from service.auth import bearer_token
from service.errors import ServiceError
from service.governance import Governance

EXAMPLES = int(os.environ.get("COHORTSIM_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("COHORTSIM_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
DIM, MAX_K, MAX_FILES = 8, 1000, 4

floats = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def requests(draw: st.DrawFn) -> pb.SearchSimilarRequest:
    req = pb.SearchSimilarRequest(k=draw(st.integers(-(2**31), 2**31 - 1)))
    kind = draw(st.sampled_from(["embedding", "study_uid", "dicom", None]))
    if kind == "embedding":
        req.embedding.values.extend(draw(st.lists(floats, max_size=2 * DIM)))
    elif kind == "study_uid":
        req.study_uid = draw(st.text(max_size=300))
    elif kind == "dicom":
        req.dicom.files.extend(draw(st.lists(st.binary(max_size=16), max_size=MAX_FILES + 2)))
    if draw(st.booleans()):
        req.filter.where = draw(st.text(max_size=64))
    return req


def _check(req: pb.SearchSimilarRequest) -> None:
    try:
        q = convert.parse_search_request(
            req, dimension=DIM, default_k=10, max_k=MAX_K, max_files=MAX_FILES
        )
    except ServiceError as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT and exc.reason and exc.message
        return
    assert 1 <= q.k <= MAX_K
    if q.kind == "embedding":
        assert q.embedding.shape == (DIM,) and np.isfinite(q.embedding).all()
        assert np.any(q.embedding)
    elif q.kind == "study_uid":
        assert q.study_uid and len(q.study_uid) <= 256
    else:
        assert 1 <= len(q.dicom_files) <= MAX_FILES


@FUZZ
@given(requests())
def test_search_request_validation(req: pb.SearchSimilarRequest) -> None:
    _check(req)


@FUZZ
@given(st.binary(max_size=256))
def test_request_from_arbitrary_bytes(data: bytes) -> None:
    try:
        req = pb.SearchSimilarRequest.FromString(data)
    except DecodeError:
        return  # gRPC refuses such a message before any handler runs
    _check(req)


@pytest.fixture(scope="module")
def snapshot(index_dir):
    from indexing.snapshot import load_snapshot

    return load_snapshot(index_dir, device="cpu")


_WORDS = st.sampled_from(
    ["site", "kvp", "manufacturer", "event", "patient_id", "labels['x']", "AND", "OR", "NOT",
     "=", "<>", "IN", "(", ")", "'north'", "120", "NULL", "IS", "LIKE", "'%'", ",", "BETWEEN"]
)


@FUZZ
@given(st.one_of(st.text(max_size=80), st.lists(_WORDS, max_size=12).map(" ".join)))
def test_researcher_filter_check(snapshot, where: str) -> None:
    try:
        patients = Governance().check_filter(snapshot, where)
    except FilterError as exc:
        assert str(exc)
    except ServiceError as exc:
        assert exc.code == grpc.StatusCode.PERMISSION_DENIED
    else:
        assert len(patients) >= 11


@FUZZ
@given(st.lists(st.tuples(st.text(max_size=20), st.one_of(st.text(max_size=60), st.binary(max_size=60))), max_size=4))
def test_bearer_header_parser(metadata: list[tuple[str, object]]) -> None:
    token = bearer_token(metadata)
    assert token is None or isinstance(token, str)


def test_fuzz_settings_are_sane() -> None:
    assert EXAMPLES >= 1 and not math.isnan(EXAMPLES)
