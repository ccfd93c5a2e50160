"""The test harness: a broker process, a plugin process as Claude Code drives it, a TCP proxy that
misbehaves on cue, a raw HTTP client and one poll helper; the tests and the benchmarks import it.

    test / bench ──JSON-RPC on stdin──▶ dispatch_plugin (the channel) ──HTTP──▶ [Proxy] ──▶ BrokerProcess
         ▲                                   │ notifications/claude/channel on stdout        │ dispatch.db
         └── reads stdout ◀──────────────────┘                                                 │ tokens
               └─ appends each channel event to the session transcript, as Claude Code does
                  (…/projects/<project dir>/<session id>.jsonl): the plugin acks only what it shows
    test ──peer() (the SDK's client) / http() (raw) ──▶ BrokerProcess

Claude Code gives the plugin a session id, a config dir and a project dir; without the
transcript lines the plugin turns its channel off after PROOF_SECONDS and acks nothing.
`PluginProcess` reads the plugin in a thread (the tests); `AsyncPluginProcess` on an asyncio loop,
with requests in flight at once and the time each line arrived (the benchmarks). Standard library
at import time, so `bench/` imports it without pytest; `peer()` imports the MCP SDK when first used.
Every process is real, nothing of ours is mocked, and every wait is bounded. State lives in the
directories the caller gives (a test's tmp_path).
"""

import asyncio
import contextlib
import functools
import importlib
import itertools
import json
import os
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
BROKER = ROOT / "dispatch_broker.py"
PLUGIN = ROOT / "dispatch_plugin.py"
#: The protocol eras a client may speak: the 2026-07-28 one (a Dispatch-Session link per client)
#: and the 2025-11-25 one (an Mcp-Session-Id session).
MODERN = "2026-07-28"
LEGACY = "legacy"
#: The bases the broker tests connect as; minted together, once per broker.
BASES = ("backend", "frontend", "other")
#: initialize as a 2025-11-25 (legacy era) client sends it, for raw HTTP tests.
LEGACY_INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                     "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                "clientInfo": {"name": "raw-test", "version": "0"}}}
CHANNEL_METHOD = "notifications/claude/channel"
#: What Claude Code 2.1.330 sends first: server/discover (a server without it answers -32601),
#: then initialize at 2025-11-25, then notifications/initialized.
INITIALIZE_PARAMS = {"protocolVersion": "2025-11-25", "capabilities": {},
                     "clientInfo": {"name": "claude-code", "version": "2.1.330"}}
#: Where every child's project appears to live (the transcript directory is derived from it).
PROJECT_DIR = "/work/some.project_x"


# ---------------------------------------------------------------------------------------------
# Ports, polling, raw HTTP
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0, interval=0.05, what="condition"):
    """Poll `predicate` until it returns a truthy value or `timeout` passes; return that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def eventually(check, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """`wait_for` for a coroutine function: await `check()` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


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


# ---------------------------------------------------------------------------------------------
# The broker process
# ---------------------------------------------------------------------------------------------


def broker_module():
    """dispatch_broker itself, for the constants tests must agree with (LIVE_GRACE, PUSH_TIMEOUT, …)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("dispatch_broker")


class BrokerProcess:
    """A `dispatch_broker.py serve` child process with its own db and tokens file.

    `command` runs another broker file (a zipapp, tests/clock_broker.py); `extra` are serve flags;
    `env` replaces ours; `preexec` runs in the child before the broker (a umask, an fd limit).
    Tokens come from `mint` only."""

    def __init__(self, workdir: Path, command: list[str] | None = None, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, preexec: Callable[[], None] | None = None):
        self.workdir = workdir
        self.preexec = preexec
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
        """Run this broker's command line (`token list`, …) in its working directory."""
        return subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=120, check=check,
                              cwd=self.workdir, env=self.env)

    def mint(self, *bases: str) -> "BrokerProcess":
        """Tokens for `bases` from the broker's own `mint_token` (what `token add` runs), called
        in this process: no ~1 s interpreter start per mint. Reloads a running broker once."""
        missing = [b for b in bases if b not in self.tokens]
        if missing:
            mint_token = broker_module().mint_token
            self.tokens.update((base, mint_token(self.tokens_file, base)[1]) for base in missing)
            self.reload()
        return self

    def token(self, base: str) -> str:
        """The token for `base`, minted on first use."""
        return self.mint(base).tokens[base]

    def reload(self) -> None:
        """SIGHUP a running broker and wait until it has re-read the tokens file."""
        if self.proc and self.proc.poll() is None:
            before = self.logs().count("tokens: ")
            self.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: self.logs().count("tokens: ") > before, what="tokens reloaded")

    def start(self) -> "BrokerProcess":
        if not self.tokens_file.exists():
            self.mint("test")
        args = [*self.command, "serve", "--port", str(self.port), "--db", str(self.db),
                "--tokens", str(self.tokens_file), *self.extra]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, cwd=self.workdir, env=self.env,
                                         preexec_fn=self.preexec)
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


