"""What Carina records, one function per kind of event, each building one
DICOM audit message (node/audit/messages.py) and appending it to the trail.

| happening                               | EventID / EventTypeCode                    | action |
|-----------------------------------------|--------------------------------------------|--------|
| node start / stop                       | 110100 Application Activity / 110120, 110121 | E    |
| login, failed login, logout             | 110114 User Authentication / 110122, 110123 | E     |
| refused token or session                | 110114 User Authentication (outcome 4)     | E      |
| a role without the permission, bad CSRF | 110113 Security Alert / 110132             | E      |
| study view, FHIR read, job detail       | 110110 Patient Record                      | R      |
| reading app: image, heatmap fetch       | 110110 Patient Record                      | R      |
| feedback on a finding (new, changed)    | 110110 Patient Record                      | C, U   |
| downloads (SR, SC, SEG, GSPS, FHIR), feedback CSV | 110106 Export                    | R      |
| study list, FHIR search                 | 110112 Query (+ the patients returned)     | E      |
| predict upload, reading-app upload      | 110107 Import (one per image)              | C      |
| DICOM association in (per association)  | 110104 DICOM Instances Transferred         | C      |
| STOW-RS request in (per request)        | 110104 DICOM Instances Transferred         | C      |
| DICOM association refused               | 110113 Security Alert / 110126 Node Authentication | E |
| delivery out: DICOM, DICOMweb           | 110104 DICOM Instances Transferred         | R      |
| delivery out: FHIR, HL7; audit export   | 110106 Export                              | R      |
| user, role, token changes               | 110113 Security Alert / 110137, 110136     | U      |
| model activation                        | 110113 Security Alert / 110131             | U      |
| job retry                               | 110113 Security Alert / 110132             | E      |
"""
from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass
from typing import Iterable

from node.audit import messages as m
from node.audit.trail import AuditTrail


@dataclass(frozen=True)
class Actor:
    """Who asked: a user, a token, a DICOM peer or an operator at the CLI."""

    user_id: str
    role: str = ""
    address: str = ""
    address_is_ip: bool = True

    def participant(self) -> m.Participant:
        roles = (m.role_code(self.role),) if self.role else ()
        return m.Participant(self.user_id, True, self.address, self.address_is_ip, roles)


