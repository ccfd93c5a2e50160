"""What the plugin is made of and how it tells the mode a session is in.

It imports only the standard library, so it runs under `python3 -I -S` (no site-packages at
all). It reads the channel flag of the Claude Code process above it, to say truthfully in its
instructions and the SessionStart hook how mail will arrive; acks still wait for the transcript.
"""

import ast
import json
import os
import sys
import textwrap
import uuid

import pytest

from harness import PLUGIN, plugin_env, run_cli, wait_connected

sys.path.insert(0, str(PLUGIN.parent))
import dispatch_plugin  # noqa: E402


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
    return names


def test_the_plugin_imports_nothing_outside_the_standard_library():
    outside = {m for m in imported_modules(PLUGIN) if m not in sys.stdlib_module_names and m != "__future__"}
    assert outside == set()


def test_the_plugin_has_one_http_client_path():
    """Every connection to the broker is made by BrokerClient.connect; nothing uses urllib.request."""
    source = PLUGIN.read_text()
    assert "urllib.request" not in source and "urlopen" not in source
    tree = ast.parse(source)
    makers = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
              and any(isinstance(n, ast.Attribute) and n.attr in ("HTTPConnection", "HTTPSConnection")
                      for n in ast.walk(node))]
    assert [f.name for f in makers] == ["connect"]


def test_two_plugins_exchange_mail_under_python_without_site_packages(plugins, shared_broker):
    command = [sys.executable, "-I", "-S", str(PLUGIN)]
    a, b = (plugins(plugin_env(shared_broker, "test", f"test-bare{n}{os.urandom(2).hex()}"), command) for n in "ab")
    for p in (a, b):
        p.handshake()
        wait_connected(p)
    text, is_error = a.tool("send", to=b.env["DISPATCH_NAME"], body="no site-packages here")
    assert not is_error, text
    assert b.wait_channel(1)[0]["content"] == "no site-packages here"


# --------------------------------------------------------------------------------------------
# The channel flag, as Claude Code matches it
# --------------------------------------------------------------------------------------------

PLUGIN_ENV = {"CLAUDE_PLUGIN_ROOT": "/src/dispatch", "CLAUDE_PLUGIN_DATA": "/h/.claude/plugins/data/dispatch-team"}


@pytest.mark.parametrize("flags, on", [
    (["plugin:dispatch@team"], True),
    (["server:plugin:dispatch:dispatch"], True),
    (["plugin:dispatch@other"], False),  # Claude Code: "the installed plugin is dispatch@team"
    (["server:dispatch"], False),  # the form for `mcp add`: wrong for a plugin
    ([], False),
])
def test_a_plugin_install_is_named_by_plugin_at_its_marketplace_or_its_full_server_name(flags, on):
    assert dispatch_plugin.flags_name_us(flags, PLUGIN_ENV) is on


@pytest.mark.parametrize("flags, on", [(["server:dispatch"], True), (["server:other"], True),
                                       (["plugin:dispatch@team"], False), ([], False)])
def test_an_mcp_add_install_is_named_by_any_server_flag_since_it_cannot_know_its_name(flags, on):
    assert dispatch_plugin.flags_name_us(flags, {}) is on


def test_the_fix_names_the_flag_for_the_install():
    assert dispatch_plugin.channel_flag(PLUGIN_ENV).endswith("plugin:dispatch@team")
    assert dispatch_plugin.channel_flag({"CLAUDE_PLUGIN_ROOT": "/src/dispatch"}).endswith("plugin:dispatch@dispatch")
    assert "server:dispatch" in dispatch_plugin.channel_flag({})


def fake_claude(tmp_path, *flags: str):
    """A process named `claude` with Claude Code's flags, which runs a hook as Claude Code does
    (through `sh -c`), so the hook finds it among its ancestors."""
    script = tmp_path / "claude"
    script.write_text(textwrap.dedent(f"""\
        import subprocess, sys
        hook = {[sys.executable, str(PLUGIN), 'hook', 'session-start']!r}
        sys.exit(subprocess.run(["sh", "-c", " ".join(hook)]).returncode)
    """))
    return [sys.executable, str(script), *flags]


