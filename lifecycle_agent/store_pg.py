"""The PostgreSQL backend of :class:`~lifecycle_agent.store.Store`, so several server replicas share agents.

``Store("postgresql://user@host/dbname")`` opens it; everything else about the store (the schema and
its migrations, the budget rule, the claim-release rule, every query but the few below) is the SQLite
store's own code. What differs:

- every write transaction first takes one transaction-level advisory lock, so writes serialize across
  processes and hosts exactly as ``BEGIN IMMEDIATE`` serializes them on SQLite (a context version is
  written once, a completion rated once); reads never wait for it;
- connections come from a psycopg pool (one per thread at a time); a killed process's open transaction
  is rolled back by the server, so only committed, acknowledged writes remain;
- the schema statements use PostgreSQL types (``DOUBLE PRECISION`` times, identity episode ids) and
  JSON fields are read with ``->>``.

psycopg is imported only here, when a ``postgresql://`` URL is opened (``pip install 'lifecycle-agent[postgres]'``).
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from .errors import StoreError, StoreLockedError
from .store import DEFAULT_BUSY_TIMEOUT, Store

URL_PREFIXES = ("postgresql://", "postgres://")
#: The key of the advisory lock every write transaction holds (any fixed 64-bit number: "lifecycl" in ASCII).
WRITE_LOCK_KEY = 0x6C6966656379636C
#: Connections each process keeps open (a server's worker threads share them).
DEFAULT_POOL_SIZE = 8
#: Seconds to wait for the server when connecting.
CONNECT_TIMEOUT_S = 10
INSTALL_HINT = "pip install 'lifecycle-agent[postgres]'"


def is_postgres_url(db: Any) -> bool:
    return isinstance(db, str) and db.startswith(URL_PREFIXES)


def redact(url: str) -> str:
    """The URL as messages show it: the password replaced by ``***``."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def _psycopg():
    try:
        import psycopg
        import psycopg_pool
    except ImportError:
        raise StoreError(
            f"a postgresql:// database needs the PostgreSQL driver: {INSTALL_HINT}"
        ) from None
    return psycopg, psycopg_pool


class _Connection:
    """A psycopg connection that speaks the store's SQL (``?`` placeholders), as ``sqlite3.Connection`` does."""

    def __init__(self, conn):
        self.raw = conn

    def execute(self, sql: str, params: tuple | list | dict = ()):
        return self.raw.execute(_placeholders(sql), params)


def _placeholders(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresStore(Store):
    """The store on a PostgreSQL database (see the module docstring). Thread-safe; a pool per store.

    Args:
        url: ``postgresql://user[:password]@host[:port]/dbname`` (libpq parameters such as
            ``?sslmode=require`` pass through).
        busy_timeout: seconds a write waits for another writer's lock before :class:`StoreLockedError`.
        create: ``False`` refuses a database that holds no lifecycle-agent store yet.
        pool_size: most connections this process keeps open (default 8).
    """

    _SQL_TABLES = (
        "SELECT table_name AS name FROM information_schema.tables "
        "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY table_name"
    )
    _SQL_UPDATE_LANDED = (
        "SELECT 1 FROM episodes WHERE kind = 'update' AND (metadata::jsonb ->> 'solve_episode_id') = ? LIMIT 1"
    )
    _SQL_CLAIMED_SOLVES = (
        "SELECT episode_id, metadata FROM episodes WHERE kind = 'solve' AND (metadata::jsonb -> 'feedback_claim') "
        "IS NOT NULL AND (metadata::jsonb ->> 'awaiting_feedback') = 'false'"
    )

    def __init__(self, url: str, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, *, create: bool = True,
                 pool_size: int = DEFAULT_POOL_SIZE):
        psycopg, psycopg_pool = _psycopg()
        self.url, self.path = url, redact(url)
        self.busy_timeout = float(busy_timeout)
        self._local = threading.local()
        self._lock = threading.RLock()
        self._db = None
        # one connection first, outside the pool: an unreachable server or refused credentials fail here, clearly
        try:
            psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S).close()
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to database {self.path}: {_first_line(exc)} (check --db)") from None
        self._pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=max(1, int(pool_size)), open=True, timeout=self.busy_timeout * 3,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S}, configure=self._configure,
            name="lifecycle-agent",
        )
        try:
            if not create and "meta" not in self.table_names():
                raise StoreError(f"database {self.path} holds no lifecycle-agent store (check --db)")
            self._check_and_migrate()  # refuses foreign or newer databases before changing anything
            self.close_dead_runs()
        except BaseException:
            self._pool.close()
            raise

    def _configure(self, conn) -> None:
        # a write waits this long for the advisory lock, then fails as SQLite's busy timeout does
        conn.execute(f"SET lock_timeout = {int(self.busy_timeout * 1000)}")

    @property
    def db(self):
        raise StoreError(f"Store.db (sqlite_utils) is for SQLite stores; {self.path} is PostgreSQL: use SQL through psycopg")

    def close(self) -> None:
        self._pool.close()

    @staticmethod
    def _ddl(statement: str) -> str:
        statement = statement.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
        return re.sub(r"\bREAL\b", "DOUBLE PRECISION", statement)

    @staticmethod
    def _json_key(value: int) -> Any:
        return str(value)  # ->> reads JSON as text

    def _after_copy(self, conn: Any) -> None:
        # copied rows carry their own episode ids: the identity sequence must continue after the largest
        conn.execute(
            "SELECT setval(pg_get_serial_sequence('episodes', 'episode_id'), COALESCE(MAX(episode_id), 0) + 1, false) "
            "FROM episodes"
        )

    @contextmanager
    def transaction(self) -> Iterator[_Connection]:
        """A write transaction holding the store's write lock: all or nothing, one writer at a time (every host)."""
        current = getattr(self._local, "conn", None)
        if current is not None:  # nested: join the outer transaction
            yield current
            return
        psycopg, psycopg_pool = _psycopg()
        try:
            with self._pool.connection() as raw, raw.transaction():
                try:
                    raw.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
                except psycopg.errors.LockNotAvailable:
                    raise StoreLockedError(
                        f"database {self.path} stayed locked by another writer for {self.busy_timeout:g} s; "
                        "retry later, or raise the busy timeout (Store(busy_timeout=...), --busy-timeout)"
                    ) from None
                self._local.conn = _Connection(raw)
                try:
                    yield self._local.conn
                finally:
                    self._local.conn = None
        except psycopg_pool.PoolTimeout:
            raise self._pool_exhausted() from None
        except psycopg.OperationalError as exc:
            raise StoreError(f"cannot write to database {self.path}: {_first_line(exc)}") from None

    def _read(self, sql: str, params: tuple | dict = ()) -> list[dict]:
        current = getattr(self._local, "conn", None)
        psycopg, psycopg_pool = _psycopg()
        try:
            if current is not None:  # inside a transaction: read what it wrote
                return _rows(current.execute(sql, params))
            with self._pool.connection() as raw:
                return _rows(raw.execute(_placeholders(sql), params))
        except psycopg_pool.PoolTimeout:
            raise self._pool_exhausted() from None
        except psycopg.OperationalError as exc:
            raise StoreError(f"cannot read database {self.path}: {_first_line(exc)}") from None

    def _pool_exhausted(self) -> StoreLockedError:
        return StoreLockedError(
            f"database {self.path}: no free connection in this process's pool for {self._pool.timeout:g} s "
            f"(all {self._pool.max_size} busy, or the server stopped answering); retry later, or raise pool_size"
        )


def _rows(cursor) -> list[dict]:
    columns = [c.name for c in cursor.description or ()]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