def cli_actor() -> Actor:
    """The operator running `carina` on the node's host (no role: the OS account is the authority)."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry for the uid, e.g. in some containers
        user = "unknown"
    return Actor(f"{user} (carina CLI)", "", socket.gethostname(), address_is_ip=False)


def _node(trail: AuditTrail, role: m.Code = m.APPLICATION, *, requestor: bool = False) -> m.Participant:
    return m.Participant(trail.source_id, requestor, socket.gethostname(), False, (role,))


def _patients_and_studies(pairs: Iterable[tuple[str, str]], life_cycle: int | None = 6) -> tuple[m.ParticipantObject, ...]:
    patients, studies = {}, {}
    for patient_id, study_uid in pairs:
        if patient_id:
            patients.setdefault(patient_id, m.patient(patient_id, life_cycle))
        if study_uid:
            studies.setdefault(study_uid, m.study(study_uid, life_cycle=life_cycle))
    return tuple(patients.values()) + tuple(studies.values())


# --- the node itself --------------------------------------------------------------------------


def application(trail: AuditTrail, started: bool) -> int:
    return trail.append(m.AuditMessage(
        m.APPLICATION_ACTIVITY, "E", m.SUCCESS, (_node(trail, m.APPLICATION, requestor=True),),
        event_types=(m.APPLICATION_START if started else m.APPLICATION_STOP,),
    ))


# --- authentication and authorisation ---------------------------------------------------------


def login(trail: AuditTrail, actor: Actor, *, success: bool, why: str = "") -> int:
    return trail.append(m.AuditMessage(
        m.USER_AUTHENTICATION, "E", m.SUCCESS if success else m.MINOR_FAILURE,
        (actor.participant(), _node(trail)), event_types=(m.LOGIN,), outcome_description=why,
    ))


def logout(trail: AuditTrail, actor: Actor) -> int:
    return trail.append(m.AuditMessage(
        m.USER_AUTHENTICATION, "E", m.SUCCESS, (actor.participant(), _node(trail)), event_types=(m.LOGOUT,),
    ))


def credential_refused(trail: AuditTrail, actor: Actor, why: str) -> int:
    return trail.append(m.AuditMessage(
        m.USER_AUTHENTICATION, "E", m.MINOR_FAILURE, (actor.participant(), _node(trail)), outcome_description=why,
    ))


def access_denied(trail: AuditTrail, actor: Actor, method: str, path: str, why: str) -> int:
    target = m.ParticipantObject(f"{method} {path}", m.URI, 2, 4)
    return trail.append(m.AuditMessage(
        m.SECURITY_ALERT, "E", m.MINOR_FAILURE, (actor.participant(), _node(trail)), (target,),
        event_types=(m.USE_OF_RESTRICTED_FUNCTION,), outcome_description=why,
    ))


# --- access to PHI ----------------------------------------------------------------------------


def record_read(trail: AuditTrail, actor: Actor, what: str, pairs: Iterable[tuple[str, str]]) -> int:
    """Someone read patient data: a study view, a FHIR read, a job's error detail.
    `what` is the resource read (a URL path); `pairs` are (patient ID, study UID)."""
    target = m.ParticipantObject(what, m.URI, 2, 4, 6)
    return trail.append(m.AuditMessage(
        m.PATIENT_RECORD, "R", m.SUCCESS, (actor.participant(), _node(trail)),
        (target,) + _patients_and_studies(pairs),
    ))


def record_changed(trail: AuditTrail, actor: Actor, what: str, pairs: Iterable[tuple[str, str]], *,
                   created: bool) -> int:
    """Someone wrote to a patient's record: a radiologist's feedback on an AI finding."""
    target = m.ParticipantObject(what, m.URI, 2, 4, 1 if created else 5)
    return trail.append(m.AuditMessage(
        m.PATIENT_RECORD, "C" if created else "U", m.SUCCESS, (actor.participant(), _node(trail)),
        (target,) + _patients_and_studies(pairs, life_cycle=1 if created else 5),
    ))


def query(trail: AuditTrail, actor: Actor, query_text: str, pairs: Iterable[tuple[str, str]]) -> int:
    """A search (FHIR search, study list): the query itself and every patient it returned."""
    asked = m.ParticipantObject(query_text[:256] or "query", m.SEARCH_CRITERIA, 2, 24, query=query_text.encode())
    return trail.append(m.AuditMessage(
        m.QUERY, "E", m.SUCCESS, (actor.participant(), _node(trail)), (asked,) + _patients_and_studies(pairs),
    ))


def predict_import(trail: AuditTrail, actor: Actor, *, kind: str, patient_id: str, study_uid: str,
                   outcome: int, why: str = "") -> int:
    upload = m.ParticipantObject(f"upload:{kind}", m.URI, 2, 4, 2)
    return trail.append(m.AuditMessage(
        m.IMPORT, "C", outcome, (actor.participant(), _node(trail, m.DESTINATION)),
        (upload,) + _patients_and_studies([(patient_id, study_uid)], life_cycle=2), outcome_description=why,
    ))


def exported(trail: AuditTrail, actor: Actor, what: str, pairs: Iterable[tuple[str, str]], query_text: str = "") -> int:
    """An export by a person (the audit CSV): who took which patients' data out."""
    objects = (m.ParticipantObject(what, m.URI, 2, 4, 10, query=query_text.encode() if query_text else None),)
    return trail.append(m.AuditMessage(
        m.EXPORT, "R", m.SUCCESS, (actor.participant(), _node(trail, m.SOURCE)),
        objects + _patients_and_studies(pairs, life_cycle=10),
    ))


# --- DICOM and the other networks --------------------------------------------------------------