def start_broker(broker_factory, *extra: str) -> BrokerProcess:
    """A broker of the test's own (flags `extra`, from the `broker_factory` fixture), with tokens for BASES."""
    return broker_factory(*extra).mint(*BASES).start()


def clock_broker(broker_factory, tmp_path, *extra: str) -> tuple[BrokerProcess, callable]:
    """A broker under tests/clock_broker.py, and jump(seconds) to move its wall clock."""
    clock = tmp_path / "clock"
    clock.write_text("0")
    broker = broker_factory(*extra)
    broker.command = [sys.executable, str(ROOT / "tests" / "clock_broker.py")]
    broker.env = {**os.environ, "DISPATCH_TEST_CLOCK": str(clock)}
    broker.mint("backend", "frontend").start()

    def jump(seconds: float) -> None:
        clock.write_text(str(float(clock.read_text()) + seconds))
        broker.proc.send_signal(signal.SIGUSR1)

    return broker, jump


async def broker_clock_moved(client, by: float) -> None:
    """Wait until the broker's `ping` shows its clock moved by `by` seconds (±60 s)."""
    import datetime

    async def moved():
        stamp = (await client.call("ping"))["server_time"]
        now = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
        return abs(now.timestamp() - (time.time() + by)) < 60
    await eventually(moved, timeout=10, what=f"the broker's clock moved by {by:+.0f} s")


def fresh(base: str) -> str:
    """A participant name no other test uses: `base-<random>`."""
    return f"{base}-{os.urandom(4).hex()}"


def logged(broker: BrokerProcess, text: str, since: int = 0, timeout: float = 5.0) -> str:
    """Wait until the broker's log (from character `since`) contains `text`; return that part of the log."""
    return wait_for(lambda: text in broker.logs()[since:] and broker.logs()[since:], timeout,
                    what=f"{text!r} in the broker log")


def db_query(broker: BrokerProcess, sql: str, *params) -> list[tuple]:
    """Read the broker's SQLite file directly (WAL allows a reader beside the running broker)."""
    db = sqlite3.connect(broker.db, timeout=5)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


# ---------------------------------------------------------------------------------------------
# An SDK client that collects pushed mail (the MCP SDK is imported on first use)
# ---------------------------------------------------------------------------------------------


class ToolFailed(Exception):
    """A tool call answered with isError; the message is the error text."""


class Peer:
    """One connection to the broker: call tools, listen in the background, read pushed mail."""

    def __init__(self, client, inbox: asyncio.Queue, name: str | None = None):
        self.client = client
        self.name = name  #: the name it identified as, if any
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


@functools.cache
def mail_binding():
    """The SDK extension that puts each notifications/dispatch/mail into a queue (a class)."""
    from mcp.client.extension import ClientExtension, NotificationBinding
    from pydantic import BaseModel, ConfigDict

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
            return [NotificationBinding(method="notifications/dispatch/mail", params_type=MailParams,
                                        handler=on_mail)]

    return MailBinding


@contextlib.asynccontextmanager
async def peer(broker: BrokerProcess, base: str, name: str | None = None, mode: str = MODERN, *,
               token: str | None = None, headers: dict | None = None):
    """Connect to the broker with a token for `base`, identify as `name` (if given)."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    inbox: asyncio.Queue = asyncio.Queue()
    link = {"Dispatch-Session": os.urandom(8).hex()} if mode == MODERN else {}
    client = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token or broker.token(base)}", **link,
                                         **(headers or {})},
                                timeout=httpx2.Timeout(30, read=400))
    async with client, Client(streamable_http_client(broker.url, http_client=client), mode=mode,
                              extensions=[mail_binding()(inbox)]) as session:
        p = Peer(session, inbox, name)
        if name:
            await p.call("identify", name=name)
        try:
            yield p
        finally:
            if p.listen_task:
                p.listen_task.cancel()
                with contextlib.suppress(BaseException):
                    await p.listen_task


@contextlib.asynccontextmanager
async def fresh_peers(broker: BrokerProcess, *bases: str):
    """One identified peer for each base, under a fresh name and with that base's token."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(peer(broker, base, fresh(base))) for base in bases]


