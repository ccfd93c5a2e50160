"""Real Claude Code in tmux, offline, against a scripted stand-in for the Anthropic Messages API.

    test ──tmux send-keys──▶ claude (tmux -L <own socket>) ──POST /v1/messages──▶ MessagesStandIn
                                │  stdio MCP, hooks                                 (records bodies,
                                ▼                                                    answers "ok")
                          dispatch plugin ──HTTP──▶ broker (harness)
    transcript: $CLAUDE_CONFIG_DIR/projects/<cwd, every non-alphanumeric as ->/<session id>.jsonl

What the tests read: every request body the stand-in received (the last one holds the whole
conversation, since Claude Code resends it each turn; side requests such as a title come too:
`turn_request` picks a turn's own), the session transcript, and the broker's
database. Everything talks to 127.0.0.1 only; the HOME is throwaway.

Pieces: MessagesStandIn (threaded http.server), prepare_home (the .claude.json that skips
onboarding, the API-key prompt, the trust dialog, and opens the channels gate), install_plugin
(`claude plugin marketplace add` + `claude plugin install`), ClaudeSession (one tmux session).
"""

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
import uuid
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from harness import ROOT, wait_for

PINNED = ROOT / ".claude-code" / "node_modules" / ".bin" / "claude"
CLAUDE = str(PINNED) if PINNED.exists() else shutil.which("claude")
TMUX = shutil.which("tmux")

#: The key Claude Code sends to the stand-in; its last 20 characters are pre-approved in .claude.json.
API_KEY = "sk-ant-api03-dispatch-e2e-" + "x" * 60 + "-AAAAAAAA"
#: The stand-in keeps at most this many requests: a runaway client cannot fill memory.
MAX_RECORDED = 2000
#: What the scripted model says to every request.
REPLY = "ok"


# ---------------------------------------------------------------------------------------------
# The Messages API stand-in
# ---------------------------------------------------------------------------------------------


class MessagesStandIn:
    """POST /v1/messages answered with REPLY (SSE when the request streams), count_tokens with a
    guess; every request recorded as {method, path, headers, body}. Unknown paths get 404 and are
    recorded too, so a test can see what Claude Code asked for. `run_tool(prompt, command)`
    scripts one Bash call: the turn that prompt starts runs `command` before it ends."""

    def __init__(self):
        self.requests: list[dict] = []
        self.tool_plans: dict[str, str] = {}  #: prompt -> the Bash command its turn runs, once
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: the record is the log
                pass

            def do_GET(self):
                stand_in.record(self, None)
                self.answer(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})

            def do_HEAD(self):
                stand_in.record(self, None)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"_raw": raw.decode(errors="replace")}
                stand_in.record(self, body)
                path = self.path.split("?")[0]
                if path == "/v1/messages/count_tokens":
                    self.answer(200, {"input_tokens": len(raw) // 4})
                elif path == "/v1/messages":
                    self.message(body)
                else:
                    self.answer(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})

            def answer(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def message(self, body: dict) -> None:
                message_id = "msg_" + uuid.uuid4().hex[:24]
                model = body.get("model", "claude-standin")
                usage = {"input_tokens": 10, "output_tokens": 1, "cache_creation_input_tokens": 0,
                         "cache_read_input_tokens": 0}
                command = stand_in.planned_tool(body)
                if command:
                    block = {"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": "Bash",
                             "input": {"command": command, "description": "scripted by the test"}}
                    start, delta, stop = dict(block, input={}), {"type": "input_json_delta",
                                                                "partial_json": json.dumps(block["input"])}, "tool_use"
                else:
                    block = {"type": "text", "text": REPLY}
                    start, delta, stop = {"type": "text", "text": ""}, {"type": "text_delta", "text": REPLY}, "end_turn"
                if not body.get("stream"):
                    self.answer(200, {"id": message_id, "type": "message", "role": "assistant", "model": model,
                                      "content": [block], "stop_reason": stop, "stop_sequence": None, "usage": usage})
                    return
                events = [
                    ("message_start", {"type": "message_start", "message": {
                        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
                        "stop_reason": None, "stop_sequence": None, "usage": usage}}),
                    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": start}),
                    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
                    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop,
                                                                          "stop_sequence": None},
                                       "usage": {"output_tokens": 1}}),
                    ("message_stop", {"type": "message_stop"}),
                ]
                data = b"".join(f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode() for name, payload in events)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def record(self, handler: BaseHTTPRequestHandler, body) -> None:
        with self.lock:
            if len(self.requests) < MAX_RECORDED:
                self.requests.append({"method": handler.command, "path": handler.path, "time": time.time(),
                                      "headers": dict(handler.headers.items()), "body": body})

    def run_tool(self, prompt: str, command: str) -> None:
        with self.lock:
            self.tool_plans[prompt] = command

    def planned_tool(self, body: dict) -> str | None:
        """The Bash command planned for the turn this request starts (a request offering Bash whose
        newest message holds the prompt), once."""
        if not any(isinstance(t, dict) and t.get("name") == "Bash" for t in body.get("tools") or []):
            return None
        newest = {"messages": (body.get("messages") or [])[-1:]}
        with self.lock:
            prompt = next((p for p in self.tool_plans if occurrences(p, newest)), None)
            return self.tool_plans.pop(prompt) if prompt else None

    def messages_records(self) -> list[dict]:
        """The POST /v1/messages requests so far, in order, as recorded (`time`, `body`, …)."""
        with self.lock:
            return [r for r in self.requests if r["method"] == "POST" and r["path"].split("?")[0] == "/v1/messages"]

    def messages_requests(self) -> list[dict]:
        """The bodies of POST /v1/messages requests so far, in order."""
        return [r["body"] for r in self.messages_records()]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------
