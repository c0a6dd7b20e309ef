"""encoders.deid: keyed pseudonyms and the site secret."""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
from pathlib import Path

import pytest

from encoders.deid import ENV_VAR, Pseudonymizer, day_offset

SECRET = b"0123456789abcdef-site-a"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_format_and_determinism() -> None:
    a, b = Pseudonymizer(SECRET), Pseudonymizer(SECRET)
    assert re.fullmatch(r"P-[0-9a-f]{16}", a.patient("SYN-00001"))
    assert re.fullmatch(r"S-[0-9a-f]{24}", a.study("1.2.3.4"))
    assert a.patient("SYN-00001") == b.patient("SYN-00001")
    assert a.study("1.2.3.4") == b.study("1.2.3.4")
    assert a.patient("SYN-00001") != a.patient("SYN-00002")
    # DICOM padding does not change the pseudonym.
    assert a.patient("SYN-00001 ") == a.patient("SYN-00001")
    assert a.study("1.2.3.4\x00") == a.study("1.2.3.4")
    # Domain separation: the same string as patient and as study gives unrelated digests.
    assert a.patient("1.2.3")[2:] != a.study("1.2.3")[2:18]
    assert "0123456789" not in repr(a)


def test_different_secrets_differ() -> None:
    a, b = Pseudonymizer(SECRET), Pseudonymizer(SECRET + b"!")
    assert a.patient("SYN-00001") != b.patient("SYN-00001")
    assert a.study("1.2.3.4") != b.study("1.2.3.4")


def test_bad_secret_and_ids() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        Pseudonymizer(b"short")
    with pytest.raises(TypeError):
        Pseudonymizer("a string secret, not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        Pseudonymizer(SECRET).patient("  ")


def test_secret_file_created_0600(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "cohortsim" / "site-secret"
    p1 = Pseudonymizer.from_env_or_file(path)
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", text)
    p2 = Pseudonymizer.from_env_or_file(path)
    assert p1.patient("x1") == p2.patient("x1")
    assert [f.name for f in path.parent.iterdir()] == ["site-secret"]  # no temp files left


def test_secret_file_default_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    Pseudonymizer.from_env_or_file()
    assert (tmp_path / ".config" / "cohortsim" / "site-secret").exists()


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o640, 0o620])
def test_group_or_world_accessible_file_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "site-secret"
    path.write_text("f" * 64)
    os.chmod(path, mode)
    with pytest.raises(PermissionError, match="chmod 600"):
        Pseudonymizer.from_env_or_file(path)
    os.chmod(path, 0o600)
    Pseudonymizer.from_env_or_file(path)


def test_short_secret_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "site-secret"
    path.write_text("short")
    os.chmod(path, 0o600)
    with pytest.raises(ValueError, match="at least 16"):
        Pseudonymizer.from_env_or_file(path)


def test_env_var_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "site-secret"
    file_p = Pseudonymizer.from_env_or_file(path)
    monkeypatch.setenv(ENV_VAR, "an environment secret of some length")
    env_p = Pseudonymizer.from_env_or_file(path)
    assert env_p.patient("SYN-1") == Pseudonymizer(b"an environment secret of some length").patient(
        "SYN-1"
    )
    assert env_p.patient("SYN-1") != file_p.patient("SYN-1")
    assert not (tmp_path / "other").exists()
    Pseudonymizer.from_env_or_file(tmp_path / "other")  # env set: no file is created
    assert not (tmp_path / "other").exists()
    # The file's text used as the variable gives the same pseudonyms.
    monkeypatch.setenv(ENV_VAR, path.read_text().strip())
    assert Pseudonymizer.from_env_or_file().patient("SYN-1") == file_p.patient("SYN-1")
    monkeypatch.setenv(ENV_VAR, "too-short")
    with pytest.raises(ValueError, match=ENV_VAR):
        Pseudonymizer.from_env_or_file(path)


def test_day_offset() -> None:
    first = dt.date(2020, 1, 1)
    assert day_offset(dt.date(2020, 3, 1), first) == 60
    assert day_offset(first, first) == 0
    assert day_offset(dt.date(2019, 12, 31), first) == -1
    assert day_offset(dt.datetime(2020, 1, 2, 23, 0), first) == 1


