"""Shared fixtures: a real broker process on 127.0.0.1, tokens minted by its CLI, and SDK clients.

Everything here runs the real programs; nothing of ours is mocked. Every wait is bounded.
"""

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.extension import ClientExtension, NotificationBinding
from mcp.client.streamable_http import streamable_http_client
from pydantic import BaseModel, ConfigDict

from harness import (PluginProcess, channel_tag, free_port, record_channel_event,  # noqa: F401  (tests import them from here)
                     transcript_of, wait_for)

ROOT = Path(__file__).resolve().parent.parent
BROKER = ROOT / "dispatch_broker.py"
PLUGIN = ROOT / "dispatch_plugin.py"
MODERN = "2026-07-28"
LEGACY = "legacy"


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def async_wait_for(predicate, timeout=10.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class BrokerProcess:
    """A `dispatch_broker.py serve` child process with its own db and tokens file."""

    def __init__(self, workdir: Path, command: list[str] | None = None, extra: list[str] | None = None,
                 env: dict[str, str] | None = None):
        self.workdir = workdir
        self.command = command or [sys.executable, str(BROKER)]
        self.extra = extra or []
        self.env = env  # None: inherit ours
        self.db = workdir / "dispatch.db"
        self.tokens_file = workdir / "tokens"
        self.log = workdir / "broker.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.tokens: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def cli(self, *args: str, check=True) -> subprocess.CompletedProcess:
        return subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=120, check=check,
                              cwd=self.workdir, env=self.env)

    def token(self, base: str) -> str:
        """A token for `base`, minted once through the real `token add` command."""
        if base not in self.tokens:
            self.tokens[base] = self.cli("token", "add", base, "--tokens", str(self.tokens_file)).stdout.strip()
            self.reload()
        return self.tokens[base]

    def reload(self) -> None:
        """SIGHUP a running broker and wait until it has re-read the tokens file."""
        if self.proc and self.proc.poll() is None:
            before = self.logs().count("tokens: ")
            self.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: self.logs().count("tokens: ") > before, what="tokens reloaded")

    def start(self) -> "BrokerProcess":
        if not self.tokens_file.exists():
            self.token("test")
        args = [*self.command, "serve", "--port", str(self.port), "--db", str(self.db),
                "--tokens", str(self.tokens_file), *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), cwd=self.workdir,
                                     env=self.env)
        wait_for(self.healthy, timeout=30, what=f"broker /healthz ({self.logs()[-500:]})")
        return self

    def healthy(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"broker exited with {self.proc.returncode}: {self.logs()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError("broker did not stop within 15 s of SIGTERM")
        return self.proc.returncode if self.proc else 0

    def restart(self) -> "BrokerProcess":
        self.kill()
        return self.start()


@pytest.fixture
def broker(tmp_path):
    b = BrokerProcess(tmp_path).start()
    yield b
    b.kill()


@pytest.fixture
def broker_factory(tmp_path):
    made = []

    def make(*extra: str, workdir: Path | None = None) -> BrokerProcess:
        b = BrokerProcess(workdir or tmp_path, extra=list(extra))
        made.append(b)
        return b

    yield make
    for b in made:
        b.kill()


# ---------------------------------------------------------------------------------------------
# An SDK client that collects pushed mail
# ---------------------------------------------------------------------------------------------


class MailParams(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    id: str
    chat_id: str
    body: str
    attempt: int


class MailBinding(ClientExtension):
    identifier = "net.dispatch/mail"

    def __init__(self, inbox: asyncio.Queue):
        self.inbox = inbox

    def notifications(self):
        async def on_mail(params: MailParams) -> None:
            self.inbox.put_nowait(params.model_dump(by_alias=True))
        return [NotificationBinding(method="notifications/dispatch/mail", params_type=MailParams, handler=on_mail)]


class Peer:
    """One connection to the broker: call tools, listen in the background, read pushed mail."""

    def __init__(self, client: Client, inbox: asyncio.Queue):
        self.client = client
        self.inbox = inbox
        self.listen_task: asyncio.Task | None = None

    async def call(self, tool: str, **arguments):
        """Call a tool; return structured content, or raise ToolFailed with the error text."""
        result = await self.client.call_tool(tool, arguments)
        text = " ".join(getattr(c, "text", "") for c in result.content)
        if result.is_error:
            raise ToolFailed(text)
        if result.structured_content is not None:
            return result.structured_content
        return json.loads(text)

    async def text(self, tool: str, **arguments) -> str:
        result = await self.client.call_tool(tool, arguments)
        return " ".join(getattr(c, "text", "") for c in result.content)

    def listen(self, wait_s: float = 30) -> asyncio.Task:
        self.listen_task = asyncio.ensure_future(self.call("listen", wait_s=wait_s))
        return self.listen_task

    async def next_mail(self, timeout: float = 10) -> dict:
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def no_mail(self, within: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            mail = await asyncio.wait_for(self.inbox.get(), within)
            raise AssertionError(f"unexpected mail: {mail}")


class ToolFailed(Exception):
    pass


@contextlib.asynccontextmanager
async def peer(broker: BrokerProcess, base: str, name: str | None = None, mode: str = MODERN, *,
               token: str | None = None, headers: dict | None = None):
    """Connect to the broker with a token for `base`, identify as `name` (if given)."""
    inbox: asyncio.Queue = asyncio.Queue()
    link = {"Dispatch-Session": os.urandom(8).hex()} if mode == MODERN else {}
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token or broker.token(base)}", **link,
                                       **(headers or {})},
                              timeout=httpx2.Timeout(30, read=400))
    async with http, Client(streamable_http_client(broker.url, http_client=http), mode=mode,
                            extensions=[MailBinding(inbox)]) as client:
        p = Peer(client, inbox)
        if name:
            await p.call("identify", name=name)
        try:
            yield p
        finally:
            if p.listen_task:
                p.listen_task.cancel()
                with contextlib.suppress(BaseException):
                    await p.listen_task


