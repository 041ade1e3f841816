"""Load benchmark of ``lifecycle-agent serve`` on loopback with a zero-latency scripted model.

Starts the real server (the CLI, in its own process, with an API key and request logs on),
creates a few agents, then drives it from this process with aiohttp clients (keep-alive
connections, one per client). aiohttp rather than httpx: at 32 connections the httpx async
client spends about 3 ms of CPU per request itself, more than the server, so it measured
the client; aiohttp spends about 0.15 ms.

- ``context``: ``GET /v1/agents/{id}/context`` in a loop;
- ``pair``: ``POST /v1/chat/completions`` then ``POST /v1/agents/{id}/feedback`` for that
  completion (a solve episode and an update episode, each stored), in a loop.

at 1, 8 and 32 concurrent clients (client ``i`` uses agent ``i % agents``). Prints requests
(or pairs) per second, p50 and p99 latency and errors, and writes
``benchmarks/results/serve_load.json``.

Then the backends (``backends`` in the JSON): both workloads at the top concurrency on one replica on
SQLite, one replica on PostgreSQL and two replicas on one PostgreSQL (client ``i`` talks to replica
``i % replicas``), and ``one_agent_feedback``: 50 completions of one agent rated at once, split over
the two replicas (a feedback answered ``409 context_conflict`` was not applied and is sent again, as
a client does): every accepted feedback must be one new context version. PostgreSQL is a server this
script starts with the system's ``initdb``/``pg_ctl`` (as the tests do); without them that part is skipped.

    python benchmarks/serve_load.py [--duration 8] [--clients 1,8,32] [--agents 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "helpers"))
import postgres  # noqa: E402  (the tests' server starter: initdb/pg_ctl in a temporary directory)

KEY = "bench-key-0123456789abcdef"
TARGETS = {"context_rps_at_32": 500.0, "pairs_per_s_at_32": 150.0, "p99_ms_at_32": 250.0}
RESULT = Path(__file__).parent / "results" / "serve_load.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: str, port: int, log_file) -> subprocess.Popen:
    command = [sys.executable, "-c", "from lifecycle_agent.cli import main; main()", "serve", "--db", db,
               "--model", "scripted", "--port", str(port), "--api-key", KEY]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_file)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}; see {log_file.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not answer /healthz within 60 s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def session(url: str, clients: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(url, headers={"authorization": f"Bearer {KEY}"},
                                 connector=aiohttp.TCPConnector(limit=clients), timeout=aiohttp.ClientTimeout(total=30))


async def run_cell(urls: str | list[str], workload: str, clients: int, agents: int, duration: float) -> dict:
    """One workload at one concurrency: ``clients`` loops for ``duration`` seconds (client ``i`` on replica ``i % n``)."""
    urls = [urls] if isinstance(urls, str) else urls
    latencies: list[float] = []
    errors: list[str] = []
    accepted = 0  # feedbacks answered 200, warm-up included: each must have written one context version
    sessions = [session(url, clients) for url in urls]
    try:

        async def one_pair(http, agent: str) -> None:
            nonlocal accepted
            async with http.post("/v1/chat/completions", json={
                    "model": agent, "messages": [{"role": "user", "content": "What is the secret code of the apple?"}]}) as r:
                body = await r.json()
                if r.status != 200:
                    errors.append(f"chat {r.status}: {body}")
                    return
            async with http.post(f"/v1/agents/{agent}/feedback", json={
                    "completion_id": body["id"], "reward": 0.0, "feedback": "The code of the apple is 42."}) as r:
                await r.read()
                if r.status != 200:
                    errors.append(f"feedback {r.status}: {(await r.text())[:200]}")
                else:
                    accepted += 1

        async def one_read(http, agent: str) -> None:
            async with http.get(f"/v1/agents/{agent}/context") as r:
                await r.read()
                if r.status != 200:
                    errors.append(f"context {r.status}: {(await r.text())[:200]}")

        step = one_pair if workload == "pair" else one_read

        async def client(i: int, until: float) -> None:
            agent, http = f"agent-{i % agents}", sessions[i % len(sessions)]
            while time.perf_counter() < until:
                started = time.perf_counter()
                try:
                    await step(http, agent)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                latencies.append(time.perf_counter() - started)

        warm_until = time.perf_counter() + min(1.0, duration / 4)
        await asyncio.gather(*(client(i, warm_until) for i in range(clients)))
        latencies.clear()
        errors.clear()
        started = time.perf_counter()
        await asyncio.gather(*(client(i, started + duration) for i in range(clients)))
        elapsed = time.perf_counter() - started
    finally:
        for http in sessions:
            await http.close()
    return {
        "workload": workload, "clients": clients, "count": len(latencies),
        "per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2),
        "errors": len(errors), "first_errors": errors[:3], "feedbacks_accepted": accepted,
    }


async def one_agent_feedback(urls: list[str], n: int = 50) -> dict:
    """``n`` completions of one agent, then all ``n`` feedbacks at once, split over the replicas."""
    errors: list[str] = []
    accepted = conflicts_resent = 0
    sessions = [session(url, n) for url in urls]
    try:
        await (await sessions[0].post("/v1/agents", json={"agent_id": "hot"})).read()
        ids = []
        for i in range(n):
            async with sessions[i % len(sessions)].post("/v1/chat/completions", json={
                    "model": "hot", "messages": [{"role": "user", "content": f"What is the code of item {i}?"}]}) as r:
                ids.append((await r.json())["id"])

        async def rate(i: int) -> None:
            nonlocal accepted, conflicts_resent
            while True:
                async with sessions[i % len(sessions)].post("/v1/agents/hot/feedback", json={
                        "completion_id": ids[i], "reward": 0.0, "feedback": f"The code of item {i} is {i}."}) as r:
                    body = await r.json()
                if r.status == 409 and body["error"].get("code") == "context_conflict":
                    conflicts_resent += 1  # not applied: another replica's update landed first; send it again
                    continue
                if r.status == 200:
                    accepted += 1 if body["changed"] else 0
                else:
                    errors.append(f"{r.status}: {str(body)[:200]}")
                return

        started = time.perf_counter()
        await asyncio.gather(*(rate(i) for i in range(n)))
        elapsed = time.perf_counter() - started
        async with sessions[0].get("/v1/agents/hot") as r:
            versions = (await r.json())["context_version"]
    finally:
        for http in sessions:
            await http.close()
    return {"feedbacks": n, "replicas": len(urls), "accepted": accepted, "context_versions_written": versions,
            "conflicts_resent": conflicts_resent, "errors": len(errors), "first_errors": errors[:3],
            "seconds": round(elapsed, 2), "accepted_equals_versions": accepted == versions}


def measure_backend(db: str, replicas: int, clients: int, agents: int, duration: float, tmp: str,
                    feedback_test: bool = False) -> dict:
    """Both workloads at ``clients`` over ``replicas`` servers on one database (and the one-agent feedback test)."""
    procs, urls = [], []
    logs = [open(os.path.join(tmp, f"replica-{i}.log"), "w+") for i in range(replicas)]
    try:
        for log_file in logs:
            port = free_port()
            procs.append(start_server(db, port, log_file))
            urls.append(f"http://127.0.0.1:{port}")
        with httpx.Client(base_url=urls[0], headers={"authorization": f"Bearer {KEY}"}) as h:
            for i in range(agents):
                h.post("/v1/agents", json={"agent_id": f"agent-{i}"}).raise_for_status()
        cells = {w: asyncio.run(run_cell(urls, w, clients, agents, duration)) for w in ("context", "pair")}
        with httpx.Client(base_url=urls[-1], headers={"authorization": f"Bearer {KEY}"}) as h:
            versions = sum(h.get(f"/v1/agents/agent-{i}").json()["context_version"] for i in range(agents))
        result = {
            "backend": db.split(":")[0] if db.startswith("postgresql") else "sqlite", "replicas": replicas,
            "clients": clients, "reads_per_s": cells["context"]["per_s"], "pairs_per_s": cells["pair"]["per_s"],
            "context_p99_ms": cells["context"]["p99_ms"], "pair_p99_ms": cells["pair"]["p99_ms"],
            "errors": cells["context"]["errors"] + cells["pair"]["errors"],
            "feedbacks_accepted": cells["pair"]["feedbacks_accepted"], "context_versions_written": versions,
        }
        if feedback_test:
            result["one_agent_feedback"] = asyncio.run(one_agent_feedback(urls))
        return result
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(60)
        for log_file in logs:
            log_file.close()


def compare_backends(clients: int, agents: int, duration: float) -> dict:
    """One replica on SQLite, one and two replicas on one PostgreSQL; the ratios between them."""
    server = postgres.start()
    if isinstance(server, str):
        print(f"backends skipped: {server}")
        return {"skipped": server}
    runs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for db, replicas in ((os.path.join(tmp, "one.db"), 1), (server.fresh_database(), 1),
                                 (server.fresh_database(), 2)):
                run = measure_backend(db, replicas, clients, agents, duration, tmp, feedback_test=replicas == 2)
                runs.append(run)
                print(f"{run['backend']:10s} x{replicas}  {run['reads_per_s']:8.1f} reads/s  "
                      f"{run['pairs_per_s']:7.1f} pairs/s  errors {run['errors']}", flush=True)
                if "one_agent_feedback" in run:
                    print(f"one agent, 50 feedbacks over 2 replicas: {run['one_agent_feedback']}", flush=True)
    finally:
        server.stop()
    sqlite, pg1, pg2 = runs
    return {
        "runs": runs,
        "ratios": {
            "reads_pg1_over_sqlite": round(pg1["reads_per_s"] / sqlite["reads_per_s"], 2),
            "pairs_pg1_over_sqlite": round(pg1["pairs_per_s"] / sqlite["pairs_per_s"], 2),
            "reads_pg2_over_pg1": round(pg2["reads_per_s"] / pg1["reads_per_s"], 2),
            "pairs_pg2_over_pg1": round(pg2["pairs_per_s"] / pg1["pairs_per_s"], 2),
        },
        "postgresql": "local server started by the benchmark (initdb defaults, fsync off), same machine",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="Seconds measured per workload and concurrency.")
    parser.add_argument("--clients", default="1,8,32", help="Comma-separated concurrency levels.")
    parser.add_argument("--agents", type=int, default=8, help="Agents the clients spread over.")
    parser.add_argument("--out", type=Path, default=RESULT, help="Where to write the JSON result.")
    parser.add_argument("--backends-only", action="store_true",
                        help="Measure only the backends comparison (keeps the sweep of the last full run).")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    load = [round(x, 2) for x in os.getloadavg()]  # the machine is shared: say how busy it was
    if args.backends_only:
        report = json.loads(args.out.read_text()) if args.out.exists() else {"benchmark": "serve_load"}
        report["backends"] = compare_backends(max(levels), args.agents, args.duration)
        report["backends"]["load_average_at_start"] = load
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
        return

    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "bench.db")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(os.path.join(tmp, "server.log"), "w+") as log_file:
            server = start_server(db, port, log_file)
            try:
                with httpx.Client(base_url=url, headers={"authorization": f"Bearer {KEY}"}) as h:
                    for i in range(args.agents):
                        h.post("/v1/agents", json={"agent_id": f"agent-{i}"}).raise_for_status()
                results = []
                for workload in ("context", "pair"):
                    for clients in levels:
                        cell = asyncio.run(run_cell(url, workload, clients, args.agents, args.duration))
                        results.append(cell)
                        unit = "pairs/s" if workload == "pair" else "reads/s"
                        print(f"{workload:8s} clients={clients:3d}  {cell['per_s']:8.1f} {unit}  "
                              f"p50 {cell['p50_ms']:7.2f} ms  p99 {cell['p99_ms']:7.2f} ms  errors {cell['errors']}",
                              flush=True)
                with httpx.Client(base_url=url, headers={"authorization": f"Bearer {KEY}"}) as h:
                    versions = sum(h.get(f"/v1/agents/agent-{i}").json()["context_version"] for i in range(args.agents))
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(60)
            log_file.seek(0)
            logged = sum(1 for line in log_file if '"lifecycle_agent.server.access"' in line)

    top = max(levels)
    ctx = next(r for r in results if r["workload"] == "context" and r["clients"] == top)
    pair = next(r for r in results if r["workload"] == "pair" and r["clients"] == top)
    met = {
        "context_rps": ctx["per_s"] >= TARGETS["context_rps_at_32"],
        "pairs_per_s": pair["per_s"] >= TARGETS["pairs_per_s_at_32"],
        "p99": max(ctx["p99_ms"], pair["p99_ms"]) < TARGETS["p99_ms_at_32"],
        "zero_errors": all(r["errors"] == 0 for r in results),
    }
    accepted = sum(r["feedbacks_accepted"] for r in results)
    met["no_lost_update"] = versions == accepted
    report = {
        "benchmark": "serve_load",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "setup": {"model": "scripted (zero latency)", "agents": args.agents, "duration_s": args.duration,
                  "transport": "loopback HTTP/1.1 keep-alive, aiohttp clients in a separate process from the server",
                  "server": "lifecycle-agent serve (uvicorn), one API key, JSON request logs on"},
        "results": results,
        "load_average_at_start": load,
        "feedbacks_accepted": accepted,
        "context_versions_written": versions,
        "requests_logged": logged,
        "targets_at_32_clients": TARGETS,
        "met": met,
        "backends": compare_backends(top, args.agents, args.duration),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"targets at {top} clients: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
