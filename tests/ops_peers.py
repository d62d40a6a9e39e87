"""Peers for the operations tests (issue 11): a modality that sends at its own
pace over one association, and a PACS that is slow to store.

Both are real pynetdicom DICOM applications on loopback ports, talking to a
real `carina serve`; what they saw (acknowledgements, aborts, each
association's span and content) is what the tests count.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    DigitalXRayImageStorageForPresentation,
    EncapsulatedPDFStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    Verification,
)

from dicom_scp.sockets import LOW_LATENCY_HANDLER
from peers import free_port


class PacedSender(threading.Thread):
    """Sends `files` over ONE association, `pause` seconds apart (a modality
    pushing a long series), recording each C-STORE's outcome in order:
    'acked' (status 0x0000), 'failed' (another status) or 'no-response' (the
    association died first). `acked_count` reaches each value as it happens."""

    def __init__(self, port: int, files: list[Path], *, pause: float, calling_ae: str = "MODALITY"):
        super().__init__(name="paced-sender", daemon=True)
        self.port, self.files, self.pause, self.calling_ae = port, files, pause, calling_ae
        self.outcomes: list[str] = []
        self.aborted = False
        self.error: BaseException | None = None
        self._acked = threading.Condition()

    @property
    def acked(self) -> list[Path]:
        return [f for f, o in zip(self.files, self.outcomes) if o == "acked"]

    def wait_acked(self, count: int, timeout: float) -> None:
        with self._acked:
            if not self._acked.wait_for(lambda: self.outcomes.count("acked") >= count or not self.is_alive(), timeout):
                raise AssertionError(f"only {self.outcomes.count('acked')} of {count} instances acknowledged in {timeout}s")

    def run(self) -> None:
        try:
            ae = AE(ae_title=self.calling_ae)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
            ae.add_requested_context(DigitalXRayImageStorageForPresentation, ["1.2.840.10008.1.2.1"])
            assoc = ae.associate("127.0.0.1", self.port, ae_title="CARINA", evt_handlers=[LOW_LATENCY_HANDLER])
            assert assoc.is_established, "association not established"
            try:
                for path in self.files:
                    if not assoc.is_established:
                        self._record("no-response")
                        continue
                    rsp = assoc.send_c_store(dcmread(path))
                    if rsp and "Status" in rsp:
                        self._record("acked" if rsp.Status == 0 else "failed")
                    else:
                        self._record("no-response")
                    if assoc.is_established:
                        time.sleep(self.pause)  # the modality's own pace, not a wait for an event
                self.aborted = assoc.is_aborted
            finally:
                if assoc.is_established:
                    assoc.release()
                self.aborted = self.aborted or assoc.is_aborted
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            with self._acked:
                self._acked.notify_all()

    def _record(self, outcome: str) -> None:
        with self._acked:
            self.outcomes.append(outcome)
            self._acked.notify_all()


@dataclass
class Reception:
    """One association the slow PACS accepted."""

    calling_ae: str
    start: float
    end: float | None = None
    sops: list[str] = field(default_factory=list)
    studies: set[str] = field(default_factory=set)
    released: bool = False


class SlowPacs:
    """A Storage SCP that takes `association_seconds` per association: it
    holds each association's first C-STORE response that long, then stores
    the rest at once. Every association and every C-STORE is recorded."""

    def __init__(self, association_seconds: float, ae_title: str = "SLOWPACS"):
        self.association_seconds = association_seconds
        self.ae_title = ae_title
        self.port = free_port()
        self.receptions: list[Reception] = []
        self._by_assoc: dict[int, Reception] = {}
        self._lock = threading.Lock()
        self._server = None

    def start(self) -> "SlowPacs":
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0
        ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = 120
        # Every kind Carina writes (outputs.kinds): a PACS that refused one would dead-letter the delivery.
        for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage, SegmentationStorage,
                          GrayscaleSoftcopyPresentationStateStorage, EncapsulatedPDFStorage, Verification):
            ae.add_supported_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        handlers = [
            (evt.EVT_ACCEPTED, self._opened),
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_RELEASED, lambda e: self._closed(e, released=True)),
            (evt.EVT_ABORTED, lambda e: self._closed(e, released=False)),
            (evt.EVT_CONN_CLOSE, lambda e: self._closed(e, released=False)),
        ]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _opened(self, event) -> None:
        with self._lock:
            reception = Reception(event.assoc.requestor.ae_title, time.monotonic())
            self._by_assoc[id(event.assoc)] = reception
            self.receptions.append(reception)

    def _store(self, event):
        reception = self._by_assoc[id(event.assoc)]
        if not reception.sops:
            time.sleep(self.association_seconds)  # the slowness under test: a PACS busy for this long
        ds = event.dataset
        with self._lock:
            reception.sops.append(str(ds.SOPInstanceUID))
            reception.studies.add(str(ds.StudyInstanceUID))
        return 0x0000

    def _closed(self, event, *, released: bool) -> None:
        with self._lock:
            reception = self._by_assoc.get(id(event.assoc))
            if reception is not None and reception.end is None:
                reception.end = time.monotonic()
                reception.released = released
