"""The SQLite store: schema and migrations, locking, context operations, export/import."""

import json
import sqlite3

import pytest

from lifecycle_agent import store as store_module
from lifecycle_agent.errors import (
    AgentExistsError,
    AgentNotFoundError,
    ContextFormatError,
    SchemaVersionError,
    StoreError,
    StoreLockedError,
    VersionNotFoundError,
)
from lifecycle_agent.prompts import CONTEXT_BEGIN
from lifecycle_agent.store import ContextConflictError, Store


@pytest.fixture
def store(any_db):
    """A store with one agent, on each backend (SQLite, then a real PostgreSQL server)."""
    s = Store(any_db)
    s.create_agent("a1", {"context_budget": 100})
    yield s
    s.close()


def test_new_database_records_schema_version_and_wal(db_path):
    s = Store(db_path)
    assert s.schema_version() == store_module.SCHEMA_VERSION
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_new_agent_starts_at_empty_version_zero(store):
    head = store.head("a1")
    assert (head.version, head.text, head.source) == (0, "", "init")


def test_write_context_appends_versions_with_parents(store):
    store.write_context("a1", "one", source="edit")
    v2 = store.write_context("a1", "two", source="edit")
    assert (v2.version, v2.parent_version) == (2, 1)
    assert [v.text for v in store.history("a1")] == ["", "one", "two"]


def test_conditional_write_refuses_when_head_moved(store):
    store.write_context("a1", "one", source="edit")
    with pytest.raises(ContextConflictError, match="head is version 1, not 0"):
        store.write_context("a1", "two", source="edit", expected_head=0)
    assert store.head("a1").text == "one"


def test_stored_context_never_holds_delimiters(store):
    store.write_context("a1", f"x {CONTEXT_BEGIN} y", source="edit")
    assert CONTEXT_BEGIN not in store.head("a1").text


def test_rollback_appends_copy_and_deletes_nothing(store):
    store.write_context("a1", "good", source="edit")
    store.write_context("a1", "bad", source="edit")
    new = store.rollback("a1", 1)
    assert (new.version, new.text, new.source) == (3, "good", "rollback")
    assert len(store.history("a1")) == 4


def test_diff_between_versions(store):
    store.write_context("a1", "line a\nline b", source="edit")
    store.write_context("a1", "line a\nline c", source="edit")
    diff = store.diff("a1", 1, 2)
    assert "-line b" in diff and "+line c" in diff
    assert store.diff("a1", 1, 1) == ""


def test_fork_starts_new_agent_from_version(store):
    store.write_context("a1", "v1 text", source="edit")
    store.write_context("a1", "v2 text", source="edit")
    info = store.fork("a1", "b1", version=1)
    assert (info.forked_from, info.forked_at_version, store.head("b1").text) == ("a1", 1, "v1 text")
    assert store.get_agent("b1").settings == {"context_budget": 100}


def test_fork_onto_existing_agent_is_refused(store):
    store.create_agent("b1")
    with pytest.raises(AgentExistsError):
        store.fork("a1", "b1")


def test_unknown_agent_and_version_errors_are_clear(store):
    with pytest.raises(AgentNotFoundError, match="no agent 'zz'"):
        store.head("zz")
    with pytest.raises(VersionNotFoundError, match=r"no context version 7 \(versions 0..0\)"):
        store.get_version("a1", 7)


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "x" * 200, "sp ace"])
def test_path_like_or_odd_agent_ids_are_refused(store, bad):
    with pytest.raises(ValueError, match="agent id"):
        store.create_agent(bad)


def test_export_import_round_trip_keeps_every_version(store, tmp_path):
    store.write_context("a1", "one", source="edit")
    data = json.loads(json.dumps(store.export_agent("a1")))
    other = Store(str(tmp_path / "other.db"))
    info = other.import_agent(data)
    assert info.head_version == 1 and [v.text for v in other.history("a1")] == ["", "one"]


def test_import_refuses_existing_id_and_changes_nothing(store):
    data = store.export_agent("a1")
    with pytest.raises(AgentExistsError):
        store.import_agent(data)
    assert len(store.history("a1")) == 1


@pytest.mark.parametrize(
    "data,match",
    [
        ({"format": "other"}, "not a lifecycle-agent export"),
        ({"format": store_module.EXPORT_FORMAT, "format_version": 99, "versions": []}, "not supported"),
        ({"format": store_module.EXPORT_FORMAT, "format_version": 1, "versions": []}, "no context versions"),
        ({"format": store_module.EXPORT_FORMAT, "format_version": 1, "versions": [{"version": 3, "text": "x"}]}, "entry 0"),
    ],
)
def test_import_bad_exports_are_clear_errors(store, data, match):
    with pytest.raises(ContextFormatError, match=match):
        store.import_agent(data, "new")
    assert not store.has_agent("new")


