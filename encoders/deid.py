"""Pseudonymisation of patient and study identifiers with a per-site secret.

Pseudonyms are keyed HMAC-SHA256 digests with domain separation, so the same raw id maps
to the same pseudonym at one site (re-ingest, outcome linking) but cannot be reversed or
recomputed without the site secret, and a patient id can never collide with a study uid.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from encoders.deid_table import BASIC_PROFILE_ACTIONS, BASIC_PROFILE_REPEATING
from encoders.owner_only import read_owner_only

__all__ = [
    "ANCHORS_ENV_VAR",
    "ANCHORS_FILE_NAME",
    "BASIC_PROFILE_KEYWORDS",
    "DEFAULT_SECRET_PATH",
    "ENV_VAR",
    "MIN_SECRET_LEN",
    "RETAINED_WITH_OPTIONS",
    "DateAnchors",
    "Pseudonymizer",
    "clean_descriptor",
    "day_offset",
    "identifying_values",
    "is_basic_profile_tag",
]

ENV_VAR = "COHORTSIM_SITE_SECRET"
DEFAULT_SECRET_PATH = Path("~/.config/cohortsim/site-secret")
MIN_SECRET_LEN = 16
ANCHORS_ENV_VAR = "COHORTSIM_DATE_ANCHORS"
ANCHORS_FILE_NAME = "date-anchors.json"
"""The site-side file of per-patient date anchors (see :class:`DateAnchors`): at
``$COHORTSIM_DATE_ANCHORS`` if set, else beside the site secret file (for a secret from
the environment: beside the default secret path)."""


class Pseudonymizer:
    """Maps raw identifiers to stable pseudonyms: ``P-<16 hex>`` and ``S-<24 hex>``.

    ``secret`` must be at least 16 bytes. Raw ids are stripped of surrounding whitespace
    and NUL padding first (DICOM pads values), so ``"SYN-00001 "`` and ``"SYN-00001"``
    map to the same pseudonym.
    """

    def __init__(self, secret: bytes, *, anchors_path: Path | None = None) -> None:
        if not isinstance(secret, bytes | bytearray):
            raise TypeError(f"Pseudonymizer secret must be bytes, got {type(secret).__name__}")
        if len(secret) < MIN_SECRET_LEN:
            raise ValueError(
                f"Pseudonymizer secret is {len(secret)} bytes; use at least {MIN_SECRET_LEN} "
                "(e.g. 32 random bytes)"
            )
        self._secret = bytes(secret)
        self.anchors_path = Path(anchors_path).expanduser() if anchors_path is not None else None
        self._anchors: DateAnchors | None = None

    def __repr__(self) -> str:  # never show the secret
        return "Pseudonymizer(<secret>)"

    @property
    def date_anchors(self) -> DateAnchors:
        """This site's :class:`DateAnchors`: in ``anchors_path`` when set (as
        :meth:`from_env_or_file` does), else in memory for the life of this object."""
        if self._anchors is None:
            self._anchors = DateAnchors(self, self.anchors_path)
        return self._anchors

    def _digest(self, domain: bytes, raw: str) -> str:
        if not isinstance(raw, str):
            raise TypeError(f"identifier must be str, got {type(raw).__name__}")
        value = raw.strip().strip("\x00").strip()
        if not value:
            raise ValueError(f"empty {domain.decode()} identifier; cannot pseudonymise it")
        msg = domain + b"\x00" + value.encode("utf-8")
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def patient(self, raw_id: str) -> str:
        """``"P-" + 16 hex``: the pseudonym of a raw PatientID."""
        return "P-" + self._digest(b"patient", raw_id)[:16]

    def study(self, raw_uid: str) -> str:
        """``"S-" + 24 hex``: the pseudonym of a raw StudyInstanceUID."""
        return "S-" + self._digest(b"study", raw_uid)[:24]

    def site(self, name: str) -> str:
        """``"site-" + 15 hex``: the pseudonym of a site's name, as an encoder card of
        federated training lists it (15 hex digits fit a signed 64-bit integer)."""
        return "site-" + self._digest(b"site", name)[:15]

    @classmethod
    def from_env_or_file(cls, path: Path | None = None) -> Pseudonymizer:
        """The site pseudonymiser.

        The secret is ``$COHORTSIM_SITE_SECRET`` (any string of at least 16 characters,
        used as UTF-8 bytes; an empty variable counts as unset), else the content of
        ``path`` (default ``~/.config/cohortsim/site-secret``). The file is created on
        first use with 32 random bytes, hex-encoded, mode 0600 (its folder 0700). A file
        that group or others may read or write is refused with ``PermissionError``. The
        file's text is used exactly like the variable, so copying it into
        ``$COHORTSIM_SITE_SECRET`` gives the same pseudonyms.
        """
        env = os.environ.get(ENV_VAR)
        file = Path(path if path is not None else DEFAULT_SECRET_PATH).expanduser()
        anchors = os.environ.get(ANCHORS_ENV_VAR)
        anchors_path = Path(anchors) if anchors else None
        if env:
            if len(env) < MIN_SECRET_LEN:
                raise ValueError(
                    f"${ENV_VAR} is {len(env)} characters; use at least {MIN_SECRET_LEN} "
                    "(e.g. the output of `openssl rand -hex 32`)"
                )
            default = DEFAULT_SECRET_PATH.expanduser().with_name(ANCHORS_FILE_NAME)
            return cls(env.encode("utf-8"), anchors_path=anchors_path or default)
        if not file.exists():
            _create_secret_file(file)
        return cls(
            _read_secret_file(file).encode("utf-8"),
            anchors_path=anchors_path or file.with_name(ANCHORS_FILE_NAME),
        )


def _create_secret_file(file: Path) -> None:
    """Write a fresh secret atomically (never replacing one another process wrote)."""
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (secrets.token_bytes(32).hex() + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, file)  # atomic; fails if another process created it first
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _read_secret_file(file: Path) -> str:
    raw = read_owner_only(file, "site secret")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"site secret {file} is not UTF-8 text") from None
    if len(text) < MIN_SECRET_LEN:
        raise ValueError(
            f"site secret {file} holds {len(text)} characters; use at least {MIN_SECRET_LEN} "
            "(delete it to have a new one generated, which changes every pseudonym)"
        )
    return text


class DateAnchors:
    """Each patient's anchor date, kept site-side, so day offsets agree across ingests.

    The store keeps ``study_day`` = days from the patient's anchor: the date of the
    earliest study of that patient in the first ingest that saw the patient. The
    anchor never moves: a study found later that is older than the anchor gets a
    negative offset (re-anchoring would change offsets already stored and released).

    Privacy: no date enters the store, only whole-day differences within one patient.
    The anchors live in a JSON file beside the site secret (mode 0600, folder 0700,
    refused when group/others may access it), never in the store, and even that file
    holds no date or id in the clear: each entry is keyed by an HMAC of the patient id
    (a different domain than the ``P-`` pseudonym, so the file cannot be joined to the
    store without the secret) and its value is the date's day number plus a keyed
    48-bit per-patient mask (a one-time pad: each mask hides exactly one value, and
    2**48 is far wider than any range of dates, so without the secret the values are
    indistinguishable from random numbers). Reading and updating the file happen under
    an exclusive lock, and writes are atomic (temp file + rename), so concurrent ingests
    agree on one anchor per patient. With ``path`` None the anchors live in memory.
    """

    _FORMAT = "cohortsim-date-anchors"
    _MASK_BITS = 48

    def __init__(self, pseudonymizer: Pseudonymizer, path: Path | None = None) -> None:
        self._p = pseudonymizer
        self.path = Path(path).expanduser() if path is not None else None
        self._memory: dict[str, int] = {}

    def _key(self, raw_id: str) -> str:
        return self._p._digest(b"date-anchor-key", raw_id)[:32]

    def _mask(self, raw_id: str) -> int:
        digest = self._p._digest(b"date-anchor-mask", raw_id)
        return int(digest[: self._MASK_BITS // 4], 16)

    def resolve(self, earliest: Mapping[str, _dt.date]) -> dict[str, _dt.date]:
        """The anchor of each raw patient id in ``earliest``: the recorded one, else
        ``earliest[id]`` (the patient's earliest study date now), which is recorded."""
        if not earliest:
            return {}
        with self._locked() as table:
            out: dict[str, _dt.date] = {}
            for raw_id, first in earliest.items():
                key, mask = self._key(raw_id), self._mask(raw_id)
                if key not in table:
                    table[key] = first.toordinal() + mask
                out[raw_id] = self._unmask(table[key], mask)
            return out

    def _unmask(self, value: Any, mask: int) -> _dt.date:
        ordinal = value - mask if isinstance(value, int) else 0
        if not 1 <= ordinal <= _dt.date.max.toordinal():
            raise ValueError(
                f"date anchors file {self.path or '<memory>'} holds an entry that does not "
                "decode with this site secret (was the secret changed?); keep the file "
                "that belongs to this secret"
            )
        return _dt.date.fromordinal(ordinal)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, int]]:
        """The anchor table, read under an exclusive lock and written back atomically
        if it changed."""
        if self.path is None:
            yield self._memory
            return
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            table = self._read(path)
            before = dict(table)
            yield table
            if table != before:
                self._write(path, table)
        finally:
            os.close(lock_fd)  # releases the lock

    def _read(self, path: Path) -> dict[str, int]:
        if not path.exists():
            return {}
        raw = read_owner_only(path, "date anchors file")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except ValueError as e:
            raise ValueError(
                f"date anchors file {path} cannot be read ({type(e).__name__}); restore it "
                "from a backup (deleting it restarts every patient's day offsets)"
            ) from None
        table = doc.get("anchors") if isinstance(doc, dict) else None
        if not isinstance(table, dict) or doc.get("format") != self._FORMAT:
            raise ValueError(f"{path} is not a cohortsim date anchors file")
        return {str(k): v for k, v in table.items() if isinstance(v, int)}

    def _write(self, path: Path, table: dict[str, int]) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        doc = {"format": self._FORMAT, "version": 1, "anchors": dict(sorted(table.items()))}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (json.dumps(doc, indent=0) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)


