"""Section `floor`: what the stack itself costs, measured in the same run as everything it is the floor of.

    SQLite WAL insert + COMMIT (synchronous=FULL), in process, on the broker's filesystem
    a line into a child's stdin and back           (the two stdio hops a message makes)
    stdlib http.client ──kept-alive POST──▶ bench/floor_server.py (Starlette on uvicorn)
                                            /echo: nothing stored; /insert: one FULL commit
                                            (issue 11's send → channel floor: the latency
                                            section also posts to /insert between its sends)
    the RSS of an idle `python3 -I`                (the floor of a plugin's memory)

Its figures are read by the goals (bench/goals.py) beside the figures they are the floor of.
"""

import asyncio
import contextlib
import http.client
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from typing import Any

from context import BENCH, Bench, eventually, free_port
from measure import now, proc_sample, say, stats

#: Pause between spaced sends: lets the receiver's ack of the previous message land first. The
#: latency section spaces its sends alike, so the two spaced figures compare.
GAP_S = 0.02
#: Samples dropped at the start of each loop (caches, the first connection).
WARMUP = 20


def sqlite_commit(bench: Bench, n: int) -> dict[str, Any]:
    """The broker's pattern (BEGIN IMMEDIATE, one INSERT, COMMIT) on the same filesystem."""
    db = sqlite3.connect(bench.work / "floor.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE m (id TEXT PRIMARY KEY, recipient TEXT, body TEXT, sent_at REAL)")
    samples = []
    for i in range(n + WARMUP):
        t0 = now()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO m VALUES (?, ?, ?, ?)", (os.urandom(8).hex(), "rcv-0001", "x" * 40, time.time()))
        db.execute("COMMIT")
        if i >= WARMUP:
            samples.append(now() - t0)
    db.close()
    return stats(samples)


async def stdio(bench: Bench, n: int, floor: dict[str, Any]) -> None:
    """A line into a child and a line back, through asyncio pipes like the plugins'; the idle child's RSS."""
    echo = bench.children.add(await asyncio.create_subprocess_exec(
        bench.py, "-I", "-c", "import sys\nfor l in sys.stdin.buffer:\n sys.stdout.buffer.write(l); sys.stdout.buffer.flush()",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE))
    await asyncio.sleep(0.3)
    floor["python_idle_rss_mb"] = proc_sample(echo.pid)["rss_mb"]
    line = json.dumps({"jsonrpc": "2.0", "method": "notifications/claude/channel",
                       "params": {"content": "x" * 40}}).encode() + b"\n"
    samples = []
    for i in range(n + WARMUP):
        t0 = now()
        echo.stdin.write(line)
        await echo.stdin.drain()
        await echo.stdout.readline()
        if i >= WARMUP:
            samples.append(now() - t0)
    echo.stdin.close()
    await echo.wait()
    floor["stdio_rtt_ms"] = stats(samples)


class FloorServer:
    """bench/floor_server.py running, and one kept-alive stdlib connection to it."""

    BODY = json.dumps({"to": "rcv-0001", "body": "x" * 40}).encode()

    def __init__(self, bench: Bench):
        self.bench, self.port, self.log = bench, free_port(), bench.work / "floor-server.log"
        self.server: subprocess.Popen | None = None
        self.conn: http.client.HTTPConnection | None = None

    async def __aenter__(self) -> "FloorServer":
        self.server = self.bench.children.add(subprocess.Popen(
            [sys.executable, str(BENCH / "floor_server.py"), str(self.port), str(self.bench.work / "floor-server.db")],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab")))
        await eventually(self.listening, 60, what="the floor server")
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        return self

    async def listening(self) -> bool:
        if self.server.poll() is not None:
            raise RuntimeError(f"floor server exited {self.server.returncode}: {self.log.read_text()}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        return False

    async def __aexit__(self, *exc) -> None:
        if self.conn:
            self.conn.close()
        self.server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.server.wait(10)

    def posts(self, path: str, reps: int, gap: float = 0.0, warmup: int = WARMUP) -> list[float]:
        """Seconds each of `reps` POSTs took, after `warmup` untimed ones; `gap` seconds after each."""
        samples = []
        for i in range(reps + warmup):
            t0 = now()
            self.conn.request("POST", path, self.BODY, {"Content-Type": "application/json"})
            response = self.conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"floor server {path}: HTTP {response.status}")
            if i >= warmup:
                samples.append(now() - t0)
            if gap:
                time.sleep(gap)
        return samples


async def http_posts(bench: Bench, n: int, floor: dict[str, Any]) -> None:
    """Kept-alive stdlib POSTs to the floor server: bare, with one FULL commit, and that spaced."""
    async with FloorServer(bench) as server:
        floor["server_rss_mb"] = proc_sample(server.server.pid)["rss_mb"]
        for path, key, gap in (("/echo", "http_rtt_ms", 0.0), ("/insert", "http_commit_ms", 0.0),
                               ("/insert", "http_commit_spaced_ms", GAP_S)):
            reps = n if not gap else n // 2
            cpu0 = time.process_time()
            floor[key] = stats(server.posts(path, reps, gap))
            if gap:
                floor[key]["gap_ms"] = gap * 1000
            if not gap:  # CPU of the client per kept-alive POST: the floor of the plugin's per-send CPU
                floor[key]["client_cpu_ms"] = round((time.process_time() - cpu0) * 1000 / (reps + WARMUP), 3)


async def floor(bench: Bench) -> None:
    n = bench.plan.floor_n
    say("floor: SQLite, stdio, stdlib HTTP to Starlette on uvicorn, idle python3 RSS")
    result: dict[str, Any] = {"sqlite_commit_ms": sqlite_commit(bench, n)}
    await stdio(bench, n, result)
    await http_posts(bench, n, result)
    # The floor of one sequential sender: the stdio hop into A, then that POST.
    result["sequential_sender_floor_per_s"] = round(
        1000 / (result["stdio_rtt_ms"]["p50"] + result["http_commit_ms"]["p50"]), 1)
    bench.results["floor"] = result
    say(f"  floor POST + FULL commit {result['http_commit_ms']['p50']} ms, "
        f"bare POST {result['http_rtt_ms']['p50']} ms, stdio {result['stdio_rtt_ms']['p50']} ms")
