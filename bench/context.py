"""One run of the bench: its plan, its scratch directory and copies of the .pyz files, and the
processes every section starts (brokers and plugins from tests/harness.py).

    Bench ──copies──▶ WORK/broker.pyz, WORK/plugin.pyz   (a rebuild mid-run cannot change them)
          ──spawns──▶ BrokerProc (broker.pyz serve)  ◀── PluginProc × N (plugin.pyz, stdio)
          ──holds───▶ results{section: figures}, children (each ended by its pid at the end)

Each broker keeps its own tokens (minted by the harness). A section is a function of a Bench: it
starts what it needs here and writes its figures to `bench.results`.
"""

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from measure import ROOT, base_interpreter, now, proc_sample

sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
import dispatch_plugin  # noqa: E402  (its BrokerClient for the bench's own calls, its TOKEN_RE)
# The broker and the plugin processes as the tests run them: one harness for both.
from harness import AsyncPluginProcess, BrokerProcess, db_query, eventually, free_port  # noqa: E402

BENCH = Path(__file__).resolve().parent
#: Plugins spawned at once while building a crowd.
SPAWN_BATCH = 8


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
    plugin_warm_reps: int  #: warm plugin starts, each timed to `initialize` and to link up, each after a floor start
    broker_warm_reps: int
    floor_n: int
    send_cpu_n: int  #: sends in the BrokerClient loop (at most the broker's burst, 1,000: no rate limit)
    soak_seconds: float = 600.0

    @property
    def pause(self) -> float:
        """Settling time between steps (acks land, listens re-register)."""
        return 0.5 if self.quick else 1.5


FULL = Plan(quick=False, latency_n=1000, latency_warmup=50, seq_n=1000, levels=((1, 1000), (10, 300), (20, 200), (50, 100)),
            depth=8, fanout_reps=3, session_levels=(100, 1000), idle_window=20.0, plugin_warm_reps=20,
            broker_warm_reps=3, floor_n=1000, send_cpu_n=1000)
QUICK = Plan(quick=True, latency_n=150, latency_warmup=20, seq_n=100, levels=((1, 100), (3, 40)), depth=8,
             fanout_reps=1, session_levels=(50,), idle_window=2.0, plugin_warm_reps=3,
             broker_warm_reps=0, floor_n=200, send_cpu_n=200)


class Children:
    """Every process the bench starts, so each can be ended by its own pid at the end."""

    def __init__(self):
        self.procs: list[Any] = []

    def add(self, proc):
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            if isinstance(proc, subprocess.Popen):
                with contextlib.suppress(Exception):
                    proc.wait(5)