def session_start_under(command, env, session_id) -> str:
    import subprocess

    done = subprocess.run(command, env=env, input=json.dumps({"session_id": session_id}), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["hookSpecificOutput"]["additionalContext"]


INBOX = {"CLAUDE_CODE_MESSAGING_SOCKET": "/tmp/cc-socks/1.sock", "CLAUDE_CODE_MESSAGING_TOKEN": "t"}


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads the process tree from /proc")
@pytest.mark.parametrize("flags, extra, settings, expected", [
    (["--dangerously-load-development-channels", "plugin:dispatch@team"], INBOX, None,
     "live as channel events: Claude Code's channel flag names this server"),
    (["--dangerously-load-development-channels", "server:dispatch"], {}, None,
     "before your next prompt (the prompt hook), or when you call the `inbox` tool: Claude Code gave this session "
     "no inbox"),
    ([], {}, None, "before your next prompt (the prompt hook)"),
    ([], INBOX, None, "live through the session's inbox: no channel flag needed"),
    (["--dangerously-load-development-channels", "server:dispatch"], INBOX, None, "live through the session's inbox"),
    ([], INBOX, {"crossSessionInbound": "hold"},
     "before your next prompt (the prompt hook), or when you call the `inbox` tool: this session holds cross-session "
     "messages (`crossSessionInbound: hold`)"),
    ([], {**INBOX, "CLAUDE_CODE_HARBOR_KITE": "0"}, None,
     "Claude Code's session inbox is switched off (CLAUDE_CODE_HARBOR_KITE=0)"),
])
def test_session_start_says_which_way_mail_arrives_and_why(shared_broker, tmp_path, flags, extra, settings, expected):
    config = tmp_path / "claude-config"
    config.mkdir()
    if settings:
        (config / "settings.json").write_text(json.dumps(settings))
    env = {**plugin_env(shared_broker, "test"), **PLUGIN_ENV, **extra, "CLAUDE_CONFIG_DIR": str(config),
           "CLAUDE_PROJECT_DIR": str(tmp_path)}
    context = session_start_under(fake_claude(tmp_path, *flags), env, str(uuid.uuid4()))
    assert expected in context, context
    if "next prompt" in expected:
        assert "--dangerously-load-development-channels plugin:dispatch@team" in context


def test_session_start_outside_claude_code_describes_both_modes_with_the_real_source(shared_broker):
    env = {**plugin_env(shared_broker, "test"), **PLUGIN_ENV}
    done = run_cli(env, "hook", "session-start", input=json.dumps({"session_id": str(uuid.uuid4())}))
    context = json.loads(done.stdout)["hookSpecificOutput"]["additionalContext"]
    assert "live as channel events if Claude Code's channel flag names this server" in context, context


def test_hook_hints_name_a_command_that_exists_for_the_install(shared_broker):
    from harness import closed_url

    env = {**plugin_env(shared_broker, "test"), "DISPATCH_URL": closed_url()}
    hint = lambda e: json.loads(run_cli(e, "hook", "prompt-submit", input="{}").stdout)[  # noqa: E731
        "hookSpecificOutput"]["additionalContext"]
    assert "(run `/dispatch:doctor`)" in hint({**env, **PLUGIN_ENV})
    assert f"(run `python3 {PLUGIN} doctor`)" in hint(env)


def claude_around_the_channel(tmp_path, *flags: str) -> list[str]:
    """A process named `claude` with Claude Code's flags whose child is the channel, on its stdio."""
    script = tmp_path / "claude"
    script.write_text(f"import subprocess, sys\nsys.exit(subprocess.run([sys.executable, {str(PLUGIN)!r}]).returncode)\n")
    return [sys.executable, str(script), *flags]


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads the process tree from /proc")
def test_the_channel_does_not_listen_in_a_session_claude_code_keeps_no_transcript_of(plugins, shared_broker, tmp_path):
    name = f"test-ephemeral{os.urandom(2).hex()}"
    command = claude_around_the_channel(tmp_path, "--no-session-persistence",
                                        "--dangerously-load-development-channels", "server:dispatch")
    channel = plugins(plugin_env(shared_broker, "test", name), command)
    channel.handshake()
    text = wait_connected(channel)
    assert "--no-session-persistence" in text and "inbox` tool" in text, text
    sent = run_cli(plugin_env(shared_broker, "test", "test-towards"), "send", "--to", name, "kept for inbox")
    assert "queued" in sent.stdout.lower(), sent.stdout
    text, is_error = channel.tool("inbox")
    assert not is_error and "kept for inbox" in text and channel.channel == []


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads the process tree from /proc")
@pytest.mark.parametrize("flags, words", [
    (["--dangerously-load-development-channels", "server:dispatch"], 'arrives as <channel source="dispatch"'),
    ([], "reaches this session when you call the `inbox` tool"),
])
def test_the_instructions_say_how_mail_arrives_in_the_mode_claude_code_was_started_in(plugins, tmp_path, flags,
                                                                                     words):
    from test_plugin_channel import offline_env

    channel = plugins(offline_env(), claude_around_the_channel(tmp_path, *flags))
    assert words in channel.handshake()["instructions"]
