"""DICOM audit messages (PS3.15 Annex A.5, the IHE ATNA format), as XML.

A message is built from typed parts and serialised in the element order of the
A.5.1 schema: EventIdentification, ActiveParticipant+, AuditSourceIdentification,
ParticipantObjectIdentification*. Coded values use the schema's attributes
`csd-code`, `codeSystemName` and `originalText` (the DICOM Code Meaning).

Codes: event IDs are CID 400 (DCM 1101xx), event types CID 401, participant
role IDs CID 402 (DCM 110150-110155), participant object ID types RFC 3881
("RFC-3881") or DCM (110180 Study Instance UID). Carina's own roles are coded
in the private scheme 99CARINA.
"""
from __future__ import annotations

import base64
import datetime as dt
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Code:
    code: str
    system: str
    meaning: str

    def element(self, parent: ET.Element, tag: str) -> ET.Element:
        return ET.SubElement(parent, tag, {"csd-code": self.code, "codeSystemName": self.system,
                                           "originalText": self.meaning})


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


# CID 400 Audit Event ID
APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
DICOM_INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
EXPORT = _dcm("110106", "Export")
IMPORT = _dcm("110107", "Import")
PATIENT_RECORD = _dcm("110110", "Patient Record")
QUERY = _dcm("110112", "Query")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")

# CID 401 Audit Event Type Code
APPLICATION_START = _dcm("110120", "Application Start")
APPLICATION_STOP = _dcm("110121", "Application Stop")
LOGIN = _dcm("110122", "Login")
LOGOUT = _dcm("110123", "Logout")
NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")
USE_OF_RESTRICTED_FUNCTION = _dcm("110132", "Use of Restricted Function")
SECURITY_ROLES_CHANGED = _dcm("110136", "Security Roles Changed")
USER_SECURITY_ATTRIBUTES_CHANGED = _dcm("110137", "User Security Attributes Changed")

# CID 402 Audit Active Participant Role ID Code
APPLICATION = _dcm("110150", "Application")
APPLICATION_LAUNCHER = _dcm("110151", "Application Launcher")
DESTINATION = _dcm("110152", "Destination Role ID")
SOURCE = _dcm("110153", "Source Role ID")

# Participant object ID type codes
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
SEARCH_CRITERIA = Code("10", "RFC-3881", "Search Criteria")
USER_IDENTIFIER = Code("11", "RFC-3881", "User Identifier")
URI = Code("12", "RFC-3881", "URI")
STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")


def role_code(role: str) -> Code:
    """Carina's access role (viewer, radiologist, integration, admin) as a RoleIDCode."""
    return Code(role, "99CARINA", f"Carina role {role}")


# Outcome indicator
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12


@dataclass(frozen=True)
class Participant:
    """ActiveParticipant: a person, a process or a network node taking part."""

    user_id: str
    requestor: bool
    address: str = ""  # NetworkAccessPointID
    address_is_ip: bool = True  # type code 2 (IP) or 1 (machine name)
    roles: tuple[Code, ...] = ()
    alternative_user_id: str = ""
    user_name: str = ""


@dataclass(frozen=True)
class ParticipantObject:
    """ParticipantObjectIdentification: the data the event touched."""

    object_id: str
    id_type: Code
    type_code: int  # 1 person, 2 system object, 3 organization, 4 other
    role: int | None = None  # 1 patient, 3 report, 4 resource, 6 user, 11 security user entity, 20 job, 24 query ...
    life_cycle: int | None = None  # 6 access/use, 10 export, 2 import ...
    name: str = ""
    query: bytes | None = None  # ParticipantObjectQuery, base64 in the XML
    details: tuple[tuple[str, str], ...] = ()  # ParticipantObjectDetail type/value (value base64)
    study_uids: tuple[str, ...] = ()  # ParticipantObjectDescription/ParticipantObjectContainsStudy
    accession: str = ""


def patient(patient_id: str, life_cycle: int | None = 6) -> ParticipantObject:
    return ParticipantObject(patient_id, PATIENT_NUMBER, 1, 1, life_cycle)


def study(study_uid: str, *, accession: str = "", life_cycle: int | None = 6) -> ParticipantObject:
    return ParticipantObject(study_uid, STUDY_INSTANCE_UID, 2, 3, life_cycle, study_uids=(study_uid,),
                             accession=accession)


