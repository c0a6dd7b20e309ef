"""Reading secret files that only their owner may access (site secret, tokens, keys).

One check for every secret cohortsim reads: the path must be a regular file with no
group or other permission bits (``chmod 600``); anything else is refused with a message
that names the file, its mode and the fix.
"""

from __future__ import annotations

import stat
from pathlib import Path

__all__ = ["check_owner_only", "read_owner_only"]


def check_owner_only(path: Path | str, what: str) -> Path:
    """``path`` as a :class:`Path` if it is a regular file only its owner can access;
    :class:`PermissionError` naming ``what`` otherwise (also when it cannot be stat'ed)."""
    file = Path(path)
    try:
        st = file.stat()
    except OSError as exc:
        raise PermissionError(f"cannot read the {what} {file}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PermissionError(f"the {what} {file} is not a regular file")
    if st.st_mode & 0o077:
        raise PermissionError(
            f"the {what} {file} is accessible by group/others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {file}` and retry"
        )
    return file


def read_owner_only(path: Path | str, what: str) -> bytes:
    """The bytes of ``path`` after :func:`check_owner_only`; :class:`PermissionError`
    naming ``what`` when it fails or the file cannot be read."""
    file = check_owner_only(path, what)
    try:
        return file.read_bytes()
    except OSError as exc:
        raise PermissionError(f"cannot read the {what} {file}: {exc.strerror or exc}") from None