def test_delete_agent_removes_its_rows_only(store):
    store.create_agent("keep")
    store.record_episode(agent_id="a1", kind="solve", status="ok", messages=[])
    store.delete_agent("a1")
    assert not store.has_agent("a1") and store.has_agent("keep")
    assert store._read("SELECT COUNT(*) AS n FROM episodes")[0]["n"] == 0


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(str(tmp_path / "no" / "such" / "dir.db"))


def test_create_false_refuses_missing_file(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(str(tmp_path / "typo.db"), create=False)
    assert not (tmp_path / "typo.db").exists()


def test_directory_path_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="is a directory"):
        Store(str(tmp_path))


def test_non_sqlite_file_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not a database " * 100)
    with pytest.raises(StoreError, match="SQLite"):
        Store(str(path))


def test_database_of_another_application_is_refused(tmp_path):
    path = str(tmp_path / "app.db")
    sqlite3.connect(path).execute("CREATE TABLE customers (id INTEGER)")
    with pytest.raises(StoreError, match="other tables"):
        Store(path)


def write_schema_version(db_path, value: str) -> None:
    """A store's database whose meta.schema_version record holds ``value``."""
    Store(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (value,))
    conn.commit()
    conn.close()


def test_database_from_newer_schema_is_refused_untouched(db_path):
    write_schema_version(db_path, "99")
    with pytest.raises(SchemaVersionError, match="schema version 99.*upgrade lifecycle-agent"):
        Store(db_path)
    assert sqlite3.connect(db_path).execute("SELECT value FROM meta").fetchone()[0] == "99"


def test_older_schema_is_migrated_in_place_keeping_data(db_path, monkeypatch):
    s = Store(db_path)
    s.create_agent("old")
    s.write_context("old", "kept", source="edit")
    s.close()
    following = store_module.SCHEMA_VERSION + 1
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", following)
    monkeypatch.setitem(store_module.MIGRATIONS, following, "ALTER TABLE agents ADD COLUMN label TEXT")
    migrated = Store(db_path)
    assert migrated.schema_version() == following and migrated.head("old").text == "kept"
    assert "label" in migrated.db["agents"].columns_dict


def test_locked_database_past_timeout_is_a_clear_error(db_path):
    s = Store(db_path, busy_timeout=0.2)
    s.create_agent("a")
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreLockedError, match="locked by another writer"):
            s.write_context("a", "x", source="edit")
    finally:
        blocker.execute("ROLLBACK")
    assert s.head("a").version == 0
    assert s.write_context("a", "x", source="edit").version == 1


def test_failed_transaction_writes_nothing(store):
    with pytest.raises(RuntimeError):
        with store.transaction() as conn:
            conn.execute("UPDATE agents SET head_version = 5 WHERE agent_id = 'a1'")
            raise RuntimeError("boom")
    assert store.get_agent("a1").head_version == 0


def test_record_update_with_conflict_writes_neither_episode_nor_version(store):
    store.write_context("a1", "moved", source="edit")
    with pytest.raises(ContextConflictError):
        store.record_update(new_text="late", expected_head=0, agent_id="a1", kind="update", status="ok", messages=[])
    assert store.count_episodes("a1") == 0 and store.head("a1").text == "moved"


def test_task_state_tracks_solve_then_done(store):
    assert store.task_state("a1", "t")[0] == "new"
    store.record_episode(agent_id="a1", kind="solve", task_id="t", status="ok", messages=[])
    state, row = store.task_state("a1", "t")
    assert state == "solved" and row.kind == "solve"
    store.record_episode(agent_id="a1", kind="update", task_id="t", status="ok", messages=[], completes_task=True)
    assert store.task_state("a1", "t")[0] == "done"


def test_unknown_episode_fields_are_refused(store):
    with pytest.raises(TypeError, match="unknown episode fields: bogus"):
        store.record_episode(agent_id="a1", kind="solve", status="ok", bogus=1)


def test_task_lookup_uses_its_index_so_cost_stays_flat_as_the_agent_ages(db_path):
    store = Store(db_path)  # SQLite's query planner
    plan = store.conn.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM episodes WHERE agent_id = ? AND task_id = ? ORDER BY episode_id DESC LIMIT 4",
        ("a1", "t"),
    ).fetchall()
    assert "idx_episodes_agent_task (agent_id=? AND task_id=?)" in str(plan)


