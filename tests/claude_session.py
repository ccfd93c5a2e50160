"""Real Claude Code in tmux, offline, against a scripted stand-in for the Anthropic Messages API.

    test ──tmux send-keys──▶ claude (tmux -L <own socket>) ──POST /v1/messages──▶ MessagesStandIn
                                │  stdio MCP, hooks                                 (records bodies,
                                ▼                                                    answers "ok")
                          dispatch plugin ──HTTP──▶ broker (conftest)
    transcript: $CLAUDE_CONFIG_DIR/projects/<cwd, every non-alphanumeric as ->/<session id>.jsonl

What the tests read: every request body the stand-in received (the last one holds the whole
conversation, since Claude Code resends it each turn), the session transcript, and the broker's
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINNED = ROOT / ".claude-code" / "node_modules" / ".bin" / "claude"
CLAUDE = str(PINNED) if PINNED.exists() else shutil.which("claude")
TMUX = shutil.which("tmux")

#: The key Claude Code sends to the stand-in; its last 20 characters are pre-approved in .claude.json.
API_KEY = "sk-ant-api03-dispatch-e2e-" + "x" * 60 + "-AAAAAAAA"
#: The stand-in keeps at most this many requests: a runaway client cannot fill memory.
MAX_RECORDED = 2000
#: What the scripted model says to every request.
REPLY = "ok"


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll `predicate` until it returns something truthy or `timeout` passes; return that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ---------------------------------------------------------------------------------------------
# The Messages API stand-in
# ---------------------------------------------------------------------------------------------


class MessagesStandIn:
    """POST /v1/messages answered with REPLY (SSE when the request streams), count_tokens with a
    guess; every request recorded as {method, path, headers, body}. Unknown paths get 404 and are
    recorded too, so a test can see what Claude Code asked for."""

    def __init__(self):
        self.requests: list[dict] = []
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
                if not body.get("stream"):
                    self.answer(200, {"id": message_id, "type": "message", "role": "assistant", "model": model,
                                      "content": [{"type": "text", "text": REPLY}], "stop_reason": "end_turn",
                                      "stop_sequence": None, "usage": usage})
                    return
                events = [
                    ("message_start", {"type": "message_start", "message": {
                        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
                        "stop_reason": None, "stop_sequence": None, "usage": usage}}),
                    ("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}}),
                    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": REPLY}}),
                    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
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

    def messages_requests(self) -> list[dict]:
        """The bodies of POST /v1/messages requests so far, in order."""
        with self.lock:
            return [r["body"] for r in self.requests
                    if r["method"] == "POST" and r["path"].split("?")[0] == "/v1/messages"]

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
    for path in (home / ".claude.json", home / ".claude" / ".claude.json"):
        path.write_text(json.dumps(config, indent=2))


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
# One Claude Code session in its own tmux server
# ---------------------------------------------------------------------------------------------


class ClaudeSession:
    """`claude ARGS` in a detached tmux session on its own socket (`tmux -L`), killed by close()."""

    def __init__(self, home: Path, cwd: Path, args: list[str], env: dict[str, str] | None = None,
                 width: int = 200, height: int = 50):
        self.home, self.cwd, self.args = home, cwd, list(args)
        self.env = isolated_env(home, env)
        self.socket = f"dispatch-e2e-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.width, self.height = width, height

    def tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([TMUX, "-L", self.socket, "-f", "/dev/null", *args], capture_output=True,
                              text=True, timeout=15, check=check, env=self.env)

    def start(self) -> "ClaudeSession":
        launcher = self.home / "tmp" / f"launch-{self.socket}.sh"
        launcher.parent.mkdir(parents=True, exist_ok=True)
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env.items() if re.fullmatch(r"\w+", k))
        launcher.write_text(f"#!/bin/sh\n{exports}cd {shlex.quote(str(self.cwd))}\n"
                            f"exec {shlex.join([CLAUDE, *self.args])}\n")
        launcher.chmod(0o700)
        self.tmux("new-session", "-d", "-s", "claude", "-x", str(self.width), "-y", str(self.height),
                  str(launcher))
        self.tmux("set-option", "-t", "claude", "remain-on-exit", "on", check=False)
        return self

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "claude", check=False).stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "claude", *keys)

    def type(self, text: str) -> None:
        """Type `text` literally, then press Enter."""
        self.tmux("send-keys", "-t", "claude", "-l", text)
        time.sleep(0.2)  # let the input box take the text before Enter submits it
        self.keys("Enter")

    def wait_screen(self, pattern: str, timeout: float = 30) -> re.Match:
        return wait_until(lambda: re.search(pattern, self.screen()), timeout,
                          f"{pattern!r} on the screen:\n{self.screen()}")

    def close(self) -> None:
        self.tmux("kill-server", check=False)
