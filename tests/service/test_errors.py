"""Domain exceptions map to one status code and reason each; internals never leak."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from encoders.errors import DicomError, EncoderError, EncoderOutOfMemoryError
from indexing.errors import (
    DimensionError,
    FilterError,
    ModelVersionError,
    QueryError,
    SnapshotError,
    UnknownStudyError,
)
from service.api import cohortsim_pb2, cohortsim_pb2_grpc
from service.errors import (
    DOMAIN,
    ServiceError,
    classify,
    reason_from_trailing,
    retry_delay_from_trailing,
    to_status,
)

C = grpc.StatusCode


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (
            DicomError("not_dicom", "file 1 is not DICOM; send Part 10 files"),
            C.INVALID_ARGUMENT,
            "DICOM_NOT_DICOM",
        ),
        (
            DimensionError("dimension 3; the index expects 32"),
            C.INVALID_ARGUMENT,
            "WRONG_DIMENSION",
        ),
        (FilterError("unknown column 'x'"), C.INVALID_ARGUMENT, "INVALID_FILTER"),
        (QueryError("k must be an integer"), C.INVALID_ARGUMENT, "INVALID_QUERY"),
        (UnknownStudyError("study S-1 is not in index version v1"), C.NOT_FOUND, "UNKNOWN_STUDY"),
        (ModelVersionError("model a vs b"), C.FAILED_PRECONDITION, "MODEL_VERSION_MISMATCH"),
        (EncoderError("weights corrupt"), C.FAILED_PRECONDITION, "ENCODER_UNUSABLE"),
        (EncoderOutOfMemoryError("out of memory"), C.RESOURCE_EXHAUSTED, "OUT_OF_MEMORY"),
        (SnapshotError("no published snapshot"), C.UNAVAILABLE, "INDEX_UNAVAILABLE"),
    ],
)
def test_mapping(exc: Exception, code: grpc.StatusCode, reason: str) -> None:
    err = classify(exc)
    assert (err.code, err.reason) == (code, reason)
    assert err.message and "\n" not in err.message


def test_lookup_error_message_is_not_repr_quoted() -> None:
    err = classify(UnknownStudyError("study S-1 is not in index version v1"))
    assert err.message == "study S-1 is not in index version v1"


def test_unexpected_exception_is_internal_and_generic(caplog: pytest.LogCaptureFixture) -> None:
    secret = "P-0123456789abcdef"
    try:
        raise KeyError(secret)
    except KeyError as exc:
        with caplog.at_level(logging.ERROR, logger="service.errors"):
            err = classify(exc)
    assert err.code == C.INTERNAL and err.reason == "INTERNAL"
    assert secret not in err.message
    assert err.metadata["ref"] in err.message
    assert "KeyError" in caplog.text and err.metadata["ref"] in caplog.text
    assert secret not in caplog.text


def test_status_carries_error_info() -> None:
    status = to_status(
        ServiceError(C.INVALID_ARGUMENT, "WRONG_DIMENSION", "bad", {"expected": "32"})
    )
    assert status.code == C.INVALID_ARGUMENT and status.details == "bad"
    ((key, value),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    rich = status_pb2.Status.FromString(value)
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "WRONG_DIMENSION",
        DOMAIN,
        {"expected": "32"},
    )


def test_resource_exhausted_carries_retry_info() -> None:
    status = to_status(ServiceError(C.RESOURCE_EXHAUSTED, "RATE_LIMITED", "slow down", retry_after=1.25))
    assert reason_from_trailing(status.trailing_metadata) == "RATE_LIMITED"
    assert retry_delay_from_trailing(status.trailing_metadata) == pytest.approx(1.25, abs=1e-9)
    rich = status_pb2.Status.FromString(status.trailing_metadata[0][1])
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in rich.details)
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (1, 250_000_000)
    # without a delay: no RetryInfo
    plain = to_status(ServiceError(C.RESOURCE_EXHAUSTED, "OVERLOADED", "busy"))
    assert retry_delay_from_trailing(plain.trailing_metadata) is None


def test_rate_limited_call_gives_the_client_a_retry_delay(index_dir, tmp_path) -> None:
    from service.background import BackgroundServer
    from service.client import CohortsimClient, CohortsimClientError

    from .security_env import write_tokens

    tokens = write_tokens(tmp_path / "tokens.json")
    with (
        BackgroundServer(index_dir, device="cpu", auth_tokens=tmp_path / "tokens.json", rate_limit=0.5) as srv,
        CohortsimClient(srv.target, token=tokens["clinician"]) as client,
        grpc.insecure_channel(srv.target) as channel,
    ):
        client.index_info()  # the burst of one call
        with pytest.raises(CohortsimClientError) as info:
            client.index_info()
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raw:
            stub.GetIndexInfo(
                cohortsim_pb2.GetIndexInfoRequest(),
                metadata=(("authorization", f"Bearer {tokens['clinician']}"),),
                timeout=10,
            )
    assert (info.value.code, info.value.reason) == ("RESOURCE_EXHAUSTED", "RATE_LIMITED")
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 2.0
    rich = status_pb2.Status.FromString(dict(raw.value.trailing_metadata())["grpc-status-details-bin"])
    error_info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(error_info) for d in rich.details)
    assert error_info.reason == "RATE_LIMITED" and "retry_after_ms" not in error_info.metadata


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def test_one_error_table_for_the_servicer_and_the_cli() -> None:
    # every typed error of encoders and indexing derives from CohortsimError, whose class
    # attributes are the only table: the servicer and the CLI both read them
    import encoders.evaluate  # noqa: F401  (defines more subclasses, if any)
    import indexing.errors as ie
    from encoders.errors import CohortsimError, RegionError
    from encoders.federated import FederationError
    from service.cli import _fail  # noqa: F401  (the CLI module imports cleanly)

    classes = _subclasses(CohortsimError)
    for cls in (DicomError, EncoderError, EncoderOutOfMemoryError, DimensionError, FilterError,
                ModelVersionError, QueryError, SnapshotError, UnknownStudyError, ie.StoreError,
                ie.StoreWriteError, ie.SnapshotWriteError):  # fmt: skip
        assert cls in classes, cls
    for cls in classes:
        if issubclass(cls, (DicomError, RegionError)):  # (reason, message)
            exc = cls("r", "msg")
        elif issubclass(cls, FederationError):  # (message, *, reason)
            exc = cls("msg", reason="r")
        else:
            exc = cls("msg")
        error = classify(exc)
        assert error.code == getattr(C, cls.status) and error.code != C.INTERNAL, cls
        assert error.reason == exc.reason_code and error.reason.isupper(), cls
        assert cls.exit_code in (1, 2)
