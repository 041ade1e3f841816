"""The SQLite store: agents, append-only context versions, episodes and runs.

One module, one small interface (:class:`Store`), so a server database can replace
it later. Writes run in ``BEGIN IMMEDIATE`` transactions (WAL mode, a busy timeout
and a retry), so concurrent writers queue instead of failing half-way, and every
finished episode is committed before the next one begins.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import os
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

from pydantic import BaseModel, Field, ValidationError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from .errors import (
    AgentBusyError,
    AgentExistsError,
    AgentNotFoundError,
    ContextBudgetError,
    ContextConflictError,
    ContextFormatError,
    SchemaVersionError,
    StoreError,
    StoreLockedError,
    StoreReadOnlyError,
    VersionNotFoundError,
)
from .protocol import BudgetResult, apply_budget, neutralize
from .settings import AgentSettings

#: Schema version written by this release. Older databases are migrated on open.
SCHEMA_VERSION = 2
#: Attempts at ``BEGIN IMMEDIATE`` before a write gives up; each waits up to the busy timeout.
LOCK_ATTEMPTS = 3
#: Seconds one attempt waits for another writer's lock.
DEFAULT_BUSY_TIMEOUT = 10.0
EXPORT_FORMAT = "lifecycle-agent/agent-export"
EXPORT_FORMAT_VERSION = 1
MAX_AGENT_ID_CHARS = 128


class ContextVersion(BaseModel):
    """One version of an agent's context. Versions are append-only; version 0 is the initial context."""

    agent_id: str
    version: int
    text: str
    created_at: float = Field(description="Unix time, seconds.")
    parent_version: Optional[int] = Field(default=None, description="The version this one replaced.")
    episode_id: Optional[int] = Field(default=None, description="The update episode that wrote it, if any.")
    source: str = Field(description="init, update, rollback, fork, import or edit.")
    note: Optional[str] = Field(default=None, description="Why it was written (e.g. rollback to v3, truncated).")

    @property
    def created(self) -> "datetime.datetime":
        """``created_at`` as a timezone-aware UTC datetime."""
        return datetime.datetime.fromtimestamp(self.created_at, tz=datetime.timezone.utc)


class AgentInfo(BaseModel):
    """An agent as stored: its id, settings and head context version."""

    agent_id: str
    created_at: float
    head_version: int
    settings: dict[str, Any]
    owner: Optional[str] = None
    forked_from: Optional[str] = None
    forked_at_version: Optional[int] = None


class EpisodeRow(BaseModel):
    """One stored episode (solve or update)."""

    episode_id: int
    agent_id: str
    run_id: Optional[str]
    kind: str
    position: Optional[int]
    task_id: Optional[str]
    context_version: Optional[int] = Field(description="Solve: the version shown as Hints. Update: the version it read.")
    messages: list[dict]
    answer: Optional[str]
    reward: Optional[float]
    feedback: Optional[str]
    status: str = Field(description="ok, failed (task or model error), or for updates ok / format_miss / failed.")
    budget_status: Optional[str]
    error: Optional[str]
    prompt_set: Optional[str]
    model_id: Optional[str]
    prompt_tokens: Optional[int]
    completion_tokens: Optional[int]
    turns: list[dict] = Field(default_factory=list, description="Per model call: token ids and log-probs when the model gives them.")
    metadata: dict[str, Any] = Field(default_factory=dict)
    duration_s: Optional[float]
    completes_task: bool = Field(default=False, description="Whether this episode finished its task (resume skips it).")
    created_at: float


def check_agent_id(agent_id: Any) -> str:
    """Agent ids: 1-128 characters of letters, digits, ``-``, ``_``, ``.``, ``:``, ``@``; no path parts."""
    if not isinstance(agent_id, str) or not agent_id:
        raise ValueError("agent id must be a non-empty string")
    if len(agent_id) > MAX_AGENT_ID_CHARS:
        raise ValueError(f"agent id must be at most {MAX_AGENT_ID_CHARS} characters, got {len(agent_id)}")
    bad = [c for c in agent_id if not (c.isascii() and (c.isalnum() or c in "-_.:@"))]
    if bad or agent_id in (".", "..") or agent_id.startswith("."):
        raise ValueError(
            f"agent id {agent_id!r} is not allowed: use letters, digits and - _ . : @ (not starting with '.')"
        )
    return agent_id


class ContextWrite(NamedTuple):
    """What a context write stored: the new version, the budget's outcome (status and original length, from
    which callers word their messages) and the version's note."""

    version: ContextVersion
    budget: BudgetResult
    note: Optional[str]


class UpdateWrite(NamedTuple):
    """What :meth:`Store.record_update` stored: the episode, the version it wrote (if any) and the budget's outcome."""

    episode_id: int
    version: Optional[ContextVersion]
    budget: Optional[BudgetResult]


