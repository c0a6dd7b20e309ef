"""DICOMweb: find studies with QIDO-RS and retrieve them with WADO-RS (``dicomweb-client``).

Two uses: :func:`fetch_study` retrieves a study into a private spool, resumably (an
instance already there is not fetched again), for :func:`service.pacs.pull.pull_studies`
(``cohortsim ingest --dicomweb URL``); :func:`fetch_study_bytes` (a query by PACS
reference) retrieves one study into memory only.

Files in the spool are named by a hash of their UIDs (never the UIDs themselves), the
spool is mode 0700, and a study's files are removed once it is ingested or rejected.
Errors are :class:`~service.pacs.errors.PacsError` naming the PACS by URL, never a study.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from encoders.owner_only import read_owner_only
from service.pacs.errors import PacsError, pacs_missing

log = logging.getLogger(__name__)

ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)  # as stored: no transcoding on the PACS
QIDO_PAGE = 1000
DEFAULT_TIMEOUT_S = 30.0
READY_DIR = "ready"  # spool/ready/<study hash>/: fetched studies waiting for the ingest


def uid_hash(uid: str) -> str:
    """A file-name-safe, non-identifying name for a UID (sha256, 32 hex)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class DicomwebConfig:
    """Where the PACS's DICOMweb service is and how to log in.

    ``user`` + ``password_file``: HTTP basic; ``token_file``: a bearer token; both files
    must be owner-only (mode 0600). ``ca_file``: the CA bundle that signs an https PACS.
    ``timeout_s``: the longest one HTTP read may wait.
    """

    url: str
    user: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None
    ca_file: Path | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def label(self) -> str:
        """The URL without credentials or query: how messages name the PACS."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))

    def check(self) -> None:
        """Refuse a bad URL or credential files now (``PacsError`` kind ``config``)."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsError(
                "config", "invalid_pacs_url",
                f"{self.url!r} is not an http(s) URL of a DICOMweb service "
                "(e.g. http://pacs:8042/dicom-web)",
            )
        if (self.user is None) != (self.password_file is None):
            raise PacsError("config", "invalid_pacs_auth", "give both the PACS user and its password file (or neither)")
        if self.token_file is not None and self.user is not None:
            raise PacsError("config", "invalid_pacs_auth", "give a bearer token file or a user and password, not both")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise PacsError("config", "invalid_pacs_ca", f"the CA file {self.ca_file} does not exist")

    def client(self, *, timeout_s: float | None = None, retry: bool = True) -> Any:
        """A ``DICOMwebClient`` for this PACS (credentials read now)."""
        self.check()
        try:
            import requests
            from dicomweb_client.api import DICOMwebClient
        except ImportError:
            raise pacs_missing("dicomweb-client") from None
        session = requests.Session()
        headers: dict[str, str] = {}
        try:
            if self.user is not None and self.password_file is not None:
                password = read_owner_only(self.password_file, "PACS password file")
                session.auth = (self.user, password.decode().strip())
            if self.token_file is not None:
                token = read_owner_only(self.token_file, "PACS token file").decode().strip()
                headers["Authorization"] = f"Bearer {token}"
        except PermissionError as exc:
            raise PacsError("config", "invalid_pacs_auth", str(exc)) from None
        if self.ca_file is not None:
            session.verify = str(self.ca_file)
        client = DICOMwebClient(
            self.url, session=session, headers=headers or None,
            timeout=timeout_s if timeout_s is not None else self.timeout_s,
        )
        # the PACS being down is reported at once; a busy one (429/503) is retried a little
        client.set_http_retry_params(retry=retry, max_attempts=3, wait_exponential_multiplier=200)
        return client


