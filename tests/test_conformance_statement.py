"""docs/conformance-statement.md says what Carina negotiates: this checks it on the wire.

The statement's machine-readable tables (each after a
`<!-- conformance-table: NAME -->` marker) are parsed, then:

- **SCP**: a real `carina serve` is asked, with pynetdicom as the requestor,
  for every SOP class the statement lists as accepted and as rejected, plus
  classes it does not list; and, for the scored classes, Verification and a
  sample of the other storage classes, for every transfer syntax it lists
  plus unlisted ones. The accepted set must equal the statement's. Also the
  implementation identity, the advertised PDU length, the peers check, the
  unchecked called AE title and the answer to an asynchronous operations
  window proposal.
- **SCU**: the real encode and deliver stages (tests/pipeline_rig.py) send a
  study with every output kind to a recording SCP, which keeps the
  presentation contexts Carina proposed and the objects it sent; they must
  be the statement's SCU contexts and its created-object and character-set
  tables. The destination probe's C-ECHO proposes the Verification context
  the statement lists.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation, UserIdentityNegotiation
from pynetdicom.sop_class import _STORAGE_CLASSES

from dicom_scp.contexts import CHEST_CAPABLE_SOP_CLASSES
from dicom_scp.scu import echo
from node.config import Settings
from peers import CarinaNode, free_port, wait_until
from pipeline_rig import PipelineRig

STATEMENT = Path(__file__).resolve().parent.parent / "docs" / "conformance-statement.md"
VERIFICATION = "1.2.840.10008.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# Classes and syntaxes the statement does not list, which must be refused.
UNLISTED_CLASSES = ("1.2.826.0.1.3680043.10.1249.99.1",  # private
                    "1.2.840.10008.5.1.4.1.1.999",         # not a storage class
                    "1.2.840.10008.5.1.4.1.1.88.99")
UNLISTED_SYNTAXES = ("1.2.840.10008.1.2.4.999", "1.2.826.0.1.3680043.10.1249.99.2")
CALLING = "PROBE"  # one of the test senders the node's dicom.peers lists


# -- the statement's tables -----------------------------------------------------------------------------


def table(name: str) -> list[dict[str, str]]:
    lines = STATEMENT.read_text().splitlines()
    marker = f"<!-- conformance-table: {name} -->"
    assert lines.count(marker) == 1, f"the statement has no single table {name!r}"
    at = lines.index(marker) + 1
    header = [cell.strip() for cell in lines[at].strip().strip("|").split("|")]
    assert set(lines[at + 1].replace("|", "").strip()) <= set("-: "), f"{name}: no separator row"
    rows = []
    for line in lines[at + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == len(header), f"{name}: {line}"
        rows.append(dict(zip(header, cells)))
    assert rows, f"{name}: empty"
    return rows


def uids(rows: list[dict[str, str]], column: str) -> list[str]:
    values = [row[column] for row in rows]
    assert all(re.fullmatch(r"[0-9]+(\.[0-9]+)+", v) for v in values), f"not UIDs: {values}"
    assert len(values) == len(set(values)), f"{column}: a UID listed twice"
    return values


def scp_classes() -> dict[str, str]:
    """SOP Class UID -> what Carina does with it, as the statement says."""
    rows = table("scp-sop-classes")
    return dict(zip(uids(rows, "SOP Class UID"), (r["What Carina does with it"] for r in rows)))


def scp_syntaxes() -> list[dict[str, str]]:
    rows = table("scp-transfer-syntaxes")
    uids(rows, "Transfer Syntax UID")
    return rows


def listed(column: str) -> set[str]:
    return {r["Transfer Syntax UID"] for r in scp_syntaxes() if r[column] == "Yes"}


# -- a requestor ------------------------------------------------------------------------------------------


def negotiate(port: int, contexts: list[tuple[str, str]], *, called: str = "CARINA", calling: str = CALLING,
              extra=None) -> tuple[set[tuple[str, str]], object]:
    """Propose each (SOP class, transfer syntax) as its own presentation context;
    the accepted pairs and the (released) association."""
    assert len(contexts) <= 128, "at most 128 presentation contexts in one association"
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=called, ext_neg=extra)
    try:
        assert assoc.is_established, f"association not established ({'rejected' if assoc.is_rejected else 'failed'})"
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
    finally:
        if assoc.is_established:
            assoc.release()
    return accepted, assoc


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    carina = CarinaNode(tmp_path_factory.mktemp("conformance")).start()
    yield carina
    carina.stop()


# -- SCP: SOP classes -------------------------------------------------------------------------------------


def test_the_statement_covers_every_storage_class_pynetdicom_knows():
    accepted = set(scp_classes())
    rejected = set(uids(table("scp-rejected-sop-classes"), "SOP Class UID"))
    assert not accepted & rejected
    # pynetdicom's current storage classes and the retired ones its StoragePresentationContexts still has.
    known = set(_STORAGE_CLASSES.values()) | {str(cx.abstract_syntax) for cx in StoragePresentationContexts}
    assert accepted | rejected == known | {VERIFICATION}
    assert {u for u, what in scp_classes().items() if what.startswith("stored; scored")} == set(CHEST_CAPABLE_SOP_CLASSES)


def test_scp_accepts_every_listed_sop_class(node):
    classes = list(scp_classes())
    assert len(classes) == 121
    accepted, _ = negotiate(node.dicom_port, [(c, ExplicitVRLittleEndian) for c in classes])
    assert {c for c, _ in accepted} == set(classes)


def test_scp_rejects_the_listed_and_the_unlisted_sop_classes(node):
    refused = uids(table("scp-rejected-sop-classes"), "SOP Class UID") + list(UNLISTED_CLASSES)
    assert len(refused) == 67
    accepted, _ = negotiate(node.dicom_port, [(VERIFICATION, ExplicitVRLittleEndian)] +
                            [(c, ExplicitVRLittleEndian) for c in refused])
    assert accepted == {(VERIFICATION, ExplicitVRLittleEndian)}


# -- SCP: transfer syntaxes ---------------------------------------------------------------------------------


def accepted_syntaxes(port: int, sop_class: str) -> set[str]:
    proposed = [r["Transfer Syntax UID"] for r in scp_syntaxes()] + list(UNLISTED_SYNTAXES)
    accepted, _ = negotiate(port, [(sop_class, syntax) for syntax in proposed])
    assert {c for c, _ in accepted} <= {sop_class}
    return {syntax for _, syntax in accepted}


def test_the_statement_lists_every_transfer_syntax_pynetdicom_knows():
    assert {r["Transfer Syntax UID"] for r in scp_syntaxes()} == set(ALL_TRANSFER_SYNTAXES)


@pytest.mark.parametrize("sop_class", CHEST_CAPABLE_SOP_CLASSES)
def test_scp_transfer_syntaxes_of_the_scored_classes(node, sop_class):
    assert accepted_syntaxes(node.dicom_port, sop_class) == listed("CR, DX, SC (scored classes)")


def test_scp_transfer_syntaxes_of_other_storage_classes(node):
    others = [u for u, what in scp_classes().items() if what.startswith("stored, marked ignored")]
    assert len(others) == 116
    # A spread of them (the first, the last, the objects Carina itself writes, and every 20th).
    sample = sorted({others[0], others[-1], *others[::20], "1.2.840.10008.5.1.4.1.1.88.34",
                     "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.104.1"})
    for sop_class in sample:
        assert accepted_syntaxes(node.dicom_port, sop_class) == listed("Other storage SOP classes"), sop_class


def test_scp_picks_in_its_tables_order_among_proposed_syntaxes(node):
    """One context proposing several syntaxes gets the first of them in Table 4.2-4's order."""
    order = [r["Transfer Syntax UID"] for r in scp_syntaxes()]
    jpeg_lossless, jpeg_ls, explicit = "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.1"
    for sop_class, proposal in (("1.2.840.10008.5.1.4.1.1.1", [jpeg_lossless, jpeg_ls, explicit]),
                                ("1.2.840.10008.5.1.4.1.1.2", [jpeg_ls, jpeg_lossless])):
        ae = AE(ae_title=CALLING)
        ae.add_requested_context(sop_class, proposal)
        assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="CARINA")
        try:
            [context] = assoc.accepted_contexts
            assert context.transfer_syntax[0] == min(proposal, key=order.index), (sop_class, proposal)
        finally:
            assoc.release()