def _fit_budget(
    agent_id: str, settings: dict[str, Any], text: str, note: str | None, policy: str | None = None,
    what: str | None = None,
) -> tuple[str, str | None, BudgetResult]:
    """The budget rule, applied where every context is written: returns the text to store, its note and the outcome.

    ``policy`` overrides the agent's ``budget_policy`` (``"reject"`` for a person's edit). A truncation is
    recorded on the note (``what`` names the text there, e.g. ``update``). A refusal raises
    :class:`ContextBudgetError`: nothing is written.
    """
    config = AgentSettings(**settings)
    result = apply_budget(text, config.context_budget, policy or config.budget_policy)
    if result.status == "ok":
        return text, note, result
    if result.text is None:
        described = f"the new context ({note})" if note else "the new context"
        raise ContextBudgetError(
            f"agent {agent_id!r}: {described} is {result.original_chars} characters, over the context budget of "
            f"{config.context_budget}; nothing was written. "
            + ("Shorten the text or raise the agent's context_budget" if policy else
               "Raise the agent's context_budget, or set its budget_policy to 'truncate'"),
            original_chars=result.original_chars, budget=config.context_budget,
            policy=policy or config.budget_policy,
        )
    outcome = budget_note(result.status, result.original_chars, config.context_budget, what)
    return result.text, f"{note}; {outcome}" if note else outcome, result


def budget_note(status: str, original_chars: int, budget: int, what: str | None = None) -> str:
    """How a version or episode records what the budget did, e.g. ``truncated: update was 2400 characters, budget 2000``."""
    return f"{status}: {what + ' ' if what else ''}was {original_chars} characters, budget {budget}"


def _is_locked(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc).lower() or "busy" in str(exc).lower()
    )


