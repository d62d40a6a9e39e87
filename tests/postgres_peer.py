"""The PostgreSQL the scale-out tests run against.

The machine's own server (127.0.0.1:5432, database `test`, user `root`, trust
auth) when it accepts us; otherwise a throwaway cluster built with Debian's
binaries (`scripts/ensure-peers.sh` installs them) on a free loopback port, and
deleted at the end of the session. A fresh machine then needs no setup beyond
`make test`, and a developer's running server is used as it always was.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from peers import free_port

MACHINE_POSTGRES_URL = "postgresql+psycopg://root@127.0.0.1:5432/test"
DEBIAN_POSTGRES_ROOT = Path("/usr/lib/postgresql")


def unusable(url: str) -> str | None:
    """Why `url` cannot be used (nothing listening, role or database missing), or None."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None
    except Exception as exc:
        return str(exc).splitlines()[0]
    finally:
        engine.dispose()


def debian_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<ver>/bin that has initdb and pg_ctl."""
    found = [d / "bin" for d in DEBIAN_POSTGRES_ROOT.glob("*") if (d / "bin" / "initdb").exists() and (d / "bin" / "pg_ctl").exists()]
    if not found:
        pytest.fail("PostgreSQL is not running on 127.0.0.1:5432 and Debian's `postgresql` package is not installed; "
                    "`make test` installs it (scripts/ensure-peers.sh)")
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else -1)


class ThrowawayCluster:
    """initdb + pg_ctl in a temp dir, trust auth, listening on 127.0.0.1 only.

    initdb and pg_ctl refuse to run as root, so under root (CI) they run as the
    `postgres` user that Debian's package creates, in a temp dir it owns."""

    superuser = "postgres"

    def __init__(self):
        self.bin = debian_bin_dir()
        self.port = free_port()
        self.root: Path | None = None
        self.as_user: list[str] = []
        self.owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root, and there is no `postgres` user to run initdb as; install Debian's `postgresql`")
            self.as_user = ["runuser", "-u", "postgres", "--"]
            self.owner = (entry.pw_uid, entry.pw_gid)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.superuser}@127.0.0.1:{self.port}/test"

    def _run(self, tool: str, *args: str) -> None:
        proc = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True,
                              cwd=self.root, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")

    def start(self) -> str:
        self.root = Path(tempfile.mkdtemp(prefix="carina-pg-"))
        try:
            if self.owner:
                os.chown(self.root, *self.owner)
            self._run("initdb", "-D", str(self.data), "-U", self.superuser, "--auth=trust",
                      "--encoding=UTF8", "--locale=C", "--no-sync")
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write(
                    "\n# carina tests: loopback only, on our own port and socket dir\n"
                    f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.root}'\n"
                    # Thrown away after the session: no test here checks PostgreSQL's own crash safety.
                    "fsync = off\n"
                )
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")
            import psycopg

            with psycopg.connect(host="127.0.0.1", port=self.port, user=self.superuser, dbname="postgres",
                                 autocommit=True, connect_timeout=10) as conn:
                conn.execute("CREATE DATABASE test")
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        """Stop the server and delete every file of it; safe to call twice or after a failed start."""
        if self.root is None:
            return
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
            except Exception:
                self._kill(pid_file)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    @staticmethod
    def _kill(pid_file: Path) -> None:
        """Last resort when pg_ctl cannot stop it: SIGKILL the postmaster (its children exit with it)."""
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