def day_offset(date: _dt.date, first_date: _dt.date) -> int:
    """Whole days from ``first_date`` to ``date`` (negative if earlier).

    The only use of study dates: the store keeps day offsets, never dates.
    """
    if isinstance(date, _dt.datetime):
        date = date.date()
    if isinstance(first_date, _dt.datetime):
        first_date = first_date.date()
    if not isinstance(date, _dt.date) or not isinstance(first_date, _dt.date):
        raise TypeError("day_offset expects two datetime.date values")
    return (date - first_date).days


# ------------------------------------------------------------------ PS3.15 Basic Profile

BASIC_PROFILE_KEYWORDS: frozenset[str] = frozenset(BASIC_PROFILE_ACTIONS)
"""Keywords of the attributes that DICOM PS3.15 Annex E, Table E.1-1 lists for the Basic
Application Level Confidentiality Profile (names, ids, dates and times, addresses,
accession, institution, physicians and operators, device serials and UIDs, free-text
comments and descriptions), generated from the standard's table into
:mod:`encoders.deid_table` (edition and source in its header). Together with private tags (odd groups) and the curve /
overlay groups (50xx, 60xx data and comments, see :func:`is_basic_profile_tag`) nothing
from this list is copied into the store or a log. Reading some of them is necessary
(PatientID and StudyInstanceUID become keyed pseudonyms, StudyDate a day offset,
PatientWeight and the injection times feed the PET SUV factor) but their values are
never kept."""

