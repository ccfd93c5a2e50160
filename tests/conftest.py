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
import time
import urllib.request
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.extension import ClientExtension, NotificationBinding
from mcp.client.streamable_http import streamable_http_client
from pydantic import BaseModel, ConfigDict

ROOT = Path(__file__).resolve().parent.parent
BROKER = ROOT / "dispatch_broker.py"
PLUGIN = ROOT / "dispatch_plugin.py"
MODERN = "2026-07-28"
LEGACY = "legacy"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0, interval=0.05, what="condition"):
    """Poll `predicate` until it returns a truthy value or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


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

    def __init__(self, workdir: Path, command: list[str] | None = None, extra: list[str] | None = None):
        self.workdir = workdir
        self.command = command or [sys.executable, str(BROKER)]
        self.extra = extra or []
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
        return subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=60, check=check,
                              cwd=self.workdir)

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
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), cwd=self.workdir)
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
# A plugin process driven over stdio exactly as Claude Code drives it
# ---------------------------------------------------------------------------------------------

import queue  # noqa: E402
import threading  # noqa: E402


class PluginProcess:
    """The channel (`plugin` with no arguments) as a child process speaking JSON-RPC on stdio."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.command = command
        self.env = env
        self.messages: queue.Queue = queue.Queue()
        self.channel: list[dict] = []  # every notifications/claude/channel seen, in order
        self.next_id = 100
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.started = time.monotonic()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            if message.get("method") == "notifications/claude/channel":
                self.channel.append(message["params"])
            else:
                self.messages.put(message)
        self.messages.put(None)

    def send(self, message: dict) -> None:
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def request(self, method: str, params: dict | None = None, timeout: float = 20) -> dict:
        """Send a request and return its response (the whole JSON-RPC message)."""
        self.next_id += 1
        request_id = self.next_id
        self.send({"jsonrpc": "2.0", "id": request_id, "method": method, **({"params": params} if params is not None else {})})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if message is None:
                raise AssertionError(f"plugin exited ({self.proc.poll()}): {self.stderr_text()}")
            if message.get("id") == request_id:
                return message
        raise AssertionError(f"no answer to {method} within {timeout}s")

    def handshake(self) -> dict:
        """server/discover (refused), initialize at 2025-11-25, initialized — as Claude Code 2.1.330 does."""
        discover = self.request("server/discover", {})
        assert discover["error"]["code"] == -32601
        init = self.request("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                           "clientInfo": {"name": "claude-code", "version": "2.1.330"}})
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return init["result"]

    def tool(self, name: str, timeout: float = 20, **arguments) -> tuple[str, bool]:
        """Call a tool: (text, is_error)."""
        result = self.request("tools/call", {"name": name, "arguments": arguments}, timeout)["result"]
        return result["content"][0]["text"], result.get("isError", False)

    def wait_channel(self, count: int, timeout: float = 15) -> list[dict]:
        wait_for(lambda: len(self.channel) >= count, timeout, what=f"{count} channel events (have {len(self.channel)})")
        return self.channel

    def stderr_text(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")

    def close(self) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


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

    def start(env: dict[str, str], command: list[str] | None = None) -> PluginProcess:
        p = PluginProcess(command or [sys.executable, str(PLUGIN)], env)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
