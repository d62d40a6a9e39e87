"""Socket options for every DICOM association, inbound or outbound."""
from __future__ import annotations

import logging
import socket

from pynetdicom import evt

log = logging.getLogger(__name__)


def _set_nodelay(event: evt.Event) -> None:
    # pynetdicom leaves Nagle on; with it, each small PDU waits for the peer's
    # delayed ACK and the SCU runs ~8x slower.
    try:
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:  # closed before we got to it
        log.debug("could not set TCP_NODELAY: %s", exc)


NODELAY_HANDLER = (evt.EVT_CONN_OPEN, _set_nodelay)