def association(trail: AuditTrail, event, node_ae: str, patients_by_study: dict[str, str] | None = None) -> int | None:
    """One record per inbound DICOM association, from its end event.

    `event` is duck-typed: kind ("accepted"|"rejected"|"released"|"aborted"),
    calling_ae, called_ae, peer_address, peer_port, reason, study_uids, tls.
    An association that ends without storing anything (a C-ECHO probe) is not
    recorded; "accepted" is not recorded either (its end is). A rejected one is
    a security alert."""
    kind = event.kind
    peer = m.Participant(event.calling_ae, True, str(event.peer_address or ""), True, (m.SOURCE,),
                         alternative_user_id=f"port {event.peer_port}" if event.peer_port else "")
    us = m.Participant(event.called_ae or node_ae, False, socket.gethostname(), False, (m.DESTINATION,))
    security = "TLS" if event.tls else "no TLS"
    if kind == "rejected":
        return trail.append(m.AuditMessage(
            m.SECURITY_ALERT, "E", m.MINOR_FAILURE, (peer, us), event_types=(m.NODE_AUTHENTICATION,),
            outcome_description=f"association rejected ({security}): {event.reason or 'not a known peer'}",
        ))
    studies = tuple(event.study_uids or ())
    if kind not in ("released", "aborted") or not studies:
        return None
    patients_by_study = patients_by_study or {}
    pairs = [(patients_by_study.get(uid, ""), uid) for uid in studies]
    outcome = m.SUCCESS if kind == "released" else m.MINOR_FAILURE
    return trail.append(m.AuditMessage(
        m.DICOM_INSTANCES_TRANSFERRED, "C", outcome, (peer, us), _patients_and_studies(pairs, life_cycle=2),
        outcome_description=f"association {kind} ({security})" + (f": {event.reason}" if event.reason else ""),
    ))


def stow_received(trail: AuditTrail, actor: Actor, *, source: str, pairs: Iterable[tuple[str, str]], stored: int,
                  failed: int) -> int:
    """One STOW-RS request in: who sent (the token, as the source name its studies
    are keyed by), the patients and studies it stored, how many parts failed."""
    outcome = m.SUCCESS if not failed else (m.MINOR_FAILURE if stored else m.SERIOUS_FAILURE)
    them = m.Participant(actor.user_id, True, actor.address, actor.address_is_ip,
                         (m.SOURCE,) + ((m.role_code(actor.role),) if actor.role else ()), user_name=source)
    return trail.append(m.AuditMessage(
        m.DICOM_INSTANCES_TRANSFERRED, "C", outcome, (them, _node(trail, m.DESTINATION)),
        _patients_and_studies(pairs, life_cycle=2),
        outcome_description=f"STOW-RS: {stored} stored, {failed} failed",
    ))


def delivery(trail: AuditTrail, *, destination: str, kind: str, peer_id: str, peer_address: str,
             patient_id: str, study_uid: str, outcome: int, why: str = "") -> int:
    """One outbound delivery attempt: DICOM C-STORE to a PACS, FHIR or HL7 to an EHR/RIS.
    `why` must be PHI-free (the job's error code, never the peer's text)."""
    event = m.DICOM_INSTANCES_TRANSFERRED if kind in ("dicom", "dicomweb") else m.EXPORT
    us = _node(trail, m.SOURCE, requestor=True)
    them = m.Participant(peer_id, False, peer_address, True, (m.DESTINATION,), user_name=destination)
    return trail.append(m.AuditMessage(
        event, "R", outcome, (us, them), _patients_and_studies([(patient_id, study_uid)], life_cycle=10),
        outcome_description=why,
    ))


# --- administration ---------------------------------------------------------------------------


def admin_action(trail: AuditTrail, actor: Actor, event_type: m.Code, target: m.ParticipantObject,
                 description: str, outcome: int = m.SUCCESS) -> int:
    return trail.append(m.AuditMessage(
        m.SECURITY_ALERT, "U" if event_type != m.USE_OF_RESTRICTED_FUNCTION else "E", outcome,
        (actor.participant(), _node(trail)), (target,), event_types=(event_type,), outcome_description=description,
    ))


def user_object(name: str) -> m.ParticipantObject:
    return m.ParticipantObject(name, m.USER_IDENTIFIER, 1, 11)


def token_object(name: str) -> m.ParticipantObject:
    return m.ParticipantObject(f"token:{name}", m.USER_IDENTIFIER, 2, 11)


def model_object(ref: str) -> m.ParticipantObject:
    return m.ParticipantObject(f"model:{ref}", m.URI, 2, 4)


def job_object(job_id: int) -> m.ParticipantObject:
    return m.ParticipantObject(f"job:{job_id}", m.URI, 2, 20)
