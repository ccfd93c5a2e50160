#!/usr/bin/env python3
"""Dispatch benchmarks: the real dist/*.pyz processes, measured against the floor of their own stack.

    python3 bench/run.py [--quick] [--json out.json] [--soak] [--dist DIR] [--plugin FILE] [--profile DIR]

What runs (every figure through dist/broker.pyz and dist/plugin.pyz as built, or the --plugin
file, copied to a scratch directory first so a concurrent rebuild cannot change them mid-run):

  size       each .pyz in bytes
  startup    `python3 -I -c pass` spawn -> exit (the interpreter's own start, the floor);
             plugin spawn -> `initialize` answered, first start (a fresh PEX_ROOT: a pex file
             unpacks there, a plain zipapp has nothing to unpack) and warm; plugin spawn -> link
             up (the first `ping` tool call answered without error); broker spawn -> GET /healthz
             200, cold and warm
  floor      what the stack itself costs, in the same run: a bare SQLite WAL insert+commit
             (synchronous=FULL) on the broker's filesystem; a stdio pipe round trip (the two
             stdio hops a message makes: into A, out of B); a kept-alive stdlib http.client POST
             to a bare Starlette endpoint on uvicorn (bench/floor_server.py), with no storage and
             with one SQLite insert + FULL commit (issue 11's send -> channel floor), and the
             client's CPU per POST; the RSS of an idle `python3 -I`
  plugins    on one crowd of plugin processes, each connected and listening:
    rss        each plugin's resident memory with its link up
    latency    `send` tools/call written to plugin A's stdin -> `notifications/claude/channel` read
               from plugin B's stdout; sequential, p50/p99/max
    send CPU   the plugin's BrokerClient (bench/plugin_client.py send-loop) making sends one after
               another: its process's CPU time / sends
    throughput S sender plugins -> S receiver plugins (pairs), messages delivered to the channel
               and acked (the broker's acked_at) per second; duplicates and losses counted
    fanout     send(to="*") from a plugin to the crowd -> the last channel write
  scale      broker RSS, open fds, threads and CPU with N live sessions that keep the plugin's
             cadence on its own BrokerClient (bench/plugin_client.py listeners: a pending
             listen(120 s) re-issued at once, keepalives on it, no ping), a fan-out to them at
             each level; --soak keeps the largest level for 10 minutes with a fan-out every 30 s

The broker runs as `broker.pyz serve --synchronous FULL --rate 0` on 127.0.0.1 (ephemeral port):
no per-base rate limit, its defaults otherwise (per-recipient cap 10,000, 1,000 names a base,
INFO logging to a file). Tokens are minted with
`broker.pyz token add BASE --tokens FILE`: base `snd` for senders, `rcv` for receiver plugins,
`lsn` for the scale sessions, `cpu` for the send loop. Plugins are driven over stdio as Claude
Code drives them (tests/harness.py, shared with the tests): server/discover (-> -32601),
initialize 2025-11-25, notifications/initialized, tools/call, and each channel event appended to
the session's transcript, which is what the plugin acks by.

--quick runs every section with small counts (about a minute) for a smoke test; its figures are
indicative only. Goals are reported (met / MISS), never asserted: the exit code is 0 whenever
the run itself worked. Each goal is a row (goal, target, measured, floor, verdict); the printed
goals table is made from those rows.

Needs the project's .venv (uvicorn and Starlette, for the floor server): when the running
interpreter lacks them, the script re-executes itself with .venv/bin/python. The .pyz files, the
plugin's client processes and the `python3 -I` floor run on the base interpreter (--python), as
`python3 dist/plugin.pyz` would.
"""

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from harness import AsyncPluginProcess  # noqa: E402  (the plugin as Claude Code drives it, shared with the tests)

TOKEN_RE = re.compile(r"^dsp_([a-z0-9]{1,32})_[0-9a-f]{48}$")
#: Scale sessions (threads on the plugin's BrokerClient) per worker process.
LISTENERS_PER_WORKER = 250
#: Pause between spaced latency sends: lets the receiver's ack of the previous message land first.
LATENCY_GAP = 0.02
#: Sender plugins per token base. A broker may rate-limit sends per base (200/s by default once it
#: does): five senders share one, so 50 senders use 10 bases and the limit never caps the run.
SENDERS_PER_BASE = 5
#: Plugins spawned at once while building a crowd.
SPAWN_BATCH = 8

now = time.monotonic  # CLOCK_MONOTONIC: comparable across processes on one machine


@dataclass(frozen=True)
class Plan:
    """How much of each section to run."""

    quick: bool
    latency_n: int
    latency_warmup: int
    seq_n: int  #: messages for the one sequential sender
    levels: tuple[tuple[int, int], ...]  #: (senders, messages per sender), pipelined
    depth: int  #: tools/call requests in flight per pipelined sender
    fanout_reps: int
    session_levels: tuple[int, ...]  #: live sessions (plugin_client.py listeners) for scale and fan-out
    idle_window: float  #: seconds of CPU sampling per scale level
    plugin_warm_reps: int  #: warm plugin starts, each timed to `initialize` and to link up
    python_reps: int  #: `python3 -I -c pass` runs, the start-up floor
    broker_warm_reps: int
    floor_n: int
    send_cpu_n: int  #: sends in the BrokerClient loop (at most the broker's burst, 1,000: no rate limit)
    soak_seconds: float = 600.0

    @property
    def pause(self) -> float:
        """Settling time between steps (acks land, listens re-register)."""
        return 0.5 if self.quick else 1.5


FULL = Plan(quick=False, latency_n=1000, latency_warmup=50, seq_n=1000, levels=((1, 1000), (10, 300), (50, 100)),
            depth=8, fanout_reps=3, session_levels=(100, 1000), idle_window=20.0, plugin_warm_reps=10,
            python_reps=20, broker_warm_reps=3, floor_n=1000, send_cpu_n=1000)
QUICK = Plan(quick=True, latency_n=150, latency_warmup=20, seq_n=100, levels=((1, 100), (3, 40)), depth=8,
             fanout_reps=1, session_levels=(50,), idle_window=2.0, plugin_warm_reps=3, python_reps=5,
             broker_warm_reps=0, floor_n=200, send_cpu_n=200)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def sender_base(i: int) -> str:
    """Token base of sender i (1-based): snd for the first SENDERS_PER_BASE, then snd2, snd3, ..."""
    group = (i - 1) // SENDERS_PER_BASE
    return "snd" if group == 0 else f"snd{group + 1}"