# ---------------------------------------------------------------------------------------------
# A plugin process driven over stdio exactly as Claude Code drives it (PluginProcess, in harness.py)
# ---------------------------------------------------------------------------------------------


def plugin_env(broker: BrokerProcess, base: str, name: str | None = None, **extra: str) -> dict[str, str]:
    """A clean environment for a plugin: no user config, the broker's URL and a token for `base`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "CLAUDE_"))}
    env.update({"DISPATCH_URL": broker.url, "DISPATCH_TOKEN": broker.token(base),
                "XDG_CONFIG_HOME": str(broker.workdir / "xdg-none")})
    if name:
        env["DISPATCH_NAME"] = name
    env.update(extra)
    return env


@pytest.fixture
def plugins():
    """Start plugin processes (source module by default); all are stopped at the end."""
    started: list[PluginProcess] = []

    def start(env: dict[str, str], command: list[str] | None = None, **host) -> PluginProcess:
        p = PluginProcess(command or [sys.executable, str(PLUGIN)], env, **host)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


# --- plugin test helpers ---


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory):
    """One broker for a whole test module whose tests keep to their own participant names:
    minting a token costs a ~2 s CLI run, so the module shares them."""
    b = BrokerProcess(tmp_path_factory.mktemp("shared-broker")).start()
    yield b
    b.kill()


def run_cli(env: dict[str, str], *args: str, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `dispatch_plugin.py ARGS` as a shell user would; text in, text out."""
    return subprocess.run([sys.executable, str(PLUGIN), *args], env=env, input=input, capture_output=True,
                          text=True, timeout=timeout)


def wait_connected(plugin: PluginProcess, timeout: float = 40.0) -> str:
    """Call the channel's `ping` tool until its broker link answers; the ping text."""
    deadline = time.monotonic() + timeout
    while True:
        text, is_error = plugin.tool("ping", timeout=30)
        if not is_error:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"plugin not connected within {timeout}s: {text}")


def closed_url() -> str:
    """An http URL on a loopback port nobody listens on."""
    return f"http://127.0.0.1:{free_port()}/mcp"


def unknown_token(base: str) -> str:
    """A well-formed token for `base` that no broker has minted."""
    return f"dsp_{base}_{os.urandom(24).hex()}"


@contextlib.contextmanager
def impostor(reply: bytes):
    """A loopback server that is not a broker: it answers every connection with `reply` and closes.
    Yields its URL."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/mcp"
    finally:
        server.close()


#: Answers of things that are not a Dispatch broker, for DISPATCH_URL mistakes.
NOT_A_BROKER = {
    "ssh server": b"SSH-2.0-OpenSSH_9.6\r\n",
    "json api": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"hello\":1}",
}


# --- broker test helpers ---

import importlib  # noqa: E402
import sqlite3  # noqa: E402
import urllib.error  # noqa: E402

#: The bases the broker tests connect as; minted together, once per broker.
BASES = ("backend", "frontend", "other")
#: initialize as a 2025-11-25 (legacy era) client sends it, for raw HTTP tests.
LEGACY_INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                     "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                "clientInfo": {"name": "raw-test", "version": "0"}}}


def broker_module():
    """dispatch_broker itself, for the constants tests must agree with (LIVE_GRACE, PUSH_TIMEOUT, …)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("dispatch_broker")


def mint(broker: BrokerProcess, *bases: str) -> BrokerProcess:
    """Tokens for `bases` through the real `token add` entry point, all in one interpreter:
    one ~1 s process start instead of one per base. Reloads a running broker once."""
    missing = [b for b in bases if b not in broker.tokens]
    if missing:
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import dispatch_broker as d\n"
                "for base in sys.argv[3:]:\n"
                "    d.main(['token', 'add', base, '--tokens', sys.argv[2]])\n")
        run = subprocess.run([sys.executable, "-c", code, str(ROOT), str(broker.tokens_file), *missing],
                             capture_output=True, text=True, timeout=60, check=True)
        tokens = run.stdout.split()
        assert len(tokens) == len(missing), run.stderr
        broker.tokens.update(zip(missing, tokens))
        broker.reload()
    return broker


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory):
    """One broker for a test module's tests that need no flags or restarts of their own. Each test
    keeps to fresh participant names (`fresh`). --ack-timeout 1s keeps redelivery tests short."""
    b = BrokerProcess(tmp_path_factory.mktemp("module-broker"), extra=["--ack-timeout", "1s"])
    mint(b, *BASES).start()
    yield b
    b.kill()