@pytest.mark.parametrize("setup", ["foreign", "newer"])
def test_refused_database_is_left_untouched(tmp_path, setup):
    path = tmp_path / "x.db"
    conn = sqlite3.connect(path)
    if setup == "foreign":
        conn.execute("CREATE TABLE users (id INTEGER)")
    else:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("CREATE TABLE agents (agent_id TEXT)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError):
        Store(str(path))
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert not (tmp_path / "x.db-wal").exists()


@pytest.mark.parametrize("created_at", [float("nan"), float("inf"), -1, "yesterday"])
def test_import_refuses_bad_timestamps(store, created_at):
    data = store.export_agent("a1")
    data["versions"][0]["created_at"] = created_at
    with pytest.raises(ContextFormatError, match="created_at"):
        store.import_agent(data, "new")


def test_import_refuses_head_over_its_own_budget(store):
    data = store.export_agent("a1")
    data["versions"][0]["text"] = "x " * 100
    with pytest.raises(ContextFormatError, match="over its own budget of 100"):
        store.import_agent(data, "new")


def _store_with_long_version(store, budget_policy="truncate"):
    """Version 1 is 160 characters, written under a budget of 1000; the budget is then 50."""
    store.update_settings("a1", {"context_budget": 1000})
    store.write_context("a1", "word " * 32, source="edit")
    store.update_settings("a1", {"context_budget": 50, "budget_policy": budget_policy})


def test_rollback_and_fork_truncate_to_the_current_budget_with_a_note(store):
    _store_with_long_version(store)
    new = store.rollback("a1", 1)
    assert len(new.text) <= 50 and new.text.endswith("word")
    assert new.note == "rollback to version 1; truncated: was 160 characters, budget 50"
    store.fork("a1", "b1", version=1)
    head = store.head("b1")
    assert len(head.text) <= 50 and "truncated: was 160 characters, budget 50" in head.note


def test_rollback_and_fork_under_reject_policy_write_nothing(store):
    _store_with_long_version(store, "reject")
    with pytest.raises(ContextFormatError, match=r"rollback to version 1\) is 160 characters, over the context budget of 50"):
        store.rollback("a1", 1)
    with pytest.raises(ContextFormatError, match="over the context budget of 50"):
        store.fork("a1", "b1", version=1)
    assert store.head("a1").version == 1 and not store.has_agent("b1")


def test_write_context_policy_override_refuses_an_over_long_edit(store):
    with pytest.raises(ContextFormatError, match="over the context budget of 100; nothing was written"):
        store.write_context("a1", "x " * 60, source="edit", budget_policy="reject")
    assert store.head("a1").version == 0


def test_agent_rollback_and_fork_respect_a_lowered_budget(db_path):
    from lifecycle_agent import LifecycleAgent

    with LifecycleAgent(lambda messages: "x", db_path, "a") as agent:
        agent.set_context("word " * 32)
    with LifecycleAgent(lambda messages: "x", db_path, "a", context_budget=50) as agent:
        assert len(agent.rollback(1).text) <= 50
        assert len(agent.fork("b", 1).context) <= 50


def test_corrupt_schema_version_record_names_the_database(db_path):
    write_schema_version(db_path, "one")
    with pytest.raises(SchemaVersionError, match=f"database {db_path}: its schema version record is corrupt"):
        Store(db_path)


@pytest.mark.parametrize("parent", [7, 1, -1, True, "0"])
def test_import_refuses_a_parent_version_not_in_the_export(store, parent):
    store.write_context("a1", "one", source="edit")
    data = store.export_agent("a1")
    data["versions"][1]["parent_version"] = parent
    with pytest.raises(ContextFormatError, match="entry 1: 'parent_version'.*expected null or 0..0"):
        store.import_agent(data, "new")
    assert not store.has_agent("new")


def test_import_without_a_budget_setting_uses_the_default_budget(store):
    data = store.export_agent("a1")
    data["settings"] = {}
    data["versions"][0]["text"] = "x " * 1500
    with pytest.raises(ContextFormatError, match="over its own budget of 2000"):
        store.import_agent(data, "new")


@pytest.mark.parametrize(
    "settings,match",
    [({"context_budget": "50"}, "settings.context_budget"), ({"budget_policy": "sometimes"}, "settings.budget_policy")],
)
def test_import_refuses_invalid_settings(store, settings, match):
    data = store.export_agent("a1")
    data["settings"] = settings
    with pytest.raises(ContextFormatError, match=match):
        store.import_agent(data, "new")


def test_a_foreign_database_with_its_own_agents_table_is_refused_untouched(tmp_path):
    import sqlite3

    from lifecycle_agent.errors import StoreError

    path = tmp_path / "foreign.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE agents (name TEXT)")
    con.execute("INSERT INTO agents VALUES ('alice')")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="holds other tables"):
        Store(str(path))
    con = sqlite3.connect(path)
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["agents"]
    con.close()