# A throwaway HOME that starts Claude Code offline with no dialogs
# ---------------------------------------------------------------------------------------------


def isolated_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment minus its Claude Code / Dispatch settings, pointed at `home`, offline."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLAUDE", "ANTHROPIC_", "DISPATCH_", "MCP_", "TMUX")) and k != "AI_AGENT"}
    env.update(HOME=str(home), CLAUDE_CONFIG_DIR=str(home / ".claude"), CLAUDE_CODE_TMPDIR=str(home / "tmp"),
               XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"),
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",  # no telemetry, update check or DNS at all
               # ...which also stops feature flags being read from .claude.json's cache, so the
               # channels gate (tengu_harbor) would stay shut; this reads the cache anyway.
               CLAUDE_CODE_GB_DISK_CACHE_WHEN_TELEMETRY_OFF="1",
               DISABLE_AUTOUPDATER="1")
    env.update(extra or {})
    return env


def prepare_home(home: Path, project: Path) -> None:
    """A config that skips onboarding, the custom-API-key question and the trust dialog for
    `project`, and opens the channels gate (tengu_harbor), as if the feature flags were cached."""
    config = {
        "hasCompletedOnboarding": True,
        "customApiKeyResponses": {"approved": [API_KEY[-20:]], "rejected": []},
        "projects": {str(project): {"hasTrustDialogAccepted": True, "allowedTools": []}},
        "cachedGrowthBookFeatures": {"tengu_harbor": True},
    }
    for d in (home / ".claude", home / "tmp", project):
        d.mkdir(parents=True, exist_ok=True)
    # With CLAUDE_CONFIG_DIR set (isolated_env), this is the file Claude Code reads, not ~/.claude.json.
    (home / ".claude" / ".claude.json").write_text(json.dumps(config, indent=2))