def start_broker(broker_factory, *extra: str) -> BrokerProcess:
    """A broker of the test's own (flags `extra`), with tokens for BASES."""
    return mint(broker_factory(*extra), *BASES).start()


def fresh(base: str) -> str:
    """A participant name no other test uses: `base-<random>`."""
    return f"{base}-{os.urandom(4).hex()}"


def http(url: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None):
    """One raw HTTP request with urllib: (status, headers with lower-case names, body text)."""
    request = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"),
                                     headers={"Content-Type": "application/json",
                                              "Accept": "application/json, text/event-stream", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode(errors="replace")


def logged(broker: BrokerProcess, text: str, since: int = 0, timeout: float = 5.0) -> str:
    """Wait until the broker's log (from character `since`) contains `text`; return that part of the log."""
    return wait_for(lambda: text in broker.logs()[since:] and broker.logs()[since:], timeout,
                    what=f"{text!r} in the broker log")


async def eventually(check, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Await `check()` until it returns something truthy or `timeout` passes; return that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def liveness(observer: "Peer") -> dict[str, bool]:
    """name -> live, as `who` reports it."""
    return {p["name"]: p["live"] for p in (await observer.call("who"))["participants"]}


async def until_live(observer: "Peer", name: str, timeout: float = 10.0) -> None:
    """Wait until `who` shows `name` listening (its listen call is registered)."""
    async def live():
        return (await liveness(observer)).get(name)
    await eventually(live, timeout, what=f"{name} live in who()")


def db_query(broker: BrokerProcess, sql: str, *params) -> list[tuple]:
    """Read the broker's SQLite file directly (WAL allows a reader beside the running broker)."""
    db = sqlite3.connect(broker.db, timeout=5)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


@pytest.fixture
def listener_processes(tmp_path):
    """Start `tests/listener_process.py` participants; each is continued (if stopped) and killed at the end."""
    started: list[subprocess.Popen] = []

    def start(broker: BrokerProcess, base: str, name: str, mode: str = MODERN) -> subprocess.Popen:
        errors = open(tmp_path / f"{name}.stderr", "wb")
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "listener_process.py"), broker.url,
                                 broker.token(base), name, mode], stdout=subprocess.DEVNULL, stderr=errors)
        errors.close()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)


# --- build fixtures ---------------------------------------------------------------------------
# The zipapps from build.py, for tests/test_build.py and any test that runs dist/*.pyz.
# Self-contained: nothing above uses these names, and these use nothing above.

from typing import NamedTuple  # noqa: E402

#: Running build.py as a user would, with the interpreter that has pex (the test venv).
BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "build.py"
#: A cold build downloads ~80 MB of wheels into pex's cache; a warm one takes ~20 s.
BUILD_TIMEOUT_S = 900


class Dist(NamedTuple):
    """A directory of built zipapps: plugin.pyz, broker-<platform>.pyz each, and broker.pyz (a
    copy of this machine's broker file)."""

    dir: Path
    broker: Path
    plugin: Path
    prebuilt: bool = False  #: True when it came from DISPATCH_DIST instead of this session

    @classmethod
    def at(cls, directory: Path, prebuilt: bool = False) -> "Dist":
        return cls(directory, directory / "broker.pyz", directory / "plugin.pyz", prebuilt)

    def broker_for(self, platform: str) -> Path:
        """The broker file for `platform` (linux-x86_64, macos-arm64, ...)."""
        return self.dir / f"broker-{platform}.pyz"


@pytest.fixture(scope="session")
def build_zipapps():
    """build(out_dir, src=None, platforms=None) -> Dist: run build.py; src swaps in stand-in
    modules, platforms limits the broker files to those (default: all)."""

    def build(out: Path, src: Path | None = None, platforms: list[str] | None = None) -> Dist:
        command = [sys.executable, str(BUILD_SCRIPT), "--out", str(out)]
        if src is not None:
            command += ["--src", str(src)]
        for platform in platforms or ():
            command += ["--platform", platform]
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            pytest.fail(f"build.py exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return Dist.at(out)

    return build


@pytest.fixture(scope="session")
def dist(build_zipapps, tmp_path_factory) -> Dist:
    """Every zipapp built once per session from this checkout, or taken from DISPATCH_DIST (a
    directory written by an earlier `python3 build.py`) to skip the build."""
    prebuilt = os.environ.get("DISPATCH_DIST")
    if prebuilt:
        return Dist.at(Path(prebuilt).resolve(), prebuilt=True)
    return build_zipapps(tmp_path_factory.mktemp("dist"))
