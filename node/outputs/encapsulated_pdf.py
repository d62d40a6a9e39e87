"""The printable report as a DICOM Encapsulated PDF (PS3.3 A.45.1), into the source study.

Many PACS show an Encapsulated PDF where they show nothing of an SR, so the
report goes into the study as one more object: its own series (9905, modality
DOC), one instance per study version, with the same deterministic UIDs and
issue-time dates as every other output (a re-run writes the same bytes). The
Source Instance Sequence names the scored images; the document's title and
concept are the SR's (LOINC 18748-4). The PDF travels unchanged: Encapsulated
Document Length (0042,0015) records its exact size, so a reader strips the
pad byte an odd-sized PDF gets.
"""
from __future__ import annotations

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
from pydicom.valuerep import DA, DT, TM

from node.outputs import uids
from node.outputs.equipment import MANUFACTURER, contributing_equipment, series_description, software_versions
from node.outputs.pdf_report import TITLE, report_document_uid
from node.outputs.sr import source_header
from node.scored_study import ScoredStudy
from node.terminology import load_terminology

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
PDF_SERIES_NUMBER = 9905
PDF_SERIES_BASE = "Carina AI report (PDF)"
_PATIENT_STUDY = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
)


def build_encapsulated_pdf(pdf: bytes, headers: list[Dataset], scored: ScoredStudy, *,
                           manufacturer: str = MANUFACTURER) -> Dataset:
    """The Encapsulated PDF of `pdf`; `headers` are the scored images' source headers,
    in `scored.images` order (the first gives the patient and study)."""
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("not a PDF document")
    model, created = scored.model, scored.created_local
    first = source_header(headers[0])
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # names and the caveat's em dash are not Latin-1
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = report_document_uid(scored)
    ds.InstanceCreationDate, ds.InstanceCreationTime = DA(created.date()), TM(created.time())
    for keyword in _PATIENT_STUDY:  # Patient and General Study, as the source has them
        if keyword in first:
            ds[keyword] = first[keyword]
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = uids.series_uid(scored.study_uid, model.ref, "pdf")
    ds.SeriesNumber = PDF_SERIES_NUMBER
    ds.SeriesDescription = series_description(PDF_SERIES_BASE, model)
    ds.SeriesDate, ds.SeriesTime = DA(created.date()), TM(created.time())
    # General Equipment and SC Equipment
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model.name[:64]
    ds.SoftwareVersions = software_versions(model)
    ds.ConversionType = "WSD"  # rendered by a workstation
    # Encapsulated Document
    ds.InstanceNumber = scored.version
    ds.ContentDate, ds.ContentTime = DA(created.date()), TM(created.time())
    ds.AcquisitionDateTime = DT(created)
    ds.BurnedInAnnotation = "YES"  # the pages name the patient
    ds.RecognizableVisualFeatures = "NO"
    ds.DocumentTitle = TITLE
    title = load_terminology().report["sr_title"].dicom()
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = title.value, title.scheme_designator, title.meaning
    ds.ConceptNameCodeSequence = [concept]
    ds.VerificationFlag = "UNVERIFIED"
    ds.SourceInstanceSequence = [_reference(h) for h in headers]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.ContributingEquipmentSequence = contributing_equipment(headers, model, manufacturer=manufacturer,
                                                              contributed_at=created)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.set_original_encoding(False, True)
    return ds


def document_bytes(ds: Dataset) -> bytes:
    """The PDF exactly as encapsulated: without the pad byte of an odd-sized document."""
    data = bytes(ds.EncapsulatedDocument)
    length = ds.get("EncapsulatedDocumentLength")
    return data[: int(length)] if length is not None else data.rstrip(b"\0")


def _reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item