def test_scp_transfer_syntaxes_of_verification(node):
    assert accepted_syntaxes(node.dicom_port, VERIFICATION) == listed("Verification")


# -- SCP: association policies ----------------------------------------------------------------------------------


def implementation() -> dict[str, str]:
    return {r["Item"]: r["Value"] for r in table("implementation")}


def limits() -> dict[str, str]:
    return {r["Parameter"]: r["Value"] for r in table("association-limits")}


def advertised(text: str) -> int:
    return int(re.match(r"(\d+) bytes", text).group(1))


def test_scp_association_policies(node):
    # Identity and PDU length, as the acceptor presents them.
    _, assoc = negotiate(node.dicom_port, [(VERIFICATION, ExplicitVRLittleEndian)])
    identity = implementation()
    assert assoc.acceptor.implementation_class_uid == identity["Implementation Class UID"]
    assert assoc.acceptor.implementation_version_name == identity["Implementation Version Name"]
    advertised_pdu = advertised(limits()["Maximum PDU length received (SCP, advertised)"])
    assert assoc.acceptor.maximum_length == advertised_pdu == Settings().dicom.max_pdu_bytes
    # The called AE title is not checked.
    accepted, _ = negotiate(node.dicom_port, [(VERIFICATION, ExplicitVRLittleEndian)], called="ANY_TITLE")
    assert accepted
    # An asynchronous operations window proposal gets 1 invoked / 1 performed.
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    _, assoc = negotiate(node.dicom_port, [(VERIFICATION, ExplicitVRLittleEndian)], extra=[window])
    assert assoc.acceptor.asynchronous_operations == (1, 1)
    # User Identity is no access control: the association goes on, without a positive response.
    identity_rq = UserIdentityNegotiation()
    identity_rq.user_identity_type = 1
    identity_rq.primary_field = b"someone"
    identity_rq.positive_response_requested = True
    accepted, assoc = negotiate(node.dicom_port, [(VERIFICATION, ExplicitVRLittleEndian)], extra=[identity_rq])
    assert accepted and not assoc.acceptor.user_identity
    # Only listed peers: another calling AE title gets A-ASSOCIATE-RJ, calling AE not recognised.
    ae = AE(ae_title="OUTSIDER")
    ae.add_requested_context(VERIFICATION)
    rejected = ae.associate("127.0.0.1", node.dicom_port, ae_title="CARINA")
    assert rejected.is_rejected
    rj = rejected.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)