@dataclass(frozen=True)
class AuditMessage:
    event: Code
    action: str  # C R U D E
    outcome: int
    participants: tuple[Participant, ...]
    objects: tuple[ParticipantObject, ...] = ()
    event_types: tuple[Code, ...] = ()
    outcome_description: str = ""
    when: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    def __post_init__(self):
        if self.action not in ("C", "R", "U", "D", "E"):
            raise ValueError(f"EventActionCode must be C, R, U, D or E, not {self.action!r}")
        if self.outcome not in (0, 4, 8, 12):
            raise ValueError(f"EventOutcomeIndicator must be 0, 4, 8 or 12, not {self.outcome!r}")
        if not self.participants:
            raise ValueError("an audit message has at least one ActiveParticipant")

    @property
    def requestor(self) -> Participant | None:
        return next((p for p in self.participants if p.requestor), None)

    @property
    def patient_ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(o.object_id for o in self.objects if o.role == 1 and o.object_id))

    def to_xml(self, source_id: str, enterprise_site_id: str = "") -> str:
        root = ET.Element("AuditMessage")
        ident = ET.SubElement(root, "EventIdentification", {
            "EventActionCode": self.action,
            "EventDateTime": self.when.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": str(self.outcome),
        })
        self.event.element(ident, "EventID")
        for code in self.event_types:
            code.element(ident, "EventTypeCode")
        if self.outcome_description:
            ET.SubElement(ident, "EventOutcomeDescription").text = self.outcome_description
        for p in self.participants:
            attrs = {"UserID": p.user_id}
            if p.alternative_user_id:
                attrs["AlternativeUserID"] = p.alternative_user_id
            if p.user_name:
                attrs["UserName"] = p.user_name
            attrs["UserIsRequestor"] = "true" if p.requestor else "false"
            if p.address:
                attrs["NetworkAccessPointID"] = p.address
                attrs["NetworkAccessPointTypeCode"] = "2" if p.address_is_ip else "1"
            element = ET.SubElement(root, "ActiveParticipant", attrs)
            for code in p.roles:
                code.element(element, "RoleIDCode")
        source_attrs = {"AuditEnterpriseSiteID": enterprise_site_id} if enterprise_site_id else {}
        source_attrs["AuditSourceID"] = source_id
        source = ET.SubElement(root, "AuditSourceIdentification", source_attrs)
        # 4: application server process (A.5.1.2.1).
        ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})
        for o in self.objects:
            attrs = {"ParticipantObjectID": o.object_id, "ParticipantObjectTypeCode": str(o.type_code)}
            if o.role is not None:
                attrs["ParticipantObjectTypeCodeRole"] = str(o.role)
            if o.life_cycle is not None:
                attrs["ParticipantObjectDataLifeCycle"] = str(o.life_cycle)
            element = ET.SubElement(root, "ParticipantObjectIdentification", attrs)
            o.id_type.element(element, "ParticipantObjectIDTypeCode")
            if o.query is not None:
                ET.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(o.query).decode()
            elif o.name:
                ET.SubElement(element, "ParticipantObjectName").text = o.name
            for kind, value in o.details:
                ET.SubElement(element, "ParticipantObjectDetail",
                              {"type": kind, "value": base64.b64encode(value.encode()).decode()})
            if o.study_uids or o.accession:
                description = ET.SubElement(element, "ParticipantObjectDescription")
                if o.accession:
                    ET.SubElement(description, "Accession", {"Number": o.accession})
                if o.study_uids:
                    contains = ET.SubElement(description, "ParticipantObjectContainsStudy")
                    for uid in o.study_uids:
                        ET.SubElement(contains, "StudyIDs", {"UID": uid})
        for element in root.iter():  # values from the network (user names, queries) may hold any character
            element.attrib = {k: xml_safe(v) for k, v in element.attrib.items()}
            if element.text:
                element.text = xml_safe(element.text)
        return ET.tostring(root, encoding="unicode")


# Characters XML 1.0 cannot carry, even escaped (controls, lone surrogates, U+FFFE/FFFF).
_NOT_XML = re.compile("[^\x09\x0A\x0D\x20-\uD7FF\uE000-\uFFFD\U00010000-\U0010FFFF]")


def xml_safe(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value)


def patient_ids_in(xml: str) -> tuple[str, ...]:
    """The patient participant objects' IDs of a stored message (for verify and export)."""
    root = ET.fromstring(xml)
    ids = [o.get("ParticipantObjectID", "") for o in root.iter("ParticipantObjectIdentification")
           if o.get("ParticipantObjectTypeCodeRole") == "1"]
    return tuple(dict.fromkeys(i for i in ids if i))


def study_uids_in(xml: str) -> tuple[str, ...]:
    root = ET.fromstring(xml)
    return tuple(dict.fromkeys(s.get("UID", "") for s in root.iter("StudyIDs") if s.get("UID")))
