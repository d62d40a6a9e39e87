"""HL7 v2.5.1 ORU^R01 for one scored study, built with hl7apy.

Structure (ORU_R01): MSH, PID, PV1, ORC, OBR, NTE*, TQ1, then one OBX (+ NTE)
per ChestX-ray14 finding. Coding follows the SR and FHIR outputs exactly,
because every code comes from fhir/terminology.json:

- OBR-4: the LOINC procedure (36554-4 / 36643-5), as DiagnosticReport.code.
- OBX-2 CWE, OBX-3: the finding's SNOMED CT concept (the SR's Finding and the
  FHIR Observation.code); OBX-5: Present/Absent (SCT 52101004 / 272519000,
  the SR's qualitative evaluation); OBX-9 (Probability, "the probability of a
  result being true for results with categorical values") the model's
  probability, as the SR NUM and Observation.valueQuantity; OBX-8 the verdict
  flag (Table 0078: A / N, and AA for a triage-critical finding).
- Result status (OBR-25, OBX-11): P for a preliminary report, C for a
  correction (an amended report after a re-run). Carina never issues F: an AI
  result is final only once a radiologist signs it, which happens elsewhere.
- Priority: TQ1-9 (Table 0485) and OBR-27.6 (Table 0027) R or S.
- NTE after OBR: the AI disclaimer (with the demo-weights caveat first when it
  applies), the conclusion sentence, and the triage reason.

All free text (names, ids, comments) goes through hl7apy's textual data types,
which escape | ^ ~ \\ & as \\F\\ \\S\\ \\R\\ \\E\\ \\T\\. MSH-18 declares UTF-8.
MSH-10 is derived from the report id and study version, so a retry of the same
version carries the same control id (receivers can de-duplicate) and a new
version gets a new one.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from dataclasses import dataclass

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.v2_5_1 import FT, IS, ST

from inference.types import DEMO_WARNING
from node.outputs.equipment import device_uid
from node.outputs.names import PersonName
from node.report import ReportStatus, conclusion
from node.scored_study import ScoredStudy
from node.terminology import load_terminology, procedure_coding

VERSION = "2.5.1"
CHARSET = "UNICODE UTF-8"  # MSH-18, Table 0211
RESULT_STATUS = {ReportStatus.PRELIMINARY: "P", ReportStatus.AMENDED: "C"}  # OBR-25 / OBX-11, Table 0123
AI_DISCLAIMER = (
    "AI-generated result (Carina). Not reviewed by a radiologist; probabilities are model outputs, "
    "not calibrated risks."
)


@dataclass(frozen=True)
class OruHeader:
    """MSH addressing (from the destination's configuration)."""

    sending_application: str = "CARINA"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"


@dataclass(frozen=True)
class OrderContext:
    """What an inbound order (ORM^O01) told Carina about this accession."""

    placer_order_number: str = ""
    filler_order_number: str = ""
    procedure_code: str = ""
    procedure_text: str = ""
    procedure_system: str = ""
    patient_class: str = ""


def control_id(report_id: str, study_version: int) -> str:
    """MSH-10 (ST, at most 20 characters): the same for every retry of one report version."""
    return hashlib.sha256(f"{report_id}|{study_version}".encode()).hexdigest()[:20].upper()


def hd_from_system(system: str) -> str:
    """CX-4 assigning authority (HD) for a FHIR identifier system: `&<oid>&ISO` for urn:oid."""
    if system.startswith("urn:oid:"):
        return f"&{system[len('urn:oid:'):]}&ISO"
    return ""


def build_oru(
    study: ScoredStudy,
    *,
    header: OruHeader = OruHeader(),
    patient_authority: str = "",
    order: OrderContext | None = None,
) -> Message:
    """The ORU^R01 of one scored study version as an hl7apy Message (validated:
    a bad message never leaves). `study.facts` may carry RIS demographics
    merged in by the sender; `order` is what an inbound ORM said."""
    terms = load_terminology()
    order = order or OrderContext()
    facts, model, triage = study.facts, study.model, study.triage
    result_status = RESULT_STATUS[study.status]
    strongest = study.strongest
    issued_ts = _ts(study.issued)
    observed_ts = _dicom_ts(facts.study_date, facts.study_time)
    priority = triage.priority
    critical = set(triage.critical)

    msg = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    msh = msg.msh
    msh.msh_3.hd_1 = IS(header.sending_application)
    if header.sending_facility:
        msh.msh_4.hd_1 = IS(header.sending_facility)
    if header.receiving_application:
        msh.msh_5.hd_1 = IS(header.receiving_application)
    if header.receiving_facility:
        msh.msh_6.hd_1 = IS(header.receiving_facility)
    msh.msh_7 = issued_ts
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control_id(study.report_id, study.version)
    msh.msh_11 = header.processing_id
    msh.msh_12 = VERSION
    msh.msh_18 = CHARSET

    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    patient = result.add_group("ORU_R01_PATIENT")
    pid = patient.add_segment("PID")
    pid.pid_1 = "1"
    pid.pid_3.cx_1 = _st(facts.patient_id or "UNKNOWN")
    if patient_authority:
        pid.pid_3.cx_4 = patient_authority
    pid.pid_3.cx_5 = "MR"
    name = PersonName.from_dicom(facts.patient_name)
    for component, value in (("xpn_1", name.family), ("xpn_2", name.given), ("xpn_3", name.middle),
                             ("xpn_4", name.suffix), ("xpn_5", name.prefix)):
        if value:
            if component == "xpn_1":
                pid.pid_5.xpn_1.fn_1 = _st(value)
            else:
                setattr(pid.pid_5, component, _st(value))
    if name.empty:
        pid.pid_5.xpn_1.fn_1 = _st("UNKNOWN")
    birth = (facts.patient_birth_date or "").strip()
    if len(birth) == 8 and birth.isdigit():
        pid.pid_7 = birth
    sex = (facts.patient_sex or "").strip().upper()
    if sex in ("M", "F", "O"):
        pid.pid_8 = sex
    visit = patient.add_group("ORU_R01_VISIT")
    pv1 = visit.add_segment("PV1")
    pv1.pv1_1 = "1"
    pv1.pv1_2 = order.patient_class or "U"  # Table 0004: U = unknown

    obs_group = result.add_group("ORU_R01_ORDER_OBSERVATION")
    accession = facts.accession_number
    placer = order.placer_order_number or accession
    filler = order.filler_order_number or accession
    orc = obs_group.add_segment("ORC")
    orc.orc_1 = "RE"  # observations to follow
    if placer:
        orc.orc_2.ei_1 = _st(placer)
    if filler:
        orc.orc_3.ei_1 = _st(filler)
    orc.orc_9 = issued_ts

    obr = obs_group.add_segment("OBR")
    obr.obr_1 = "1"
    if placer:
        obr.obr_2.ei_1 = _st(placer)
    if filler:
        obr.obr_3.ei_1 = _st(filler)
    procedure = procedure_coding(terms, [img.view_position or img.sop_instance_uid for img in facts.images])
    code, text, system = procedure.v2()
    obr.obr_4.ce_1, obr.obr_4.ce_2, obr.obr_4.ce_3 = _st(code), _st(text), system
    if order.procedure_code:  # the order's own code travels as the alternate
        obr.obr_4.ce_4 = _st(order.procedure_code)
        if order.procedure_text:
            obr.obr_4.ce_5 = _st(order.procedure_text)
        if order.procedure_system:
            obr.obr_4.ce_6 = order.procedure_system
    if observed_ts:
        obr.obr_7 = observed_ts
    if accession:
        obr.obr_18 = _st(accession)  # placer field 1: where radiology receivers often look
    obr.obr_22 = issued_ts
    obr.obr_24 = terms.fhir["radiology_section"].code  # Table 0074 RAD
    obr.obr_25 = result_status
    obr.obr_27.tq_6 = terms.priority[priority]["v2_obr27"].code

    disclaimer = f"{AI_DISCLAIMER} Model {model.name} {model.version}."
    notes = [
        f"{DEMO_WARNING}: demonstration weights. {disclaimer}" if model.demo else disclaimer,
        # The same sentence as DiagnosticReport.conclusion (its caveat is in the line above).
        conclusion(dataclasses.replace(model, demo=False), study.positives),
    ]
    if triage.stat:
        notes.append(f"STAT: {triage.reason}")
    for index, text in enumerate(notes, start=1):
        nte = obs_group.add_segment("NTE")
        nte.nte_1 = str(index)
        nte.nte_2 = "L"  # Table 0105: ancillary (filler) department is the source
        nte.nte_3 = FT(text)

    timing = obs_group.add_group("ORU_R01_TIMING_QTY")
    tq1 = timing.add_segment("TQ1")
    tq1.tq1_1 = "1"
    tq1_priority = terms.priority[priority]["v2_tq1"]
    tq1.tq1_9.cwe_1, tq1.tq1_9.cwe_2, tq1.tq1_9.cwe_3 = tq1_priority.code, _st(tq1_priority.display), "HL70485"

    device = device_uid(model)
    for index, (label, (_, finding)) in enumerate(strongest.items(), start=1):
        observation = obs_group.add_group("ORU_R01_OBSERVATION")
        obx = observation.add_segment("OBX")
        obx.obx_1 = str(index)
        obx.obx_2 = "CWE"
        code, text, system = terms.finding(label).snomed.v2()
        obx.obx_3.ce_1, obx.obx_3.ce_2, obx.obx_3.ce_3 = _st(code), _st(text), system
        verdict = terms.sr["present" if finding.positive else "absent"]
        obx.obx_5 = f"{verdict.code}^{verdict.meaning or verdict.display}^{verdict.v2_system or verdict.scheme}"
        flag = "critical" if label in critical else ("positive" if finding.positive else "negative")
        obx.obx_8 = terms.interpretation[flag]["v2"].code
        obx.obx_9 = _probability(finding.probability)
        obx.obx_11 = result_status
        if observed_ts:
            obx.obx_14 = observed_ts
        obx.obx_18.ei_1 = _st(f"{model.name} {model.version}"[:199])
        obx.obx_18.ei_3 = device
        obx.obx_18.ei_4 = "ISO"
        obx.obx_19 = issued_ts
        nte = observation.add_segment("NTE")
        nte.nte_1 = "1"
        nte.nte_2 = "L"
        nte.nte_3 = FT(
            f"{terms.finding(label).display}: AI probability {finding.probability:.3f} "
            f"(operating point {finding.threshold:.3f}); {'positive' if finding.positive else 'negative'}."
        )
    msg.validate()
    return msg


def encode(message: Message) -> str:
    """ER7 text; every segment, the last one included, ends with CR (the MLLP payload, before UTF-8)."""
    return message.to_er7().rstrip("\r") + "\r"


def _st(value: str) -> ST:
    return ST(str(value))


def _probability(value: float) -> str:
    return f"{float(value):.4f}"


def _ts(value: dt.datetime) -> str:
    """HL7 DTM with seconds and the UTC offset."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.strftime("%Y%m%d%H%M%S%z")


def _dicom_ts(date: str, time: str) -> str:
    """DICOM DA/TM -> HL7 DTM at the precision given (no zone: DICOM carries none)."""
    date = (date or "").strip()
    if len(date) != 8 or not date.isdigit():
        return ""
    clock = (time or "").replace(":", "").split(".")[0].strip()
    if clock.isdigit() and len(clock) in (2, 4, 6):
        return date + clock
    return date