_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    head_version INTEGER NOT NULL,
    settings TEXT NOT NULL,
    owner TEXT,
    forked_from TEXT,
    forked_at_version INTEGER
);
CREATE TABLE IF NOT EXISTS contexts (
    agent_id TEXT NOT NULL REFERENCES agents(agent_id),
    version INTEGER NOT NULL,
    text TEXT NOT NULL,
    created_at REAL NOT NULL,
    parent_version INTEGER,
    episode_id INTEGER,
    source TEXT NOT NULL,
    note TEXT,
    PRIMARY KEY (agent_id, version)
);
CREATE TABLE IF NOT EXISTS episodes (
    episode_id INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id TEXT NOT NULL REFERENCES agents(agent_id),
    run_id TEXT,
    kind TEXT NOT NULL,
    position INTEGER,
    task_id TEXT,
    context_version INTEGER,
    messages TEXT NOT NULL,
    answer TEXT,
    reward REAL,
    feedback TEXT,
    status TEXT NOT NULL,
    budget_status TEXT,
    error TEXT,
    prompt_set TEXT,
    model_id TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    turns TEXT,
    metadata TEXT,
    duration_s REAL,
    completes_task INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_episodes_agent_task ON episodes (agent_id, task_id, episode_id);
CREATE INDEX IF NOT EXISTS idx_episodes_agent ON episodes (agent_id, episode_id);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL,
    source TEXT,
    options TEXT,
    n_done INTEGER NOT NULL DEFAULT 0,
    n_failed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS idx_runs_agent ON runs (agent_id, started_at);
"""

#: Migrations from version N-1 to N, applied in order inside one transaction.
#: Each takes the raw connection. Version 1 is the initial schema.
#: Version 2: a run records the process that holds it (``host:pid``) and when it last finished a task,
#: so a second process cannot run the same agent at once and a killed run is found and closed
#: (``stale`` = 1: closed because its process was gone, not by the run itself).
_SCHEMA_V2 = """
ALTER TABLE runs ADD COLUMN holder TEXT;
ALTER TABLE runs ADD COLUMN heartbeat_at REAL;
ALTER TABLE runs ADD COLUMN stale INTEGER NOT NULL DEFAULT 0
"""

MIGRATIONS: dict[int, str] = {1: _SCHEMA_V1, 2: _SCHEMA_V2}

#: A run held by another host counts as dead when it has not finished a task for this long (seconds).
RUN_LEASE_S = 900.0


class Store:
    """The store behind every agent: SQLite (the default), or PostgreSQL for a ``postgresql://`` URL. Thread-safe;
    one connection per SQLite ``Store`` (a connection pool for PostgreSQL, see :mod:`lifecycle_agent.store_pg`).

    Args:
        path: database file (its directory must exist; ``":memory:"`` for tests), or
            ``postgresql://user@host/dbname`` (``pip install 'lifecycle-agent[postgres]'``).
        busy_timeout: seconds one attempt at a write waits for another process's write lock
            (default 10 s). A write makes ``LOCK_ATTEMPTS`` (3) attempts, so it raises
            :class:`StoreLockedError` after about 3 x ``busy_timeout`` (30 s by default).
    """

    def __new__(cls, path: Any = None, *args: Any, **kwargs: Any) -> "Store":
        # a postgresql:// URL opens the PostgreSQL backend (psycopg is imported only then)
        if cls is Store and isinstance(path, str) and path.startswith(("postgresql://", "postgres://")):
            from .store_pg import PostgresStore

            return super().__new__(PostgresStore)
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, *, create: bool = True):
        self.path = str(path)
        self.busy_timeout = float(busy_timeout)
        if self.path != ":memory:" and not create and not Path(self.path).expanduser().exists():
            raise StoreError(f"database {self.path} does not exist (check --db)")
        if self.path != ":memory:":
            directory = Path(self.path).expanduser().resolve().parent
            if not directory.is_dir():
                raise StoreError(
                    f"cannot open database {self.path}: directory {directory} does not exist; create it or choose another path"
                )
            if Path(self.path).is_dir():
                raise StoreError(f"cannot open database {self.path}: it is a directory")
            if not os.access(directory, os.W_OK):
                raise StoreError(f"cannot open database {self.path}: directory {directory} is not writable")
        self._lock = threading.RLock()
        self._db = None
        try:
            self.conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from None
        try:
            self.conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            self._check_and_migrate()  # refuses foreign or newer databases before changing anything
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            try:
                self.close_dead_runs()  # runs a killed process left `running` become `interrupted`
            except StoreReadOnlyError:
                pass  # a read-only database stays readable; the next writer closes its dead runs
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise StoreError(f"cannot open database {self.path}: {exc} (is it an SQLite file?)") from None
        except BaseException:
            self.conn.close()
            raise

    @staticmethod
    def _ddl(statement: str) -> str:
        """A schema statement in this backend's dialect (the migrations are written once, for SQLite)."""
        return statement

    @property
    def db(self):
        """A ``sqlite_utils.Database`` over this store's connection, for ad-hoc queries and analysis."""
        if self._db is None:
            import sqlite_utils

            self._db = sqlite_utils.Database(self.conn)
        return self._db

    #: The store's own tables, as the catalogue lists them (``name``), excluding the engine's internal ones.
    _SQL_TABLES = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"

    def table_names(self) -> list[str]:
        return [r["name"] for r in self._read(self._SQL_TABLES)]

    # ---------------------------------------------------------------- plumbing
    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _raise_if_read_only(self, exc: sqlite3.OperationalError) -> None:
        if "readonly" in str(exc).replace("-", "").replace(" ", ""):
            raise StoreReadOnlyError(
                f"database {self.path} is read-only ({exc}); check the permissions of the file and its "
                "directory, or use another --db"
            ) from None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``): all or nothing, one writer at a time."""
        with self._lock:
            if self.conn.in_transaction:  # nested: join the outer transaction
                yield self.conn
                return
            started = time.monotonic()
            # one try around BEGIN and the body: an interruption (Ctrl-C, a stop signal turned
            # into an exception) that lands just after BEGIN still rolls the transaction back
            try:
                try:
                    for attempt in Retrying(
                        retry=retry_if_exception(_is_locked),
                        stop=stop_after_attempt(LOCK_ATTEMPTS),
                        wait=wait_exponential(multiplier=0.05, max=1.0),
                        reraise=True,
                    ):
                        with attempt:
                            self.conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as exc:
                    if _is_locked(exc):
                        raise StoreLockedError(
                            f"database {self.path} stayed locked by another writer for "
                            f"{time.monotonic() - started:.1f} s ({LOCK_ATTEMPTS} attempts, busy timeout "
                            f"{self.busy_timeout:g} s each); retry later, or raise the busy timeout "
                            "(Store(busy_timeout=...), --busy-timeout)"
                        ) from None
                    self._raise_if_read_only(exc)
                    raise StoreError(f"cannot write to database {self.path}: {exc}") from None
                try:
                    yield self.conn
                except sqlite3.OperationalError as exc:
                    self._raise_if_read_only(exc)
                    raise
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
            else:
                try:
                    self.conn.execute("COMMIT")
                except sqlite3.OperationalError as exc:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise StoreError(f"cannot commit to database {self.path}: {exc}") from None

    def _read(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                cursor = self.conn.execute(sql, params)
            except sqlite3.OperationalError as exc:
                if _is_locked(exc):
                    raise StoreLockedError(f"database {self.path} stayed locked for more than {self.busy_timeout:g} s") from None
                raise StoreError(f"cannot read database {self.path}: {exc}") from None
            columns = [c[0] for c in cursor.description or ()]
            return [dict(zip(columns, row)) for row in cursor.fetchall()]

    def schema_version(self) -> int:
        if "meta" not in self.table_names():
            return 0
        rows = self._read("SELECT value FROM meta WHERE key = 'schema_version'")
        if not rows:
            return 0
        try:
            return int(rows[0]["value"])
        except (TypeError, ValueError):
            raise SchemaVersionError(
                f"database {self.path}: its schema version record is corrupt (meta.schema_version = "
                f"{rows[0]['value']!r}, expected a whole number); restore the file from a backup"
            ) from None

    def _check_and_migrate(self) -> None:
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"database {self.path} was written by schema version {current}, newer than this "
                f"lifecycle-agent supports ({SCHEMA_VERSION}); upgrade lifecycle-agent to open it"
            )
        if current == SCHEMA_VERSION:
            return
        with self.transaction() as conn:
            # decided under the write lock: another process may have created or migrated the schema meanwhile
            tables = [r[0] for r in conn.execute(self._SQL_TABLES).fetchall()]
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if "meta" in tables else None
            current = int(row[0]) if row else 0
            if current >= SCHEMA_VERSION:
                return
            if current == 0 and tables:
                # tables but no schema record of ours: another application's database (even with a table called
                # "agents"). Refused inside the transaction, which rolls back: nothing is written
                raise StoreError(
                    f"database {self.path} holds other tables ({', '.join(tables[:5])}) "
                    "and no lifecycle-agent schema; use a separate file"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        conn.execute(self._ddl(statement))
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(SCHEMA_VERSION),)
            )

    # ---------------------------------------------------------------- agents
    def create_agent(
        self,
        agent_id: str,
        settings: dict[str, Any] | None = None,
        *,
        owner: str | None = None,
        initial_context: str = "",
        exist_ok: bool = False,
        forked_from: str | None = None,
        forked_at_version: int | None = None,
        source: str = "init",
        note: str | None = None,
    ) -> AgentInfo:
        """Create an agent with context version 0. ``exist_ok`` returns the existing agent instead.

        The initial context must fit the budget in ``settings`` (truncated or rejected by its policy).
        """
        check_agent_id(agent_id)
        initial_context, note, _ = _fit_budget(agent_id, settings or {}, neutralize(initial_context), note)
        now = time.time()
        with self.transaction() as conn:
            existing = conn.execute("SELECT 1 FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
            if existing:
                if exist_ok:
                    return self.get_agent(agent_id)
                raise AgentExistsError(f"agent {agent_id!r} already exists in {self.path}")
            conn.execute(
                "INSERT INTO agents (agent_id, created_at, head_version, settings, owner, forked_from, forked_at_version)"
                " VALUES (?, ?, 0, ?, ?, ?, ?)",
                (agent_id, now, json.dumps(settings or {}, sort_keys=True), owner, forked_from, forked_at_version),
            )
            conn.execute(
                "INSERT INTO contexts (agent_id, version, text, created_at, parent_version, episode_id, source, note)"
                " VALUES (?, 0, ?, ?, NULL, NULL, ?, ?)",
                (agent_id, initial_context, now, source, note),
            )
        return self.get_agent(agent_id)

    def get_agent(self, agent_id: str) -> AgentInfo:
        rows = self._read("SELECT * FROM agents WHERE agent_id = ?", (agent_id,))
        if not rows:
            raise AgentNotFoundError(f"no agent {agent_id!r} in {self.path}")
        row = rows[0]
        row["settings"] = json.loads(row["settings"])
        return AgentInfo(**row)

    def has_agent(self, agent_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM agents WHERE agent_id = ?", (agent_id,)))

    def list_agents(self, owner: str | None = None) -> list[AgentInfo]:
        if owner is None:
            rows = self._read("SELECT * FROM agents ORDER BY agent_id")
        else:
            rows = self._read("SELECT * FROM agents WHERE owner = ? ORDER BY agent_id", (owner,))
        for row in rows:
            row["settings"] = json.loads(row["settings"])
        return [AgentInfo(**row) for row in rows]

    def update_settings(self, agent_id: str, settings: dict[str, Any]) -> AgentInfo:
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE agents SET settings = ? WHERE agent_id = ?", (json.dumps(settings, sort_keys=True), agent_id)
            )
            if cur.rowcount == 0:
                raise AgentNotFoundError(f"no agent {agent_id!r} in {self.path}")
        return self.get_agent(agent_id)

    def delete_agent(self, agent_id: str) -> None:
        """Delete an agent with its contexts, episodes and runs (an explicit, irreversible action)."""
        with self.transaction() as conn:
            if not conn.execute("SELECT 1 FROM agents WHERE agent_id = ?", (agent_id,)).fetchone():
                raise AgentNotFoundError(f"no agent {agent_id!r} in {self.path}")
            for table in ("episodes", "contexts", "runs", "agents"):
                conn.execute(f"DELETE FROM {table} WHERE agent_id = ?", (agent_id,))

    # ---------------------------------------------------------------- contexts
    def head(self, agent_id: str) -> ContextVersion:
        """The current (newest) context version of an agent."""
        rows = self._read(
            "SELECT c.* FROM agents a JOIN contexts c ON c.agent_id = a.agent_id AND c.version = a.head_version"
            " WHERE a.agent_id = ?",
            (agent_id,),
        )
        if not rows:
            raise AgentNotFoundError(f"no agent {agent_id!r} in {self.path}")
        return ContextVersion(**rows[0])

    def get_version(self, agent_id: str, version: int) -> ContextVersion:
        rows = self._read("SELECT * FROM contexts WHERE agent_id = ? AND version = ?", (agent_id, int(version)))
        if not rows:
            self.get_agent(agent_id)
            head = self.head(agent_id).version
            raise VersionNotFoundError(f"agent {agent_id!r} has no context version {version} (versions 0..{head})")
        return ContextVersion(**rows[0])

    def history(self, agent_id: str, limit: int | None = None, offset: int = 0) -> list[ContextVersion]:
        """Context versions, oldest first."""
        self.get_agent(agent_id)
        sql = "SELECT * FROM contexts WHERE agent_id = ? ORDER BY version"
        params: tuple = (agent_id,)
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params = (agent_id, int(limit), int(offset))
        return [ContextVersion(**row) for row in self._read(sql, params)]

    def write_context(self, agent_id: str, text: str, **options: Any) -> ContextVersion:
        """Append a new context version and make it the head; the options and rules of :meth:`append_context`."""
        return self.append_context(agent_id, text, **options).version

    def append_context(
        self,
        agent_id: str,
        text: str,
        *,
        source: str,
        episode_id: int | None = None,
        note: str | None = None,
        expected_head: int | None = None,
        budget_policy: str | None = None,
        what: str | None = None,
    ) -> ContextWrite:
        """Append a new context version, make it the head, and say what the budget did.

        The agent's context budget applies here, on every write (see :func:`_fit_budget`);
        ``budget_policy`` overrides its policy for this write. ``expected_head`` (optional) makes the
        write conditional: when the head moved since the caller read it, :class:`ContextConflictError`
        is raised and nothing is written.
        """
        text = neutralize(text)
        now = time.time()
        with self.transaction() as conn:
            row = conn.execute("SELECT head_version, settings FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
            if row is None:
                raise AgentNotFoundError(f"no agent {agent_id!r} in {self.path}")
            head = row[0]
            text, note, budget = _fit_budget(agent_id, json.loads(row[1]), text, note, budget_policy, what)
            if expected_head is not None and head != expected_head:
                raise ContextConflictError(agent_id, expected_head, head)
            version = head + 1
            conn.execute(
                "INSERT INTO contexts (agent_id, version, text, created_at, parent_version, episode_id, source, note)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (agent_id, version, text, now, head, episode_id, source, note),
            )
            conn.execute("UPDATE agents SET head_version = ? WHERE agent_id = ?", (version, agent_id))
        return ContextWrite(ContextVersion(
            agent_id=agent_id, version=version, text=text, created_at=now, parent_version=head,
            episode_id=episode_id, source=source, note=note,
        ), budget, note)

    def rollback(self, agent_id: str, version: int) -> ContextVersion:
        """Make an old version current again by appending a copy of it (nothing is deleted).

        The copy must fit the agent's current budget: truncated (noted) or rejected by its policy.
        """
        old = self.get_version(agent_id, version)
        return self.write_context(agent_id, old.text, source="rollback", note=f"rollback to version {version}")

    def diff(self, agent_id: str, a: int, b: int) -> str:
        """Unified diff between two context versions (empty when equal)."""
        va, vb = self.get_version(agent_id, a), self.get_version(agent_id, b)
        lines = difflib.unified_diff(
            va.text.splitlines(), vb.text.splitlines(), f"{agent_id}@v{a}", f"{agent_id}@v{b}", lineterm=""
        )
        return "\n".join(lines)

    def fork(self, agent_id: str, new_agent_id: str, version: int | None = None, *, owner: str | None = None) -> AgentInfo:
        """A new agent whose version 0 is ``agent_id``'s context at ``version`` (default: head).

        The new agent takes the source's settings; its version 0 must fit that budget.
        """
        source = self.get_agent(agent_id)
        snapshot = self.head(agent_id) if version is None else self.get_version(agent_id, version)
        return self.create_agent(
            new_agent_id,
            source.settings,
            owner=owner if owner is not None else source.owner,
            initial_context=snapshot.text,
            forked_from=agent_id,
            forked_at_version=snapshot.version,
            source="fork",
            note=f"fork of {agent_id} at version {snapshot.version}",
        )

    def export_agent(self, agent_id: str) -> dict[str, Any]:
        """The agent's settings and every context version as a JSON-ready dict."""
        info = self.get_agent(agent_id)
        return {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_FORMAT_VERSION,
            "agent_id": agent_id,
            "settings": info.settings,
            "head_version": info.head_version,
            "versions": [v.model_dump(exclude={"agent_id"}) for v in self.history(agent_id)],
        }

    def import_agent(self, data: Any, agent_id: str | None = None, *, owner: str | None = None) -> AgentInfo:
        """Create an agent from :meth:`export_agent` output, all versions kept. Refuses an existing id."""
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise ContextFormatError(f"not a lifecycle-agent export: expected a JSON object with format {EXPORT_FORMAT!r}")
        if data.get("format_version") != EXPORT_FORMAT_VERSION:
            raise ContextFormatError(
                f"export format version {data.get('format_version')!r} is not supported (this release reads {EXPORT_FORMAT_VERSION})"
            )
        versions = data.get("versions")
        if not isinstance(versions, list) or not versions:
            raise ContextFormatError("export holds no context versions ('versions' must be a non-empty list)")
        for i, v in enumerate(versions):
            if not isinstance(v, dict) or not isinstance(v.get("text"), str) or v.get("version") != i:
                raise ContextFormatError(
                    f"export version entry {i}: expected an object with 'version': {i} and a string 'text'"
                )
            parent = v.get("parent_version")
            if parent is not None and (isinstance(parent, bool) or not isinstance(parent, int) or not 0 <= parent < i):
                raise ContextFormatError(
                    f"export version entry {i}: 'parent_version' {parent!r} is not an earlier version of this export "
                    f"(expected null or 0..{i - 1})"
                )
            created = v.get("created_at")
            if created is not None and (
                isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created) or created < 0
            ):
                raise ContextFormatError(f"export version entry {i}: 'created_at' must be a finite number of seconds >= 0")
        new_id = check_agent_id(agent_id or data.get("agent_id"))
        settings = data.get("settings") or {}
        if not isinstance(settings, dict):
            raise ContextFormatError("export 'settings' must be a JSON object")
        try:
            budget = AgentSettings.model_validate(settings, strict=True).context_budget
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(part) for part in err["loc"])
            raise ContextFormatError(f"export 'settings.{field}': {err['msg']}") from None
        head_chars = len(neutralize(versions[-1]["text"]))
        if head_chars > budget:
            raise ContextBudgetError(
                f"export head context is {head_chars} characters, over its own budget of {budget}; "
                "raise 'settings.context_budget' in the file or shorten the last version",
                original_chars=head_chars, budget=budget, policy="reject",
            )
        now = time.time()
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM agents WHERE agent_id = ?", (new_id,)).fetchone():
                raise AgentExistsError(f"agent {new_id!r} already exists in {self.path}; import under another id")
            conn.execute(
                "INSERT INTO agents (agent_id, created_at, head_version, settings, owner) VALUES (?, ?, ?, ?, ?)",
                (new_id, now, len(versions) - 1, json.dumps(settings, sort_keys=True), owner),
            )
            for v in versions:
                conn.execute(
                    "INSERT INTO contexts (agent_id, version, text, created_at, parent_version, episode_id, source, note)"
                    " VALUES (?, ?, ?, ?, ?, NULL, ?, ?)",
                    (
                        new_id, v["version"], neutralize(v["text"]), float(v.get("created_at") or now),
                        v.get("parent_version"), str(v.get("source") or "import"), v.get("note"),
                    ),
                )
        return self.get_agent(new_id)

    # ---------------------------------------------------------------- whole-store copy
    #: Tables in the order a copy writes them (parents first), each with the order its rows are read in.
    _COPY_ORDER = (("agents", "agent_id"), ("contexts", "agent_id, version"), ("episodes", "episode_id"),
                   ("runs", "run_id"))
    _COPY_PAGE = 500

    def copy_to(self, target: "Store") -> dict[str, int]:
        """Copy every agent, context version, episode and run into ``target`` (an empty store, either backend).

        One transaction on the target: a failure leaves it empty. Ids are kept (episode ids too, so
        references between episodes hold). Stop the writers of this store first: rows written during
        the copy may be missed. Returns the rows copied per table.
        """
        filled = [table for table, _ in self._COPY_ORDER if target._read(f"SELECT 1 AS x FROM {table} LIMIT 1")]
        if filled:
            raise StoreError(
                f"database {target.path} is not empty (it holds {', '.join(filled)}); "
                "copy into a new, empty database"
            )
        counts: dict[str, int] = {}
        with target.transaction() as conn:
            for table, order in self._COPY_ORDER:
                counts[table] = 0
                while True:
                    rows = self._read(f"SELECT * FROM {table} ORDER BY {order} LIMIT ? OFFSET ?",
                                      (self._COPY_PAGE, counts[table]))
                    for row in rows:
                        conn.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
                                     tuple(row.values()))
                    counts[table] += len(rows)
                    if len(rows) < self._COPY_PAGE:
                        break
            target._after_copy(conn)
        return counts

    def _after_copy(self, conn: Any) -> None:
        """Bring the target's id counters past the copied ids (SQLite's AUTOINCREMENT follows on its own)."""

    # ---------------------------------------------------------------- episodes
    def record_episode(self, **fields: Any) -> int:
        """Insert one finished episode; returns its id. JSON fields are serialised here."""
        row = _episode_row(fields)
        with self.transaction() as conn:
            return self._insert_episode(conn, row)

    def record_update(
        self,
        *,
        new_text: str | None,
        note: str | None = None,
        expected_head: int | None = None,
        **fields: Any,
    ) -> UpdateWrite:
        """Insert an update episode and, when ``new_text`` is given, the context version it wrote: one transaction.

        The budget applies to ``new_text`` under the agent's policy; its outcome is recorded on the episode
        (``budget_status``, and the note as its ``error``) and returned. A refused text writes no version.
        With ``expected_head``, a moved head raises :class:`ContextConflictError` and nothing is written.
        """
        row = _episode_row(fields)
        with self.transaction() as conn:
            episode_id = self._insert_episode(conn, row)
            if new_text is None:
                return UpdateWrite(episode_id, None, None)
            try:
                version, budget, note = self.append_context(
                    row["agent_id"], new_text, source="update", episode_id=episode_id, note=note,
                    expected_head=expected_head, what="update",
                )
            except ContextBudgetError as exc:  # a refused update is a finished episode that kept the old context
                version, budget = None, BudgetResult(None, "rejected", exc.original_chars)
                note = budget_note("rejected", exc.original_chars, exc.budget, "update")
            conn.execute(
                "UPDATE episodes SET budget_status = ?, error = ? WHERE episode_id = ?", (budget.status, note, episode_id)
            )
        return UpdateWrite(episode_id, version, budget)

    def _insert_episode(self, conn: sqlite3.Connection, row: dict[str, Any]) -> int:
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        cur = conn.execute(f"INSERT INTO episodes ({columns}) VALUES ({marks}) RETURNING episode_id", tuple(row.values()))
        return int(cur.fetchone()[0])

    def episodes(
        self,
        agent_id: str,
        *,
        kind: str | None = None,
        task_id: str | None = None,
        run_id: str | None = None,
        limit: int | None = 100,
        offset: int = 0,
        newest_first: bool = False,
    ) -> list[EpisodeRow]:
        """Stored episodes of an agent, oldest first unless ``newest_first``."""
        self.get_agent(agent_id)
        where, params = ["agent_id = ?"], [agent_id]
        for column, value in (("kind", kind), ("task_id", task_id), ("run_id", run_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = f"SELECT * FROM episodes WHERE {' AND '.join(where)} ORDER BY episode_id {'DESC' if newest_first else 'ASC'}"
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params += [int(limit), int(offset)]
        return [_episode_from_row(r) for r in self._read(sql, tuple(params))]

    def get_episode(self, episode_id: int) -> EpisodeRow:
        rows = self._read("SELECT * FROM episodes WHERE episode_id = ?", (int(episode_id),))
        if not rows:
            raise KeyError(f"no episode {episode_id} in {self.path}")
        return _episode_from_row(rows[0])

    def claim_feedback(self, episode_id: int, reward: float | None, feedback: str | None) -> bool:
        """Attach late feedback to a solve episode once; ``False`` when it already had some.

        The claim records the process that holds it. A claim whose update episode never landed
        because its process died (``kill -9`` during the update's model call) is taken over by
        the next claim, so an acknowledged feedback is never lost and never applied twice.
        """
        with self.transaction() as conn:
            row = conn.execute("SELECT metadata FROM episodes WHERE episode_id = ?", (int(episode_id),)).fetchone()
            if row is None:
                raise KeyError(f"no episode {episode_id} in {self.path}")
            metadata = json.loads(row[0]) if row[0] else {}
            if not metadata.get("awaiting_feedback") and not self._claim_is_dead(conn, int(episode_id), metadata):
                return False
            metadata["awaiting_feedback"] = False
            metadata["feedback_claim"] = {"holder": run_holder(), "at": time.time()}
            conn.execute(
                "UPDATE episodes SET reward = ?, feedback = ?, metadata = ?, completes_task = 1 WHERE episode_id = ?",
                (reward, feedback, json.dumps(metadata, default=str), int(episode_id)),
            )
        return True

    #: The dialect's JSON reads (the only SQL that differs between the backends besides the schema catalogue).
    _SQL_UPDATE_LANDED = (
        "SELECT 1 FROM episodes WHERE kind = 'update' AND json_extract(metadata, '$.solve_episode_id') = ? LIMIT 1"
    )
    _SQL_CLAIMED_SOLVES = (
        "SELECT episode_id, metadata FROM episodes WHERE kind = 'solve' AND json_extract(metadata, '$.feedback_claim') "
        "IS NOT NULL AND json_extract(metadata, '$.awaiting_feedback') = 0"
    )

    @staticmethod
    def _json_key(value: int) -> Any:
        """A value compared with a JSON field read by the dialect's SQL (SQLite: the number itself)."""
        return value

    def _claim_is_dead(self, conn: Any, episode_id: int, metadata: dict) -> bool:
        """A claim whose process is gone and whose update episode never landed."""
        claim = metadata.get("feedback_claim")
        if not isinstance(claim, dict) or not _holder_dead(claim.get("holder"), float(claim.get("at") or 0)):
            return False
        landed = conn.execute(self._SQL_UPDATE_LANDED, (self._json_key(episode_id),)).fetchone()
        return landed is None

    def release_dead_claims(self) -> int:
        """Release every feedback claim whose process died before its update landed (a server calls it at start);
        returns how many. The completion can then be rated again."""
        rows = self._read(self._SQL_CLAIMED_SOLVES)
        released = 0
        for row in rows:
            with self.transaction() as conn:  # re-read inside: another replica may have taken it over meanwhile
                current = conn.execute("SELECT metadata FROM episodes WHERE episode_id = ?", (row["episode_id"],)).fetchone()
                metadata = json.loads(current[0]) if current and current[0] else {}
                if not metadata.get("awaiting_feedback") and self._claim_is_dead(conn, row["episode_id"], metadata):
                    self.release_feedback(row["episode_id"])  # joins this transaction
                    released += 1
        return released

    def release_feedback(self, episode_id: int) -> None:
        """Undo :meth:`claim_feedback` when the update it was for did not happen."""
        with self.transaction() as conn:
            row = conn.execute("SELECT metadata FROM episodes WHERE episode_id = ?", (int(episode_id),)).fetchone()
            if row is None:
                return
            metadata = json.loads(row[0]) if row[0] else {}
            metadata["awaiting_feedback"] = True
            conn.execute(
                "UPDATE episodes SET reward = NULL, feedback = NULL, metadata = ?, completes_task = 0 WHERE episode_id = ?",
                (json.dumps(metadata, default=str), int(episode_id)),
            )

    def count_episodes(self, agent_id: str, kind: str | None = None) -> int:
        if kind is None:
            rows = self._read("SELECT COUNT(*) AS n FROM episodes WHERE agent_id = ?", (agent_id,))
        else:
            rows = self._read("SELECT COUNT(*) AS n FROM episodes WHERE agent_id = ? AND kind = ?", (agent_id, kind))
        return int(rows[0]["n"])

    def task_state(self, agent_id: str, task_id: str) -> tuple[str, EpisodeRow | None]:
        """Where a task stands for an agent: ``new``, ``solved`` (solve stored, update missing) or ``done``.

        Returns the stored solve episode with ``solved`` so a resumed run can write the
        missing update without solving the task again.
        """
        done = self._read(
            "SELECT 1 FROM episodes WHERE agent_id = ? AND task_id = ? AND completes_task = 1 LIMIT 1",
            (agent_id, task_id),
        )
        if done:
            return "done", None
        solves = self._read(
            "SELECT * FROM episodes WHERE agent_id = ? AND task_id = ? AND kind = 'solve' AND status != 'failed'"
            " ORDER BY episode_id DESC LIMIT 1",
            (agent_id, task_id),
        )
        if solves:
            return "solved", _episode_from_row(solves[0])
        return "new", None

    # ---------------------------------------------------------------- runs
    def start_run(self, run_id: str, agent_id: str, *, source: str | None = None, options: dict | None = None) -> None:
        """Record a run of ``agent_id`` held by this process.

        One process at a time runs an agent: a run of the same agent still held by another live process
        raises :class:`AgentBusyError` naming it (runs nested in one process, such as a Ralph loop's
        iterations, are fine). Runs left ``running`` by a process that died are closed as ``interrupted``
        first (see :meth:`close_dead_runs`).
        """
        holder, now = run_holder(), time.time()
        with self.transaction() as conn:
            self._close_dead_runs(conn, agent_id)
            for other in conn.execute(
                "SELECT run_id, holder, started_at FROM runs WHERE agent_id = ? AND status = 'running' AND run_id != ?",
                (agent_id, run_id),
            ).fetchall():
                if other[1] and other[1] != holder:
                    started = datetime.datetime.fromtimestamp(other[2]).strftime("%Y-%m-%d %H:%M:%S")
                    raise AgentBusyError(
                        f"agent {agent_id!r} is being run by run {other[0]} (process {other[1]}, started {started}); "
                        "wait for it to finish or stop it, or use another --agent"
                    )
            exists = conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if exists:
                conn.execute(
                    "UPDATE runs SET status = 'running', finished_at = NULL, holder = ?, heartbeat_at = ? WHERE run_id = ?",
                    (holder, now, run_id),
                )
            else:
                conn.execute(
                    "INSERT INTO runs (run_id, agent_id, started_at, status, source, options, holder, heartbeat_at) "
                    "VALUES (?, ?, ?, 'running', ?, ?, ?, ?)",
                    (run_id, agent_id, now, source, json.dumps(options or {}, sort_keys=True, default=str), holder, now),
                )

    def touch_run(self, run_id: str) -> None:
        """The run is alive: it just finished a task (the lease other hosts check)."""
        with self.transaction() as conn:
            conn.execute("UPDATE runs SET heartbeat_at = ? WHERE run_id = ?", (time.time(), run_id))

    def finish_run(self, run_id: str, status: str, n_done: int, n_failed: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE runs SET status = ?, finished_at = ?, n_done = n_done + ?, n_failed = n_failed + ? WHERE run_id = ?",
                (status, time.time(), n_done, n_failed, run_id),
            )

    def close_dead_runs(self, agent_id: Optional[str] = None) -> int:
        """Mark runs whose process died (``kill -9``, a crash) ``interrupted``, with the tasks they really
        completed; returns how many. Runs on this host are checked by process id, runs of other hosts by
        their last heartbeat (:data:`RUN_LEASE_S`)."""
        rows = self._read("SELECT holder, heartbeat_at, started_at FROM runs WHERE status = 'running'")
        if not any(_holder_dead(r["holder"], r["heartbeat_at"] or r["started_at"]) for r in rows):
            return 0  # the common case: no write transaction at all
        with self.transaction() as conn:
            return self._close_dead_runs(conn, agent_id)

    def _close_dead_runs(self, conn: sqlite3.Connection, agent_id: Optional[str]) -> int:
        sql = "SELECT run_id, holder, heartbeat_at, started_at FROM runs WHERE status = 'running'"
        rows = conn.execute(sql + (" AND agent_id = ?" if agent_id else ""), (agent_id,) if agent_id else ()).fetchall()
        closed = 0
        for run_id, holder, heartbeat_at, started_at in rows:
            if not _holder_dead(holder, heartbeat_at or started_at):
                continue
            # one episode per finished task completes it: the update, or the solve of a task that failed in its own
            # code (an update whose reply held no notes is a finished task, not a failed one)
            done, failed = conn.execute(
                "SELECT COALESCE(SUM(CASE WHEN kind = 'solve' AND status = 'failed' THEN 0 ELSE 1 END), 0), "
                "COALESCE(SUM(CASE WHEN kind = 'solve' AND status = 'failed' THEN 1 ELSE 0 END), 0) FROM episodes "
                "WHERE run_id = ? AND completes_task = 1", (run_id,),
            ).fetchone()
            conn.execute(
                "UPDATE runs SET status = 'interrupted', stale = 1, finished_at = COALESCE(heartbeat_at, started_at), "
                "n_done = ?, n_failed = ? WHERE run_id = ?", (done, failed, run_id),
            )
            closed += 1
        return closed

    def runs(self, agent_id: str) -> list[dict[str, Any]]:
        return self._read("SELECT * FROM runs WHERE agent_id = ? ORDER BY started_at", (agent_id,))


def run_holder() -> str:
    """This process, as runs record it: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _holder_dead(holder: Optional[str], last_seen: float) -> bool:
    """Whether the process holding a run is gone (runs from before schema 2 have no holder: never judged)."""
    if not holder:
        return False
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return time.time() - last_seen > RUN_LEASE_S
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


_JSON_FIELDS = ("messages", "turns", "metadata")
_EPISODE_COLUMNS = (
    "agent_id", "run_id", "kind", "position", "task_id", "context_version", "messages", "answer", "reward",
    "feedback", "status", "budget_status", "error", "prompt_set", "model_id", "prompt_tokens",
    "completion_tokens", "turns", "metadata", "duration_s", "completes_task", "created_at",
)


def _episode_row(fields: dict[str, Any]) -> dict[str, Any]:
    unknown = set(fields) - set(_EPISODE_COLUMNS)
    if unknown:
        raise TypeError(f"unknown episode fields: {', '.join(sorted(unknown))}")
    row = {k: fields.get(k) for k in _EPISODE_COLUMNS}
    row["created_at"] = row["created_at"] or time.time()
    row["completes_task"] = 1 if row["completes_task"] else 0
    row["messages"] = row["messages"] or []
    for key in _JSON_FIELDS:
        row[key] = json.dumps(row[key] if row[key] is not None else ([] if key != "metadata" else {}), default=str)
    return row


def _episode_from_row(row: dict[str, Any]) -> EpisodeRow:
    for key in _JSON_FIELDS:
        row[key] = json.loads(row[key]) if row.get(key) else ([] if key != "metadata" else {})
    return EpisodeRow(**row)