# -- SCU: what delivery proposes and sends ------------------------------------------------------------------------


class RecordingPacs:
    """A pynetdicom Storage SCP that accepts every storage class in every
    syntax and keeps what each association proposed and what was stored."""

    def __init__(self):
        self.port = free_port()
        self.proposals: list[list[tuple[str, list[str]]]] = []
        self.requestors: list[tuple[str, str, int]] = []
        self.stored: list[tuple[object, str]] = []  # (dataset, transfer syntax)
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        # Explicit VR LE first: an acceptor picks in its own order, and this one
        # takes Carina's objects as they are written.
        syntaxes = [ExplicitVRLittleEndian, *(ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian)]
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        ae.add_supported_context(VERIFICATION, ALL_TRANSFER_SYNTAXES)
        for sop_class in ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.66.4",
                          "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.104.1"):
            ae.add_supported_context(sop_class, syntaxes)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_ACCEPTED, self._accepted), (evt.EVT_C_STORE, self._store), (evt.EVT_C_ECHO, lambda e: 0)])

    def _accepted(self, event):
        requestor = event.assoc.requestor
        with self._lock:
            self.proposals.append([(str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
                                   for cx in requestor.requested_contexts])
            self.requestors.append((requestor.implementation_class_uid, requestor.implementation_version_name,
                                    requestor.maximum_length))

    def _store(self, event):
        with self._lock:
            self.stored.append((event.dataset, str(event.context.transfer_syntax)))
        return 0x0000

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def recording_pacs():
    pacs = RecordingPacs()
    yield pacs
    pacs.stop()


def scu_contexts() -> dict[str, list[str]]:
    rows = table("scu-presentation-contexts")
    assert all(r["Role"] == "SCU" and r["Extended Negotiation"] == "None" for r in rows)
    return {uid: [ts.strip() for ts in r["Transfer Syntaxes proposed"].split(",")]
            for uid, r in zip(uids(rows, "SOP Class UID"), rows)}


FOUR_POSITIVES = {"Pneumothorax": 0.91, "Effusion": 0.73, "Cardiomegaly": 0.66, "Mass": 0.58}


def test_scu_proposes_and_sends_what_the_statement_lists(tmp_path, recording_pacs):
    destination = {"name": "pacs", "type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                   "port": recording_pacs.port}
    rig = PipelineRig(tmp_path, destinations=[destination])
    try:
        study_id, source = rig.add_study(FOUR_POSITIVES)  # every output kind: the regions give a SEG and a GSPS
        rig.encode(study_id)
        jobs = rig.run_deliveries(study_id)
        assert jobs["pacs"].state == "done", jobs["pacs"].last_error
    finally:
        rig.close()
    # Two associations for the study version (the report's objects, then the SCs),
    # proposing between them the statement's contexts, each context once.
    expected = {uid: syntaxes for uid, syntaxes in scu_contexts().items() if uid != VERIFICATION}
    report, captures = recording_pacs.proposals
    assert set(dict(captures)) == {SECONDARY_CAPTURE} and SECONDARY_CAPTURE not in dict(report)
    assert dict(report) | dict(captures) == expected and len(report) + len(captures) == len(expected)
    identity = implementation()
    assert len(recording_pacs.requestors) == 2
    for class_uid, version_name, max_pdu in recording_pacs.requestors:
        assert (class_uid, version_name) == (identity["Implementation Class UID"], identity["Implementation Version Name"])
        assert max_pdu == advertised(limits()["Maximum PDU length received (SCU, advertised)"])
    # What arrived: the created-objects table (class, series, modality), sent as Explicit VR LE.
    objects = {r["SOP Class UID"]: r for r in table("created-objects")}
    assert set(objects) == set(expected)
    assert {str(ds.SOPClassUID) for ds, _ in recording_pacs.stored} == set(objects)
    charsets = {r["Object"]: r["Specific Character Set (0008,0005)"] for r in table("character-sets")}
    for ds, syntax in recording_pacs.stored:
        row = objects[str(ds.SOPClassUID)]
        assert syntax == ExplicitVRLittleEndian
        assert (int(ds.SeriesNumber), ds.Modality) == (int(row["Series Number"]), row["Modality"].split()[0]), row
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert str(ds.SeriesDescription).startswith(row["Series Description"].split(" (")[0])
        declared = ds.get("SpecificCharacterSet")
        rule = next(v for k, v in charsets.items() if row["Object"].startswith(k))
        if rule == "ISO_IR 192":
            assert declared == "ISO_IR 192", row["Object"]
        else:  # "absent, or ISO_IR 192 when a value needs it": this study's values are all ASCII
            assert rule.startswith("absent") and declared is None, (row["Object"], declared)
    annex_a_claims(recording_pacs.stored, source)
    # The counts the table gives: one SR, SEG, GSPS and PDF; a summary SC plus one per positive.
    counts = {}
    for ds, _ in recording_pacs.stored:
        counts[str(ds.SOPClassUID)] = counts.get(str(ds.SOPClassUID), 0) + 1
    assert counts == {"1.2.840.10008.5.1.4.1.1.88.34": 1, "1.2.840.10008.5.1.4.1.1.7": 1 + len(FOUR_POSITIVES),
                      "1.2.840.10008.5.1.4.1.1.66.4": 1, "1.2.840.10008.5.1.4.1.1.11.1": 1,
                      "1.2.840.10008.5.1.4.1.1.104.1": 1}


def annex_a_claims(stored, source) -> None:
    """Annex A's statements about each created object, on the objects delivered."""
    by_class = {}
    for ds, _ in stored:
        by_class.setdefault(str(ds.SOPClassUID), []).append(ds)
    [sr] = by_class["1.2.840.10008.5.1.4.1.1.88.34"]
    assert (sr.CompletionFlag, sr.PreliminaryFlag, sr.VerificationFlag) == ("COMPLETE", "PRELIMINARY", "UNVERIFIED")
    title = sr.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("126000", "DCM")
    [gsps] = by_class["1.2.840.10008.5.1.4.1.1.11.1"]
    evidence = {str(ref.ReferencedSOPInstanceUID) for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert evidence == {str(source.SOPInstanceUID), str(gsps.SOPInstanceUID)}
    for ds in stored_all(by_class):
        assert ds.Manufacturer == "Carina"
        purposes = [p.CodeValue for item in ds.ContributingEquipmentSequence
                    for p in item.PurposeOfReferenceCodeSequence]
        assert "Newcode1" in purposes, ds.SOPClassUID
        assert str(ds.SOPInstanceUID).startswith("2.25.")
    for sc in by_class["1.2.840.10008.5.1.4.1.1.7"]:
        assert (sc.SamplesPerPixel, sc.PhotometricInterpretation, sc.PlanarConfiguration, sc.BitsAllocated) == \
            (3, "RGB", 0, 8)
        assert (sc.ConversionType, sc.BurnedInAnnotation, sc.ImageLaterality) == ("WSD", "YES", "U")
        assert max(sc.Rows, sc.Columns) <= 2048
    [seg] = by_class["1.2.840.10008.5.1.4.1.1.66.4"]
    assert (seg.SegmentationType, seg.ContentLabel) == ("BINARY", "CARINA_AI")
    assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"AUTOMATIC"}
    assert gsps.ContentLabel == "CARINA_AI" and gsps.PresentationLUTShape in ("IDENTITY", "INVERSE")
    assert len(gsps.GraphicLayerSequence) == len(seg.SegmentSequence)
    [pdf] = by_class["1.2.840.10008.5.1.4.1.1.104.1"]
    assert (pdf.MIMETypeOfEncapsulatedDocument, pdf.BurnedInAnnotation) == ("application/pdf", "YES")
    concept = pdf.ConceptNameCodeSequence[0]
    assert (concept.CodeValue, concept.CodingSchemeDesignator) == ("18748-4", "LN")
    assert int(pdf.EncapsulatedDocumentLength) <= len(pdf.EncapsulatedDocument)


def stored_all(by_class):
    return [ds for group in by_class.values() for ds in group]


def test_scu_verification_proposes_what_the_statement_lists(recording_pacs):
    status = echo(calling_ae="CARINA", called_ae="PACS", host="127.0.0.1", port=recording_pacs.port)
    assert status == 0x0000
    wait_until(lambda: recording_pacs.proposals, 10, what="the C-ECHO association")
    assert recording_pacs.proposals == [[(VERIFICATION, scu_contexts()[VERIFICATION])]]