RETAINED_WITH_OPTIONS: dict[str, str] = {
    "SoftwareVersions": "Retain Device Identity Option (harmonisation needs the software "
    "version; the device serial number and station name are not kept)",
    "ProtocolName": "Clean Descriptors Option (kept only when clean_descriptor() finds no "
    "identifying value in it)",
}
"""The two Basic-profile attributes the store keeps, each under the PS3.15 option that
allows it."""

_DESCRIPTOR_CHARS = re.compile(r"^[A-Za-z0-9 _+\-./()&:,#%*=\[\]]+$")
_LONG_NUMBER = re.compile(r"[0-9]{5,}")
_NUMERIC_ONLY = re.compile(r"^[0-9 .,:;/+\-]*$")
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC", "AE", "CS"})


def is_basic_profile_tag(tag: int) -> bool:
    """True for a tag whose value the Basic profile removes or replaces: a keyword of
    :data:`BASIC_PROFILE_KEYWORDS`, any private tag (odd group), curve data (50xx) and
    overlay data / comments (60xx,3000 / 60xx,4000)."""
    from pydicom.datadict import keyword_for_tag

    group, element = tag >> 16, tag & 0xFFFF
    if group % 2 == 1:
        return True
    for g, e, group_mask, element_mask, _ in BASIC_PROFILE_REPEATING:
        if group & group_mask == g and element & element_mask == e:
            return True
    return keyword_for_tag(tag) in BASIC_PROFILE_KEYWORDS


def identifying_values(ds: Any, *, exclude: frozenset[str] = frozenset()) -> set[str]:
    """Lower-cased text values (3+ characters, not just digits and punctuation) of the
    standard Basic-profile text elements of a pydicom dataset (nested ones included),
    person names also split into their components: what a descriptor must not contain.
    Elements whose keyword is in ``exclude`` are left out (the descriptor itself)."""
    out: set[str] = set()
    for elem in ds.iterall() if hasattr(ds, "iterall") else ():
        try:
            tag = int(elem.tag)
            if elem.VR not in _TEXT_VRS or (tag >> 16) % 2 or not is_basic_profile_tag(tag):
                continue  # private elements are never kept, but too noisy to match against
            if elem.keyword in exclude:
                continue
            value = elem.value
        except Exception:
            continue
        values = value if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue" else [value]
        for v in values:
            text = v.decode("latin-1", "replace") if isinstance(v, bytes) else str(v)
            parts = [text, *re.split(r"[\^=]", text)] if elem.VR == "PN" else [text]
            for p in parts:
                p = " ".join(p.split()).lower()
                if 3 <= len(p) <= 256 and not _NUMERIC_ONLY.match(p):
                    out.add(p)
    return out


def clean_descriptor(value: str, identifying: set[str]) -> str | None:
    """``value`` (a short descriptor such as a protocol name) if it looks safe to keep,
    else None: printable ASCII of a descriptor's usual characters, at most 64 of them, no
    run of 5+ digits (ids, dates) and none of the ``identifying`` values of its dataset
    (see :func:`identifying_values`) inside it. Best effort: a descriptor typed by hand
    can still name a person in a way no rule catches, so only few are kept."""
    text = " ".join(str(value).split())
    if not text or len(text) > 64 or not _DESCRIPTOR_CHARS.match(text):
        return None
    if _LONG_NUMBER.search(text):
        return None
    low = text.lower()
    if any(v in low for v in identifying):
        return None
    return text
