"""A real PostgreSQL server for the test session (never a mock): the system's ``initdb``/``pg_ctl``.

One server per session on a free port, its data and unix socket in a temporary directory; each test
gets a fresh database. As root the binaries run as the ``postgres`` user (PostgreSQL refuses root).
Where no server can start, :func:`start` says why and the PostgreSQL tests skip with that reason.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

#: A role that must give its password (the wrong-credentials tests use it); every other local login is trusted.
PASSWORD_USER, PASSWORD = "secured", "right-password"


@dataclass
class Server:
    root: Path
    port: int
    run_as: list[str]

    def url(self, dbname: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        auth = f"{user}:{password}" if password is not None else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def sql(self, statement: str, dbname: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(statement)

    def fresh_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        self.sql(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(self.run_as + ["pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start() -> Server | str:
    """A running server, or the reason none can start (the tests skip with it)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install 'lifecycle-agent[postgres]'"
    if not shutil.which("initdb") or not shutil.which("pg_ctl"):
        return "no PostgreSQL server binaries (initdb, pg_ctl) on PATH"
    root = Path(tempfile.mkdtemp(prefix="la-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL will not run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    steps = [
        ["initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"],
    ]
    for step in steps:
        done = subprocess.run(run_as + step, capture_output=True, text=True, timeout=120)
        if done.returncode:
            shutil.rmtree(root, ignore_errors=True)
            return f"initdb failed: {done.stderr.strip()[-300:]}"
    hba = data / "pg_hba.conf"
    hba.write_text(f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    done = subprocess.run(run_as + ["pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
                          capture_output=True, text=True, timeout=120)
    if done.returncode:
        log = (root / "log").read_text()[-300:] if (root / "log").exists() else done.stderr
        shutil.rmtree(root, ignore_errors=True)
        return f"pg_ctl start failed: {log.strip()}"
    server = Server(root, port, run_as)
    server.sql(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'")
    return server