def test_a_read_only_database_is_a_clear_error(tmp_path):
    from lifecycle_agent.errors import StoreReadOnlyError

    store = Store(str(tmp_path / "ro.db"))
    store.create_agent("a")
    store.conn.execute("PRAGMA query_only = ON")  # what a file without write permission gives
    with pytest.raises(StoreReadOnlyError, match="is read-only"):
        store.create_agent("b")
    store.conn.execute("PRAGMA query_only = OFF")
    assert not store.has_agent("b") and store.has_agent("a")
    store.close()


def test_run_on_a_read_only_database_exits_2_naming_the_file(tmp_path, capsys, monkeypatch):
    from lifecycle_agent.cli import main

    db = tmp_path / "ro.db"
    Store(str(db)).close()
    real_init = Store.__init__

    def read_only(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.conn.execute("PRAGMA query_only = ON")

    monkeypatch.setattr(Store, "__init__", read_only)
    with pytest.raises(SystemExit) as exc:
        main(["run", "--env", "fact-recall", "-n", "1", "--model", "scripted", "--db", str(db)])
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long paths at the terminal width
    assert exc.value.code == 2 and "is read-only" in err and "Traceback" not in err


# ---------------------------------------------------------------- one process runs an agent; dead runs are closed
def _foreign_run(store, run_id, agent_id, pid, *, heartbeat=None):
    """A run row as another process on this host (``pid``) would have written it."""
    import socket
    import time

    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO runs (run_id, agent_id, started_at, status, holder, heartbeat_at) VALUES (?, ?, ?, 'running', ?, ?)",
            (run_id, agent_id, time.time(), f"{socket.gethostname()}:{pid}", heartbeat or time.time()),
        )


def test_a_second_process_cannot_run_an_agent_that_a_live_process_runs(tmp_path):
    import subprocess
    import sys

    from lifecycle_agent import LifecycleAgent, Task
    from lifecycle_agent.errors import AgentBusyError

    db = str(tmp_path / "a.db")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with Store(db) as store:
            store.create_agent("a")
            _foreign_run(store, "other-run", "a", holder.pid)
        agent = LifecycleAgent(lambda m: "Answer: 1", db, "a")
        with pytest.raises(AgentBusyError, match=rf"run other-run \(process .*:{holder.pid}"):
            agent.run([Task(prompt="q", answer="1", id="t1")])
        assert agent.episodes() == []  # nothing done twice
        agent.close()
    finally:
        holder.kill()
        holder.wait()
    with LifecycleAgent(lambda m: "Answer: 1", db, "a") as agent:  # the holder is gone: its run is closed
        assert agent.run([Task(prompt="q", answer="1", id="t1")]).records[0].reward == 1.0
        statuses = {r["run_id"]: r["status"] for r in agent.store.runs("a")}
    assert statuses["other-run"] == "interrupted"


def test_a_killed_run_is_marked_interrupted_with_its_real_counts_at_the_next_open(tmp_path):
    import subprocess
    import sys

    db = str(tmp_path / "k.db")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with Store(db) as store:
        store.create_agent("a")
        _foreign_run(store, "killed", "a", dead.pid)
        for i, (kind, status) in enumerate([("update", "ok"), ("update", "failed"), ("solve", "failed")]):
            # a finished task, one whose update held no notes (still finished), one whose own code failed
            store.record_episode(agent_id="a", run_id="killed", kind=kind, task_id=f"t{i}", messages=[],
                                 status=status, completes_task=True)
        store.record_episode(agent_id="a", run_id="killed", kind="solve", task_id="t3", messages=[], status="ok",
                             completes_task=False)  # solved, its update never ran: not completed
    with Store(db) as store:
        (run,) = store.runs("a")
    assert run["status"] == "interrupted" and (run["n_done"], run["n_failed"]) == (2, 1)