def run_claude(home: Path, *args: str, cwd: Path, env: dict[str, str] | None = None,
               timeout: float = 90) -> str:
    """Run `claude ARGS` non-interactively in `home`; stdout + stderr, failing on a non-zero exit."""
    r = subprocess.run([CLAUDE, *args], cwd=cwd, env=isolated_env(home, env), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"claude {' '.join(args)} exited {r.returncode}:\n{out}"
    return out


def transcript_dir(home: Path, cwd: Path) -> Path:
    """Where Claude Code writes the session transcripts for `cwd`."""
    return home / ".claude" / "projects" / re.sub(r"[^A-Za-z0-9]", "-", str(cwd))


# ---------------------------------------------------------------------------------------------
# The plugin package, installed as a user installs it
# ---------------------------------------------------------------------------------------------

#: The plugin's files in the repository: what a marketplace install copies.
PACKAGE = (".claude-plugin", ".mcp.json", "hooks", "commands", "dispatch_plugin.py")
#: The marketplace and plugin names in .claude-plugin/marketplace.json.
MARKETPLACE, PLUGIN_NAME = "dispatch", "dispatch"


def copy_package(where: Path) -> Path:
    """A copy of the plugin package at `where`. Where .mcp.json or the hooks still run
    dist/plugin.pyz, that file is dispatch_plugin.py itself (python3 runs a non-zip .pyz as source),
    so no build is needed."""
    where.mkdir(parents=True, exist_ok=True)
    for part in PACKAGE:
        src, dst = ROOT / part, where / part
        if not src.exists():
            continue
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    wiring = (where / ".mcp.json").read_text() + (where / "hooks" / "hooks.json").read_text()
    if "dist/plugin.pyz" in wiring:
        (where / "dist").mkdir(exist_ok=True)
        shutil.copy(ROOT / "dispatch_plugin.py", where / "dist" / "plugin.pyz")
    return where


def install_plugin(home: Path, project: Path, package: Path, options: dict[str, str] | None = None) -> str:
    """`claude plugin marketplace add PACKAGE` and `claude plugin install dispatch@dispatch`, as a
    user would (user scope), with `--config KEY=VALUE` for each of `options`. Returns what they printed."""
    out = run_claude(home, "plugin", "marketplace", "add", str(package), cwd=project)
    config = [arg for key, value in (options or {}).items() for arg in ("--config", f"{key}={value}")]
    return out + run_claude(home, "plugin", "install", f"{PLUGIN_NAME}@{MARKETPLACE}", *config, cwd=project)


def python3_shim(bindir: Path, python: str) -> Path:
    """A directory whose `python3` runs `python`, to put first on PATH: the package runs `python3`,
    and the plugin under test may need what this interpreter has. A script, not a symlink: a
    venv's interpreter finds its site-packages only when started by its own path."""
    bindir.mkdir(parents=True, exist_ok=True)
    shim = bindir / "python3"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(python)} \"$@\"\n")
    shim.chmod(0o755)
    return bindir


# ---------------------------------------------------------------------------------------------
# What reached the model
# ---------------------------------------------------------------------------------------------


def texts(request: dict) -> list[str]:
    """Every text the model reads in a /v1/messages body's messages (not the top-level system)."""
    found = []
    for message in request.get("messages", []):
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for block in blocks:
            if isinstance(block.get("text"), str):
                found.append(block["text"])
            elif block.get("type") == "tool_result":
                inner = block.get("content")
                found.extend([inner] if isinstance(inner, str) else
                             [b.get("text", "") for b in inner or [] if isinstance(b, dict)])
    return found


def occurrences(needle: str, request: dict) -> int:
    """How many times `needle` appears in what the model reads in `request`."""
    return sum(text.count(needle) for text in texts(request))


def turn_request(api: "MessagesStandIn", prompt: str) -> dict | None:
    """The request of the turn `prompt` started: the first that holds it and offers the model
    tools. Claude Code's side requests hold the prompt too, without tools or history (one comes
    just before the turn's own), so neither the first nor the newest request holding it will do."""
    return next((r for r in api.messages_requests() if occurrences(prompt, r) and r.get("tools")), None)


def places(needle: str, request: dict) -> list[str]:
    """Where `needle` sits in `request`'s messages: index, role and the text around it (for
    failure messages)."""
    found = []
    for index, message in enumerate(request.get("messages", [])):
        for text in texts({"messages": [message]}):
            for hit in re.finditer(re.escape(needle), text):
                found.append(f"message {index} ({message.get('role')}): "
                             f"{text[max(0, hit.start() - 300):hit.end() + 100]!r}")
    return found


def transcript_lines(path: Path) -> list[dict]:
    """The transcript's JSON lines (a torn last line, still being written, is skipped)."""
    lines = []
    if path.exists():
        for raw in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(raw))
    return lines


def first_seen(needle: str, lines: list[dict]) -> tuple[float, str] | None:
    """When and how `needle` first entered the session in the transcript: ("channel" for a
    channel event's enqueue or user line, "hook" for hook additionalContext), else None.
    api-request-blob and prompt_snapshot lines copy what is already there and are ignored."""
    found = []
    for line in lines:
        kind = line.get("type")
        if kind == "queue-operation" and needle in str(line.get("content", "")):
            route = "channel"
        elif kind == "user" and (line.get("origin") or {}).get("kind") == "channel" and needle in json.dumps(line):
            route = "channel"
        elif kind == "attachment" and (line.get("attachment") or {}).get("type") == "hook_additional_context" \
                and needle in json.dumps(line["attachment"].get("content")):
            route = "hook"
        else:
            continue
        found.append((datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp(), route))
    return min(found) if found else None