# ------------------------------------------------------------------ PS3.15 Basic Profile


def test_basic_profile_keywords_are_real_and_cover_the_issue_list() -> None:
    from pydicom.datadict import tag_for_keyword

    from encoders.deid import BASIC_PROFILE_KEYWORDS, is_basic_profile_tag

    assert all(tag_for_keyword(k) is not None for k in BASIC_PROFILE_KEYWORDS)
    for kw in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "AccessionNumber",
        "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName",
        "OperatorsName", "DeviceSerialNumber", "StationName", "ImageComments", "StudyDescription",
        "SeriesDescription", "StudyInstanceUID", "StudyDate", "OtherPatientIDs", "PatientWeight",
    ):  # fmt: skip
        assert kw in BASIC_PROFILE_KEYWORDS, kw
    assert is_basic_profile_tag(0x00091010)  # private
    assert is_basic_profile_tag(0x60003000)  # overlay data
    assert not is_basic_profile_tag(0x00080070)  # Manufacturer
    assert not is_basic_profile_tag(0x00180060)  # KVP


def test_basic_profile_is_the_whole_2024b_table() -> None:
    from pydicom.datadict import tag_for_keyword

    from encoders.deid import BASIC_PROFILE_KEYWORDS, RETAINED_WITH_OPTIONS, is_basic_profile_tag
    from encoders.deid_table import BASIC_PROFILE_ACTIONS, EDITION

    assert EDITION == "2024b"
    # Table E.1-1 of 2024b: 617 rows of one tag in the source + 9 supplemented (+3 repeating
    # groups); a dropped row
    # (a typo, an edit by hand, a broken source) fails here
    assert len(BASIC_PROFILE_KEYWORDS) >= 626
    for kw in (
        "StationAETitle", "RequestedSeriesDescription", "ReasonForVisit",
        "UniqueDeviceIdentifier", "RadiopharmaceuticalStartDateTime", "SoftwareVersions",
        "PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber", "InstitutionName",
    ):  # fmt: skip
        assert kw in BASIC_PROFILE_KEYWORDS, kw
        tag = tag_for_keyword(kw)
        assert tag is not None and is_basic_profile_tag(tag), kw
    assert BASIC_PROFILE_ACTIONS["PatientName"] == "Z"
    assert BASIC_PROFILE_ACTIONS["StudyInstanceUID"] == "U"
    assert set(BASIC_PROFILE_ACTIONS.values()) <= {"D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
    assert set(RETAINED_WITH_OPTIONS) <= BASIC_PROFILE_KEYWORDS
    assert is_basic_profile_tag(0x50021234)  # curve data (50xx,eeee)
    assert is_basic_profile_tag(0x60024000)  # overlay comments (60xx,4000)
    assert not is_basic_profile_tag(0x60020010)  # overlay rows


def test_generated_table_equals_the_generator_output() -> None:
    pytest.importorskip(
        "dicomanonymizer", reason="dicom-anonymizer (the table's source, dev extra) is not installed"
    )
    from encoders import _deid_table_gen as gen

    text = gen.render(*gen.load_source())
    assert gen.TARGET.read_text(encoding="utf-8") == text, "run python -m encoders._deid_table_gen"


def test_clean_descriptor() -> None:
    import pydicom
    from pydicom.dataset import Dataset

    from encoders.deid import clean_descriptor, identifying_values

    ds = Dataset()
    ds.PatientName = "Doe^Jonathan"
    ds.InstitutionName = "Faketown General"
    ds.ProtocolName = "ignored itself"
    ds.KVP = "120"
    ids = identifying_values(ds, exclude=frozenset({"ProtocolName"}))
    assert {"doe", "jonathan", "faketown general"} <= ids and "ignored itself" not in ids
    assert clean_descriptor("Chest  CT 1.0 B30f", ids) == "Chest CT 1.0 B30f"
    assert clean_descriptor("DOE chest", ids) is None  # a name component
    assert clean_descriptor("Faketown General protocol", ids) is None
    assert clean_descriptor("chest 20190304", ids) is None  # a date
    assert clean_descriptor("acc 123456", ids) is None  # an id
    assert clean_descriptor("x" * 65, ids) is None
    assert clean_descriptor("Thorax <script>", ids) is None
    assert isinstance(pydicom.__version__, str)
