"""STOW-RS in: each part of a multipart/related request through the C-STORE intake.

Every part, once streamed to its temp file (node/dicomweb/multipart.py), gets
exactly what an instance arriving by C-STORE gets: the SCP's header check
(dicom_scp/scp.py `check_header`: bounded inflation of Deflated data, UIDs,
0xA900/0xC000/0xC210), the SCP's SOP class and transfer syntax rule
(dicom_scp/contexts.py `accepts`, 0x0122 otherwise), then the node's
`Receiver`: the disk floor (0xA700), a durable move, the committed row. Only
after that is the part listed as stored, so the response acknowledges only
what survives a crash, as the C-STORE response does. A part that fails fails
alone: the others are stored and listed.

Studies from STOW-RS are keyed like DICOM ones, by (calling AE,
StudyInstanceUID): the "calling AE" is the source name configured for the
sender's token (`dicomweb.stow_senders`), so a study keeps apart from the same
UID sent by another route, and joins the DIMSE study of a PACS whose AE title
is chosen as its source name.

The response body is PS3.18 10.5.3's: ReferencedSOPSequence (stored) and
FailedSOPSequence with FailureReason as the DICOM status. Failure reasons:
0xA700 out of resources (disk floor, database failure, a part over
`dicomweb.max_part_mb`), 0xA900 the instance does not belong to the study of
the request URL, 0xC000 cannot understand (not DICOM, not application/dicom,
inflates past the cap, a UID over 64 characters), 0xC210 no Study or SOP
Instance UID, 0x0122 a SOP class or transfer syntax the SCP would not
accept either.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dicom_scp.contexts import accepts
from dicom_scp.scp import CANNOT_UNDERSTAND, DOES_NOT_MATCH_SOP_CLASS, OUT_OF_RESOURCES, ReceivedInstance, Refusal, check_header
from dicom_scp.scu import SOP_CLASS_NOT_SUPPORTED
from node.dicomweb.multipart import Part
from node.receiver import Receiver

log = logging.getLogger(__name__)

DICOM = "application/dicom"


@dataclass(frozen=True)
class Outcome:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    patient_id: str
    status: int  # 0x0000 stored, else the FailureReason


@dataclass
class StowResult:
    outcomes: list[Outcome] = field(default_factory=list)
    truncated: bool = False  # the request was cut off (too large or malformed framing)

    @property
    def stored(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 0]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 0]

    def http_status(self) -> int:
        """200 all stored; 202 some stored, some not; 409 none stored (PS3.18 10.5.3)."""
        if not self.failed and not self.truncated:
            return 200
        return 202 if self.stored else 409

    def json(self, retrieve_url: str | None = None) -> dict:
        """The Store Instances Response Module as DICOM JSON."""
        body: dict = {}
        if retrieve_url:
            body["00081190"] = {"vr": "UR", "Value": [retrieve_url]}
        if self.failed:
            body["00081198"] = {"vr": "SQ", "Value": [_item(o, failure=True) for o in self.failed]}
        if self.stored:
            body["00081199"] = {"vr": "SQ", "Value": [_item(o) for o in self.stored]}
        return body


def _uid(value: str) -> dict:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _item(outcome: Outcome, failure: bool = False) -> dict:
    item = {"00081150": _uid(outcome.sop_class_uid), "00081155": _uid(outcome.sop_instance_uid)}
    if failure:
        item["00081197"] = {"vr": "US", "Value": [outcome.status]}
    return item


def with_preamble(path: Path) -> None:
    """Give a part that starts with its File Meta (as pydicom writes a Dataset
    without a preamble, e.g. from dicomweb-client) the 128-byte preamble and
    "DICM" of a Part 10 file, so it is stored as every other instance is. A part
    without File Meta is left alone: without a transfer syntax it cannot be read
    (0xC000)."""
    with open(path, "rb") as fh:
        head = fh.read(132)
        if head[128:132] == b"DICM" or not head.startswith(b"\x02\x00"):
            return
        fh.seek(0)
        rewritten = path.with_name(path.name + ".p10")
        with open(rewritten, "wb") as out:
            out.write(b"\0" * 128 + b"DICM")
            shutil.copyfileobj(fh, out, 1 << 20)
    os.replace(rewritten, path)


@dataclass(frozen=True)
class StowIntake:
    """Stores the parts of one STOW-RS request from one sender."""

    receiver: Receiver
    source: str  # the calling-AE key of the studies this sender stores
    peer_address: str
    max_inflated_bytes: int
    study_uid: str | None = None  # from the request URL, when it names one

    def store(self, part: Part) -> Outcome:
        """Store one part durably, or say why not; the part's temp file is gone afterwards."""
        fields: dict[str, str] = {}
        try:
            if part.too_large:
                raise Refusal(OUT_OF_RESOURCES, "part larger than dicomweb.max_part_mb")
            if part.content_type not in ("", DICOM):
                raise Refusal(CANNOT_UNDERSTAND, f"part of type {part.content_type!r}, not {DICOM}")
            with_preamble(part.path)
            fields = check_header(part.path, self.max_inflated_bytes)
            if self.study_uid is not None and fields["StudyInstanceUID"] != self.study_uid:
                raise Refusal(DOES_NOT_MATCH_SOP_CLASS, "instance of another study than the request URL names")
            if not accepts(fields["SOPClassUID"], fields["TransferSyntaxUID"]):
                raise Refusal(SOP_CLASS_NOT_SUPPORTED, "SOP class or transfer syntax not accepted")
            self.receiver(self._received(part, fields))
        except Refusal as refusal:
            log.warning("STOW-RS part %s from %s refused: %s", fields.get("SOPInstanceUID", "?"), self.source,
                        refusal.comment)
            return self._outcome(fields, refusal.status)
        except Exception as exc:  # the database or the disk: the sender may try again later
            log.error("STOW-RS part %s from %s not recorded: %s", fields.get("SOPInstanceUID", "?"), self.source,
                      type(exc).__name__)
            return self._outcome(fields, OUT_OF_RESOURCES)
        finally:
            part.discard()  # after a successful intake the file has moved; this removes a refused one
        log.info("stored %s study=%s from %s (STOW-RS)", fields["SOPInstanceUID"], fields["StudyInstanceUID"],
                 self.source)
        return self._outcome(fields, 0)

    def _received(self, part: Part, fields: dict[str, str]) -> ReceivedInstance:
        return ReceivedInstance(
            calling_ae=self.source,
            peer_address=self.peer_address,
            sop_class_uid=fields["SOPClassUID"],
            sop_instance_uid=fields["SOPInstanceUID"],
            study_uid=fields["StudyInstanceUID"],
            series_uid=fields["SeriesInstanceUID"],
            transfer_syntax_uid=fields["TransferSyntaxUID"],
            patient_id=fields["PatientID"],
            accession_number=fields["AccessionNumber"],
            modality=fields["Modality"],
            temp_path=Path(part.path),
            size_bytes=part.size,
        )

    @staticmethod
    def _outcome(fields: dict[str, str], status: int) -> Outcome:
        return Outcome(fields.get("SOPClassUID", ""), fields.get("SOPInstanceUID", ""),
                       fields.get("StudyInstanceUID", ""), fields.get("PatientID", ""), status)