@contextlib.asynccontextmanager
async def listening(broker: BrokerProcess, mode: str = MODERN, sender_base: str = "backend",
                    receiver_base: str = "frontend"):
    """A fresh sender and a fresh receiver whose listen is registered: (sender peer, receiver peer);
    each peer's `name` is its fresh name."""
    sender, receiver = fresh(sender_base), fresh(receiver_base)
    async with peer(broker, sender_base, sender, mode) as s, peer(broker, receiver_base, receiver, mode) as r:
        r.listen()
        await until_live(s, receiver)
        yield s, r


async def liveness(observer: Peer) -> dict[str, bool]:
    """name -> live, as `who` reports it."""
    return {p["name"]: p["live"] for p in (await observer.call("who"))["participants"]}


async def until_live(observer: Peer, name: str, timeout: float = 10.0) -> None:
    """Wait until `who` shows `name` listening (its listen call is registered)."""
    async def live():
        return (await liveness(observer)).get(name)
    await eventually(live, timeout, what=f"{name} live in who()")


# ---------------------------------------------------------------------------------------------
# Claude Code's side: the session's environment and its transcript
# ---------------------------------------------------------------------------------------------


def claude_code_env(env: dict[str, str], session: bool = True) -> dict[str, str]:
    """`env` plus what Claude Code gives a server it starts: a session id (unless `session` is
    False), a config dir of its own and a project dir. Values already in `env` are kept."""
    env = dict(env)
    if session:
        env.setdefault("CLAUDE_CODE_SESSION_ID", str(uuid.uuid4()))
    env.setdefault("CLAUDE_CONFIG_DIR", tempfile.mkdtemp(prefix="dispatch-claude-config-"))
    env.setdefault("CLAUDE_PROJECT_DIR", PROJECT_DIR)
    return env


def transcript_of(env: dict[str, str]) -> Path:
    """Where Claude Code keeps a session's transcript: projects/<project dir, each character but
    ASCII letters and digits as ->/<session id>.jsonl."""
    project = re.sub(r"[^A-Za-z0-9]", "-", env["CLAUDE_PROJECT_DIR"])
    return Path(env["CLAUDE_CONFIG_DIR"]) / "projects" / project / f"{env.get('CLAUDE_CODE_SESSION_ID')}.jsonl"


def channel_tag(params: dict, source: str = "dispatch") -> str:
    """A channel event as Claude Code 2.1.330 renders it: meta as attributes after `source`."""
    attributes = "".join(f' {k}="{v}"' for k, v in params["meta"].items())
    return f'<channel source="{source}"{attributes}>\n{params["content"]}\n</channel>'


def seal(token: str, message_id: str) -> str:
    """The seal the plugin puts on a message it shows (a token's HMAC of the id): what a test
    writes into a transcript in Claude Code's place carries it, as the plugin's own output does."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import dispatch_plugin

    return dispatch_plugin.Proofs(token, ()).seal(message_id)


def record_channel_event(transcript: Path, session_id: str, params: dict, source: str = "dispatch") -> None:
    """Append an accepted channel event to a transcript as Claude Code does: the enqueue
    queue-operation, then the user line of channel origin."""
    transcript.parent.mkdir(parents=True, exist_ok=True)
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    tag = channel_tag(params, source)
    lines = [{"type": "queue-operation", "operation": "enqueue", "timestamp": now, "sessionId": session_id,
              "content": tag},
             {"type": "user", "message": {"role": "user", "content": tag}, "uuid": str(uuid.uuid4()),
              "timestamp": now, "sessionId": session_id, "origin": {"kind": "channel", "server": source}}]
    with open(transcript, "a") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))


class ClaudeCodeSession:
    """What Claude Code does with a channel event: with the channel flag naming the server
    (`accepts=True`) it appends the event to the transcript; without it, it drops the event."""

    def __init__(self, env: dict[str, str], accepts: bool = True):
        self.env = env
        self.accepts = accepts
        self.transcript = transcript_of(env)

    def on_channel_event(self, params: dict) -> None:
        if self.accepts and "CLAUDE_CODE_SESSION_ID" in self.env:
            record_channel_event(self.transcript, self.env["CLAUDE_CODE_SESSION_ID"], params)




# ---------------------------------------------------------------------------------------------
# The plugin's configuration and command line
# ---------------------------------------------------------------------------------------------


def plugin_env(broker: BrokerProcess, base: str, name: str | None = None, **extra: str) -> dict[str, str]:
    """A clean environment for a plugin: no user config or installed broker, the broker's URL
    and a token for `base`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "CLAUDE_"))}
    env.update({"DISPATCH_URL": broker.url, "DISPATCH_TOKEN": broker.token(base),
                "XDG_CONFIG_HOME": str(broker.workdir / "xdg-none"), "XDG_DATA_HOME": str(broker.workdir / "xdg-none")})
    if name:
        env["DISPATCH_NAME"] = name
    env.update(extra)
    return env


