"""Claude Code itself as the host: it validates the plugin package, reports the plugin Connected,
and in a real session (tmux, a scripted Messages API on loopback) hands each message to the model once.

Uses the pinned Claude Code in .claude-code/ (`npm install --prefix .claude-code
@anthropic-ai/claude-code@2.1.330`), else `claude` on PATH; skipped when there is neither.
Every run is offline, in a throwaway HOME, from an empty working directory (the repo's own
.mcp.json would otherwise be listed too, as a project server pending approval).

`claude mcp list` exits 0 even when a server fails, so the tests read its output:
    dispatch: python3 /x/plugin.pyz - ✔ Connected
    dispatch: python3 /x/plugin.pyz - ✘ Failed to connect — CONNECTION_CLOSED: Connection closed
It waits up to MCP_TIMEOUT ms (default 30000) for initialize + tools/list.
"""

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

import claude_session as cs
from claude_session import CLAUDE, isolated_env
from harness import db_query, free_port, plugin_env, run_cli, wait_for

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = [".claude-plugin", ".mcp.json", "hooks", "commands", "dispatch_plugin.py"]  # what the plugin package runs

needs_claude = pytest.mark.skipif(CLAUDE is None, reason="Claude Code not installed: npm install --prefix "
                                  ".claude-code @anthropic-ai/claude-code@2.1.330")


