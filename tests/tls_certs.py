"""Certificates made at test time with the openssl CLI: a CA, and leaf
certificates it signs, for the DICOM TLS tests. Nothing is checked in."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from peers import require_tool


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run([require_tool("openssl"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"openssl {' '.join(args)}: {proc.stderr}"


@dataclass(frozen=True)
class Leaf:
    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class CertificateAuthority:
    directory: Path
    name: str

    @property
    def certificate(self) -> Path:
        return self.directory / f"{self.name}.crt"

    @property
    def private_key(self) -> Path:
        return self.directory / f"{self.name}.key"

    @classmethod
    def create(cls, directory: Path, name: str) -> "CertificateAuthority":
        directory.mkdir(parents=True, exist_ok=True)
        ca = cls(directory, name)
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-keyout", ca.private_key.name, "-out", ca.certificate.name,
                 "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
        return ca

    def issue(self, name: str, *, server: bool = False) -> Leaf:
        """A leaf for `name` signed by this CA; a server one names localhost and 127.0.0.1."""
        key, csr, crt, ext = (self.directory / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
        usage = "serverAuth" if server else "clientAuth"
        lines = ["basicConstraints=CA:FALSE", "keyUsage=digitalSignature,keyEncipherment", f"extendedKeyUsage={usage}"]
        if server:
            lines.append("subjectAltName=DNS:localhost,IP:127.0.0.1")
        ext.write_text("\n".join(lines) + "\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", csr.name,
                 "-subj", f"/CN={name}", cwd=self.directory)
        _openssl("x509", "-req", "-in", csr.name, "-CA", self.certificate.name, "-CAkey", self.private_key.name,
                 "-CAcreateserial", "-days", "2", "-out", crt.name, "-extfile", ext.name, cwd=self.directory)
        return Leaf(crt, key)