def translate(exc: BaseException, cfg: DicomwebConfig) -> PacsError:
    """A requests / HTTP failure as a :class:`PacsError` naming the PACS."""
    import requests

    where = cfg.label
    if isinstance(exc, PacsError):
        return exc
    if isinstance(exc, requests.Timeout):
        return PacsError("deadline", "pacs_timeout", f"the PACS at {where} did not answer in time")
    if isinstance(exc, requests.exceptions.SSLError):
        return PacsError("unavailable", "pacs_tls_failed", f"TLS with the PACS at {where} failed (check --pacs-ca-file)")
    if isinstance(exc, requests.ConnectionError):
        return PacsError("unavailable", "pacs_unreachable", f"cannot reach the PACS at {where} (connection failed)")
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 404:
            return PacsError("not_found", "study_not_in_pacs", f"the study is not in the PACS at {where}")
        if status in (401, 403):
            return PacsError("unavailable", "pacs_refused_credentials", f"the PACS at {where} refused the credentials (HTTP {status})")
        return PacsError("unavailable", "pacs_http_error", f"the PACS at {where} answered HTTP {status}")
    return PacsError("unavailable", "pacs_failed", f"the PACS at {where} failed ({type(exc).__name__})")


def _value(item: dict[str, Any], tag: str) -> str | None:
    """The first value of a DICOM JSON attribute (QIDO result), or None."""
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def find_studies(
    cfg: DicomwebConfig,
    *,
    since: date | None = None,
    modality: str | None = None,
    client: Any = None,
) -> list[str]:
    """StudyInstanceUIDs the PACS lists (QIDO-RS), on or after ``since``, with ``modality``
    in the study; paged ``QIDO_PAGE`` at a time."""
    client = client or cfg.client()
    filters: dict[str, Any] = {}
    if since is not None:
        filters["StudyDate"] = f"{since:%Y%m%d}-"
    if modality:
        filters["ModalitiesInStudy"] = modality.upper()
    found: list[str] = []
    seen: set[str] = set()
    offset = 0
    try:
        while True:
            page = client.search_for_studies(
                search_filters=filters or None, fields=["StudyInstanceUID"],
                limit=QIDO_PAGE, offset=offset,
            )
            fresh = [u for u in (_value(p, "0020000D") for p in page) if u and u not in seen]
            found.extend(fresh)
            seen.update(fresh)
            if len(page) < QIDO_PAGE or not fresh:  # a server that ignores offset repeats itself
                return found
            offset += len(page)
    except Exception as exc:
        raise translate(exc, cfg) from None


def list_instances(cfg: DicomwebConfig, study_uid: str, *, client: Any = None) -> list[tuple[str, str]]:
    """``(SeriesInstanceUID, SOPInstanceUID)`` of every instance of one study (QIDO-RS);
    ``PacsError`` ``not_found`` when the PACS lists none."""
    client = client or cfg.client()
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    offset = 0
    try:
        while True:
            page = client.search_for_instances(
                study_instance_uid=study_uid, fields=["SeriesInstanceUID", "SOPInstanceUID"],
                limit=QIDO_PAGE, offset=offset,
            )
            fresh = []
            for item in page:
                series, sop = _value(item, "0020000E"), _value(item, "00080018")
                if series and sop and sop not in seen:
                    fresh.append((series, sop))
                    seen.add(sop)
            out.extend(fresh)
            if len(page) < QIDO_PAGE or not fresh:
                break
            offset += len(page)
    except Exception as exc:
        raise translate(exc, cfg) from None
    if not out:
        raise PacsError("not_found", "study_not_in_pacs", f"the study is not in the PACS at {cfg.label}")
    return out


def dataset_bytes(ds: Any) -> bytes:
    """A retrieved pydicom dataset as DICOM Part 10 bytes."""
    import pydicom

    buf = io.BytesIO()
    try:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    except (ValueError, AttributeError):  # no usable file meta: write as received
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds)
    return buf.getvalue()


