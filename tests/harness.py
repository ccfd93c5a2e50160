"""The plugin process as Claude Code drives it, for the tests and the benchmarks alike.

    test / bench ──JSON-RPC on stdin──▶ dispatch_plugin (the channel) ──▶ broker
         ▲                                   │ notifications/claude/channel on stdout
         └── reads stdout ◀──────────────────┘
               └─ appends each channel event to the session transcript, as Claude Code does
                  (…/projects/<project dir>/<session id>.jsonl): the plugin acks only what it shows

Claude Code gives the plugin a session id, a config dir and a project dir; without the
transcript lines the plugin turns its channel off after PROOF_SECONDS and acks nothing.
`PluginProcess` reads the plugin in a thread (the tests); `AsyncPluginProcess` on an asyncio loop,
with requests in flight at once and the time each line arrived (the benchmarks). Standard library
only, so `bench/` imports it without pytest.
"""

import asyncio
import contextlib
import itertools
import json
import queue
import re
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

CHANNEL_METHOD = "notifications/claude/channel"
#: What Claude Code 2.1.330 sends first: server/discover (a server without it answers -32601),
#: then initialize at 2025-11-25, then notifications/initialized.
INITIALIZE_PARAMS = {"protocolVersion": "2025-11-25", "capabilities": {},
                     "clientInfo": {"name": "claude-code", "version": "2.1.330"}}
#: Where every child's project appears to live (the transcript directory is derived from it).
PROJECT_DIR = "/work/some.project_x"


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
