"""Queries by PACS reference: ``SearchSimilar`` / ``EmbedStudy`` with a ``PacsStudy``.

The servicer calls :func:`resolve_search` / :func:`resolve_embed` before anything else:
the study is retrieved from the configured PACS (:func:`service.pacs.dicomweb.fetch_study_bytes`,
in memory only) and the request is rewritten as the same request with a ``DicomStudy``,
so reading, embedding, governance and errors are those of a DICOM upload. The retrieved
bytes live only in that request object, which is dropped when the call ends.

Errors (a :class:`~service.errors.ServiceError` each): FAILED_PRECONDITION ``NO_PACS``
(no ``serve --dicomweb``), INVALID_ARGUMENT ``INVALID_STUDY_INSTANCE_UID``, NOT_FOUND
``STUDY_NOT_IN_PACS``, UNAVAILABLE ``PACS_UNREACHABLE`` / ``PACS_HTTP_ERROR`` / ...,
DEADLINE_EXCEEDED ``PACS_TIMEOUT`` (the PACS did not answer within the call's deadline or
the configured timeout), PERMISSION_DENIED ``PACS_QUERY_NOT_ALLOWED`` for researchers
(the answer would tell whether a study exists in the hospital's PACS).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import grpc

from service.api import cohortsim_pb2 as pb
from service.errors import ServiceError, failed_precondition, invalid_argument
from service.pacs.dicomweb import DicomwebConfig, fetch_study_bytes
from service.pacs.errors import PacsError

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
DEADLINE_MARGIN_S = 0.5  # left of the caller's deadline for reading and embedding

_CODES = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "unusable": grpc.StatusCode.INVALID_ARGUMENT,
    "config": grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(exc: PacsError) -> ServiceError:
    """A :class:`PacsError` as the status the client gets."""
    return ServiceError(_CODES[exc.kind], exc.reason.upper(), str(exc))


def check_uid(ref: pb.PacsStudy) -> str:
    uid = ref.study_instance_uid.strip()
    if not uid or len(uid) > 64 or not _UID.match(uid):
        raise invalid_argument(
            "INVALID_STUDY_INSTANCE_UID",
            "pacs.study_instance_uid must be a DICOM UID (digits and dots, at most 64 characters)",
        )
    return uid


async def fetch(
    pacs: DicomwebConfig | None,
    ref: pb.PacsStudy,
    context: Any,
    *,
    max_files: int,
    restricted: bool,
) -> list[bytes]:
    """The study's files from the PACS within the call's deadline (see the module doc)."""
    if restricted:
        raise ServiceError(
            grpc.StatusCode.PERMISSION_DENIED,
            "PACS_QUERY_NOT_ALLOWED",
            "researchers query with an embedding or DICOM files, not with a PACS reference",
        )
    if pacs is None:
        raise failed_precondition(
            "NO_PACS",
            "this server has no PACS configured (cohortsim serve --dicomweb URL); send the "
            "study's DICOM files instead",
        )
    uid = check_uid(ref)
    budget = pacs.timeout_s
    remaining = context.time_remaining() if context is not None else None
    if remaining is not None:
        budget = min(budget, max(0.05, remaining - DEADLINE_MARGIN_S))
    loop = asyncio.get_running_loop()
    job = loop.run_in_executor(None, lambda: fetch_study_bytes(pacs, uid, timeout_s=budget))
    try:
        files = await asyncio.wait_for(job, timeout=budget)
    except TimeoutError:
        raise ServiceError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "PACS_TIMEOUT",
            f"the PACS at {pacs.label} did not answer within {budget:.1f} s",
        ) from None
    except PacsError as exc:
        raise status_of(exc) from None
    if len(files) > max_files:
        raise invalid_argument(
            "TOO_MANY_FILES",
            f"the study has {len(files)} instances in the PACS but this server reads at most "
            f"{max_files} per query",
            max_files=str(max_files),
        )
    return files


async def resolve_search(
    request: pb.SearchSimilarRequest, context: Any, *, pacs: DicomwebConfig | None,
    max_files: int, restricted: bool,
) -> pb.SearchSimilarRequest:
    """``request`` itself, or, for a ``pacs`` query, a copy that carries the retrieved
    study as ``dicom`` (with the same regions)."""
    if request.WhichOneof("query") != "pacs":
        return request
    files = await fetch(pacs, request.pacs, context, max_files=max_files, restricted=restricted)
    out = pb.SearchSimilarRequest()
    out.CopyFrom(request)
    out.dicom.files.extend(files)  # replaces the pacs member of the oneof
    out.dicom.regions.extend(request.pacs.regions)
    return out


async def resolve_embed(
    request: pb.EmbedStudyRequest, context: Any, *, pacs: DicomwebConfig | None,
    max_files: int, restricted: bool,
) -> pb.EmbedStudyRequest:
    """``request`` itself, or, when it names a PACS study, one with the retrieved files."""
    if not request.HasField("pacs"):
        return request
    if request.HasField("dicom") and (request.dicom.files or request.dicom.regions):
        raise invalid_argument("AMBIGUOUS_STUDY", "set dicom or pacs, not both")
    files = await fetch(pacs, request.pacs, context, max_files=max_files, restricted=restricted)
    return pb.EmbedStudyRequest(dicom=pb.DicomStudy(files=files, regions=request.pacs.regions))
