"""Debian's rsyslogd as the audit trail's syslog collector: foreground, on a free
loopback port, plain TCP or TLS (its ossl driver), writing every message it
receives, raw, one per line, to a file."""
from __future__ import annotations

import subprocess
from pathlib import Path

from peers import free_port, require_tool, wait_until, accepts_connections


class Rsyslog:
    def __init__(self, workdir: Path, *, tls: "tuple[Path, Path, Path] | None" = None):
        """`tls` = (CA cert, server cert, server key) turns TLS on."""
        self.binary = require_tool("rsyslogd")
        self.workdir = Path(workdir)
        self.port = free_port()
        self.tls = tls
        self.output = self.workdir / "received.log"
        self.proc: subprocess.Popen | None = None

    def _config(self) -> str:
        lines = [f'global(workDirectory="{self.workdir}" maxMessageSize="64k")']
        if self.tls:
            ca, cert, key = self.tls
            lines.append(f'global(DefaultNetstreamDriverCAFile="{ca}" DefaultNetstreamDriverCertFile="{cert}" '
                         f'DefaultNetstreamDriverKeyFile="{key}")')
            lines.append('module(load="imtcp" StreamDriver.Name="ossl" StreamDriver.Mode="1" '
                         'StreamDriver.AuthMode="anon")')
        else:
            lines.append('module(load="imtcp")')
        lines += [
            f'input(type="imtcp" address="127.0.0.1" port="{self.port}")',
            'template(name="raw" type="string" string="%rawmsg%\\n")',
            f'action(type="omfile" file="{self.output}" template="raw")',
        ]
        return "\n".join(lines) + "\n"

    def start(self) -> "Rsyslog":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "rsyslog.conf"
        config.write_text(self._config())
        check = subprocess.run([self.binary, "-N1", "-f", str(config)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, f"rsyslogd rejects its test config: {check.stdout}{check.stderr}"
        self.log = open(self.workdir / "rsyslogd.out", "ab")
        self.proc = subprocess.Popen([self.binary, "-n", "-f", str(config), "-i", str(self.workdir / "rsyslogd.pid")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.proc.poll() is None and accepts_connections(self.port), 30, what="rsyslogd listening")
        return self

    def messages(self) -> list[str]:
        if not self.output.exists():
            return []
        return [line for line in self.output.read_text(errors="replace").splitlines() if line]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
