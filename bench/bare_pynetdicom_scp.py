"""The floor for any receiver built on pynetdicom: a storage SCP with Carina's
network settings (chunked streaming of each dataset to a temp file, the same
maximum PDU, TCP_NODELAY and the event-driven waits of dicom_scp/sockets.py,
every storage SOP class in Explicit and Implicit VR
Little Endian) that only moves the received file into a directory (no fsync,
no header check, no database) and answers 0x0000.

bench/ingest.py runs it as a reference receiver beside Carina, dcmtk storescp
and Orthanc, so Carina's receiver can be compared with the protocol stack it
is built on, in the same run:

    python bench/bare_pynetdicom_scp.py PORT OUT_DIR [--max-pdu BYTES]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_scp.sockets import LOW_LATENCY_HANDLER  # noqa: E402
from node.config import DicomSettings  # noqa: E402

_config.STORE_RECV_CHUNKED_DATASET = True  # as dicom_scp/scp.py: each dataset streamed to a temp file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--max-pdu", type=int, default=DicomSettings.model_fields["max_pdu_bytes"].default,
                        help="default: Carina's dicom.max_pdu_bytes default")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def on_store(event: evt.Event) -> int:
        os.replace(event.dataset_path, args.out_dir / f"{event.request.AffectedSOPInstanceUID}.dcm")
        return 0x0000

    ae = AE("BARESCP")
    ae.maximum_pdu_size = args.max_pdu
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.start_server(("127.0.0.1", args.port), block=True,
                    evt_handlers=[LOW_LATENCY_HANDLER, (evt.EVT_C_STORE, on_store)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
