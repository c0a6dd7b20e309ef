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
import re
import secrets
import stat
from pathlib import Path
from typing import Any

__all__ = [
    "BASIC_PROFILE_KEYWORDS",
    "DEFAULT_SECRET_PATH",
    "ENV_VAR",
    "MIN_SECRET_LEN",
    "RETAINED_WITH_OPTIONS",
    "Pseudonymizer",
    "clean_descriptor",
    "day_offset",
    "identifying_values",
    "is_basic_profile_tag",
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


# ------------------------------------------------------------------ PS3.15 Basic Profile

BASIC_PROFILE_KEYWORDS: frozenset[str] = frozenset(
    (
        "AccessionNumber", "AcquisitionComments", "AcquisitionContextSequence", "AcquisitionDate",
        "AcquisitionDateTime", "AcquisitionDeviceProcessingDescription",
        "AcquisitionDeviceTypeCodeSequence", "AcquisitionProtocolDescription", "AcquisitionTime",
        "AcquisitionUID", "ActualHumanPerformersSequence", "AdditionalPatientHistory",
        "AddressTrial", "AdmissionID", "AdmittingDate", "AdmittingDiagnosesCodeSequence",
        "AdmittingDiagnosesDescription", "AdmittingTime", "AffectedSOPInstanceUID", "Allergies",
        "Arbitrary", "AuthorObserverSequence", "BranchOfService", "CassetteID",
        "ClinicalTrialCoordinatingCenterName",
        "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
        "ClinicalTrialProtocolEthicsCommitteeName", "ClinicalTrialProtocolID",
        "ClinicalTrialProtocolName", "ClinicalTrialSeriesDescription", "ClinicalTrialSeriesID",
        "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSponsorName",
        "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
        "ClinicalTrialTimePointDescription", "ClinicalTrialTimePointID",
        "CommentsOnThePerformedProcedureStep", "ConcatenationUID",
        "ConfidentialityConstraintOnPatientDataDescription",
        "ConsultingPhysicianIdentificationSequence", "ConsultingPhysicianName",
        "ContactDisplayName", "ContactURI", "ContentCreatorIdentificationCodeSequence",
        "ContentCreatorName", "ContentDate", "ContentSequence", "ContentTime",
        "ContextGroupExtensionCreatorUID", "ContrastBolusAgent", "ContributionDescription",
        "CountryOfResidence", "CreatorVersionUID", "CurrentPatientLocation", "CurveDate",
        "CurveTime", "CustodialOrganizationSequence", "DataSetTrailingPadding", "Date",
        "DateOfLastCalibration", "DateOfLastDetectorCalibration", "DateOfSecondaryCapture",
        "DateTime", "DerivationDescription", "DetectorID", "DeviceDescription",
        "DeviceSerialNumber", "DeviceUID", "DigitalSignatureUID", "DigitalSignaturesSequence",
        "DimensionOrganizationUID", "DischargeDiagnosisDescription", "DistributionAddress",
        "DistributionName", "DoseReferenceUID", "EndAcquisitionDateTime", "EthnicGroup",
        "ExpectedCompletionDateTime", "FailedSOPInstanceUIDList", "FiducialUID",
        "FillerOrderNumberImagingServiceRequest", "FrameComments", "FrameOfReferenceUID",
        "GantryID", "GeneratorID", "GraphicAnnotationSequence", "HumanPerformerName",
        "HumanPerformerOrganization", "IconImageSequence", "IdentifyingComments", "ImageComments",
        "ImagePresentationComments", "ImagingServiceRequestComments", "Impressions",
        "InstanceCoercionDateTime", "InstanceCreationDate", "InstanceCreationTime",
        "InstanceCreatorUID", "InstanceOriginStatus", "InstitutionAddress",
        "InstitutionCodeSequence", "InstitutionName", "InstitutionalDepartmentName",
        "InstitutionalDepartmentTypeCodeSequence", "InsurancePlanIdentification",
        "IntendedRecipientsOfResultsIdentificationSequence", "InterpretationApproverSequence",
        "InterpretationAuthor", "InterpretationDiagnosisDescription", "InterpretationIDIssuer",
        "InterpretationRecorder", "InterpretationText", "InterpretationTranscriber",
        "IrradiationEventUID", "IssuerOfAdmissionID", "IssuerOfAdmissionIDSequence",
        "IssuerOfPatientID", "IssuerOfServiceEpisodeID", "IssuerOfServiceEpisodeIDSequence",
        "LargePaletteColorLookupTableUID", "LastMenstrualDate", "MAC",
        "MediaStorageSOPInstanceUID", "MedicalAlerts", "MedicalRecordLocator", "MilitaryRank",
        "ModifiedAttributesSequence", "ModifiedImageDescription", "ModifyingDeviceID",
        "NameOfPhysiciansReadingStudy", "NamesOfIntendedRecipientsOfResults",
        "ObservationDateTime", "ObservationSubjectUIDTrial", "ObservationUID", "Occupation",
        "OperatorIdentificationSequence", "OperatorsName", "OrderCallbackPhoneNumber",
        "OrderCallbackTelecomInformation", "OrderEnteredBy", "OrderEntererLocation",
        "OriginalAttributesSequence", "OtherPatientIDs", "OtherPatientIDsSequence",
        "OtherPatientNames", "OverlayDate", "OverlayTime", "PaletteColorLookupTableUID",
        "ParticipantSequence", "PatientAddress", "PatientAge", "PatientBirthDate",
        "PatientBirthName", "PatientBirthTime", "PatientComments", "PatientID",
        "PatientInsurancePlanCodeSequence", "PatientMotherBirthName", "PatientName",
        "PatientPrimaryLanguageCodeSequence", "PatientPrimaryLanguageModifierCodeSequence",
        "PatientReligiousPreference", "PatientSex", "PatientSexNeutered", "PatientSize",
        "PatientState", "PatientTelecomInformation", "PatientTelephoneNumbers",
        "PatientTransportArrangements", "PatientWeight", "PerformedLocation",
        "PerformedProcedureStepDescription", "PerformedProcedureStepEndDate",
        "PerformedProcedureStepEndDateTime", "PerformedProcedureStepEndTime",
        "PerformedProcedureStepID", "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartDateTime", "PerformedProcedureStepStartTime",
        "PerformedStationAETitle", "PerformedStationGeographicLocationCodeSequence",
        "PerformedStationName", "PerformedStationNameCodeSequence",
        "PerformingPhysicianIdentificationSequence", "PerformingPhysicianName", "PersonAddress",
        "PersonIdentificationCodeSequence", "PersonName", "PersonTelecomInformation",
        "PersonTelephoneNumbers", "PhysicianApprovingInterpretation", "PhysiciansOfRecord",
        "PhysiciansOfRecordIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence",
        "PlacerOrderNumberImagingServiceRequest", "PlateID", "PreMedication", "PregnancyStatus",
        "ProcedureStepLabel", "ProtocolName", "ReasonForOmissionDescription",
        "ReasonForRequestedProcedureCodeSequence", "ReasonForStudy",
        "ReasonForTheImagingServiceRequest", "ReasonForTheRequestedProcedure",
        "ReceivingApplicationEntityTitle", "ReferencedDigitalSignatureSequence",
        "ReferencedFrameOfReferenceUID",
        "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID", "ReferencedImageSequence",
        "ReferencedObservationUIDTrial", "ReferencedPatientAliasSequence",
        "ReferencedPatientPhotoSequence", "ReferencedPatientSequence",
        "ReferencedPerformedProcedureStepSequence", "ReferencedSOPInstanceMACSequence",
        "ReferencedSOPInstanceUID", "ReferencedSOPInstanceUIDInFile", "ReferencedStudySequence",
        "ReferringPhysicianAddress", "ReferringPhysicianIdentificationSequence",
        "ReferringPhysicianName", "ReferringPhysicianTelephoneNumbers", "RegionOfResidence",
        "RelatedFrameOfReferenceUID", "RequestAttributesSequence", "RequestedContrastAgent",
        "RequestedProcedureComments", "RequestedProcedureDescription", "RequestedProcedureID",
        "RequestedProcedureLocation", "RequestedSOPInstanceUID", "RequestingPhysician",
        "RequestingPhysicianIdentificationSequence", "RequestingService",
        "ResponsibleOrganization", "ResponsiblePerson", "ResultsComments",
        "ResultsDistributionListSequence", "ResultsIDIssuer", "ReviewerName", "SOPInstanceUID",
        "ScheduledHumanPerformersSequence", "ScheduledPatientInstitutionResidence",
        "ScheduledPerformingPhysicianIdentificationSequence", "ScheduledPerformingPhysicianName",
        "ScheduledProcedureStepDescription", "ScheduledProcedureStepEndDate",
        "ScheduledProcedureStepEndTime", "ScheduledProcedureStepID",
        "ScheduledProcedureStepLocation", "ScheduledProcedureStepModificationDateTime",
        "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartDateTime",
        "ScheduledProcedureStepStartTime", "ScheduledStationAETitle",
        "ScheduledStationGeographicLocationCodeSequence", "ScheduledStationName",
        "ScheduledStationNameCodeSequence", "ScheduledStudyLocation",
        "ScheduledStudyLocationAETitle", "SeriesDate", "SeriesDescription", "SeriesInstanceUID",
        "SeriesTime", "ServiceEpisodeDescription", "ServiceEpisodeID", "SmokingStatus",
        "SoftwareVersions", "SourceImageSequence", "SourceSerialNumber", "SpecialNeeds",
        "StationName", "StorageMediaFileSetUID", "StudyComments", "StudyDate", "StudyDescription",
        "StudyID", "StudyIDIssuer", "StudyInstanceUID", "StudyTime",
        "SynchronizationFrameOfReferenceUID", "TargetUID", "TelephoneNumberTrial",
        "TemplateExtensionCreatorUID", "TemplateExtensionOrganizationUID", "TextComments",
        "TextString", "Time", "TimeOfLastCalibration", "TimeOfSecondaryCapture",
        "TimezoneOffsetFromUTC", "TopicAuthor", "TopicKeywords", "TopicSubject", "TopicTitle",
        "TrackingUID", "TransactionUID", "UID", "VerifyingObserverIdentificationCodeSequence",
        "VerifyingObserverName", "VerifyingObserverSequence", "VerifyingOrganization",
        "VisitComments",
    )
)
"""Keywords of the attributes that DICOM PS3.15 Annex E, Table E.1-1 lists for the Basic
Application Level Confidentiality Profile (names, ids, dates and times, addresses,
accession, institution, physicians and operators, device serials and UIDs, free-text
comments and descriptions). Together with private tags (odd groups) and the curve /
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
    if 0x5000 <= group <= 0x50FF:
        return True
    if 0x6000 <= group <= 0x60FF and element in (0x3000, 0x4000):
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