def run_cli(env: dict[str, str], *args: str, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `dispatch_plugin.py ARGS` as a shell user would; text in, text out."""
    return subprocess.run([sys.executable, str(PLUGIN), *args], env=env, input=input, capture_output=True,
                          text=True, timeout=timeout)


#: A loopback port bound for the whole run and never listened on: a connection to it is refused,
#: and nothing else can take it. A port merely found free could be taken before it is used (a
#: parametrized test's URL is made at collection, minutes before the test runs).
CLOSED_PORT = socket.socket()
CLOSED_PORT.bind(("127.0.0.1", 0))


def closed_url() -> str:
    """An http URL on a loopback port nobody listens on."""
    return f"http://127.0.0.1:{CLOSED_PORT.getsockname()[1]}/mcp"


def unknown_token(base: str) -> str:
    """A well-formed token for `base` that no broker has minted."""
    return f"dsp_{base}_{os.urandom(24).hex()}"


@contextlib.contextmanager
def impostor(reply: bytes, received: list[bytes] | None = None):
    """A loopback server that is not a broker: it answers every connection with `reply` and closes,
    adding what it read to `received` if given. Yields its URL."""
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
                    request = conn.recv(65536)
                    if received is not None:
                        received.append(request)
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
    "another json-rpc server": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 48\r\n\r\n"
                               b'{"jsonrpc":"2.0","id":1,"result":{"content":[]}}',
}


# ---------------------------------------------------------------------------------------------
# The plugin process, read by a thread (tests)
# ---------------------------------------------------------------------------------------------


class PluginProcess:
    """The channel (`plugin` with no arguments) as a child process speaking JSON-RPC on stdio.

    The test plays Claude Code: it gives the plugin a session id and a config dir, and, like a
    Claude Code whose channel flag names the server (`accepts=True`), appends each channel event
    it reads to the session transcript in Claude Code's own shape. With `accepts=False` it drops
    the events, as Claude Code does without the flag. `session=False`: no session id at all."""

    def __init__(self, command: list[str], env: dict[str, str], accepts: bool = True, session: bool = True):
        self.command = command
        self.accepts = accepts
        self.env = claude_code_env(env, session)
        self.claude = ClaudeCodeSession(self.env, accepts)
        self.transcript = self.claude.transcript
        self.messages: queue.Queue = queue.Queue()
        self.channel: list[dict] = []  # every notifications/claude/channel seen, in order
        self.next_id = 100
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=self.env)
        self.started = time.monotonic()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            if message.get("method") == CHANNEL_METHOD:
                self.channel.append(message["params"])
                self.claude.on_channel_event(message["params"])
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
        init = self.request("initialize", INITIALIZE_PARAMS)
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


def wait_connected(plugin: PluginProcess, timeout: float = 40.0) -> str:
    """Call the channel's `ping` tool until its broker link answers; the ping text."""
    deadline = time.monotonic() + timeout
    while True:
        text, is_error = plugin.tool("ping", timeout=30)
        if not is_error:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"plugin not connected within {timeout}s: {text}")


def connected(plugin: PluginProcess) -> PluginProcess:
    """`plugin` after Claude Code's handshake, once its broker link answers."""
    plugin.handshake()
    wait_connected(plugin)
    return plugin