def claude(*args: str, home: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
           timeout: float = 90) -> str:
    """Run `claude ARGS` in the isolated `home`; return stdout + stderr, failing on a non-zero exit."""
    project = home / "project"
    for d in (project, home / "tmp"):
        d.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([CLAUDE, *args], cwd=cwd or project, env=isolated_env(home, env), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"claude {' '.join(args)} exited {r.returncode}:\n{out}"
    return out


def claude_mcp_list(command: list[str], env: dict[str, str], home: Path, name: str = "dispatch") -> str:
    """Register `command` as user-scope stdio server `name` (`env` given with -e), then `claude mcp list`."""
    flags = [f"--env={k}={v}" for k, v in env.items()]  # after the name: -e takes several values
    claude("mcp", "add", "--scope", "user", name, *flags, "--", *command, home=home)
    return claude("mcp", "list", home=home)


def claude_mcp_list_plugin(plugin_root: Path, env: dict[str, str], home: Path) -> str:
    """`claude --plugin-dir ROOT mcp list`: the package's own .mcp.json; the server inherits `env`."""
    return claude("--plugin-dir", str(plugin_root), "mcp", "list", home=home, env=env)


def connected(output: str, name: str) -> bool:
    return re.search(rf"^{re.escape(name)}: .* - ✔ Connected$", output, re.M) is not None


def mcp_logs(home: Path) -> str:
    """Claude Code's per-server debug log (timeouts, the server's stderr), for failure messages."""
    return "".join(p.read_text(errors="replace") for p in sorted((home / ".cache").rglob("mcp-logs-*/*.jsonl")))


def package_copy(where: Path) -> Path:
    """A copy of the plugin package as a checkout holds it (it needs no build)."""
    where.mkdir(parents=True)
    for part in PACKAGE:
        src, dst = ROOT / part, where / part
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return where


@needs_claude
def test_claude_plugin_package_validates(tmp_path):
    out = claude("plugin", "validate", "--strict", ".", home=tmp_path / "home", cwd=ROOT)
    assert "✔ Validation passed" in out, out
    assert "mcpServers: dispatch stdio python3" in out, out
    assert "commands: dispatch:doctor" in out and "commands: dispatch:status" in out, out


@needs_claude
@pytest.mark.parametrize("via", ["mcp add", "plugin dir"])
def test_claude_code_reports_the_plugin_connected(broker, dist, tmp_path, via):
    pyz = Path(dist.plugin if hasattr(dist, "plugin") else dist["plugin"])
    token = broker.token if isinstance(broker.token, str) else broker.token("claude")
    env = {"DISPATCH_URL": broker.url, "DISPATCH_TOKEN": token}
    home = tmp_path / "home"
    if via == "mcp add":  # what the broker's banner tells people to run
        name, out = "dispatch", claude_mcp_list(["python3", str(pyz)], env, home)
    else:  # the plugin package itself: .mcp.json with ${CLAUDE_PLUGIN_ROOT}
        name, out = "plugin:dispatch:dispatch", claude_mcp_list_plugin(package_copy(tmp_path / "pkg"), env, home)
    assert connected(out, name), f"{out}\n{mcp_logs(home)[-4000:]}"


@needs_claude
def test_claude_mcp_list_says_why_when_the_broker_refuses_the_token(broker, dist, tmp_path):
    """The reason reaches the user, not only the model: tools/list answers with it."""
    from harness import unknown_token

    out = claude_mcp_list(["python3", str(dist.plugin)], {"DISPATCH_URL": broker.url,
                                                           "DISPATCH_TOKEN": unknown_token("claude")}, tmp_path / "home")
    [line] = [line for line in out.splitlines() if line.startswith("dispatch: ")]
    assert "tools fetch failed" in line and "refused the token from DISPATCH_TOKEN" in line, out


@needs_claude
def test_claude_mcp_list_shows_dispatch_failed_with_the_reason_when_dispatch_url_is_missing(dist, tmp_path):
    out = claude_mcp_list(["python3", str(dist.plugin)], {"DISPATCH_TOKEN": f"dsp_claude_{'0' * 48}"},
                          tmp_path / "home")
    [line] = [line for line in out.splitlines() if line.startswith("dispatch: ")]
    assert "✘ Failed to connect" in line and "Dispatch is not configured: no broker URL" in line, out


# ---------------------------------------------------------------------------------------------
# A real session: the plugin installed from its marketplace, mail sent from the shell, and what
# the model was actually given (tests/claude_session.py drives Claude Code in tmux against a
# scripted Messages API on loopback).
# ---------------------------------------------------------------------------------------------

needs_claude_in_tmux = pytest.mark.skipif(
    cs.CLAUDE is None or cs.TMUX is None,
    reason="needs Claude Code (npm install --prefix .claude-code @anthropic-ai/claude-code@2.1.330) and tmux")

#: How Claude Code is started, per install mode: the flag that names the plugin's channel, none,
#: and the `mcp add` form that does not name a plugin's server (Claude Code then drops the events).
CHANNEL_FLAGS = {
    "channel_on": ["--dangerously-load-development-channels", f"plugin:{cs.PLUGIN_NAME}@{cs.MARKETPLACE}"],
    "no_flag": [],
    "wrong_flag": ["--dangerously-load-development-channels", "server:dispatch"],
}
#: Mail sent to the session in each test.
MESSAGES = 3
#: A session's channel, where it listens at all, listens within this long of its first prompt;
#: mail is sent after it does (or after this long), as to a session that has been up a while.
LISTEN_S = 10
#: Every message must have reached the model within this long of the prompt after the sends.
DELIVERY_S = 20


def listening(sender_env: dict[str, str], name: str) -> bool:
    """Whether `who` (the CLI) shows `name` live: its channel is connected and listening."""
    who = run_cli(sender_env, "who").stdout
    return any(name in line and "live" in line and "offline" not in line for line in who.splitlines())


def acks(broker) -> dict[str, float | None]:
    """body -> acked_at for every message at the broker."""
    return dict(db_query(broker, "SELECT body, acked_at FROM messages"))


def seen_by_model(api: cs.MessagesStandIn, body: str) -> bool:
    return any(cs.occurrences(body, r) for r in api.messages_requests())


def delivery_report(session: cs.ClaudeSession, broker, bodies, last: dict) -> str:
    """One line per message: times in the turn's request `last`, route and time in the
    transcript, ack state at the broker. For failure messages."""
    lines, acked = session.transcript_lines(), acks(broker)
    out, lost = [], 0
    for body in bodies:
        seen = cs.first_seen(body, lines)
        out.append(f"  {body}: {cs.occurrences(body, last)}x in the last request; transcript: "
                   f"{f'{seen[1]} at {seen[0]:.3f}' if seen else 'absent'}; "
                   f"{'acked at %.3f' % acked[body] if acked.get(body) else 'not acked'}")
        lost += bool(acked.get(body) and not seen)
        if cs.occurrences(body, last) > 1:
            out.extend(f"    {where}" for where in cs.places(body, last))
    head = f"  {lost} of {len(bodies)} acked at the broker yet never shown to the model: lost\n" if lost else ""
    return head + "\n".join(out)


def session_name(session: cs.ClaudeSession) -> str:
    """README: a session's Dispatch name is <base>-<first 8 hex of its session id>."""
    return f"e2e-{session.session_id.replace('-', '')[:8]}"


def await_participant(broker, sender: dict[str, str], name: str) -> None:
    """Wait until the broker knows `name` (the plugin identified), then until it listens, or
    LISTEN_S: mail then goes to a session as to one that has been up a while."""
    wait_for(lambda: db_query(broker, "SELECT 1 FROM participants WHERE name = ?", name), 30,
             what=f"{name} known to the broker (the plugin's identify)")
    with contextlib.suppress(AssertionError):  # a plugin may well not listen where channels are off
        wait_for(lambda: listening(sender, name), LISTEN_S, interval=0.5, what=f"{name} listening")


def send_and_check(session: cs.ClaudeSession, broker, sender: dict[str, str], mail: dict[str, str],
                   label: str) -> dict:
    """Send each body in `mail` (body -> recipient name) from the CLI; type a prompt (the hook's
    turn where channels are off) and another (a later turn must not show them again). Then each
    body must be in the last turn's request exactly once, and acked only after it entered the
    transcript, and acked within 15 s (unacked mail is pushed again). That request."""
    for body, name in mail.items():
        sent = run_cli(sender, "send", "--to", name, body)
        assert sent.returncode == 0, sent.stderr
    nonce = os.urandom(3).hex()
    session.submit(f"second prompt {nonce}")
    with contextlib.suppress(AssertionError):  # reported with the details below
        wait_for(lambda: all(seen_by_model(session.api, b) for b in mail), DELIVERY_S, interval=0.5,
                 what="every message in a request to the model")
    last = session.submit(f"third prompt {nonce}")
    report = delivery_report(session, broker, mail, last)
    assert all(cs.occurrences(b, last) == 1 for b in mail), f"[{label}] each message should reach the model once:\n{report}"

    lines, acked = session.transcript_lines(), acks(broker)
    for body in mail:
        seen = cs.first_seen(body, lines)
        assert seen, f"[{label}] {body} reached the model but is not in the transcript:\n{report}"
        assert acked[body] is None or acked[body] >= seen[0] - 0.01, \
            f"[{label}] {body} was acked {(seen[0] - acked[body]) * 1000:.0f} ms before Claude Code wrote it into " \
            f"the transcript ({seen[1]}): a crash in between loses it\n{report}"
    with contextlib.suppress(AssertionError):
        wait_for(lambda: all(acks(broker)[b] is not None for b in mail), 15, interval=0.25, what="acks")
    assert all(acks(broker)[b] is not None for b in mail), \
        f"[{label}] shown to the model but never acked (the broker will push it again):\n" \
        f"{delivery_report(session, broker, mail, last)}"
    return last


@pytest.fixture
def claude_home(tmp_path):
    """A throwaway HOME with the plugin installed from a copy of the package, and the project
    directory Claude Code runs in. The package runs `python3`: ours, first on PATH."""
    home, project = tmp_path / "home", tmp_path / "project"
    cs.prepare_home(home, project)
    cs.install_plugin(home, project, cs.copy_package(tmp_path / "package"))
    return home, project, cs.python3_shim(tmp_path / "bin", sys.executable)


@contextlib.contextmanager
def claude_session(broker, claude_home, flags: list[str]):
    """Claude Code started with `flags` in the fixture's HOME, configured for `broker` as base e2e."""
    home, project, bindir = claude_home
    env = {"DISPATCH_URL": broker.url, "DISPATCH_TOKEN": broker.token("e2e"),
           "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    api = cs.MessagesStandIn()
    session = cs.ClaudeSession(home, project, flags, api, env)
    try:
        yield session.start()
    finally:
        session.close()
        api.close()


@needs_claude_in_tmux
@pytest.mark.parametrize("mode", list(CHANNEL_FLAGS))
def test_every_message_reaches_the_model_once_and_is_acked_only_after(broker, claude_home, mode):
    """Mail sent from the shell to a live session reaches the model exactly once — as a channel
    event or through the UserPromptSubmit hook — whichever way Claude Code was started, and the
    broker holds each message unacked until it is in the session's transcript."""
    with claude_session(broker, claude_home, CHANNEL_FLAGS[mode]) as session:
        session.submit("first prompt")
        name, sender = session_name(session), plugin_env(broker, "peer")
        await_participant(broker, sender, name)
        nonce = os.urandom(3).hex()
        send_and_check(session, broker, sender,
                       {f"dispatch-e2e-{mode}-{nonce}-message-{i}": name for i in range(MESSAGES)}, mode)


@needs_claude_in_tmux
def test_mail_to_either_name_reaches_the_model_once_after_clear(broker, claude_home):
    """/clear gives the session a new id (new transcript, hooks see the new id) but keeps the
    channel process, which still has the old one. Mail to the old name (a peer's reply to an
    earlier message) and to the new one (what the hooks announce) both reach the model once and
    are acked."""
    with claude_session(broker, claude_home, CHANNEL_FLAGS["channel_on"]) as session:
        session.submit("first prompt")
        before, sender = session_name(session), plugin_env(broker, "peer")
        await_participant(broker, sender, before)
        session.type("/clear")
        wait_for(lambda: "first prompt" not in session.screen(), 15, what="/clear to clear the screen")
        session.submit("after clear")
        after = session_name(session)
        assert after != before, "/clear should start a new session id"
        wait_for(lambda: db_query(broker, "SELECT 1 FROM participants WHERE name = ?", after), 15,
                 what=f"{after} known to the broker")
        nonce = os.urandom(3).hex()
        send_and_check(session, broker, sender, {f"dispatch-e2e-clear-{nonce}-to-old-name": before,
                                                 f"dispatch-e2e-clear-{nonce}-to-new-name": after}, "clear")


# ---------------------------------------------------------------------------------------------
# No flag: the session's own inbox (CLAUDE_CODE_MESSAGING_SOCKET). Its feature gate is read
# only with nonessential traffic allowed, so these sessions leave that switch unset (telemetry and
# error reports stay off by their own switches; there is no network beyond loopback anyway).
# ---------------------------------------------------------------------------------------------

#: Gates open: the inbox's (tengu_harbor_kite, on by default) is read only with this unset.
INBOX_ENV = {"DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1"}
#: Messages in the burst, and the model turns they may take at most (each turn is a paid request).
BURST, BURST_TURNS = 41, 5


@contextlib.contextmanager
def inbox_session(broker, home: Path, project: Path, bindir: Path, flags: list[str] = (),
                  extra: dict[str, str] | None = None, dispatch_env: bool = True):
    """Claude Code with no channel flag and its inbox gate open, configured for `broker` as base e2e
    by DISPATCH_URL and DISPATCH_TOKEN (`dispatch_env=False`: no DISPATCH_* at all)."""
    settings = {"DISPATCH_URL": broker.url, "DISPATCH_TOKEN": broker.token("e2e")} if dispatch_env else {}
    env = {**settings, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", **INBOX_ENV, **(extra or {})}
    api = cs.MessagesStandIn()
    session = cs.ClaudeSession(home, project, list(flags), api, env)
    session.env.pop("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", None)
    try:
        yield session.start()
    finally:
        session.close()
        api.close()


def add_settings(home: Path, settings: dict) -> None:
    """Claude Code's user settings, with `settings` added (the plugin install wrote its own there)."""
    path = home / ".claude" / "settings.json"
    path.write_text(json.dumps({**(json.loads(path.read_text()) if path.exists() else {}), **settings}))


@pytest.fixture
def mcp_add_home(tmp_path):
    """A throwaway HOME where the plugin is a `claude mcp add` server named dispatch (no package)."""
    home, project = tmp_path / "home", tmp_path / "project"
    cs.prepare_home(home, project)
    bindir = cs.python3_shim(tmp_path / "bin", sys.executable)
    cs.run_claude(home, "mcp", "add", "--scope", "user", "dispatch", "--", "python3", str(ROOT / "dispatch_plugin.py"),
                  cwd=project, env={"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"})
    return home, project, bindir


def model_turns_with(api: cs.MessagesStandIn, bodies) -> list[dict]:
    """The requests to the model whose newest message shows any of `bodies`: the turns they took."""
    turns = []
    for request in api.messages_requests():
        newest = {"messages": request.get("messages", [])[-1:]}
        if any(cs.occurrences(b, newest) for b in bodies):
            turns.append(request)
    return turns


def send_burst(broker, bodies: list[str], to: str) -> None:
    """Send `bodies` one after another from one sender, as fast as the real client goes."""
    sys.path.insert(0, str(ROOT))
    import dispatch_plugin

    config = dispatch_plugin.Config(url=broker.url, token=broker.token("peer"), base="peer", name="peer-burst",
                                    token_source="test")
    client = dispatch_plugin.BrokerClient(config)
    client.identify()
    for body in bodies:
        client.send("send", to=to, body=body)


def check_live(session: cs.ClaudeSession, broker, bodies: list[str], label: str, timeout: float = 30) -> None:
    """Every body reaches the model before anything is typed, each once, acked only after its
    transcript line; then a typed prompt (the hook's turn) shows none of them again."""
    with contextlib.suppress(AssertionError):
        wait_for(lambda: all(seen_by_model(session.api, b) for b in bodies), timeout, interval=0.25,
                 what="every message in a request to the model")
    newest = session.api.messages_requests()[-1]
    assert all(seen_by_model(session.api, b) for b in bodies), \
        f"[{label}] not all reached the model before anything was typed:\n" \
        f"{delivery_report(session, broker, bodies, newest)}"
    wait_for(lambda: all(acks(broker)[b] is not None for b in bodies), 15, interval=0.25, what="acks")
    lines, acked = session.transcript_lines(), acks(broker)
    for body in bodies:
        seen = cs.first_seen(body, lines)
        assert seen and acked[body] >= seen[0] - 0.01, f"[{label}] {body} acked before the transcript had it"
    last = session.submit(f"after the mail {os.urandom(3).hex()}")
    assert all(cs.occurrences(b, last) == 1 for b in bodies), \
        f"[{label}] each message should reach the model once:\n{delivery_report(session, broker, bodies, last)}"


@needs_claude_in_tmux
@pytest.mark.parametrize("install", ["plugin", "mcp add"])
def test_an_idle_session_without_a_channel_flag_gets_mail_live_through_its_inbox(broker, request, install):
    # One install per HOME: both fixtures share tmp_path, and a HOME with both runs two servers.
    home, project, bindir = request.getfixturevalue("claude_home" if install == "plugin" else "mcp_add_home")
    with inbox_session(broker, home, project, bindir) as session:
        session.submit("first prompt")
        name, sender = session_name(session), plugin_env(broker, "peer")
        await_participant(broker, sender, name)
        body = f"dispatch-e2e-inbox-{install.replace(' ', '-')}-{os.urandom(3).hex()}"
        assert run_cli(sender, "send", "--to", name, body).returncode == 0
        check_live(session, broker, [body], install)
        turn = model_turns_with(session.api, [body])[0]
        newest = cs.texts({"messages": turn["messages"][-1:]})[0]
        assert "Another Claude session sent a message" in newest and "`reply` tool" in newest, newest


def tool_results(request: dict) -> list[str]:
    """The tool_use ids whose results `request` carries."""
    return [b.get("tool_use_id") for m in request.get("messages", []) if isinstance(m.get("content"), list)
            for b in m["content"] if isinstance(b, dict) and b.get("type") == "tool_result"]


@needs_claude_in_tmux
def test_a_busy_session_gets_mail_through_its_inbox_within_the_running_turn(broker, claude_home):
    """Mail that arrives while a turn runs a long tool call reaches the model when the tool
    returns, in the same turn, with nothing typed; once, and acked after its transcript line."""
    home, project, bindir = claude_home
    add_settings(home, {"permissions": {"allow": ["Bash(sleep 6)"]}})
    with inbox_session(broker, home, project, bindir) as session:
        session.submit("first prompt")
        name, sender = session_name(session), plugin_env(broker, "peer")
        await_participant(broker, sender, name)
        busy = f"work a while {os.urandom(3).hex()}"
        session.api.run_tool(busy, "sleep 6")
        session.submit(busy)
        wait_for(lambda: "sleep 6" in session.screen(), 20, interval=0.2, what="the tool call running")
        body = f"dispatch-e2e-busy-{os.urandom(3).hex()}"
        assert run_cli(sender, "send", "--to", name, body).returncode == 0
        check_live(session, broker, [body], "busy")
        first = next(r for r in session.api.messages_requests() if cs.occurrences(body, r))
        assert tool_results(first) and not cs.occurrences("after the mail", first), \
            "the mail should come with the tool's result, inside the running turn"


@needs_claude_in_tmux
def test_a_burst_of_41_from_one_sender_reaches_an_idle_session_once_each_in_at_most_5_turns(broker, claude_home):
    """Claude Code's inbox drops a writer's messages past a burst of 30 without a word; the
    plugin gathers and paces its writes so that none is lost or doubled."""
    with inbox_session(broker, *claude_home) as session:
        session.submit("first prompt")
        name = session_name(session)
        await_participant(broker, plugin_env(broker, "peer"), name)
        nonce = os.urandom(3).hex()
        bodies = [f"dispatch-e2e-burst-{nonce}-{i:02d}" for i in range(BURST)]
        send_burst(broker, bodies, name)
        check_live(session, broker, bodies, "burst", timeout=60)
        turns = model_turns_with(session.api, bodies)
        assert len(turns) <= BURST_TURNS, f"{len(turns)} model turns for {BURST} messages"


@needs_claude_in_tmux
@pytest.mark.parametrize("case", ["crossSessionInbound hold", "CLAUDE_CODE_HARBOR_KITE=0"])
def test_a_session_that_holds_or_switches_off_its_inbox_gets_mail_once_with_the_next_prompt(broker, claude_home,
                                                                                           case):
    home, project, bindir = claude_home
    extra = {}
    if case.startswith("cross"):
        add_settings(home, {"crossSessionInbound": "hold"})
    else:
        extra = {"CLAUDE_CODE_HARBOR_KITE": "0"}
    with inbox_session(broker, home, project, bindir, extra=extra) as session:
        session.submit("first prompt")
        name, sender = session_name(session), plugin_env(broker, "peer")
        await_participant(broker, sender, name)
        start = session.transcript_lines()
        context = next((json.dumps(l) for l in start if "Your Dispatch name is" in json.dumps(l)), "")
        why = "crossSessionInbound: hold" if case.startswith("cross") else "CLAUDE_CODE_HARBOR_KITE=0"
        assert why in context, f"the SessionStart text should say why mail waits:\n{context[:2000]}"
        nonce = os.urandom(3).hex()
        bodies = [f"dispatch-e2e-held-{nonce}-{i}" for i in range(2)]
        for body in bodies:
            assert run_cli(sender, "send", "--to", name, body).returncode == 0
        time.sleep(3)  # a live way would have started a turn by now
        assert not any(seen_by_model(session.api, b) for b in bodies), "nothing is shown before the next prompt"
        # nothing more to send: the next prompts show the mail
        last = send_and_check(session, broker, sender, {}, case)
        assert all(cs.occurrences(b, last) == 1 for b in bodies), delivery_report(session, broker, bodies, last)
        wait_for(lambda: all(acks(broker)[b] is not None for b in bodies), 15, interval=0.25, what="acks")


@pytest.fixture
def configured_claude_home(broker, tmp_path):
    """A throwaway HOME with the plugin installed as README says, its settings given to Claude
    Code: `claude plugin install dispatch@dispatch --config url=… --config token=…`."""
    home, project = tmp_path / "home", tmp_path / "project"
    cs.prepare_home(home, project)
    out = cs.install_plugin(home, project, cs.copy_package(tmp_path / "package"),
                            {"url": broker.url, "token": broker.token("e2e")})
    assert "not yet set" not in out, out
    return home, project, cs.python3_shim(tmp_path / "bin", sys.executable)


@needs_claude_in_tmux
@pytest.mark.parametrize("way", ["live", "crossSessionInbound hold"])
def test_a_plugin_configured_only_by_its_options_gets_mail_and_its_hooks_work(broker, configured_claude_home, way):
    """No DISPATCH_* anywhere and no config.toml: the server has the options through .mcp.json's
    ${user_config.…}, the hooks through CLAUDE_PLUGIN_OPTION_*. Live: the server delivers through
    the session's inbox. Held: the prompt hook delivers with the next prompt."""
    home, project, bindir = configured_claude_home
    if way != "live":
        add_settings(home, {"crossSessionInbound": "hold"})
    with inbox_session(broker, home, project, bindir, dispatch_env=False) as session:
        assert not any(k.startswith("DISPATCH_") for k in session.env)
        session.submit("first prompt")
        name, sender = session_name(session), plugin_env(broker, "peer")
        await_participant(broker, sender, name)
        told = [t for r in session.api.messages_requests() for t in cs.texts(r) if "Dispatch" in t]
        assert any(f"Your Dispatch name is {name}" in t for t in told), f"the SessionStart hook should have its settings:\n{told}"
        body = f"dispatch-e2e-options-{way.split()[0]}-{os.urandom(3).hex()}"
        assert run_cli(sender, "send", "--to", name, body).returncode == 0
        if way == "live":
            check_live(session, broker, [body], way)
        else:
            send_and_check(session, broker, sender, {}, way)  # the next prompts show it, through the hook
            assert cs.first_seen(body, session.transcript_lines())[1] == "hook", \
                delivery_report(session, broker, [body])
            wait_for(lambda: acks(broker)[body] is not None, 15, interval=0.25, what="the ack")


# ---------------------------------------------------------------------------------------------
# README's one-machine quick start, as written
# ---------------------------------------------------------------------------------------------

ONE_MACHINE = re.compile(r"<!-- quick-start: one machine -->\s*```sh\n(.*?)```", re.S)


def run_line(line: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{line!r} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def serve_line(printed: str) -> str:
    """The `serve` command `install` prints where no service manager answers."""
    lines = printed.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("Run the broker yourself"))
    return lines[at + 1].strip()


@needs_claude_in_tmux
def test_readme_one_machine_quick_start_as_written_gets_mail_live_in_a_clean_home(tmp_path):
    """README's one-machine path, line by line, in a clean HOME and a clone of this repository:
    build, `install`, the plugin from the clone, then `claude` with no flag and nothing in the
    environment, in a project of the user's. Mail sent from the shell reaches the model before
    anything is typed. Two
    departures, both README's own: no service manager answers here (no user bus is given), so
    the test runs the `serve` command `install` prints; and `--port` keeps off this machine's 8765."""
    lines = ONE_MACHINE.search((ROOT / "README.md").read_text()).group(1).strip().splitlines()
    start = re.fullmatch(r"cd ~/(\S+) && claude\b.*", lines[-1])
    assert start and any(line.endswith(" install") for line in lines), lines
    home, clone = tmp_path / "home", tmp_path / "dispatch"
    project = home / start.group(1)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    cs.prepare_home(home, project)
    path = f"{cs.python3_shim(tmp_path / 'bin', sys.executable)}{os.pathsep}{Path(CLAUDE).parent}{os.pathsep}" \
           f"{os.environ['PATH']}"
    env = {k: v for k, v in isolated_env(home, {"PATH": path, **INBOX_ENV}).items()
           if k not in ("XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS", "XDG_DATA_HOME")}
    port = free_port()
    broker = None
    try:
        for line in lines[:-1]:
            if line.endswith(" install"):
                printed = run_line(f"{line} --port {port}", clone, env)
                assert "Not started" in printed, f"install must not load a service on the test machine:\n{printed}"
                broker = subprocess.Popen(shlex.split(serve_line(printed)), env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
                wait_for(lambda: healthy(port), 60, interval=0.2, what="the installed broker's /healthz")
            else:
                run_line(line, clone, env)
        mailbox = SimpleNamespace(db=home / ".local" / "share" / "dispatch" / "dispatch.db")
        api = cs.MessagesStandIn()
        session = cs.ClaudeSession(home, project, [], api, {"PATH": path, **INBOX_ENV})
        session.env.pop("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", None)
        try:
            session.start()
            session.submit("first prompt")
            sys.path.insert(0, str(ROOT))
            import dispatch_plugin

            name = f"{dispatch_plugin.user_base()}-{session.session_id.replace('-', '')[:8]}"
            wait_for(lambda: db_query(mailbox, "SELECT 1 FROM participants WHERE name = ?", name), 30,
                     what=f"{name} known to the broker")
            body = f"dispatch-e2e-quick-start-{os.urandom(3).hex()}"
            run_line(f"python3 dispatch_plugin.py send --to {name} {body}", clone, env)
            check_live(session, mailbox, [body], "one machine")
        finally:
            session.close()
            api.close()
    finally:
        if broker:
            broker.terminate()
            broker.wait(10)


def healthy(port: int) -> bool:
    with contextlib.suppress(OSError):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
            return answer.status == 200
    return False