def stats(samples_s: list[float]) -> dict[str, Any]:
    """Milliseconds: n, p50, p90, p99, max, mean, min (nearest-rank percentiles)."""
    if not samples_s:
        return {"n": 0}
    xs = sorted(x * 1000 for x in samples_s)

    def pct(p: float) -> float:
        return xs[min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))]

    return {"n": len(xs), "p50": round(pct(50), 3), "p90": round(pct(90), 3), "p99": round(pct(99), 3),
            "max": round(xs[-1], 3), "min": round(xs[0], 3), "mean": round(sum(xs) / len(xs), 3)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(*parts: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def proc_sample(pid: int) -> dict[str, float]:
    """RSS (MB), open fds, threads and CPU seconds of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15 of stat)
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return {"rss_mb": round(rss, 1), "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(fields[17]),
            "cpu_s": cpu}


def base_interpreter() -> str:
    """The interpreter a user's `python3 dist/plugin.pyz` would run: the venv's base, shims resolved."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return str(Path(exe).resolve())


def machine() -> dict[str, Any]:
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_kb / 1024 / 1024, 1),
            "kernel": platform.release(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and every child it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f} ms" if x < 10 else f"{x:.1f} ms" if x < 100 else f"{x:.0f} ms"


def source_state() -> str:
    """The checkout the bench ran from: HEAD and whether the working tree differs (the .pyz files
    may be older than the source: compare their `built` time)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}{' + uncommitted changes' if dirty else ''}" if head else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def filesystem_of(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/mounts"):
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], f"{parts[2]} ({parts[0]} on {parts[1]})"
    return kind


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


class Children:
    """Every process the bench starts, so each can be ended by its own pid at the end."""

    def __init__(self):
        self.procs: list[Any] = []

    def add(self, proc):
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            pid = proc.pid
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            if isinstance(proc, subprocess.Popen):
                with contextlib.suppress(Exception):
                    proc.wait(5)


class BrokerProc:
    """`broker.pyz serve` on 127.0.0.1 with its own database; tokens from the bench's tokens file."""

    def __init__(self, bench: "Bench", label: str):
        self.bench = bench
        self.dir = bench.work / f"broker-{label}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = self.dir / "dispatch.db"
        self.log = self.dir / "broker.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 120) -> float:
        """Spawn and poll /healthz; seconds from spawn to the first 200."""
        args = [self.bench.py, str(self.bench.broker_pyz), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--db", str(self.db), "--tokens", str(self.bench.tokens_file), "--synchronous", self.bench.args.synchronous,
                # The per-base rate limit is a policy, not a cost: off, so the bench finds what the
                # broker can carry (a fan-out to 1,000 costs a base 1,000 of its 1,000-message burst).
                "--rate", "0"]
        t0 = now()
        self.proc = self.bench.children.add(subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), env=self.bench.env(self.bench.broker_root),
            cwd=self.dir))
        deadline = t0 + timeout
        while now() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return now() - t0
            except OSError:
                pass
            time.sleep(0.005)
        raise RuntimeError(f"broker not healthy within {timeout}s: {self.log.read_text()[-2000:]}")

    def reload_tokens(self) -> None:
        before = self.log.read_text().count("tokens: ")
        self.proc.send_signal(signal.SIGHUP)
        deadline = now() + 20
        while self.log.read_text().count("tokens: ") <= before:
            if now() > deadline:
                raise RuntimeError("broker did not reload its tokens on SIGHUP")
            time.sleep(0.02)

    def sample(self) -> dict[str, float]:
        return proc_sample(self.proc.pid)

    def query(self, sql: str, *params) -> list[tuple]:
        """Read the broker's database beside it (WAL lets a reader in while it writes)."""
        db = sqlite3.connect(self.db, timeout=10)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class PluginProc(AsyncPluginProcess):
    """`plugin.pyz` (no arguments: the channel) driven over stdio as Claude Code drives it
    (tests/harness.py), its transcript and config dir in the bench's scratch directory."""

    def __init__(self, bench: "Bench", name: str, token: str, url: str, pex_root: Path | None = None):
        env = bench.env(pex_root or bench.plugin_root)
        env.update({"DISPATCH_URL": url, "DISPATCH_TOKEN": token, "DISPATCH_NAME": name,
                    "CLAUDE_CONFIG_DIR": str(bench.work / "claude" / name)})
        super().__init__([bench.py, str(bench.plugin_pyz)], env, name=name, clock=now)
        self.bench = bench

    async def spawn(self) -> "PluginProc":
        with open(self.bench.work / "plugins" / f"{self.name}.stderr", "ab") as errors:
            self.stderr = errors
            await super().spawn()
        self.bench.children.add(self.proc)
        return self


class Observer:
    """The bench's own broker calls (`who`), through the plugin's BrokerClient: never a measured path."""

    def __init__(self, url: str, token: str, name: str):
        import dispatch_plugin

        config = dispatch_plugin.Config(url=url, token=token, base=TOKEN_RE.match(token)[1], name=name,
                                        token_source="bench")
        self.client = dispatch_plugin.BrokerClient(config)
        self.client.identify()

    def live(self) -> set[str]:
        return {p["name"] for p in self.client.call("who")[0]["participants"] if p["live"]}


class ListenerWorker:
    """A process of sessions on the plugin's BrokerClient (`plugin_client.py listeners`), one
    thread each, reporting mail on stdout."""

    def __init__(self, bench: "Bench", broker: BrokerProc, token: str, base: str, start: int, count: int):
        self.bench, self.broker, self.token, self.base, self.start, self.count = bench, broker, token, base, start, count
        self.names = [f"{base}-{i:04d}" for i in range(start, start + count)]
        self.ready = asyncio.Event()
        self.identified = 0
        self.errors: list[str] = []
        self.reconnects: list[dict] = []  # links the worker rebuilt, as the plugin would
        self.sink = None  # callable(name, t, body)

    async def spawn(self) -> None:
        errors = open(self.bench.work / f"listeners-{self.start}.stderr", "ab")
        self.proc = self.bench.children.add(await asyncio.create_subprocess_exec(
            self.bench.py, str(BENCH / "plugin_client.py"), "listeners", str(self.bench.plugin_pyz), self.broker.url,
            self.token, self.base, str(self.start), str(self.count), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=errors, limit=1 << 24))
        errors.close()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            message = json.loads(line)
            if "m" in message:
                if self.sink:
                    self.sink(message["n"], message["t"], message["m"])
            elif "reconnect" in message:
                self.reconnects.append(message)
                if len(self.reconnects) <= 2:
                    say(f"  listener reconnect: {message['reconnect']}: {message['why']}")
            elif "ready" in message:
                self.identified = message["ready"]
                self.ready.set()
            elif "error" in message:
                self.errors.append(message["error"])
                if len(self.errors) <= 3:
                    say(f"  listener error: {message['error'][:300]}")
        self.ready.set()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


