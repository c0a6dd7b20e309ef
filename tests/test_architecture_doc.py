"""docs/ARCHITECTURE.md names every module of encoders, indexing and service, so the page
that fixes the module contracts keeps up with the tree (generated stubs excepted)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _named(doc: str, path: Path) -> bool:
    rel = path.relative_to(ROOT)
    parts = rel.with_suffix("").parts
    names = {
        rel.as_posix(),  # encoders/dicom/reading.py
        ".".join(parts),  # encoders.dicom.reading
    }
    if len(parts) > 2:
        names.add(Path(*rel.parts[1:]).as_posix())  # dicom/reading.py
    else:
        names.add(f"`{rel.name}`")  # `losses.py` in a line about its package
    return any(n in doc for n in names)


def test_every_module_is_named_in_the_architecture_page() -> None:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = []
    for package in ("encoders", "indexing", "service"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name in ("__init__.py", "__main__.py") or re.search(r"_pb2(_grpc)?\.py$", path.name):
                continue
            if "__pycache__" in path.parts:
                continue
            if not _named(doc, path):
                missing.append(path.relative_to(ROOT).as_posix())
    assert missing == [], f"docs/ARCHITECTURE.md names no {missing}"