# ---------------------------------------------------------------------------------------------
# The plugin process on an asyncio loop (benchmarks: many requests in flight, arrival times)
# ---------------------------------------------------------------------------------------------


class PluginDied(Exception):
    pass


class AsyncPluginProcess:
    """The same plugin as `PluginProcess`, read by a coroutine. Each answer and channel event is
    stamped with `clock()` the moment its line is read; `expect(body)` is a future of the time the
    channel event with that body arrived, `sink(plugin, t, message_id, body)` sees every event."""

    def __init__(self, command: list[str], env: dict[str, str], name: str = "", stderr=None,
                 accepts: bool = True, clock: Callable[[], float] = time.monotonic):
        self.command = command
        self.env = claude_code_env(env)
        self.claude = ClaudeCodeSession(self.env, accepts)
        self.name = name
        self.stderr = stderr
        self.clock = clock
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future] = {}
        self.expecting: dict[str, asyncio.Future] = {}
        self.events: list[tuple[float, str, str]] = []  # (t, message_id, body) per channel event
        self.sink: Callable | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.t_spawn = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def spawn(self) -> "AsyncPluginProcess":
        self.t_spawn = self.clock()
        self.proc = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=self.stderr,
            env=self.env, limit=1 << 24)
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            t = self.clock()
            message = json.loads(line)
            if message.get("method") == CHANNEL_METHOD:
                params = message["params"]
                self.claude.on_channel_event(params)
                body, message_id = params["content"], params["meta"]["message_id"]
                self.events.append((t, message_id, body))
                waiter = self.expecting.pop(body, None)
                if waiter and not waiter.done():
                    waiter.set_result(t)
                if self.sink:
                    self.sink(self, t, message_id, body)
            else:
                waiter = self.waiting.pop(message.get("id"), None)
                if waiter and not waiter.done():
                    waiter.set_result((t, message))
        for waiter in [*self.waiting.values(), *self.expecting.values()]:
            if not waiter.done():
                waiter.set_exception(PluginDied(f"plugin {self.name} exited"))

    def request_nowait(self, method: str, params: dict | None = None) -> tuple[float, asyncio.Future]:
        """Write a request; (time written, future of (time answered, message))."""
        request_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = future
        message = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        t = self.clock()
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        return t, future

    async def request(self, method: str, params: dict | None = None, timeout: float = 60) -> tuple[float, float, dict]:
        t0, future = self.request_nowait(method, params)
        await self.proc.stdin.drain()
        t1, message = await asyncio.wait_for(future, timeout)
        return t0, t1, message

    def notify(self, method: str) -> None:
        self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", "method": method}).encode() + b"\n")

    async def handshake(self) -> float:
        """server/discover (-32601), initialize, initialized. Seconds from spawn to the initialize answer."""
        _, _, discover = await self.request("server/discover", {})
        if discover.get("error", {}).get("code") != -32601:
            raise RuntimeError(f"server/discover: expected -32601, got {discover}")
        _, t_init, init = await self.request("initialize", INITIALIZE_PARAMS)
        if "result" not in init:
            raise RuntimeError(f"initialize failed: {init}")
        self.notify("notifications/initialized")
        return t_init - self.t_spawn

    def tool_nowait(self, name: str, **arguments) -> tuple[float, asyncio.Future]:
        return self.request_nowait("tools/call", {"name": name, "arguments": arguments})

    async def tool(self, name: str, timeout: float = 60, **arguments) -> tuple[str, bool]:
        _, _, message = await self.request("tools/call", {"name": name, "arguments": arguments}, timeout)
        result = message["result"]
        return result["content"][0]["text"], bool(result.get("isError"))

    def expect(self, body: str) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.expecting[body] = future
        return future

    async def wait_connected(self, timeout: float = 60) -> float:
        """Call `ping` until the broker link answers; seconds from spawn to that answer. The
        plugin's ping waits for a link that is still connecting, so the first answer comes as
        soon as the link is up."""
        deadline = self.clock() + timeout
        while True:
            text, is_error = await self.tool("ping", timeout=30)
            if not is_error:
                return self.clock() - self.t_spawn
            if self.clock() > deadline:
                raise RuntimeError(f"plugin {self.name} not connected within {timeout}s: {text}")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self.proc and self.proc.returncode is None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# ---------------------------------------------------------------------------------------------
# A TCP proxy between a client and the broker that loses, holds, silences, resets or cuts
# ---------------------------------------------------------------------------------------------


