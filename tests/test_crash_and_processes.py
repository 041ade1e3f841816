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