# --------------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, plan: Plan):
        self.args, self.plan = args, plan
        self.children = Children()
        self.py = args.python or base_interpreter()
        dist = Path(args.dist).resolve() if args.dist else ROOT / "dist"
        for name in ("broker.pyz", "plugin.pyz"):
            if not (dist / name).exists():
                raise SystemExit(f"{dist / name} is missing: build it with `.venv/bin/python build.py`")
        base = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="dispatch-bench-", dir=base))
        (self.work / "plugins").mkdir()
        # Copy: another process may rebuild dist/ while we run, and pex keys its cache on content.
        self.broker_pyz = self.work / "broker.pyz"
        # The plugin every plugin process runs: dist's plugin.pyz, or --plugin (dispatch_plugin.py
        # as the Claude Code plugin package runs it from a checkout, or another .pyz).
        plugin = Path(args.plugin).resolve() if args.plugin else dist / "plugin.pyz"
        self.plugin_pyz = self.work / plugin.name
        self.dist_files = {}
        for name, source, target in (("broker.pyz", dist / "broker.pyz", self.broker_pyz),
                                     ("plugin" if args.plugin else "plugin.pyz", plugin, self.plugin_pyz)):
            shutil.copyfile(source, target)
            digest = hashlib.sha256(target.read_bytes()).hexdigest()
            built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(source.stat().st_mtime))
            self.dist_files[name if name != "plugin" else f"plugin {plugin.name}"] = {"sha256": digest, "built": built}
        self.dist = dist
        self.broker_root = self.work / "pex-broker"  # fresh: the first broker start is the cold one
        self.plugin_root = self.work / "pex-plugin"  # fresh: the first plugin start is the cold one
        self.tokens_file = self.work / "tokens"
        self.tokens_file.write_text("")  # exists, holds no token yet: the cold broker can start
        self.tokens: dict[str, str] = {}
        self.results: dict[str, Any] = {}
        self.profiles: dict[str, str] = {}
        self.broker_warm: list[float] = []  # every warm broker start: spare ones and the scale broker

    def env(self, pex_root: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "CLAUDE_", "PEX_"))}
        env["PEX_ROOT"] = str(pex_root)
        env["XDG_CONFIG_HOME"] = str(self.work / "xdg-none")  # no user config.toml
        return env

    def mint(self, base: str) -> str:
        """A token through the real CLI: `broker.pyz token add BASE --tokens FILE`."""
        done = subprocess.run([self.py, str(self.broker_pyz), "token", "add", base, "--tokens", str(self.tokens_file)],
                              capture_output=True, text=True, timeout=300, env=self.env(self.broker_root))
        token = done.stdout.strip()
        if done.returncode != 0 or not TOKEN_RE.match(token) or TOKEN_RE.match(token)[1] != base:
            raise RuntimeError(f"token add {base} failed ({done.returncode}): {done.stdout} {done.stderr}")
        self.tokens[base] = token
        return token

    # -- sections ---------------------------------------------------------------------------

    def section_size(self) -> None:
        """plugin.pyz, broker.pyz (this machine's broker file) and each platform's broker-*.pyz."""
        names = ["broker.pyz", "plugin.pyz", *sorted(p.name for p in self.dist.glob("broker-*.pyz"))]
        self.results["size"] = {name: (self.dist / name).stat().st_size for name in names}

    async def section_startup_and_broker(self) -> BrokerProc:
        """Cold then warm starts; returns the main broker (the cold-started one, tokens loaded)."""
        startup: dict[str, Any] = {}
        say("startup: cold broker (fresh PEX_ROOT)")
        main = BrokerProc(self, "main")
        startup["broker_cold_ms"] = round(main.start() * 1000, 1)
        say(f"  broker cold {startup['broker_cold_ms']} ms; minting tokens with the CLI")
        for base in ("snd", "rcv", "lsn", "cpu"):
            self.mint(base)
        main.reload_tokens()

        for i in range(self.plan.broker_warm_reps):
            extra = BrokerProc(self, f"warm{i}")
            self.broker_warm.append(extra.start())
            extra.stop()

        say(f"startup: `python3 -I -c pass` x {self.plan.python_reps}, the interpreter's own start")
        samples = []
        for _ in range(self.plan.python_reps):
            t0 = now()
            subprocess.run([self.py, "-I", "-c", "pass"], check=True)
            samples.append(now() - t0)
        startup["python_pass_ms"] = stats(samples)

        say("startup: first plugin start (fresh PEX_ROOT)")
        closed = f"http://127.0.0.1:{free_port()}/mcp"  # initialize must not depend on the broker
        cold = await PluginProc(self, "snd-cold", self.tokens["snd"], closed).spawn()
        startup["plugin_cold_ms"] = round(await cold.handshake() * 1000, 1)
        await cold.close()
        samples, link = [], []
        for i in range(self.plan.plugin_warm_reps):
            # Against the live broker: initialize does not wait for it, the link-up time does.
            p = await PluginProc(self, f"snd-warm{i}", self.tokens["snd"], main.url).spawn()
            samples.append(await p.handshake())
            link.append(await p.wait_connected())
            await p.close()
        startup["plugin_warm_ms"] = stats(samples)
        startup["plugin_link_up_ms"] = stats(link)
        say(f"  python3 -I -c pass p50 {startup['python_pass_ms']['p50']} ms; plugin first {startup['plugin_cold_ms']} "
            f"ms, warm p50 {startup['plugin_warm_ms']['p50']} ms, link up p50 {startup['plugin_link_up_ms']['p50']} ms")
        self.results["startup"] = startup
        return main

    async def section_floor(self) -> None:
        n = self.plan.floor_n
        floor: dict[str, Any] = {}
        say("floor: SQLite, stdio, stdlib HTTP to Starlette on uvicorn, idle python3 RSS")

        # SQLite: the broker's pattern (BEGIN IMMEDIATE, one INSERT, COMMIT) on the same filesystem.
        db = sqlite3.connect(self.work / "floor.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE m (id TEXT PRIMARY KEY, recipient TEXT, body TEXT, sent_at REAL)")
        samples = []
        for i in range(n + 20):
            t0 = now()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO m VALUES (?, ?, ?, ?)", (os.urandom(8).hex(), "rcv-0001", "x" * 40, time.time()))
            db.execute("COMMIT")
            if i >= 20:
                samples.append(now() - t0)
        db.close()
        floor["sqlite_commit_ms"] = stats(samples)

        # stdio: a line into a child and a line back, through asyncio pipes like the bench's own.
        echo = self.children.add(await asyncio.create_subprocess_exec(
            self.py, "-I", "-c",
            "import sys\nfor l in sys.stdin.buffer:\n sys.stdout.buffer.write(l); sys.stdout.buffer.flush()",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE))
        await asyncio.sleep(0.3)
        # The idle interpreter, the floor of a plugin's resident memory.
        floor["python_idle_rss_mb"] = proc_sample(echo.pid)["rss_mb"]
        samples = []
        line = json.dumps({"jsonrpc": "2.0", "method": "notifications/claude/channel",
                           "params": {"content": "x" * 40}}).encode() + b"\n"
        for i in range(n + 20):
            t0 = now()
            echo.stdin.write(line)
            await echo.stdin.drain()
            await echo.stdout.readline()
            if i >= 20:
                samples.append(now() - t0)
        echo.stdin.close()
        await echo.wait()
        floor["stdio_rtt_ms"] = stats(samples)

        port = free_port()
        server = self.children.add(subprocess.Popen(
            [sys.executable, str(BENCH / "floor_server.py"), str(port), str(self.work / "floor-server.db")],
            stdout=subprocess.DEVNULL, stderr=open(self.work / "floor-server.log", "ab")))
        try:
            deadline = now() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if now() > deadline or server.poll() is not None:
                        raise RuntimeError(f"floor server did not start: {(self.work / 'floor-server.log').read_text()}")
                    await asyncio.sleep(0.05)
            floor["server_rss_mb"] = proc_sample(server.pid)["rss_mb"]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            body = json.dumps({"to": "rcv-0001", "body": "x" * 40}).encode()
            headers = {"Content-Type": "application/json"}

            def post(path: str) -> None:
                conn.request("POST", path, body, headers)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"floor server {path}: HTTP {response.status}")

            for path, key, gap in (("/echo", "http_rtt_ms", 0.0), ("/insert", "http_commit_ms", 0.0),
                                   ("/insert", "http_commit_spaced_ms", LATENCY_GAP)):
                samples = []
                reps = n if not gap else n // 2
                cpu0 = time.process_time()
                for i in range(reps + 20):
                    t0 = now()
                    post(path)
                    if i >= 20:
                        samples.append(now() - t0)
                    if gap:
                        time.sleep(gap)
                floor[key] = stats(samples)
                if not gap:  # CPU of the client per kept-alive POST: the floor of the plugin's per-send CPU
                    floor[key]["client_cpu_ms"] = round((time.process_time() - cpu0) * 1000 / (reps + 20), 3)
            conn.close()
        finally:
            server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(10)

        # Issue 11's floor of send -> channel: one kept-alive stdlib POST to a bare Starlette
        # endpoint on uvicorn that stores the message with one durable commit.
        floor["send_channel_floor_ms"] = floor["http_commit_ms"]["p50"]
        # The floor of one sequential sender: the stdio hop into A, then that POST.
        floor["sequential_sender_floor_per_s"] = round(
            1000 / (floor["stdio_rtt_ms"]["p50"] + floor["http_commit_ms"]["p50"]), 1)
        self.results["floor"] = floor
        say(f"  floor send->channel {floor['send_channel_floor_ms']} ms (POST + FULL commit), "
            f"bare POST {floor['http_rtt_ms']['p50']} ms, stdio {floor['stdio_rtt_ms']['p50']} ms")

    async def start_plugins(self, specs: list[tuple[str, str]], url: str) -> list[PluginProc]:
        """Spawn, handshake and connect plugins (name, base), SPAWN_BATCH at a time."""
        plugins = [PluginProc(self, name, self.tokens[base], url) for name, base in specs]
        for start in range(0, len(plugins), SPAWN_BATCH):
            batch = plugins[start:start + SPAWN_BATCH]
            for p in batch:
                await p.spawn()
            await asyncio.gather(*(p.handshake() for p in batch))
            await asyncio.gather(*(p.wait_connected() for p in batch))
        return plugins

    async def wait_live(self, observer: Observer, names: set[str], timeout: float = 120) -> None:
        deadline = now() + timeout
        while True:
            live = await asyncio.to_thread(observer.live)
            missing = names - live
            if not missing:
                return
            if now() > deadline:
                raise RuntimeError(f"{len(missing)} participants not live within {timeout}s: {sorted(missing)[:5]}")
            await asyncio.sleep(0.25)

    async def section_plugins(self, broker: BrokerProc) -> None:
        """latency, throughput and the plugin fan-out, on one crowd of plugins."""
        smax = max(s for s, _ in self.plan.levels)
        bases = [sender_base(i) for i in range(1, smax + 1)]
        for base in sorted(set(bases) - set(self.tokens)):
            self.mint(base)
        if set(bases) - {"snd"}:
            broker.reload_tokens()
        senders = [f"{base}-{i:04d}" for i, base in enumerate(bases, start=1)]
        receivers = [f"rcv-{i:04d}" for i in range(1, smax + 1)]
        say(f"plugins: starting {2 * smax + 1} plugin processes")
        t0 = now()
        crowd = await self.start_plugins([(n, n.split("-")[0]) for n in senders] + [(n, "rcv") for n in receivers]
                                         + [("snd-fan", "snd")], broker.url)
        by_name = {p.name: p for p in crowd}
        observer = await asyncio.to_thread(Observer, broker.url, self.tokens["snd"], "snd-observer")
        await self.wait_live(observer, {p.name for p in crowd})
        say(f"  {len(crowd)} plugins connected and listening in {now() - t0:.1f} s")
        rss = [proc_sample(p.pid)["rss_mb"] for p in crowd]
        self.results["plugin_rss_mb"] = {"n": len(rss), "mean": round(sum(rss) / len(rss), 1), "min": min(rss),
                                         "max": max(rss)}
        say(f"  plugin RSS with the link up: mean {self.results['plugin_rss_mb']['mean']} MB, max {max(rss)} MB")

        await self.latency(by_name["snd-0001"], by_name["rcv-0001"], broker)
        await self.send_cpu(broker, by_name["rcv-0001"])
        await self.throughput(broker, by_name, senders, receivers)
        await self.fanout_plugins(broker, by_name["snd-fan"], [p for p in crowd if p.name != "snd-fan"])
        self.results["broker_with_plugins"] = {k: v for k, v in broker.sample().items() if k != "cpu_s"}
        self.results["broker_with_plugins"]["sessions"] = len(crowd)
        await asyncio.gather(*(p.close() for p in crowd))

    async def send_cpu(self, broker: BrokerProc, receiver: PluginProc) -> None:
        """The plugin's BrokerClient alone, sending one message after another to a live receiver
        plugin: CPU time of the client's process over the loop / sends."""
        n = self.plan.send_cpu_n
        say(f"send CPU: the plugin's BrokerClient, {n} sends in a loop to {receiver.name}")
        done = await asyncio.to_thread(subprocess.run, [
            self.py, str(BENCH / "plugin_client.py"), "send-loop", str(self.plugin_pyz), broker.url,
            self.tokens["cpu"], "cpu-0001", receiver.name, str(n)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"send loop failed ({done.returncode}): {done.stderr[-2000:]}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
        self.results["send_cpu"] = {"n": report["n"], "cpu_ms_per_send": round(report["cpu_s"] * 1000 / report["n"], 3),
                                    "wall_ms_per_send": round(report["wall_s"] * 1000 / report["n"], 3)}
        say(f"  {self.results['send_cpu']['cpu_ms_per_send']} ms CPU a send "
            f"({self.results['send_cpu']['wall_ms_per_send']} ms wall)")

    async def latency(self, a: PluginProc, b: PluginProc, broker: BrokerProc) -> None:
        """Sequential sends A -> B. Back to back (the headline, measured like the floor): the next
        send is written the moment the previous one is on B's stdout and answered at A, so every
        process stays hot (B's ack of the previous message is still in flight). Spaced: each send
        starts LATENCY_GAP after the previous one landed, as in a conversation, so every hop pays
        for waking an idle process; compare it with the floor's spaced figure."""
        plan = self.plan
        say(f"latency: {plan.latency_n} sequential sends {a.name} -> {b.name} back to back, then "
            f"{plan.latency_n} spaced {LATENCY_GAP * 1000:.0f} ms apart")
        result: dict[str, Any] = {}
        for mode, gap in (("back_to_back", 0.0), ("spaced", LATENCY_GAP)):
            samples, rtts = [], []
            profile = self.profile_start(broker, f"latency-{mode}", [a, b])
            cpu0 = self.cpu_of(broker, [(a, b)])
            for i in range(plan.latency_warmup + plan.latency_n):
                body = f"lat-{mode}-{i}"
                arrived = b.expect(body)
                t0, answered = a.tool_nowait("send", to=b.name, body=body)
                t1 = await asyncio.wait_for(arrived, 30)
                t2, message = await asyncio.wait_for(answered, 30)
                if message["result"].get("isError"):
                    raise RuntimeError(f"send failed: {message}")
                if i >= plan.latency_warmup:
                    samples.append(t1 - t0)
                    rtts.append(t2 - t0)
                if gap:
                    await asyncio.sleep(gap)
            self.profile_stop(profile)
            cpu1 = self.cpu_of(broker, [(a, b)])
            run = stats(samples)
            run["send_answer_ms"] = stats(rtts)
            run["cpu_ms_per_msg"] = {k: round((cpu1[k] - cpu0[k]) * 1000 / (plan.latency_warmup + plan.latency_n), 3)
                                     for k in cpu0}
            if mode == "back_to_back":
                result.update(run)
            else:
                run["gap_ms"] = LATENCY_GAP * 1000
                result["spaced"] = run
            say(f"  {mode}: p50 {run['p50']} ms, p99 {run['p99']} ms, max {run['max']} ms")
        self.results["latency"] = result

    async def throughput(self, broker: BrokerProc, by_name: dict, senders: list[str], receivers: list[str]) -> None:
        runs = []
        runs.append(await self.throughput_run(broker, [(by_name[senders[0]], by_name[receivers[0]])],
                                              self.plan.seq_n, depth=1, tag="tq1"))
        for s, per_sender in self.plan.levels:
            pairs = [(by_name[senders[i]], by_name[receivers[i]]) for i in range(s)]
            runs.append(await self.throughput_run(broker, pairs, per_sender, depth=self.plan.depth, tag=f"tp{s}",
                                                  profile=f"throughput-{s}" if s == max(x for x, _ in self.plan.levels) else None))
        self.results["throughput"] = runs

    async def throughput_run(self, broker: BrokerProc, pairs, per_sender: int, depth: int, tag: str,
                             profile: str | None = None) -> dict[str, Any]:
        total = len(pairs) * per_sender
        say(f"throughput {tag}: {len(pairs)} sender(s) x {per_sender} msgs, {depth} in flight each")
        seen_bodies: dict[str, int] = {}
        seen_ids: dict[str, int] = {}
        last = [0.0]
        complete = asyncio.Event()
        prefix = f"{tag}-"

        def sink(plugin, t, message_id, body):
            if not body.startswith(prefix):
                return
            seen_ids[message_id] = seen_ids.get(message_id, 0) + 1
            seen_bodies[body] = seen_bodies.get(body, 0) + 1
            if seen_bodies[body] == 1:
                last[0] = t
                if len(seen_bodies) == total:
                    complete.set()

        for _, rcv in pairs:
            rcv.sink = sink
        errors, queued, accepted = [], 0, set()

        async def sender(index: int, snd: PluginProc, rcv: PluginProc) -> None:
            nonlocal queued
            bodies = iter(range(per_sender))

            async def lane() -> None:
                nonlocal queued
                for n in bodies:
                    body = f"{tag}-{index}-{n}"
                    text, is_error = await snd.tool("send", timeout=120, to=rcv.name, body=body)
                    if is_error:
                        errors.append(text)
                        continue
                    accepted.add(body)
                    if not text.startswith("Sent."):
                        queued += 1
            await asyncio.gather(*(lane() for _ in range(depth)))

        prof = self.profile_start(broker, profile, [pairs[0][0], pairs[0][1]]) if profile else None
        cpu0 = self.cpu_of(broker, pairs)
        wall0, t0 = time.time(), now()
        await asyncio.gather(*(sender(i, s, r) for i, (s, r) in enumerate(pairs)))
        t_sent = now()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(complete.wait(), 60 + total / 50)
        # Acked = the broker's acked_at (the plugin acks after the channel write and flush).
        deadline = now() + 60
        while True:
            count, last_ack = (await asyncio.to_thread(
                broker.query, "SELECT count(*), max(acked_at) FROM messages WHERE acked_at IS NOT NULL AND body LIKE ?",
                prefix + "%"))[0]
            if count >= total - len(errors) or now() > deadline:
                break
            await asyncio.sleep(0.05)
        self.profile_stop(prof)
        cpu1 = self.cpu_of(broker, pairs)
        await asyncio.sleep(0.5)  # room for a late duplicate to show
        for _, rcv in pairs:
            rcv.sink = None
        pushes = (await asyncio.to_thread(broker.query, "SELECT count(*), coalesce(sum(attempt), 0) FROM messages "
                                          "WHERE body LIKE ?", prefix + "%"))[0]
        delivered_s = (last[0] - t0) if seen_bodies else float("nan")
        acked_s = (last_ack - wall0) if last_ack else float("nan")
        result = {
            "senders": len(pairs), "receivers": len(pairs), "depth": depth, "messages": total,
            "sent_per_s": round(total / (t_sent - t0), 1),
            "delivered_per_s": round(len(seen_bodies) / delivered_s, 1) if seen_bodies else 0,
            "acked_per_s": round(count / acked_s, 1) if last_ack else 0,
            "delivered": len(seen_bodies), "acked": count,
            "duplicates": sum(c - 1 for c in seen_bodies.values()) + sum(c - 1 for c in seen_ids.values()),
            # A loss is a send reported done whose message never arrived; a send reported failed
            # may still have been stored (the answer was lost), and then it arrives: not a loss.
            "losses": len(accepted - seen_bodies.keys()), "errors": len(errors), "queued": queued,
            "pushes": pushes[1], "rows": pushes[0],
            "cpu_ms_per_msg": {k: round((cpu1[k] - cpu0[k]) * 1000 / max(1, total), 3) for k in cpu0},
        }
        if errors:
            result["first_error"] = errors[0][:300]
        say(f"  sent {result['sent_per_s']}/s, delivered {result['delivered_per_s']}/s, acked {result['acked_per_s']}/s, "
            f"dup {result['duplicates']}, lost {result['losses']}, errors {len(errors)}")
        return result

    @staticmethod
    def cpu_of(broker: BrokerProc, pairs) -> dict[str, float]:
        """CPU seconds so far: the broker, all senders, all receivers."""
        return {"broker": broker.sample()["cpu_s"],
                "senders": sum(proc_sample(s.proc.pid)["cpu_s"] for s, _ in pairs),
                "receivers": sum(proc_sample(r.proc.pid)["cpu_s"] for _, r in pairs)}

    async def fanout_plugins(self, broker: BrokerProc, sender: PluginProc, listeners: list[PluginProc]) -> None:
        say(f"fan-out: send(to='*') to {len(listeners)} plugin listeners")
        reps = []
        for rep in range(self.plan.fanout_reps):
            body = f"fanp-{rep}"
            arrivals = [p.expect(body) for p in listeners]
            prof = self.profile_start(broker, "fanout-plugins") if rep == 0 else None
            wall0 = time.time()
            t0, answered = sender.tool_nowait("send", to="*", body=body)
            done, pending = await asyncio.wait(arrivals, timeout=60)
            t_answer, message = await asyncio.wait_for(answered, 60)
            self.profile_stop(prof)
            acked_ms = await self.settle(broker, body, len(listeners), wall0)
            times = sorted(f.result() - t0 for f in done if not f.exception())
            reps.append({"listeners": len(listeners), "kind": "plugin processes", "received": len(times),
                         "missing": len(pending), "first_ms": round(times[0] * 1000, 1) if times else None,
                         "p50_ms": stats(times).get("p50"), "last_ms": round(times[-1] * 1000, 1) if times else None,
                         "send_answer_ms": round((t_answer - t0) * 1000, 1), "all_acked_ms": acked_ms})
            for f in pending:
                f.cancel()
            await asyncio.sleep(self.plan.pause)  # acks settle before the next round
        self.results.setdefault("fanout", []).append(self.fanout_summary(reps))
        say(f"  last channel write after {self.results['fanout'][-1]['last_ms']} ms (median of {len(reps)})")

    @staticmethod
    async def settle(broker: BrokerProc, body: str, expected: int, wall0: float, timeout: float = 90) -> float | None:
        """Wait until every copy of a fan-out is acked (so the next round starts on an idle
        broker); ms from the send to the last ack, None if not all were acked in time."""
        deadline = now() + timeout
        while True:
            stored, count, last = (await asyncio.to_thread(
                broker.query, "SELECT count(*), count(acked_at), max(acked_at) FROM messages WHERE body = ?", body))[0]
            if stored and count >= min(expected, stored):  # one that was not live got no copy to ack
                return round((last - wall0) * 1000, 1)
            if now() > deadline:
                return None
            await asyncio.sleep(0.05)

    @staticmethod
    def fanout_summary(reps: list[dict]) -> dict:
        best = sorted(reps, key=lambda r: r["last_ms"] if r["last_ms"] is not None else 1e12)[len(reps) // 2]
        summary = dict(best)
        summary["runs_last_ms"] = [r["last_ms"] for r in reps]
        summary["missing"] = max(r["missing"] for r in reps)
        return summary

    async def section_scale(self) -> None:
        """A fresh broker: idle sample, then N sessions on the plugin's BrokerClient per level; fan-out at each level."""
        broker = BrokerProc(self, "scale")
        self.broker_warm.append(broker.start())
        observer = await asyncio.to_thread(Observer, broker.url, self.tokens["snd"], "snd-observer")
        await asyncio.sleep(self.plan.pause)
        rows = [await self.scale_sample(broker, 0, "no sessions")]
        say("scale: fan-out sender plugin")
        [sender] = await self.start_plugins([("snd-fan", "snd")], broker.url)
        workers: list[ListenerWorker] = []
        arrivals: dict[str, list[tuple[str, float]]] = {}

        def sink(name: str, t: float, body: str) -> None:
            arrivals.setdefault(body, []).append((name, t))

        have = 0
        for level in self.plan.session_levels:
            say(f"scale: {level} sessions on the plugin's BrokerClient")
            t_level = now()
            while have < level:
                count = min(LISTENERS_PER_WORKER, level - have)
                w = ListenerWorker(self, broker, self.tokens["lsn"], "lsn", have + 1, count)
                w.sink = sink
                await w.spawn()
                workers.append(w)
                have += count
            await asyncio.gather(*(w.ready.wait() for w in workers))
            names = {n for w in workers for n in w.names}
            await self.wait_live(observer, names | {"snd-fan"}, timeout=300)
            say(f"  {level} sessions live in {now() - t_level:.1f} s")
            await asyncio.sleep(self.plan.pause)
            rows.append(await self.scale_sample(broker, level, "plugin-client sessions, plugin cadence, + 1 sender plugin",
                                                profile=f"idle-{level}"))
            await self.fanout_sessions(broker, sender, names, arrivals, level, workers)
        self.results["scale"] = rows
        if self.args.soak:
            await self.soak(broker, sender, workers, arrivals)
        for w in workers:
            await w.stop()
            if w.errors:
                self.results.setdefault("listener_errors", []).extend(w.errors[:5])
                self.results["listener_error_count"] = self.results.get("listener_error_count", 0) + len(w.errors)
            self.results["listener_reconnects"] = self.results.get("listener_reconnects", 0) + len(w.reconnects)
        await sender.close()
        broker.stop()

    async def scale_sample(self, broker: BrokerProc, sessions: int, kind: str, profile: str | None = None) -> dict:
        prof = self.profile_start(broker, profile) if profile else None
        before, t0 = broker.sample(), now()
        await asyncio.sleep(self.plan.idle_window)
        after, elapsed = broker.sample(), now() - t0
        self.profile_stop(prof)
        row = {"sessions": sessions, "kind": kind, "rss_mb": after["rss_mb"], "fds": after["fds"],
               "threads": after["threads"], "cpu_pct": round((after["cpu_s"] - before["cpu_s"]) / elapsed * 100, 1),
               "window_s": round(elapsed, 1)}
        say(f"  {sessions} sessions: RSS {row['rss_mb']} MB, {row['fds']} fds, CPU {row['cpu_pct']}%")
        return row

    async def fanout_sessions(self, broker: BrokerProc, sender: PluginProc, names: set[str], arrivals: dict, level: int,
                         workers: list) -> None:
        say(f"fan-out: send(to='*') to {level} plugin-client sessions")
        reps = []
        for rep in range(self.plan.fanout_reps):
            body = f"fans-{level}-{rep}"
            prof = self.profile_start(broker, f"fanout-sessions-{level}") if rep == 0 else None
            cpu0 = (broker.sample()["cpu_s"], sum(proc_sample(w.proc.pid)["cpu_s"] for w in workers))
            wall0 = time.time()
            t0, answered = sender.tool_nowait("send", to="*", body=body)
            t_answer, message = await asyncio.wait_for(answered, 120)
            deadline = now() + 60
            while len({n for n, _ in arrivals.get(body, [])}) < len(names) and now() < deadline:
                await asyncio.sleep(0.01)
            self.profile_stop(prof)
            acked_ms = await self.settle(broker, body, len(names), wall0)
            cpu1 = (broker.sample()["cpu_s"], sum(proc_sample(w.proc.pid)["cpu_s"] for w in workers))
            got = arrivals.get(body, [])
            times = sorted(t - t0 for n, t in got)
            received = {n for n, _ in got}
            if names - received:  # say what the broker knows of each message that did not arrive
                rows = await asyncio.to_thread(
                    broker.query, "SELECT recipient, attempt, pushed_at IS NOT NULL, acked_at IS NOT NULL FROM messages "
                    "WHERE body = ?", body)
                self.results.setdefault("fanout_missing", []).extend(
                    {"body": body, "recipient": r[0], "attempt": r[1], "pushed": bool(r[2]), "acked": bool(r[3])}
                    for r in rows if r[0] in names - received)
                self.results.setdefault("fanout_missing_not_stored", []).extend(
                    sorted(names - received - {r[0] for r in rows})[:10])
            reps.append({"listeners": level, "kind": "plugin-client sessions in worker processes", "received": len(received),
                         "missing": len(names - received), "duplicates": len(got) - len(received),
                         "first_ms": round(times[0] * 1000, 1) if times else None, "p50_ms": stats(times).get("p50"),
                         "last_ms": round(times[-1] * 1000, 1) if times else None,
                         "send_answer_ms": round((t_answer - t0) * 1000, 1), "all_acked_ms": acked_ms,
                         # CPU seconds the round cost (send to last ack), idle load included.
                         "cpu_s": {"broker": round(cpu1[0] - cpu0[0], 2), "listeners": round(cpu1[1] - cpu0[1], 2)}})
            await asyncio.sleep(self.plan.pause)
        self.results.setdefault("fanout", []).append(self.fanout_summary(reps))
        say(f"  last notification after {self.results['fanout'][-1]['last_ms']} ms (median of {len(reps)})")

    async def soak(self, broker: BrokerProc, sender: PluginProc, workers: list, arrivals: dict) -> None:
        seconds = self.plan.soak_seconds
        say(f"soak: {seconds:.0f} s with {sum(w.count for w in workers)} sessions, a fan-out every 30 s")
        samples = []
        t_start = now()
        last = broker.sample()
        t_last = now()
        next_fan = t_start + 30
        n = 0
        while now() - t_start < seconds:
            await asyncio.sleep(10)
            if now() >= next_fan:
                n += 1
                _, answered = sender.tool_nowait("send", to="*", body=f"soak-{n}")
                await asyncio.wait_for(answered, 120)
                next_fan += 30
            s, t = broker.sample(), now()
            samples.append({"t_s": round(t - t_start), "rss_mb": s["rss_mb"], "fds": s["fds"], "threads": s["threads"],
                            "cpu_pct": round((s["cpu_s"] - last["cpu_s"]) / (t - t_last) * 100, 1)})
            last, t_last = s, t
        expected = sum(w.count for w in workers)
        observer = await asyncio.to_thread(Observer, broker.url, self.tokens["snd"], "snd-observer")
        live_at_end = len(await asyncio.to_thread(observer.live) & {n for w in workers for n in w.names})
        deadline = now() + 60  # the last fan-out's copies are still arriving
        while now() < deadline and len({name for name, _ in arrivals.get(f"soak-{n}", [])}) < expected:
            await asyncio.sleep(0.2)
        delivered = [len({name for name, _ in arrivals.get(f"soak-{i}", [])}) for i in range(1, n + 1)]
        rss = [x["rss_mb"] for x in samples]
        self.results["soak"] = {
            "seconds": round(now() - t_start), "sessions": expected, "fanouts": n,
            "fanout_min_received": min(delivered) if delivered else None, "fanout_received": delivered,
            "live_at_end": live_at_end,
            "reconnects": sum(len(w.reconnects) for w in workers),
            "reconnect_reasons": sorted({r["why"][:80] for w in workers for r in w.reconnects})[:5],
            "listener_errors": sum(len(w.errors) for w in workers),
            "rss_first_mb": rss[0], "rss_last_mb": rss[-1], "rss_max_mb": max(rss),
            "fds_first": samples[0]["fds"], "fds_last": samples[-1]["fds"],
            "cpu_pct_mean": round(sum(x["cpu_pct"] for x in samples) / len(samples), 1), "samples": samples}
        say(f"  RSS {rss[0]} -> {rss[-1]} MB (max {max(rss)}), fds {samples[0]['fds']} -> {samples[-1]['fds']}")

    # -- optional profiling -----------------------------------------------------------------

    def profile_start(self, broker: BrokerProc, label: str | None, plugins: list | None = None):
        """py-spy record (raw collapsed stacks, 250 Hz) of the broker and the given plugins."""
        if not self.args.profile or not label:
            return None
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            return None
        procs = []
        for who, pid in [("broker", broker.pid), *((p.name, p.proc.pid) for p in plugins or [])]:
            out = Path(self.args.profile) / f"{label}.{who}.txt"
            out.parent.mkdir(parents=True, exist_ok=True)
            procs.append(self.children.add(subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--output", str(out),
                 "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            self.profiles[f"{label}.{who}"] = str(out)
        time.sleep(0.5)  # let them attach
        return procs

    @staticmethod
    def profile_stop(procs) -> None:
        for proc in procs or []:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs or []:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)

    # -- run --------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        started = time.time()
        busy0, own0, t0 = machine_busy_s(), own_cpu_s(), now()
        at_start = machine()  # the load average before the bench adds its own
        self.section_size()
        only = set(self.args.only.split(",")) if self.args.only else {"floor", "plugins", "scale"}
        main = await self.section_startup_and_broker()
        try:
            if "floor" in only:
                await self.section_floor()
            if "plugins" in only:
                await self.section_plugins(main)
        finally:
            main.stop()
        if "scale" in only:
            await self.section_scale()
        self.results["startup"]["broker_warm_ms"] = stats(self.broker_warm)
        self.results["goals"] = goals(self.results)
        elapsed = now() - t0
        others = max(0.0, (machine_busy_s() - busy0) - (own_cpu_s() - own0))
        self.results["meta"] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "duration_s": round(time.time() - started, 1),
            "command": " ".join(["python3", "bench/run.py", *sys.argv[1:]]),
            "quick": self.plan.quick, "soak": bool(self.args.soak),
            "machine": at_start, "python": platform.python_version(), "pyz_interpreter": self.py,
            # What `python3 -I` imports before any code of ours: a site hook (a .pth) shows here,
            # and in every start-up and RSS figure.
            "pyz_interpreter_version": subprocess.run([self.py, "-I", "-c", "import platform; print(platform.python_version())"],
                                                      capture_output=True, text=True).stdout.strip(),
            "pyz_interpreter_modules_at_start": int(subprocess.run(
                [self.py, "-I", "-c", "import sys; print(len(sys.modules))"], capture_output=True, text=True).stdout),
            "filesystem": filesystem_of(self.work), "dist": str(self.dist),
            "sqlite": sqlite3.sqlite_version, "plan": asdict(self.plan), "profiles": self.profiles,
            "source": source_state(), "dist_files": self.dist_files,
            # Other processes' CPU during the run, in cores: > 0.2 means the figures are noisy.
            "other_load_cores": round(others / elapsed, 2), "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        }
        return self.results

    def cleanup(self) -> None:
        self.children.kill_all()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            say(f"kept {self.work}")


# --------------------------------------------------------------------------------------------
# Goals and the table
# --------------------------------------------------------------------------------------------


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal as a row: goal, target, measured, floor (measured in the same run), verdict
    ('met', 'MISS' or 'not run'), note. The printed goals table and BENCHMARKS.md come from these."""
    out = []

    def goal(what: str, target: str, measured: str, ok: bool | None, floor: str = "—", note: str = "") -> None:
        out.append({"goal": what, "target": target, "measured": measured, "floor": floor,
                    "verdict": "not run" if ok is None else ("met" if ok else "MISS"), "note": note})

    st, fl, lat = r.get("startup", {}), r.get("floor", {}), r.get("latency", {})
    py = st.get("python_pass_ms", {}).get("p50")
    # Issue 11: the plugin, per session, each beside its floor.
    rss = r.get("plugin_rss_mb")
    idle = fl.get("python_idle_rss_mb")
    goal("plugin RSS per session, link up", "< 25 MB",
         f"{rss['max']:.1f} MB max of {rss['n']} (mean {rss['mean']:.1f})" if rss else "-",
         None if not rss else rss["max"] < 25, f"idle `python3 -I`: {idle:.1f} MB" if idle else "—")
    warm = st.get("plugin_warm_ms", {}).get("p50")
    goal("plugin spawn → initialize answered, warm", f"≤ 2.5× floor ({2.5 * py:.0f} ms)" if py else "≤ 2.5× floor",
         f"{warm:.0f} ms = {warm / py:.2f}× floor" if warm and py else "-",
         None if not (warm and py) else warm <= 2.5 * py, f"`python3 -I -c pass`: {py:.0f} ms" if py else "—")
    link = st.get("plugin_link_up_ms", {})
    post = fl.get("http_rtt_ms", {}).get("p50")
    goal("plugin spawn → link up (first ping answered)", "< 300 ms",
         f"{link['p50']:.0f} ms (max {link['max']:.0f})" if link.get("n") else "-",
         None if not link.get("n") else link["p50"] < 300,
         f"python3 start + 2 POSTs: {py + 2 * post:.0f} ms" if py and post else "—")
    cpu = r.get("send_cpu", {}).get("cpu_ms_per_send")
    post_cpu = fl.get("http_commit_ms", {}).get("client_cpu_ms")
    goal("sender CPU per send (the plugin's BrokerClient)", "< 0.5 ms", f"{cpu:.3f} ms" if cpu is not None else "-",
         None if cpu is None else cpu < 0.5, f"stdlib POST client: {post_cpu:.3f} ms" if post_cpu is not None else "—")
    f50 = fl.get("send_channel_floor_ms")
    goal("send→channel p50", f"≤ 2× floor ({2 * f50:.2f} ms)" if f50 else "≤ 2× floor",
         f"{lat['p50']:.2f} ms = {lat['p50'] / f50:.2f}× floor" if lat.get("n") and f50 else "-",
         None if not (lat.get("n") and f50) else lat["p50"] <= 2 * f50,
         f"POST + FULL commit: {f50:.2f} ms" if f50 else "—")
    goal("send→channel p99", f"≤ 3× p50 ({3 * lat['p50']:.2f} ms)" if lat.get("n") else "≤ 3× p50",
         f"{lat['p99']:.2f} ms = {lat['p99'] / lat['p50']:.2f}× p50" if lat.get("n") else "-",
         None if not lat.get("n") else lat["p99"] <= 3 * lat["p50"],
         f"floor p99: {fl['http_commit_ms']['p99']:.2f} ms" if fl.get("http_commit_ms") else "—")
    size = r.get("size", {})
    if "plugin.pyz" in size:
        goal("plugin.pyz size", "< 200 KB", f"{size['plugin.pyz'] / 1e3:,.0f} KB", size["plugin.pyz"] < 200e3)
    # Earlier issues' goals for the broker and the whole path.
    tp = r.get("throughput", [])
    seq = next((x for x in tp if x["depth"] == 1), None)
    rate = min(seq["delivered_per_s"], seq["acked_per_s"]) if seq else None
    seq_floor = fl.get("sequential_sender_floor_per_s")
    goal("1 sequential sender, delivered and acked", "≥ 400 msg/s", f"{rate:.0f} msg/s" if seq else "-",
         None if not seq else rate >= 400, f"1 / (stdio + POST + commit): {seq_floor:.0f} msg/s" if seq_floor else "—")
    s50 = next((x for x in tp if x["senders"] == 50), None)
    rate = min(s50["delivered_per_s"], s50["acked_per_s"]) if s50 else None
    goal("50 senders → 50 receivers, delivered and acked", "≥ 1,000 msg/s", f"{rate:.0f} msg/s" if s50 else "-",
         None if not s50 else rate >= 1000)
    bad = [f"{x['senders']}x{x['depth']}: dup {x['duplicates']} lost {x['losses']}" for x in tp
           if x["duplicates"] or x["losses"]]
    goal("throughput duplicates and losses", "0", "0" if tp and not bad else ("; ".join(bad) or "-"),
         None if not tp else not bad)
    fo = next((x for x in r.get("fanout", []) if x["listeners"] == 1000), None)
    goal("fan-out to 1,000 listeners, last write", "< 1 s", f"{fo['last_ms']:.0f} ms" if fo and fo["last_ms"] else "-",
         None if not fo else (fo["last_ms"] is not None and fo["last_ms"] < 1000 and not fo["missing"]))
    sc = next((x for x in r.get("scale", []) if x["sessions"] == 1000), None)
    sc0 = next((x for x in r.get("scale", []) if x["sessions"] == 0), None)
    goal("broker RSS with 1,000 idle sessions", "< 250 MB", f"{sc['rss_mb']:.0f} MB" if sc else "-",
         None if not sc else sc["rss_mb"] < 250, f"no sessions: {sc0['rss_mb']:.0f} MB" if sc0 else "—")
    if "broker.pyz" in size:
        others = {n: b for n, b in size.items() if n.startswith("broker-")}
        largest = max(others, key=others.get) if others else None
        goal("broker.pyz size (this machine's file)", "< 20 MB", f"{size['broker.pyz'] / 1e6:.1f} MB",
             size["broker.pyz"] < 20e6,
             note=f"largest platform file: {largest} {others[largest] / 1e6:.1f} MB" if largest else "")
    return out


def goals_table(r: dict[str, Any]) -> str:
    """The goals, one row each, as a Markdown table."""
    head = ("goal", "target", "measured", "floor, same run", "verdict")
    rows = [(g["goal"], g["target"], g["measured"], g["floor"], g["verdict"]) for g in r.get("goals", [])]
    return markdown(head, rows)


def markdown(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def table(r: dict[str, Any]) -> str:
    """Every figure as one Markdown table: section, metric, measured."""
    rows: list[tuple[str, str, str]] = []

    def row(section: str, metric: str, measured: str) -> None:
        rows.append((section, metric, measured))

    def ms(s: dict, key="p50") -> str:
        return fmt_ms(s[key]) if s.get("n") else "-"

    f = r.get("floor", {})
    if f:
        row("floor", "SQLite WAL insert+commit, synchronous=FULL (p50 / p99)",
            f"{ms(f['sqlite_commit_ms'])} / {ms(f['sqlite_commit_ms'], 'p99')}")
        row("floor", "stdio pipe round trip (p50)", ms(f["stdio_rtt_ms"]))
        row("floor", "kept-alive stdlib POST to bare Starlette on uvicorn (p50 / p99)",
            f"{ms(f['http_rtt_ms'])} / {ms(f['http_rtt_ms'], 'p99')}")
        row("floor", "the same POST, endpoint does 1 SQLite insert + FULL commit = send→channel floor (p50 / p99)",
            f"{ms(f['http_commit_ms'])} / {ms(f['http_commit_ms'], 'p99')}")
        row("floor", f"the same, spaced {LATENCY_GAP * 1000:.0f} ms apart (p50 / p99)",
            f"{ms(f['http_commit_spaced_ms'])} / {ms(f['http_commit_spaced_ms'], 'p99')}")
        row("floor", "client CPU per kept-alive POST", fmt_ms(f["http_commit_ms"]["client_cpu_ms"]))
        row("floor", "1 sequential sender floor = 1 / (stdio rtt + POST with commit)",
            f"{f['sequential_sender_floor_per_s']:.0f} msg/s")
        row("floor", "RSS: idle `python3 -I` / the floor server (Starlette, uvicorn)",
            f"{f['python_idle_rss_mb']:.1f} MB / {f['server_rss_mb']:.1f} MB")
    rss = r.get("plugin_rss_mb")
    if rss:
        row("plugins", f"plugin process RSS, link up, {rss['n']} processes: mean / max",
            f"{rss['mean']:.1f} / {rss['max']:.1f} MB")
    lat = r.get("latency", {})
    if lat.get("n"):
        row("latency", f"send→channel ({lat['n']} sequential sends, back to back): p50 / p99 / max",
            f"{lat['p50']:.2f} / {lat['p99']:.2f} / {lat['max']:.2f} ms")
        row("latency", "send tool call answered at A (p50 / p99)",
            f"{lat['send_answer_ms']['p50']:.2f} / {lat['send_answer_ms']['p99']:.2f} ms")
        sp = lat.get("spaced")
        if sp:
            row("latency", f"send→channel spaced {sp['gap_ms']:.0f} ms apart (idle processes wake at each hop), "
                "p50 / p99 / max", f"{sp['p50']:.2f} / {sp['p99']:.2f} / {sp['max']:.2f} ms")
        cpu = lat.get("cpu_ms_per_msg")
        if cpu:
            row("latency", "CPU per message (send + push + ack): broker / sender plugin / receiver plugin",
                f"{cpu['broker']:.2f} / {cpu['senders']:.2f} / {cpu['receivers']:.2f} ms")
    sc = r.get("send_cpu")
    if sc:
        row("send CPU", f"the plugin's BrokerClient, {sc['n']} sends in a loop: CPU / wall per send",
            f"{sc['cpu_ms_per_send']:.3f} / {sc['wall_ms_per_send']:.2f} ms")
    for t in r.get("throughput", []):
        label = (f"{t['senders']} sender → {t['receivers']} receiver, sequential" if t["depth"] == 1 else
                 f"{t['senders']} senders → {t['receivers']} receivers, {t['depth']} in flight each")
        row("throughput", f"{label}: delivered / acked ({t['messages']} msgs)",
            f"{t['delivered_per_s']:.0f} / {t['acked_per_s']:.0f} msg/s")
        row("throughput", f"{label}: duplicates / losses / errors; broker CPU per message",
            f"{t['duplicates']} / {t['losses']} / {t['errors']}; {fmt_ms(t['cpu_ms_per_msg']['broker'])}")
    for fo in r.get("fanout", []):
        row("fan-out", f"send(to=\"*\") → {fo['listeners']} {fo['kind']}: last write (first / p50)",
            f"{fmt_ms(fo['last_ms'])} ({fmt_ms(fo['first_ms'])} / {fmt_ms(fo['p50_ms'])}), missing {fo['missing']}")
        row("fan-out", f"send(to=\"*\") → {fo['listeners']}: send answered at the sender / every copy acked",
            f"{fmt_ms(fo['send_answer_ms'])} / {fmt_ms(fo.get('all_acked_ms'))}")
        if fo.get("cpu_s"):
            row("fan-out", f"send(to=\"*\") → {fo['listeners']}: CPU the round cost, broker / listener processes",
                f"{fo['cpu_s']['broker']:.2f} s / {fo['cpu_s']['listeners']:.2f} s")
    for s in r.get("scale", []):
        row("scale", f"broker, {s['sessions']} live sessions: RSS / fds / threads / CPU",
            f"{s['rss_mb']:.0f} MB / {s['fds']} / {s['threads']} / {s['cpu_pct']:.1f}%")
    if r.get("broker_with_plugins"):
        b = r["broker_with_plugins"]
        row("scale", f"broker after the plugin runs, {b['sessions']} plugin sessions: RSS / fds",
            f"{b['rss_mb']:.0f} MB / {b['fds']}")
    soak = r.get("soak")
    if soak:
        row("soak", f"{soak['seconds']} s, {soak['sessions']} sessions, {soak['fanouts']} fan-outs: RSS first → last (max)",
            f"{soak['rss_first_mb']:.0f} → {soak['rss_last_mb']:.0f} MB ({soak['rss_max_mb']:.0f})")
        row("soak", "fds first → last; mean CPU; fewest receivers of a fan-out",
            f"{soak['fds_first']} → {soak['fds_last']}; {soak['cpu_pct_mean']}%; {soak['fanout_min_received']}")
        row("soak", "sessions live at the end; links rebuilt by the sessions (reconnects)",
            f"{soak.get('live_at_end')} of {soak['sessions']}; {soak.get('reconnects')}")
    st = r.get("startup", {})
    if st:
        row("startup", "`python3 -I -c pass` spawn → exit (p50, max)",
            f"{ms(st['python_pass_ms'])} ({ms(st['python_pass_ms'], 'max')})")
        row("startup", "plugin spawn → initialize answered, first start (fresh PEX_ROOT)", f"{st['plugin_cold_ms']:.0f} ms")
        row("startup", "plugin spawn → initialize answered, warm (p50, max)",
            f"{ms(st['plugin_warm_ms'])} ({ms(st['plugin_warm_ms'], 'max')})")
        row("startup", "plugin spawn → link up (first ping answered), warm (p50, max)",
            f"{ms(st['plugin_link_up_ms'])} ({ms(st['plugin_link_up_ms'], 'max')})")
        row("startup", "broker spawn → /healthz 200, cold (fresh PEX_ROOT)", f"{st['broker_cold_ms']:.0f} ms")
        row("startup", "broker spawn → /healthz 200, warm (p50)", ms(st["broker_warm_ms"]))
    for name, size in r.get("size", {}).items():
        row("size", name, f"{size / 1e6:.2f} MB ({size:,} bytes)")
    return markdown(("section", "metric", "measured"), rows)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def ensure_venv() -> None:
    """Re-run under .venv/bin/python when this interpreter lacks uvicorn or Starlette (the floor server)."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        if VENV_PYTHON.exists() and not os.environ.get("DISPATCH_BENCH_REEXEC"):
            os.environ["DISPATCH_BENCH_REEXEC"] = "1"
            os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])
        raise SystemExit("bench/run.py needs uvicorn and Starlette: run `python3 tests/run.py` once to create .venv")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Dispatch benchmarks through the real dist/*.pyz processes.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="small counts, every section, under a minute (smoke test)")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON here")
    p.add_argument("--soak", action="store_true", help="also keep the largest scale level for 10 minutes")
    p.add_argument("--dist", metavar="DIR", help="directory with broker.pyz and plugin.pyz (default: dist/)")
    p.add_argument("--plugin", metavar="FILE", help="the plugin to run instead of DIST/plugin.pyz (e.g. "
                   "dispatch_plugin.py, as the Claude Code plugin package runs it)")
    p.add_argument("--python", metavar="EXE", help="interpreter for the .pyz files (default: the base python3)")
    p.add_argument("--workdir", metavar="DIR", help="parent of the scratch directory (default: the temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, databases)")
    p.add_argument("--profile", metavar="DIR", help="record the broker with py-spy (raw stacks) during each phase")
    p.add_argument("--soak-seconds", type=float, default=600.0, help=argparse.SUPPRESS)
    p.add_argument("--only", help=argparse.SUPPRESS)  # development: floor,plugins,scale
    p.add_argument("--plan", help=argparse.SUPPRESS)  # development: JSON overriding Plan fields
    p.add_argument("--synchronous", default="FULL", help=argparse.SUPPRESS)  # development: NORMAL for comparison
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_venv()
    plan = QUICK if args.quick else FULL
    if args.soak_seconds != 600.0:
        plan = Plan(**{**asdict(plan), "soak_seconds": args.soak_seconds})
    if args.plan:
        override = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                    for k, v in json.loads(args.plan).items()}
        plan = Plan(**{**asdict(plan), **override})
    bench = Bench(args, plan)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        results = asyncio.run(bench.run())
    finally:
        bench.cleanup()
    meta = results["meta"]
    m = meta["machine"]
    print(f"Dispatch benchmarks, {meta['date']}: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
          f"Python {meta['python']}, SQLite {meta['sqlite']}, {meta['filesystem']}"
          f"{' — QUICK (indicative only)' if meta['quick'] else ''}")
    print(f"$ {meta['command']}   ({meta['duration_s']} s; other processes used {meta['other_load_cores']} "
          f"of {m['cores']} cores meanwhile; load average {' '.join(map(str, m['load_avg_at_start']))} at start, "
          f"{' '.join(map(str, meta['load_avg_at_end']))} at the end)")
    print(f"plugins and .pyz files on {meta['pyz_interpreter']} (CPython {meta['pyz_interpreter_version']}, "
          f"{meta['pyz_interpreter_modules_at_start']} modules loaded by `-I -c pass`)")
    print(f"source {meta['source']}; " + "; ".join(f"{n} built {d['built']}, sha256 {d['sha256'][:12]}"
                                                  for n, d in meta["dist_files"].items()) + "\n")
    print(goals_table(results) + "\n")
    print(table(results))
    misses = [g for g in results["goals"] if g["verdict"] == "MISS"]
    print(f"\n{len(misses)} goal(s) missed" + (": " + "; ".join(f"{g['goal']} {g['measured']} (goal {g['target']})"
                                                                for g in misses) if misses else ""))
    for g in results["goals"]:
        if g["note"]:
            print(f"- {g['goal']} ({g['verdict']}): {g['note']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