class ProxiedConnection:
    """One client connection through the proxy and its own connection to the broker."""

    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.sockets = (client, upstream)
        self.frozen = False  #: forwards nothing more either way, and stays open
        self.cut = False  #: carried the request whose answer is lost


class Proxy:
    """A TCP proxy of the test's own between a plugin (or the CLI) and the broker at `port`.

    What it does to the first request containing "mail.ack", by `ack`:
      "lose"    resets the connections of the first two (the plugin's ack and its one retry on a
                fresh connection): the broker never sees that ack;
      "hold"    forwards it only once `release` is set (bounded: 30 s), as a slow network would;
      "silence" stops that connection there for good, both ways, without closing it (`held` is set).
    `cut_answer=b"…"`: the first request containing those bytes reaches the broker, its answer does
    not (the connection is reset instead). `silence()` freezes every connection open now, as a path
    that went dead does; connections opened later are forwarded normally, as after a NAT or Wi-Fi
    change. `reset_all()` breaks every open connection, as a network blip would.
    """

    def __init__(self, port: int, ack: str | None = None, cut_answer: bytes | None = None):
        assert ack in (None, "lose", "hold", "silence"), ack
        self.port, self.ack, self.tampered = port, ack, 0
        self.cut_answer, self.answers_cut = cut_answer, 0
        self.release = threading.Event()  #: "hold": forward the held ack now
        self.held = threading.Event()  #: "silence": an ack is being held for good
        self.closed = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/mcp"
        self.connections: list[ProxiedConnection] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def __enter__(self) -> "Proxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.port))
            except OSError:
                return
            connection = ProxiedConnection(client, upstream)
            with self.lock:
                self.connections.append(connection)
            threading.Thread(target=self.pump, args=(client, upstream, connection, True), daemon=True).start()
            threading.Thread(target=self.pump, args=(upstream, client, connection, False), daemon=True).start()

    def pump(self, src: socket.socket, dst: socket.socket, connection: ProxiedConnection, outbound: bool) -> None:
        tail = b""  # a marker may straddle two reads
        try:
            while chunk := src.recv(65536):
                seen = tail + chunk
                if outbound and self.cut_answer and self.cut_answer in seen and not self.answers_cut:
                    self.answers_cut += 1
                    connection.cut = True
                if not outbound and connection.cut:
                    break  # the broker answered; the client never hears it
                if outbound and self.ack and b"mail.ack" in seen and self.first():
                    if self.ack == "lose":
                        break
                    if self.ack == "hold":
                        self.release.wait(30)  # a slow network, for as long as the test needs
                    else:
                        self.held.set()
                        connection.frozen = True
                if connection.frozen:
                    self.closed.wait(120)  # neither forward nor read again; the peers see silence
                    break
                tail = chunk[-16:]
                dst.sendall(chunk)
        except OSError:
            pass
        if not connection.frozen or self.closed.is_set():
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def first(self) -> bool:
        """Count an ack seen; True for the ones `ack` acts on (two for "lose", else one)."""
        with self.lock:
            self.tampered += 1
            return self.tampered <= (2 if self.ack == "lose" else 1)

    def silence(self) -> int:
        """Freeze every connection open now; returns how many the proxy has carried."""
        with self.lock:
            for connection in self.connections:
                connection.frozen = True
            return len(self.connections)

    def reset_all(self) -> None:
        with self.lock:
            connections, self.connections = self.connections, []
        for connection in connections:  # shutdown, unlike close, also wakes the pump blocked in recv on it
            for s in connection.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed.set()
        self.release.set()
        self.server.close()
        self.reset_all()


# ---------------------------------------------------------------------------------------------
# The zipapps from build.py
# ---------------------------------------------------------------------------------------------

#: Running build.py as a user would, with the interpreter that has pex (the test venv).
BUILD_SCRIPT = ROOT / "build.py"
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


def build(out: Path, src: Path | None = None, platforms: list[str] | None = None) -> Dist:
    """Run build.py into `out`; `src` swaps in stand-in modules, `platforms` limits the broker
    files to those (default: all)."""
    command = [sys.executable, str(BUILD_SCRIPT), "--out", str(out)]
    if src is not None:
        command += ["--src", str(src)]
    for platform in platforms or ():
        command += ["--platform", platform]
    done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        raise AssertionError(f"build.py exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return Dist.at(out)