class Bench:
    """The run: options, plan, scratch directory, the copied .pyz files, results."""

    def __init__(self, args, plan: Plan):
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
        # The plugin is dist's plugin.pyz, or --plugin (dispatch_plugin.py as the Claude Code
        # plugin package runs it from a checkout, or another .pyz).
        plugin = Path(args.plugin).resolve() if args.plugin else dist / "plugin.pyz"
        self.broker_pyz, self.plugin_pyz = self.work / "broker.pyz", self.work / plugin.name
        self.dist, self.dist_files = dist, {}
        for name, source, target in (("broker.pyz", dist / "broker.pyz", self.broker_pyz),
                                     (f"plugin {plugin.name}" if args.plugin else "plugin.pyz", plugin, self.plugin_pyz)):
            shutil.copyfile(source, target)
            self.dist_files[name] = {"sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
                                     "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(source.stat().st_mtime))}
        # What the plugin package runs, and what plugin.pyz runs on a CPython other than its builder's.
        self.plugin_source = self.work / "source" / "dispatch_plugin.py"
        self.plugin_source.parent.mkdir()
        shutil.copyfile(ROOT / "dispatch_plugin.py", self.plugin_source)
        self.broker_root = self.work / "pex-broker"  # fresh: the first broker start is the cold one
        self.plugin_root = self.work / "pex-plugin"  # fresh: the first plugin start is the cold one
        self.results: dict[str, Any] = {}
        self.profiles: dict[str, str] = {}
        self.broker_warm: list[float] = []  # every warm broker start: spare ones and the scale broker

    def env(self, pex_root: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "CLAUDE_", "PEX_"))}
        env["PEX_ROOT"] = str(pex_root)
        env["XDG_CONFIG_HOME"] = str(self.work / "xdg-none")  # no user config.toml
        return env

    async def start_plugins(self, specs: list[tuple[str, str]], broker: "BrokerProc") -> list["PluginProc"]:
        """Spawn, handshake and connect plugins (name, base), SPAWN_BATCH at a time."""
        plugins = [PluginProc(self, name, broker.token(base), broker.url) for name, base in specs]
        for start in range(0, len(plugins), SPAWN_BATCH):
            batch = plugins[start:start + SPAWN_BATCH]
            for p in batch:
                await p.spawn()
            await asyncio.gather(*(p.handshake() for p in batch))
            await asyncio.gather(*(p.wait_connected() for p in batch))
        return plugins

    def profile_start(self, broker: "BrokerProc", label: str | None, plugins: list | None = None):
        """With --profile: py-spy record (raw collapsed stacks, 250 Hz) of the broker and the given plugins."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not self.args.profile or not label or not Path(spy).exists():
            return None
        procs = []
        for who, pid in [("broker", broker.pid), *((p.name, p.pid) for p in plugins or [])]:
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

    def cleanup(self) -> None:
        self.children.kill_all()
        if self.args.keep:
            print(f"kept {self.work}", file=sys.stderr)
        else:
            shutil.rmtree(self.work, ignore_errors=True)


class BrokerProc(BrokerProcess):
    """tests/harness.py's broker process on the bench's copy of broker.pyz, in the bench's
    environment, sampled from /proc. Its tokens (`bases`) are minted before the timed start, so
    the start measures spawn → /healthz alone."""

    def __init__(self, bench: Bench, label: str, *bases: str):
        workdir = bench.work / f"broker-{label}"
        workdir.mkdir(parents=True, exist_ok=True)
        # The per-base rate limit is a policy, not a cost: off, so the bench finds what the broker
        # can carry (a fan-out to 1,000 costs a base 1,000 of its 1,000-message burst).
        super().__init__(workdir, command=[bench.py, str(bench.broker_pyz)], env=bench.env(bench.broker_root),
                         extra=["--synchronous", bench.args.synchronous, "--rate", "0"])
        self.bench = bench
        self.mint(*(bases or ("test",)))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start_timed(self) -> float:
        """Start; seconds from spawn to the first /healthz 200 (as the harness polls: every 50 ms)."""
        t0 = now()
        try:
            self.start()
        finally:
            if self.proc:
                self.bench.children.add(self.proc)
        return now() - t0

    def sample(self) -> dict[str, float]:
        return proc_sample(self.proc.pid)

    def query(self, sql: str, *params) -> list[tuple]:
        return db_query(self, sql, *params)


class PluginProc(AsyncPluginProcess):
    """`plugin.pyz` (no arguments: the channel) driven over stdio as Claude Code drives it
    (tests/harness.py), its transcript and config dir in the bench's scratch directory."""

    def __init__(self, bench: Bench, name: str, token: str, url: str, pex_root: Path | None = None,
                 program: Path | None = None):
        env = bench.env(pex_root or bench.plugin_root)
        env.update({"DISPATCH_URL": url, "DISPATCH_TOKEN": token, "DISPATCH_NAME": name,
                    "CLAUDE_CONFIG_DIR": str(bench.work / "claude" / name)})
        super().__init__([bench.py, str(program or bench.plugin_pyz)], env, name=name, clock=now)
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
        base = dispatch_plugin.TOKEN_RE.fullmatch(token)[1]
        config = dispatch_plugin.Config(url=url, token=token, base=base, name=name, token_source="bench")
        self.client = dispatch_plugin.BrokerClient(config)
        self.client.identify()

    def live(self) -> set[str]:
        return {p["name"] for p in self.client.call("who")[0]["participants"] if p["live"]}

    async def wait_live(self, names: set[str], timeout: float = 120) -> None:
        async def all_live() -> bool:
            return names <= await asyncio.to_thread(self.live)

        await eventually(all_live, timeout, interval=0.25, what=f"{len(names)} participants live")


def cpu_of(broker: BrokerProc, pairs) -> dict[str, float]:
    """CPU seconds so far: the broker, all senders, all receivers of (sender, receiver) plugin pairs."""
    return {"broker": broker.sample()["cpu_s"],
            "senders": sum(proc_sample(s.pid)["cpu_s"] for s, _ in pairs),
            "receivers": sum(proc_sample(r.pid)["cpu_s"] for _, r in pairs)}