def _write_dataset(folder: Path, ds: Any) -> bool:
    """Write a retrieved dataset as ``folder/<series hash>/<instance hash>.dcm``
    atomically (tmp + rename); False when it carries no instance UID."""
    import pydicom

    sop = str(getattr(ds, "SOPInstanceUID", "") or "")
    series = str(getattr(ds, "SeriesInstanceUID", "") or "")
    if not sop:
        return False
    sub = folder / uid_hash(series)
    sub.mkdir(exist_ok=True, mode=0o700)
    path = sub / f"{uid_hash(sop)}.dcm"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    except (ValueError, AttributeError):  # no usable file meta: write as received
        pydicom.dcmwrite(tmp, ds)
    os.replace(tmp, path)
    return True


@dataclass
class FetchResult:
    """One study's retrieval into the spool: its folder and what was fetched or reused."""

    folder: Path
    fetched: int = 0
    reused: int = 0


def fetch_study(
    cfg: DicomwebConfig,
    study_uid: str,
    dest: Path,
    *,
    client: Any = None,
    progress: Callable[[int], None] | None = None,
) -> FetchResult:
    """Retrieve the instances of one study that ``dest`` lacks (WADO-RS) into ``dest``.

    ``dest/<series hash>/<instance hash>.dcm``, each written atomically as it arrives. A
    study of which nothing is held comes in one streamed request (``iter_study``, no QIDO
    listing); otherwise QIDO-RS lists its instances, a series of which nothing is held
    comes in one streamed request and the missing instances of a partly held series one
    by one. ``progress(n)`` after each instance.
    """
    client = client or cfg.client()
    result = FetchResult(dest)
    if not (dest.is_dir() and any(dest.rglob("*.dcm"))):
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            for ds in client.iter_study(study_uid, media_types=ANY_TRANSFER_SYNTAX):
                if _write_dataset(dest, ds):
                    result.fetched += 1
                    if progress is not None:
                        progress(1)
        except Exception as exc:
            raise translate(exc, cfg) from None
        if not result.fetched:
            raise PacsError("not_found", "study_not_in_pacs", f"the study is not in the PACS at {cfg.label}")
        return result
    instances = list_instances(cfg, study_uid, client=client)
    by_series: dict[str, list[str]] = {}
    for series, sop in instances:
        by_series.setdefault(series, []).append(sop)
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        for series, sops in by_series.items():
            folder = dest / uid_hash(series)
            folder.mkdir(exist_ok=True, mode=0o700)
            missing = [s for s in sops if not (folder / f"{uid_hash(s)}.dcm").exists()]
            result.reused += len(sops) - len(missing)
            if not missing:
                continue
            if len(missing) == len(sops):
                datasets: Iterable[Any] = client.iter_series(
                    study_uid, series, media_types=ANY_TRANSFER_SYNTAX
                )
            else:
                datasets = (
                    client.retrieve_instance(study_uid, series, sop, media_types=ANY_TRANSFER_SYNTAX)
                    for sop in missing
                )
            for ds in datasets:
                if _write_dataset(dest, ds):
                    result.fetched += 1
                    if progress is not None:
                        progress(1)
    except PacsError:
        raise
    except Exception as exc:
        raise translate(exc, cfg) from None
    return result


def fetch_study_bytes(cfg: DicomwebConfig, study_uid: str, *, timeout_s: float | None = None) -> list[bytes]:
    """Every instance of one study as Part 10 bytes, in memory only (WADO-RS, one request).

    ``PacsError``: ``not_found`` (the PACS does not hold it), ``unavailable`` (down, or an
    HTTP error), ``deadline`` (one read took longer than ``timeout_s``).
    """
    client = cfg.client(timeout_s=timeout_s, retry=False)
    try:
        datasets = client.retrieve_study(study_uid, media_types=ANY_TRANSFER_SYNTAX)
        files = [dataset_bytes(ds) for ds in datasets]
    except Exception as exc:
        raise translate(exc, cfg) from None
    if not files:
        raise PacsError("not_found", "study_not_in_pacs", f"the study is not in the PACS at {cfg.label}")
    return files


def private_dir(path: Path) -> Path:
    """``path`` created (with parents) and set to mode 0700."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
