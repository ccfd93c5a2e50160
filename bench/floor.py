"""Section `floor`: what the stack itself costs, measured in the same run as everything it is the floor of.

    SQLite WAL insert + COMMIT (synchronous=FULL), in process, on the broker's filesystem
    a line into a child's stdin and back           (the two stdio hops a message makes)
    stdlib http.client ──kept-alive POST──▶ bench/floor_server.py (Starlette on uvicorn)
                                            /echo: nothing stored; /insert: one FULL commit
                                            (issue 11's send → channel floor: the latency
                                            section also posts to /insert between its sends)
    the RSS of an idle `python3 -I`                (the floor of a plugin's memory)

The latency section also times, between its sends, the SDK's own floor (SdkFloor): the plugin's
BrokerClient ──send──▶ bench/sdk_floor_server.py (MCPServer, one FULL commit) ──notification──▶
the same process's pending listen. It is what the broker's mandated stack costs for a message.

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
import threading
import time
from typing import Any

from context import BENCH, Bench, dispatch_plugin, eventually, free_port
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


class ServerProcess:
    """One of the floors' servers, bench/SCRIPT PORT DB [ARGS], started and connected to on entry,
    ended on exit."""

    SCRIPT = ""

    def __init__(self, bench: Bench, *args: str):
        name = self.SCRIPT.removesuffix(".py")
        self.bench, self.port, self.log = bench, free_port(), bench.work / f"{name}.log"
        self.args = [str(self.port), str(bench.work / f"{name}.db"), *args]
        self.server: subprocess.Popen | None = None

    async def __aenter__(self):
        self.server = self.bench.children.add(subprocess.Popen(
            [sys.executable, str(BENCH / self.SCRIPT), *self.args], stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab")))
        await eventually(self.listening, 60, what=self.SCRIPT)
        await self.connect()
        return self

    async def listening(self) -> bool:
        if self.server.poll() is not None:
            raise RuntimeError(f"{self.SCRIPT} exited {self.server.returncode}: {self.log.read_text()}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        return False

    async def connect(self) -> None:
        raise NotImplementedError

    def disconnect(self) -> None:
        raise NotImplementedError

    async def __aexit__(self, *exc) -> None:
        self.disconnect()
        self.server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.server.wait(10)


class FloorServer(ServerProcess):
    """bench/floor_server.py running, and one kept-alive stdlib connection to it."""

    SCRIPT = "floor_server.py"
    BODY = json.dumps({"to": "rcv-0001", "body": "x" * 40}).encode()

    async def connect(self) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def disconnect(self) -> None:
        self.conn.close()

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


class SdkFloor(ServerProcess):
    """bench/sdk_floor_server.py running, with a listen pending on it: the plugin's own
    BrokerClient, in this process (no stdio), sends and receives. Times a send's POST to the
    arrival of its notification on the listen stream."""

    SCRIPT = "sdk_floor_server.py"
    TOKEN = "dsp_bench_" + os.urandom(24).hex()

    def __init__(self, bench: Bench):
        super().__init__(bench, self.TOKEN)
        self.arrivals: dict[str, float] = {}
        self.arrived = threading.Event()
        self.sent = 0

    async def connect(self) -> None:
        config = dispatch_plugin.Config(url=f"http://127.0.0.1:{self.port}/mcp", token=self.TOKEN, base="bench",
                                        name="rcv", token_source="bench")
        self.sender, self.receiver = dispatch_plugin.BrokerClient(config), dispatch_plugin.BrokerClient(config)
        threading.Thread(target=self.listen, daemon=True).start()
        await eventually(self.delivers, 30, interval=0.1, what="a listen on the SDK floor server")

    def listen(self) -> None:
        def heard(message: dict[str, Any]) -> None:
            self.arrivals[message["params"]["body"]] = now()
            self.arrived.set()

        params = {"name": "listen", "arguments": {"name": "rcv"}}
        with contextlib.suppress(dispatch_plugin.DispatchError):  # the server ends at exit
            self.receiver.post("tools/call", params, tool="listen", on_notice=heard)

    async def delivers(self) -> bool:
        """One send, untimed: True once the listen is pending and hears it."""
        return self.send(timeout=0.5) is not None

    def send(self, timeout: float = 30) -> float | None:
        """Seconds from the send's POST to its notification; None if none came within `timeout`."""
        self.sent += 1
        body = f"sdk-floor-{self.sent}"
        self.arrived.clear()
        t0 = now()
        self.sender.post("tools/call", {"name": "send", "arguments": {"to": "rcv", "body": body}}, tool="send")
        while body not in self.arrivals:
            if not self.arrived.wait(timeout):
                return None
            self.arrived.clear()
        return self.arrivals.pop(body) - t0

    def sends(self, reps: int) -> list[float]:
        samples = [self.send() for _ in range(reps)]
        if None in samples:
            raise RuntimeError(f"the SDK floor server lost a notification: {self.log.read_text()[-2000:]}")
        return samples

    def disconnect(self) -> None:
        self.receiver.stop_listening()


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
