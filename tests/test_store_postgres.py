"""The PostgreSQL store: its guarantees across processes, bad databases, and moving agents between backends.

The store's own behaviour runs on both backends in test_store.py; this file holds what only a server
database has (several processes and pools at once, connection errors) and the moves between backends.
Every test uses a real PostgreSQL server the session starts (tests/helpers/postgres.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from lifecycle_agent.errors import SchemaVersionError, StoreError
from lifecycle_agent.store import Store


def _tables(url: str) -> list[str]:
    import psycopg

    with psycopg.connect(url) as conn:
        return sorted(r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"))


# ---------------------------------------------------------------- guarantees across processes
_WRITER = """
import sys
from lifecycle_agent.store import Store
store = Store(sys.argv[1])
for i in range(int(sys.argv[3])):
    store.write_context("shared", f"{sys.argv[2]} note {i}", source="edit")
store.close()
"""


def test_concurrent_writers_in_several_processes_lose_no_version(pg_url):
    with Store(pg_url) as store:
        store.create_agent("shared")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, pg_url, f"p{p}", "15"]) for p in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    with Store(pg_url) as store:
        history = store.history("shared")
    assert [v.version for v in history] == list(range(46))  # 3 x 15 versions after v0, each written once
    assert [v.parent_version for v in history[1:]] == list(range(45))
    assert sorted(v.text for v in history[1:]) == sorted(f"p{p} note {i}" for p in range(3) for i in range(15))


def test_conditional_writes_from_several_pools_serialize_one_winner_per_head(pg_url):
    stores = [Store(pg_url, pool_size=2) for _ in range(4)]
    stores[0].create_agent("a")
    outcomes: list[str] = []

    def update(store: Store, n: int) -> None:
        from lifecycle_agent.errors import ContextConflictError

        try:
            store.write_context("a", f"from {n}", source="update", expected_head=0)
            outcomes.append("written")
        except ContextConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=update, args=(stores[n % 4], n)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 11 + ["written"]
    assert stores[1].head("a").version == 1
    for s in stores:
        s.close()


def test_a_completion_is_rated_once_across_stores(pg_url):
    stores = [Store(pg_url, pool_size=2) for _ in range(3)]
    stores[0].create_agent("a")
    episode = stores[0].record_episode(agent_id="a", kind="solve", status="ok", messages=[],
                                       metadata={"awaiting_feedback": True})
    results: list[bool] = []
    threads = [threading.Thread(target=lambda s=s: results.append(s.claim_feedback(episode, 1.0, "good")))
               for s in stores * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 11 + [True]
    for s in stores:
        s.close()


def test_a_dead_replicas_feedback_claim_is_released(pg_url):
    with Store(pg_url) as store:
        store.create_agent("a")
        episode = store.record_episode(agent_id="a", kind="solve", status="ok", messages=[],
                                       metadata={"awaiting_feedback": True})
    claimer = subprocess.run([sys.executable, "-c", (
        "import sys; from lifecycle_agent.store import Store; s = Store(sys.argv[1]); "
        "print(s.claim_feedback(int(sys.argv[2]), 0.0, 'x')); s.close()"), pg_url, str(episode)],
        capture_output=True, text=True, timeout=60)
    assert claimer.stdout.strip() == "True"  # its process is gone now, and no update episode landed
    with Store(pg_url) as store:
        assert store.release_dead_claims() == 1
        assert store.get_episode(episode).metadata["awaiting_feedback"] is True
        assert store.claim_feedback(episode, 1.0, "again") is True


def test_tenants_see_only_their_agents(pg_url):
    with Store(pg_url) as store:
        store.create_agent("alice:bot", owner="alice")
        store.create_agent("bob:bot", owner="bob")
        assert [a.agent_id for a in store.list_agents(owner="alice")] == ["alice:bot"]


# ---------------------------------------------------------------- bad databases: a clear error, nothing written
def test_unreachable_server_is_a_clear_error(pg_server):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreError, match=rf"cannot connect to database postgresql://postgres@127.0.0.1:{port}/x"):
        Store(f"postgresql://postgres@127.0.0.1:{port}/x")


def test_wrong_credentials_are_a_clear_error_that_hides_the_password(pg_server):
    from helpers.postgres import PASSWORD, PASSWORD_USER

    pg_server.sql(f"CREATE DATABASE creds OWNER {PASSWORD_USER}")
    with pytest.raises(StoreError, match="password authentication failed") as exc:
        Store(pg_server.url("creds", PASSWORD_USER, "wrong-secret"))
    assert "wrong-secret" not in str(exc.value) and ":***@" in str(exc.value)
    assert _tables(pg_server.url("creds")) == []
    with Store(pg_server.url("creds", PASSWORD_USER, PASSWORD)) as store:  # the right password works
        assert store.list_agents() == []


def test_missing_database_is_a_clear_error(pg_server):
    with pytest.raises(StoreError, match='database "nosuchdb" does not exist'):
        Store(pg_server.url("nosuchdb"))


@pytest.mark.parametrize("setup, error, message", [
    (["CREATE TABLE agents (id INTEGER)", "CREATE TABLE users (id INTEGER)"], StoreError,
     "holds other tables .*agents, users.* and no lifecycle-agent schema"),
    (["CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)", "INSERT INTO meta VALUES ('schema_version', '99')"],
     SchemaVersionError, "schema version 99, newer than this lifecycle-agent supports"),
], ids=["another-application", "newer-schema"])
def test_a_database_this_release_cannot_own_is_refused_untouched(pg_url, setup, error, message):
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        for statement in setup:
            conn.execute(statement)
    before = _tables(pg_url)
    with pytest.raises(error, match=message):
        Store(pg_url)
    assert _tables(pg_url) == before


def test_create_false_refuses_an_empty_database(pg_url):
    with pytest.raises(StoreError, match="holds no lifecycle-agent store"):
        Store(pg_url, create=False)
    assert _tables(pg_url) == []


def test_a_missing_driver_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(StoreError, match=r"pip install 'lifecycle-agent\[postgres\]'"):
        Store("postgresql://nobody@127.0.0.1:1/x")


def test_importing_the_package_does_not_import_the_driver():
    code = "import lifecycle_agent, lifecycle_agent.store, sys; print('psycopg' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# ---------------------------------------------------------------- moving agents between the backends
def _filled(db: str) -> None:
    from lifecycle_agent import LifecycleAgent
    from lifecycle_agent.models.scripted import ScriptedModel
    from lifecycle_agent.tasks import Task

    with LifecycleAgent(ScriptedModel(), db, "shop") as agent:
        agent.run([Task(prompt="What is the code of the fig?", answer="77"), Task(prompt="And of the kiwi?", answer="12")])
    with Store(db) as store:
        store.create_agent("other", {"context_budget": 50}, initial_context="short note", owner="alice")


def _snapshot(db: str) -> dict:
    with Store(db) as store:
        return {
            "agents": [a.model_dump(exclude={"created_at"}) for a in store.list_agents()],
            "contexts": {a.agent_id: [v.model_dump() for v in store.history(a.agent_id)] for a in store.list_agents()},
            "episodes": [e.model_dump() for e in store.episodes("shop")],
            "runs": [{k: v for k, v in r.items()} for r in store.runs("shop")],
        }


def test_db_migrate_copies_a_whole_sqlite_store_to_postgresql_and_back(tmp_path, pg_server):
    from lifecycle_agent.cli import main

    source, pg, back = str(tmp_path / "app.db"), pg_server.fresh_database(), str(tmp_path / "back.db")
    _filled(source)
    for frm, to in ((source, pg), (pg, back)):
        with pytest.raises(SystemExit) as exc:
            main(["db", "migrate", "--from", frm, "--to", to])
        assert exc.value.code in (0, None)
    assert _snapshot(source) == _snapshot(pg) == _snapshot(back)
    with Store(pg) as store:  # new episodes continue after the copied ids
        new_id = store.record_episode(agent_id="shop", kind="solve", status="ok", messages=[])
        assert new_id == max(e.episode_id for e in store.episodes("shop")) and new_id > 2


def test_db_migrate_refuses_a_target_that_is_not_empty(tmp_path, pg_url, capsys):
    from lifecycle_agent.cli import main

    source = str(tmp_path / "app.db")
    _filled(source)
    with Store(pg_url) as store:
        store.create_agent("already-here")
    with pytest.raises(SystemExit) as exc:
        main(["db", "migrate", "--from", source, "--to", pg_url])
    assert exc.value.code != 0 and "is not empty (it holds agents, contexts)" in " ".join(capsys.readouterr().err.split())
    with Store(pg_url) as store:
        assert [a.agent_id for a in store.list_agents()] == ["already-here"]


def test_db_migrate_to_an_unreachable_server_writes_nothing_and_says_so(tmp_path, capsys):
    from lifecycle_agent.cli import main

    source = str(tmp_path / "app.db")
    _filled(source)
    with pytest.raises(SystemExit) as exc:
        main(["db", "migrate", "--from", source, "--to", "postgresql://postgres@127.0.0.1:1/x"])
    err = " ".join(capsys.readouterr().err.split())
    assert exc.value.code != 0 and "--to: cannot connect to database postgresql://postgres@127.0.0.1:1/x" in err


def test_db_migrate_from_a_missing_file_names_the_option(tmp_path, capsys):
    from lifecycle_agent.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["db", "migrate", "--from", str(tmp_path / "none.db"), "--to", str(tmp_path / "new.db")])
    err = " ".join(capsys.readouterr().err.split())
    assert exc.value.code == 2 and "--from: database" in err and "none.db does not exist" in err
    assert not (tmp_path / "new.db").exists()


def test_context_export_then_import_moves_an_agent_between_backends(tmp_path, pg_url, capsys):
    from lifecycle_agent.cli import main

    source, file = str(tmp_path / "app.db"), tmp_path / "shop.json"
    _filled(source)
    for argv in (["context", "export", "--db", source, "--agent", "shop", "--out", str(file)],
                 ["context", "import", str(file), "--db", pg_url]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code in (0, None)
    with Store(source) as a, Store(pg_url) as b:
        assert [v.text for v in a.history("shop")] == [v.text for v in b.history("shop")]
        assert a.get_agent("shop").settings == b.get_agent("shop").settings
    assert json.loads(file.read_text())["agent_id"] == "shop"


# ---------------------------------------------------------------- the server and the agent over PostgreSQL
def test_lifecycle_agent_runs_on_a_postgresql_url(pg_url):
    from lifecycle_agent import LifecycleAgent
    from lifecycle_agent.models.scripted import ScriptedModel
    from lifecycle_agent.tasks import Task

    with LifecycleAgent(ScriptedModel(), pg_url, "shop") as agent:
        result = agent.run([Task(prompt="What is the code of the fig?", answer="77"),
                            Task(prompt="What is the code of the fig?", answer="77")])
        assert [t.reward for t in result.records] == [0.0, 1.0]  # the second task reads the note the first wrote
        assert agent.context_version == 2


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_two_replicas_on_one_database_share_agents_and_rate_each_completion_once(pg_url, anyio_backend):
    """Two apps (as two replicas would be), each with its own pool: feedback split over both lands once each."""
    pytest.importorskip("fastapi")
    import asyncio
    from contextlib import AsyncExitStack

    from test_serve_api import KEY_A, KEY_B, ask, new_agent, rate, serving

    from lifecycle_agent.models.scripted import ScriptedModel
    from lifecycle_agent.server import create_app

    stores = [Store(pg_url, pool_size=4), Store(pg_url, pool_size=4)]
    async with AsyncExitStack() as stack:
        one, two = [await stack.enter_async_context(serving(create_app(s, ScriptedModel(), [KEY_A, KEY_B])))
                    for s in stores]
        await new_agent(one)
        assert (await two.get("/v1/agents/bot")).status_code == 200  # created on one, seen on the other
        completions = [(await ask(one if i % 2 else two))["id"] for i in range(10)]
        rated: list = []

        async def rate_until_settled(c, cid):
            # a context_conflict (another replica's update landed first) is not a rating: the client sends it again
            while True:
                r = await rate(c, cid)
                if r.status_code != 409 or r.json()["error"]["code"] != "context_conflict":
                    rated.append(r)
                    return

        await asyncio.gather(*(rate_until_settled(one if i % 2 else two, cid) for i, cid in enumerate(completions)),
                             *(rate_until_settled(two if i % 2 else one, cid) for i, cid in enumerate(completions)))
        statuses = sorted(r.status_code for r in rated)
        assert {r.json()["error"]["code"] for r in rated if r.status_code == 409} == {"already_rated"}
        changed = sum(1 for r in rated if r.status_code == 200 and r.json()["changed"])
        head = (await two.get("/v1/agents/bot/context")).json()["version"]
        async with serving(create_app(stores[1], ScriptedModel(), [KEY_A, KEY_B]), key=KEY_B) as other:
            assert (await other.get("/v1/agents/bot")).status_code == 404  # another tenant never sees it
    assert statuses == [200] * 10 + [409] * 10  # each completion rated once, its second rating refused
    assert head == changed  # every accepted feedback that changed the context is one new version
    for s in stores:
        s.close()


def test_a_pool_with_no_free_connection_is_a_clear_error_not_a_hang(pg_url):
    from lifecycle_agent.errors import StoreLockedError

    store = Store(pg_url, busy_timeout=0.2, pool_size=1)
    store.create_agent("a")
    held = threading.Event()
    release = threading.Event()

    def hold_the_only_connection():
        with store.transaction():
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_only_connection)
    holder.start()
    held.wait(10)
    try:
        with pytest.raises(StoreLockedError, match="no free connection in this process's pool"):
            store.head("a")
    finally:
        release.set()
        holder.join()
    assert store.head("a").version == 0
    store.close()


def test_a_writer_held_up_by_another_processes_lock_gets_a_clear_error(pg_url):
    from lifecycle_agent.errors import StoreLockedError

    holder = Store(pg_url)
    holder.create_agent("a")
    waiting = Store(pg_url, busy_timeout=0.3)
    with holder.transaction():
        with pytest.raises(StoreLockedError, match="stayed locked by another writer for 0.3 s"):
            waiting.write_context("a", "late", source="edit")
    assert waiting.write_context("a", "now", source="edit").version == 1
    holder.close()
    waiting.close()