def test_a_run_of_another_host_is_closed_only_after_its_lease(tmp_path, monkeypatch):
    import time

    from lifecycle_agent import store as store_module

    db = str(tmp_path / "h.db")
    with Store(db) as store:
        store.create_agent("a")
        with store.transaction() as conn:
            conn.execute("INSERT INTO runs (run_id, agent_id, started_at, status, holder, heartbeat_at) "
                         "VALUES ('far', 'a', ?, 'running', 'other-host:1', ?)", (time.time(), time.time() - 60))
    with Store(db) as store:
        assert store.runs("a")[0]["status"] == "running"  # heartbeat a minute old: still leased
    monkeypatch.setattr(store_module, "RUN_LEASE_S", 30.0)
    with Store(db) as store:
        assert store.runs("a")[0]["status"] == "interrupted"


def test_a_run_closed_because_its_process_died_is_marked_stale(tmp_path):
    import subprocess
    import sys

    db = str(tmp_path / "s.db")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with Store(db) as store:
        store.create_agent("a")
        _foreign_run(store, "killed", "a", dead.pid)
        store.start_run("mine", "a")
        store.finish_run("mine", "interrupted", 0, 0)
    with Store(db) as store:
        stale = {r["run_id"]: r["stale"] for r in store.runs("a")}
    assert stale == {"killed": 1, "mine": 0}


def test_a_version_1_database_is_migrated_to_version_2_keeping_its_runs(tmp_path):
    import sqlite3

    from lifecycle_agent import store as store_module

    path = tmp_path / "v1.db"
    con = sqlite3.connect(path)
    con.executescript(store_module.MIGRATIONS[1])
    con.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
    con.execute("INSERT INTO runs (run_id, agent_id, started_at, status) VALUES ('old', 'a', 1.0, 'completed')")
    con.commit()
    con.close()
    with Store(str(path)) as store:
        assert store.schema_version() == 2
        (run,) = store.runs("a")
    assert run["status"] == "completed" and run["holder"] is None and run["stale"] == 0


# ---------------------------------------------------------------- the budget rule, applied by the store's write path
def test_record_update_applies_the_budget_and_records_its_outcome_on_the_episode(store):
    long_update = "word " * 30  # 150 characters, budget 100: cut at a word boundary
    episode_id, version, budget = store.record_update(
        new_text=long_update, agent_id="a1", kind="update", status="ok", messages=[])
    assert (budget.status, budget.original_chars) == ("truncated", 150)
    assert len(version.text) <= 100 and version.note == "truncated: update was 150 characters, budget 100"
    row = store.get_episode(episode_id)
    assert (row.budget_status, row.error) == ("truncated", version.note)


def test_record_update_refused_by_the_budget_keeps_the_context_and_records_the_episode(store):
    store.update_settings("a1", {"context_budget": 100, "budget_policy": "reject"})
    episode_id, version, budget = store.record_update(
        new_text="x" * 150, expected_head=0, agent_id="a1", kind="update", status="ok", messages=[])
    assert version is None and (budget.status, budget.original_chars) == ("rejected", 150)
    row = store.get_episode(episode_id)
    assert (row.budget_status, row.error) == ("rejected", "rejected: update was 150 characters, budget 100")
    assert store.head("a1").version == 0


def test_a_refused_write_raises_a_budget_error_carrying_its_outcome(store):
    from lifecycle_agent.errors import ContextBudgetError

    with pytest.raises(ContextBudgetError) as exc:
        store.write_context("a1", "y" * 150, source="edit", budget_policy="reject")
    assert (exc.value.original_chars, exc.value.budget, exc.value.policy) == (150, 100, "reject")
    assert isinstance(exc.value, ContextFormatError) and store.head("a1").version == 0


def test_append_context_returns_the_budget_outcome_of_a_truncated_write(store):
    write = store.append_context("a1", "word " * 30, source="edit", note="from a file", what="the file")
    assert (write.budget.status, write.budget.original_chars) == ("truncated", 150)
    assert write.version.note == write.note == "from a file; truncated: the file was 150 characters, budget 100"


def test_settings_and_conflict_error_have_one_home():
    from lifecycle_agent import AgentSettings, agent, errors, settings, store as store_mod

    assert AgentSettings is settings.AgentSettings is agent.AgentSettings
    assert ContextConflictError is errors.ContextConflictError is store_mod.ContextConflictError
    import ast
    import inspect

    imported = {n.module for n in ast.walk(ast.parse(inspect.getsource(store_mod))) if isinstance(n, ast.ImportFrom)}
    assert "agent" not in imported  # the store no longer reaches up into the agent