# ---------------------------------------------------------------------------------------------
# One Claude Code session in its own tmux server
# ---------------------------------------------------------------------------------------------


class ClaudeSession:
    """`claude ARGS` in a detached tmux session on its own socket (`tmux -L`), talking to `api`.
    close() ends Claude Code with /exit (it stops its MCP servers), then kills the tmux server."""

    #: The footer under the input box: Claude Code is ready for a prompt.
    READY = r"shift\+tab to cycle|\? for shortcuts"
    #: The --dangerously-load-development-channels warning, answered with one Enter.
    DEV_CHANNELS = "Loading development channels"

    def __init__(self, home: Path, cwd: Path, args: list[str], api: MessagesStandIn,
                 env: dict[str, str] | None = None, width: int = 200, height: int = 50):
        self.home, self.cwd, self.args, self.api = home, cwd, list(args), api
        self.env = isolated_env(home, {"ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": api.url, **(env or {})})
        self.socket = f"dispatch-e2e-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.width, self.height = width, height

    def tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([TMUX, "-L", self.socket, "-f", "/dev/null", *args], capture_output=True,
                              text=True, timeout=15, check=check, env=self.env)

    def start(self, timeout: float = 40) -> "ClaudeSession":
        """Start Claude Code and wait until it takes prompts (accepting the dev-channels warning)."""
        launcher = self.home / "tmp" / f"launch-{self.socket}.sh"
        launcher.parent.mkdir(parents=True, exist_ok=True)
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env.items() if re.fullmatch(r"\w+", k))
        launcher.write_text(f"#!/bin/sh\n{exports}cd {shlex.quote(str(self.cwd))}\n"
                            f"exec {shlex.join([CLAUDE, *self.args])}\n")
        launcher.chmod(0o700)
        self.tmux("new-session", "-d", "-s", "claude", "-x", str(self.width), "-y", str(self.height),
                  str(launcher))
        self.tmux("set-option", "-t", "claude", "remain-on-exit", "on", check=False)
        ready_or_warning = f"{self.READY}|{self.DEV_CHANNELS}"
        if self.DEV_CHANNELS in self.wait_screen(ready_or_warning, timeout).group(0):
            self.keys("Enter")
        self.wait_screen(self.READY, timeout)
        return self

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "claude", check=False).stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "claude", *keys)

    def type(self, text: str) -> None:
        """Type `text` literally, then press Enter."""
        self.tmux("send-keys", "-t", "claude", "-l", text)
        time.sleep(0.3)  # let the input box take the text before Enter submits it
        self.keys("Enter")

    def wait_screen(self, pattern: str, timeout: float = 30) -> re.Match:
        return wait_for(lambda: re.search(pattern, self.screen()), timeout, 0.1,
                        f"{pattern!r} on the screen:\n{self.screen()}")

    def submit(self, prompt: str, timeout: float = 60) -> dict:
        """Type `prompt` and wait until the model is asked about it; that turn's request body."""
        self.type(prompt)
        return wait_for(lambda: turn_request(self.api, prompt), timeout, 0.1,
                        f"a /v1/messages request with {prompt!r}; screen:\n{self.screen()}")

    @property
    def session_id(self) -> str:
        """Claude Code's current session id (/clear starts a new one), from the header on its
        latest request to the stand-in."""
        with self.api.lock:
            ids = [r["headers"].get("X-Claude-Code-Session-Id") for r in self.api.requests]
        return [i for i in ids if i][-1]

    @property
    def transcript(self) -> Path:
        return transcript_dir(self.home, self.cwd) / f"{self.session_id}.jsonl"

    def transcript_lines(self) -> list[dict]:
        """The lines of every transcript this Claude Code wrote in its directory (one per
        session id: /clear starts a new file)."""
        return [line for path in sorted(transcript_dir(self.home, self.cwd).glob("*.jsonl"))
                for line in transcript_lines(path)]

    def close(self) -> None:
        """/exit (Claude Code stops its MCP servers: SIGINT, SIGTERM, SIGKILL within 0.5 s), then
        kill the tmux server whatever state Claude Code is in."""
        with contextlib.suppress(Exception):
            if re.search(self.READY, self.screen()):
                self.type("/exit")
                wait_for(lambda: "Pane is dead" in self.screen() or not self.screen(), 10, 0.1, "Claude Code to exit")
        self.tmux("kill-server", check=False)
