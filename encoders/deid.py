"""Pseudonymisation of patient and study identifiers with a per-site secret.

Pseudonyms are keyed HMAC-SHA256 digests with domain separation, so the same raw id maps
to the same pseudonym at one site (re-ingest, outcome linking) but cannot be reversed or
recomputed without the site secret, and a patient id can never collide with a study uid.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

__all__ = [
    "DEFAULT_SECRET_PATH",
    "ENV_VAR",
    "MIN_SECRET_LEN",
    "Pseudonymizer",
    "day_offset",
]

ENV_VAR = "COHORTSIM_SITE_SECRET"
DEFAULT_SECRET_PATH = Path("~/.config/cohortsim/site-secret")
MIN_SECRET_LEN = 16


class Pseudonymizer:
    """Maps raw identifiers to stable pseudonyms: ``P-<16 hex>`` and ``S-<24 hex>``.

    ``secret`` must be at least 16 bytes. Raw ids are stripped of surrounding whitespace
    and NUL padding first (DICOM pads values), so ``"SYN-00001 "`` and ``"SYN-00001"``
    map to the same pseudonym.
    """

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes | bytearray):
            raise TypeError(f"Pseudonymizer secret must be bytes, got {type(secret).__name__}")
        if len(secret) < MIN_SECRET_LEN:
            raise ValueError(
                f"Pseudonymizer secret is {len(secret)} bytes; use at least {MIN_SECRET_LEN} "
                "(e.g. 32 random bytes)"
            )
        self._secret = bytes(secret)

    def __repr__(self) -> str:  # never show the secret
        return "Pseudonymizer(<secret>)"

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
        if env:
            if len(env) < MIN_SECRET_LEN:
                raise ValueError(
                    f"${ENV_VAR} is {len(env)} characters; use at least {MIN_SECRET_LEN} "
                    "(e.g. the output of `openssl rand -hex 32`)"
                )
            return cls(env.encode("utf-8"))
        file = Path(path if path is not None else DEFAULT_SECRET_PATH).expanduser()
        if not file.exists():
            _create_secret_file(file)
        return cls(_read_secret_file(file).encode("utf-8"))


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
    try:
        st = file.stat()
    except OSError as e:
        raise PermissionError(f"cannot read the site secret {file}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PermissionError(f"site secret {file} is not a regular file")
    if st.st_mode & 0o077:
        raise PermissionError(
            f"site secret {file} is accessible by group/others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {file}` and retry"
        )
    text = file.read_text(encoding="utf-8").strip()
    if len(text) < MIN_SECRET_LEN:
        raise ValueError(
            f"site secret {file} holds {len(text)} characters; use at least {MIN_SECRET_LEN} "
            "(delete it to have a new one generated, which changes every pseudonym)"
        )
    return text


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
