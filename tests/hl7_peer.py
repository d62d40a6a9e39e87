"""A stand-alone HL7 v2 receiver for the tests: python-hl7's asyncio MLLP server.

It is deliberately independent of Carina: it parses every message with
python-hl7 (not hl7apy, which Carina builds with), records what a RIS would
look at to a JSON-lines file, and answers each message with the next ACK
code from --acks (the last code repeats), e.g. `--acks AE,AA` answers the
first message AE and every later one AA; NONE records the message and never
answers it.

    python tests/hl7_peer.py --record out.jsonl --acks AE,AA [--port 0]

The first line on stdout is `PORT <n>` once the server listens. Tests use
the `Hl7Peer` class below, which runs this file as a separate process.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import traceback
from pathlib import Path

from hl7.mllp import start_hl7_server


def _field(segment, index: int) -> str:
    try:
        return str(segment(index))
    except (IndexError, KeyError):
        return ""


def _component(segment, field: int, component: int, repetition: int = 1) -> str:
    """python-hl7 returns a plain str for a field without repetitions/components."""
    try:
        value = segment(field)
    except (IndexError, KeyError):
        return ""
    for index in (repetition, component):
        if isinstance(value, str):
            return value if index == 1 else ""
        try:
            value = value(index)
        except (IndexError, KeyError):
            return ""
    return str(value)


def describe(message) -> dict:
    """What a receiving RIS would file, read with python-hl7 only."""
    msh = message.segment("MSH")
    pid = message.segment("PID")
    obr = message.segment("OBR")
    record = {
        "control_id": _field(msh, 10),
        "message_type": _field(msh, 9),
        "version": _field(msh, 12),
        "charset": _field(msh, 18),
        "segments": [str(seg[0]) for seg in message],
        "pid": {
            "id": _component(pid, 3, 1),
            "authority": _component(pid, 3, 4),
            # python-hl7 splits on separators; unescape gives the original text back.
            "family": message.unescape(_component(pid, 5, 1)),
            "given": message.unescape(_component(pid, 5, 2)),
            "birth_date": _field(pid, 7),
            "sex": _field(pid, 8),
        },
        "placer": message.unescape(_component(obr, 2, 1)),
        "filler": message.unescape(_component(obr, 3, 1)),
        "procedure": _component(obr, 4, 1),
        "procedure_system": _component(obr, 4, 3),
        "result_status": _field(obr, 25),
        "obr27_priority": _component(obr, 27, 6),
        "notes": [message.unescape(_field(seg, 3)) for seg in message.segments("NTE")],
        "obx": [],
    }
    try:
        tq1 = message.segment("TQ1")
        record["tq1_priority"] = _component(tq1, 9, 1)
    except KeyError:
        record["tq1_priority"] = ""
    for obx in message.segments("OBX"):
        record["obx"].append({
            "value_type": _field(obx, 2),
            "code": _component(obx, 3, 1),
            "text": _component(obx, 3, 2),
            "system": _component(obx, 3, 3),
            "value": _component(obx, 5, 1),
            "flag": _field(obx, 8),
            "probability": _field(obx, 9),
            "status": _field(obx, 11),
        })
    return record


class Hl7Peer:
    """This script as a separate process, for the tests."""

    def __init__(self, workdir: Path, acks: str = "AA", reject_text: str | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.record = self.workdir / f"hl7-peer-{acks.replace(',', '-')}.jsonl"
        self.acks, self.reject_text = acks, reject_text
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self) -> "Hl7Peer":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--record", str(self.record), "--acks", self.acks]
        if self.reject_text:
            cmd += ["--reject-text", self.reject_text]
        self.stderr_path = self.workdir / f"hl7-peer-{self.acks.replace(',', '-')}.err"
        self._stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        line = self.proc.stdout.readline()  # "PORT <n>" once listening
        assert line.startswith("PORT "), f"hl7 peer did not start ({line!r}); see {self.stderr_path}"
        self.port = int(line.split()[1])
        return self

    def messages(self) -> list[dict]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text(encoding="utf-8").splitlines() if line]

    def errors(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._stderr.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", required=True)
    parser.add_argument("--acks", default="AA")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reject-text", default="rejected by the test RIS: unknown order")
    args = parser.parse_args()
    codes = [c.strip().upper() for c in args.acks.split(",") if c.strip()]
    received = 0

    async def on_connection(reader, writer):
        nonlocal received
        try:
            while not reader.at_eof():
                message = await reader.readmessage()
                code = codes[min(received, len(codes) - 1)]
                received += 1
                record = describe(message)
                record["answered"] = code
                with open(args.record, "a", encoding="utf-8") as out:
                    out.write(json.dumps(record) + "\n")
                if code == "NONE":  # a receiver that never answers: the sender must time out
                    continue
                ack = message.create_ack(code, message_id=f"PEER{received}", application="TESTRIS")
                if code != "AA":
                    text = args.reject_text if code == "AR" else "temporary failure in the test RIS"
                    ack.segment("MSA").assign_field(ack.escape(text), 3)
                writer.writemessage(ack)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass  # the sender closed the connection after its ACK
        except Exception:  # a bug here must show in the test output, not vanish
            traceback.print_exc()
            raise
        finally:
            writer.close()

    server = await start_hl7_server(on_connection, host="127.0.0.1", port=args.port, encoding="utf-8")
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
