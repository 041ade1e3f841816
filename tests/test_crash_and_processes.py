"""Crash safety with a real SIGKILL, and several processes writing one database."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lifecycle_agent.store import Store

HELPERS = str(Path(__file__).parent / "helpers")


def _env(delay):
    env = dict(os.environ)
    env["PYTHONPATH"] = HELPERS + os.pathsep + env.get("PYTHONPATH", "")
    env["SLOW_MODEL_DELAY"] = str(delay)
    return env


def _cmd(db, tasks, agent="crash", model="py:slow_model:policy"):
    return [sys.executable, "-m", "lifecycle_agent", "run", "--tasks", str(tasks), "--model", model,
            "--db", db, "--agent", agent, "--quiet"]


def _completed(db, agent):
    try:
        conn = sqlite3.connect(db, timeout=5)
        return conn.execute(
            "SELECT COUNT(*) FROM episodes WHERE agent_id = ? AND completes_task = 1", (agent,)
        ).fetchone()[0]
    except sqlite3.Error:
        return 0


def test_sigkill_mid_run_then_rerun_continues_without_repeating(tmp_path):
    n = 8
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps({"prompt": f"task number {i}", "answer": "1", "id": f"t{i}"}) for i in range(n)))
    db = str(tmp_path / "crash.db")
    proc = subprocess.Popen(_cmd(db, tasks), env=_env(0.15), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _completed(db, "crash") < 3 and time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.stderr.read().decode()}")
        time.sleep(0.05)
    time.sleep(0.17)  # land somewhere inside the next episode
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _completed(db, "crash")
    assert 3 <= done_before < n

    rerun = subprocess.run(_cmd(db, tasks), env=_env(0), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr

    conn = sqlite3.connect(db)
    per_task = conn.execute(
        "SELECT task_id, SUM(kind = 'solve'), SUM(kind = 'update'), SUM(completes_task) FROM episodes GROUP BY task_id"
    ).fetchall()
    assert sorted(row[0] for row in per_task) == [f"t{i}" for i in range(n)]
    assert all(row[1:] == (1, 1, 1) for row in per_task), per_task
    head = conn.execute("SELECT head_version FROM agents WHERE agent_id = 'crash'").fetchone()[0]
    text = conn.execute("SELECT text FROM contexts WHERE agent_id = 'crash' AND version = ?", (head,)).fetchone()[0]
    assert head == n
    assert text.splitlines() == [f"saw task number {i}" for i in range(n)]


def test_two_processes_write_one_database_without_lock_errors(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps({"prompt": f"q{i}", "id": f"q{i}"}) for i in range(40)))
    db = str(tmp_path / "shared.db")
    subprocess.run(_cmd(db, tasks, agent="init", model="scripted")[:-1] + ["-n", "1", "--quiet"], env=_env(0), check=True,
                   capture_output=True)
    procs = [
        subprocess.Popen(_cmd(db, tasks, agent=f"p{i}", model="py:slow_model:fast"), env=_env(0),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for i in range(2)
    ]
    for proc in procs:
        assert proc.wait(timeout=180) == 0, proc.stderr.read().decode()
    conn = sqlite3.connect(db)
    counts = dict(conn.execute("SELECT agent_id, COUNT(*) FROM episodes GROUP BY agent_id").fetchall())
    assert counts["p0"] == 80 and counts["p1"] == 80


def test_a_second_run_of_the_same_agent_stops_at_once_naming_the_holder(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps({"prompt": f"task number {i}", "answer": "1", "id": f"t{i}"}) for i in range(20)))
    db = str(tmp_path / "lease.db")
    first = subprocess.Popen(_cmd(db, tasks, agent="busy"), env=_env(0.2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while _completed(db, "busy") < 1 and time.time() < deadline:
            if first.poll() is not None:
                pytest.fail(f"run ended early: {first.stderr.read().decode()}")
            time.sleep(0.05)
        second = subprocess.run(_cmd(db, tasks, agent="busy"), env=_env(0), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        message = " ".join(second.stderr.split())
        assert "agent 'busy' is being run by run" in message and f":{first.pid}" in message
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    rerun = subprocess.run(_cmd(db, tasks, agent="busy"), env=_env(0), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    conn = sqlite3.connect(db)
    solves = conn.execute("SELECT task_id, COUNT(*) FROM episodes WHERE kind = 'solve' GROUP BY task_id").fetchall()
    assert len(solves) == 20 and all(count == 1 for _, count in solves)  # no task solved twice
    statuses = [r[0] for r in conn.execute("SELECT status FROM runs ORDER BY started_at")]
    assert statuses[0] == "interrupted" and statuses[-1] == "completed"


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(db, port, delay):
    env = _env(0)
    env["SLOW_UPDATE_DELAY"] = str(delay)
    return subprocess.Popen(
        [sys.executable, "-m", "lifecycle_agent", "serve", "--db", db, "--model", "py:slow_model:slow_update",
         "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _request(port, method, path, body=None, timeout=30):
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def _wait_up(port, proc):
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server ended: {proc.stderr.read().decode()[-2000:]}")
        try:
            if _request(port, "GET", "/v1/agents", timeout=2)[0] == 200:
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail("the server did not start")


def test_feedback_whose_server_died_during_its_update_can_be_given_again_and_lands_once(any_db):
    """On SQLite and on PostgreSQL (where the replicas of a deployment share one database)."""
    pytest.importorskip("fastapi")
    import threading

    db, port = any_db, _free_port()
    server = _serve(db, port, delay=3)
    try:
        _wait_up(port, server)
        assert _request(port, "POST", "/v1/agents", {"agent_id": "shop"})[0] == 201
        status, reply = _request(port, "POST", "/v1/chat/completions",
                                 {"model": "shop", "messages": [{"role": "user", "content": "What is the code of the fig?"}]})
        assert status == 200
        rating = {"completion_id": reply["id"], "reward": 0.0, "feedback": "The code of the fig is 77."}
        def rate_and_lose_the_answer():
            try:
                _request(port, "POST", "/v1/agents/shop/feedback", rating)
            except OSError:
                pass  # the server is killed while this request waits: the client sees a broken connection

        threading.Thread(target=rate_and_lose_the_answer, daemon=True).start()
        time.sleep(1.0)  # inside the update's 3 s model call
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    server = _serve(db, port, delay=0)
    try:
        _wait_up(port, server)
        status, context = _request(port, "POST", "/v1/agents/shop/feedback", rating)
        assert status == 200, context
        assert context["version"] == 1 and "77" in context["text"]
        assert _request(port, "POST", "/v1/agents/shop/feedback", rating)[0] == 409  # and only once
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    with Store(db) as store:
        assert [v.version for v in store.history("shop")] == [0, 1]
        assert [e.status for e in store.episodes("shop", kind="update")] == ["ok"]
