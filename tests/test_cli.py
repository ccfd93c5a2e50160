"""The shell CLI (`dispatch_plugin.py send|who|inbox|ping|doctor`) against a live broker process."""

import contextlib
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from harness import NOT_A_BROKER, PLUGIN, BrokerProcess, closed_url, impostor, plugin_env, run_cli, unknown_token

sys.path.insert(0, str(PLUGIN.parent))
import dispatch_plugin  # noqa: E402


def ok(result) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "", result.stderr
    return result.stdout


def register(broker, name: str) -> dict[str, str]:
    """The environment of participant `name`, made known to the broker by one ping."""
    env = plugin_env(broker, "test", name)
    ok(run_cli(env, "ping"))
    return env


def test_send_queues_mail_that_inbox_prints_once_and_then_acks(shared_broker):
    reader = register(shared_broker, "test-reader")
    out = ok(run_cli(plugin_env(shared_broker, "test", "test-writer"), "send", "--to", "test-reader", "lunch at 1?"))
    assert out.startswith("Sent (queued).") and "chat_id test-writer~test-reader~" in out

    shown = ok(run_cli(reader, "inbox"))
    assert shown.startswith("1 of 1 waiting Dispatch message(s):")
    assert re.search(r"\[from=test-writer chat_id=test-writer~test-reader~\S+ message_id=m_[0-9a-f]+ sent_at=\S+\]\n"
                     r"lunch at 1\?\n", shown), shown
    assert ok(run_cli(reader, "inbox")) == "0 message(s) waiting for test-reader.\n"


def test_status_prints_what_became_of_each_message_sent_from_this_name(shared_broker):
    register(shared_broker, "test-statusreader")
    writer = plugin_env(shared_broker, "test", "test-statuswriter")
    out = ok(run_cli(writer, "send", "--to", "test-statusreader", "--wait", "5", "first\nof two"))
    assert "No live recipient to wait for." in out  # offline: answered at once, nothing to wait for
    chat_id = re.search(r"chat_id (\S+)\.", out)[1]
    ok(run_cli(writer, "send", "--to", "test-statusreader", "second"))

    shown = ok(run_cli(writer, "status"))
    assert shown.startswith("2 of your sent message(s), newest first:\n"), shown
    lines = shown.splitlines()[1:]
    assert lines[0].startswith("- to test-statusreader, sent ") and 'It began: "second"' in lines[0]
    assert "stored, waiting for the recipient to connect; expires " in lines[1] and 'It began: "first\\nof two"' in lines[1]
    assert ok(run_cli(writer, "status", "--chat-id", chat_id)).startswith("1 of your sent message(s)")
    assert ok(run_cli(writer, "status", "--last", "1")).count("\n- to ") == 1
    assert ok(run_cli(plugin_env(shared_broker, "test", "test-statusreader"), "status")).startswith("No sent")


def test_send_reads_the_body_from_stdin_when_it_is_a_dash(shared_broker):
    reader = register(shared_broker, "test-piped")
    body = "line one\nline two with 'quotes' and ünïcode"
    ok(run_cli(plugin_env(shared_broker, "test", "test-piper"), "send", "--to", "test-piped", "-", input=body))
    assert body in ok(run_cli(reader, "inbox"))


def test_inbox_peek_counts_waiting_mail_without_marking_it_read(shared_broker):
    reader = register(shared_broker, "test-peeker")
    sender = plugin_env(shared_broker, "test", "test-poker")
    for body in ("one", "two"):
        ok(run_cli(sender, "send", "--to", "test-peeker", body))
    for _ in range(2):
        assert ok(run_cli(reader, "inbox", "--peek")) == "2 message(s) waiting for test-peeker.\n"
    assert ok(run_cli(reader, "inbox")).startswith("2 of 2 waiting")


def test_who_lists_participants_marks_you_and_counts_your_unread_mail(shared_broker):
    register(shared_broker, "test-absent")
    me = plugin_env(shared_broker, "test", "test-asker")
    ok(run_cli(me, "send", "--to", "test-absent", "are you there?"))
    out = ok(run_cli(me, "who"))
    assert re.match(r"\d+ participant\(s\):\n", out)
    assert re.search(r"^- test-asker \(you\): ", out, re.M), out
    assert re.search(r"^- test-absent: offline \(last seen \S+\), 1 of your messages unread$", out, re.M), out


def test_ping_prints_the_name_the_broker_time_and_waiting_mail(shared_broker):
    out = ok(run_cli(plugin_env(shared_broker, "test", "test-pinger"), "ping"))
    assert re.fullmatch(rf"Connected to {re.escape(shared_broker.url)} as test-pinger \(base test\); broker time "
                        r"\d{4}-\d\d-\d\dT\S+; 0 message\(s\) waiting for you\.\n", out), out


def test_doctor_passes_every_check_against_a_live_broker(shared_broker):
    out = ok(run_cli(plugin_env(shared_broker, "test", "test-doc"), "doctor"))
    lines = out.splitlines()
    assert all(line.startswith("✔ ") for line in lines), out
    checks = [line.split(":")[0] for line in lines]
    assert checks == ["✔ configuration", "✔ token and name", "✔ DNS 127.0.0.1", "✔ TCP 127.0.0.1",
                      "✔ broker /healthz", "✔ auth and identify as test-doc", "✔ round trip self → broker → self",
                      "✔ how mail reaches this session"]
    assert "--dangerously-load-development-channels server:dispatch" in lines[-1] and "inbox" in lines[-1], \
        "outside Claude Code: the ways"
    assert ok(run_cli(plugin_env(shared_broker, "test", "test-doc"), "inbox", "--peek")).startswith("0 "), \
        "doctor's round trip must leave no mail behind"


@pytest.mark.parametrize("setting, value, failing", [
    ("DISPATCH_TOKEN", unknown_token("test"), "auth and identify"),
    ("DISPATCH_TOKEN", "dsp_test_not-a-token", "token and name"),
    ("DISPATCH_URL", closed_url(), "TCP 127.0.0.1"),
], ids=["token unknown", "token malformed", "broker down"])
def test_doctor_prints_a_cross_and_a_fix_and_exits_1_when_the_token_is_wrong_or_the_broker_down(
        shared_broker, setting, value, failing):
    result = run_cli({**plugin_env(shared_broker, "test", "test-doc2"), setting: value}, "doctor")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    crossed = [i for i, line in enumerate(lines) if line.startswith("✘ ")]
    assert len(crossed) == 1 and lines[crossed[0]].startswith(f"✘ {failing}"), result.stdout
    assert lines[crossed[0] + 1].strip().startswith("fix: "), result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_doctor_says_which_setting_is_missing_when_nothing_is_configured(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "CLAUDE_"))}
    result = run_cli({**env, "XDG_CONFIG_HOME": str(tmp_path)}, "doctor")
    assert result.returncode == 1
    assert result.stdout.startswith("✘ configuration: DISPATCH_URL is not set, nor the plugin's url option, nor url "
                                    "in config.toml\n    fix: ")


@pytest.fixture
def nothing_configured(tmp_path, monkeypatch):
    """The doctor in this process with no settings anywhere, and the plugin run from an empty
    directory (no broker file, no checkout) with no `dispatch-broker` on PATH."""
    for name in list(os.environ):
        if name.startswith(("DISPATCH_", "CLAUDE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))  # no broker `install` set up
    monkeypatch.setenv("CLAUDE_PLUGIN_ROOT", str(tmp_path / "plugin"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    (tmp_path / "plugin").mkdir()
    return tmp_path / "plugin"


def doctor_fix(capsys) -> tuple[str, str]:
    """(the ✘ line, its fix) of a doctor run in this process that fails at its first check."""
    assert dispatch_plugin.Doctor().run() == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("✘ ") and lines[1].startswith("    fix: "), lines
    return lines[0], lines[1].removeprefix("    fix: ")


@pytest.mark.parametrize("layout", ["broker file in dist", "checkout"])
def test_doctor_says_the_install_command_for_this_machine_when_nothing_is_configured_and_no_broker_answers(
        nothing_configured, monkeypatch, capsys, layout):
    import platform

    monkeypatch.setattr(dispatch_plugin, "LOCAL_BROKER_URL", closed_url())
    here = dispatch_plugin.BROKER_PLATFORMS[(sys.platform, platform.machine().lower())]
    program = nothing_configured / ("dist" if layout != "checkout" else "") / \
        (f"broker-{here}.pyz" if layout != "checkout" else "dispatch_broker.py")
    program.parent.mkdir(exist_ok=True)
    program.write_text("")
    line, fix = doctor_fix(capsys)
    assert line.startswith("✘ configuration: DISPATCH_URL is not set"), line
    assert f"no broker answers on {closed_url()}: install one on this machine with `python3 {program} install`" in fix
    assert f"a token for base {dispatch_plugin.user_base()}" in fix and "--config url=… --config token=…" in fix, fix


def test_doctor_says_which_token_command_to_run_when_a_broker_here_answers_but_no_token_is_set(
        nothing_configured, shared_broker, monkeypatch, capsys):
    monkeypatch.setattr(dispatch_plugin, "LOCAL_BROKER_URL", shared_broker.url)
    (nothing_configured / "dist").mkdir()
    (nothing_configured / "dist" / "broker.pyz").write_text("")  # not this machine's name: not taken
    (nothing_configured / "dispatch_broker.py").write_text("")
    monkeypatch.setenv("DISPATCH_URL", shared_broker.url)
    line, fix = doctor_fix(capsys)
    assert line.startswith("✘ configuration: neither DISPATCH_TOKEN nor DISPATCH_TOKEN_COMMAND is set"), line
    assert fix.startswith(f"a broker answers on {shared_broker.url} (version "), fix
    assert f"`python3 {nothing_configured / 'dispatch_broker.py'} token add {dispatch_plugin.user_base()} " \
           f"--tokens FILE`" in fix, fix


def test_doctor_says_to_run_install_again_when_the_broker_here_is_one_install_set_up(
        nothing_configured, shared_broker, monkeypatch, capsys):
    monkeypatch.setattr(dispatch_plugin, "LOCAL_BROKER_URL", shared_broker.url)
    (nothing_configured / "dispatch_broker.py").write_text("")
    tokens = Path(dispatch_plugin.installed_tokens())
    tokens.parent.mkdir(parents=True)
    tokens.write_text("")
    monkeypatch.setenv("DISPATCH_URL", shared_broker.url)
    line, fix = doctor_fix(capsys)
    assert line.startswith("✘ configuration: neither DISPATCH_TOKEN nor DISPATCH_TOKEN_COMMAND is set"), line
    assert f"run `python3 {nothing_configured / 'dispatch_broker.py'} install` again: it mints a token for base " \
           f"{dispatch_plugin.user_base()}" in fix, fix


def test_doctor_says_which_token_command_to_run_when_a_broker_here_refuses_the_token(shared_broker):
    result = run_cli({**plugin_env(shared_broker, "test", "test-doc3"), "DISPATCH_TOKEN": unknown_token("test")},
                     "doctor")
    lines = result.stdout.splitlines()
    [at] = [i for i, line in enumerate(lines) if line.startswith("✘ auth and identify as test-doc3")]
    assert " token add test --tokens FILE`" in lines[at + 1] and "SIGHUP" in lines[at + 1], result.stdout


def subcommands() -> list[list[str]]:
    """Every command path of the CLI's parser, found by walking it: [], [send], …, [hook, prompt-submit]."""
    def walk(p, path):
        found = [path]
        for action in p._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, child in action.choices.items():
                    found += walk(child, [*path, name])
        return found
    return walk(dispatch_plugin.parser(), [])


@pytest.mark.parametrize("command", subcommands(), ids=lambda c: " ".join(c) or "dispatch")
def test_every_subcommand_help_exits_0(command):
    result = run_cli(dict(os.environ), *command, "--help", timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("usage: "), result.stderr
    assert result.stderr == ""


def test_the_cli_has_the_documented_subcommands():
    assert sorted(" ".join(c) for c in subcommands()) == sorted([
        "", "send", "status", "who", "inbox", "ping", "doctor", "hook", "hook session-start", "hook prompt-submit"])


ERRORS = {
    "no url": ({"DISPATCH_URL": None}, ["ping"], "no broker URL: set DISPATCH_URL"),
    "url not http": ({"DISPATCH_URL": "file:///tmp/x"}, ["ping"], "DISPATCH_URL must be an http(s) URL"),
    "broker down": ({"DISPATCH_URL": closed_url()}, ["who"], "cannot reach http://127.0.0.1:"),
    "malformed token": ({"DISPATCH_TOKEN": "hunter2"}, ["ping"], "is not a Dispatch token"),
    "token refused": ({"DISPATCH_TOKEN": unknown_token("test")}, ["inbox"], "the broker refused the token"),
    "token command fails": ({"DISPATCH_TOKEN": None, "DISPATCH_TOKEN_COMMAND": "echo nope >&2; exit 3"}, ["ping"],
                            "DISPATCH_TOKEN_COMMAND failed (exit 3): nope"),
    "name refused": ({"DISPATCH_NAME": "other-x"}, ["ping"], "the broker refused the name 'other-x'"),
    "bad name": ({"DISPATCH_NAME": "Not A Name"}, ["ping"], "bad participant name 'Not A Name'"),
    "unknown recipient": ({}, ["send", "--to", "test-nobody", "hi"], "unknown recipient 'test-nobody'"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_print_one_error_line_and_exit_1_without_a_traceback(shared_broker, case):
    changes, args, expected = ERRORS[case]
    env = plugin_env(shared_broker, "test", "test-erring")
    for key, value in changes.items():
        env.pop(key) if value is None else env.__setitem__(key, value)
    result = run_cli(env, *args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: ") and expected in line, line


@pytest.mark.parametrize("answer", NOT_A_BROKER)
def test_errors_print_one_error_line_when_dispatch_url_is_not_a_broker(answer):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "CLAUDE_"))}
    with impostor(NOT_A_BROKER[answer]) as url:
        result = run_cli({**env, "DISPATCH_URL": url, "DISPATCH_TOKEN": unknown_token("test")}, "ping")
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: ") and url in line and "broker's /mcp URL?" in line, line


def test_the_token_can_come_from_dispatch_token_command(shared_broker):
    env = plugin_env(shared_broker, "test", "test-commanded")
    env["DISPATCH_TOKEN_COMMAND"] = f"echo {env.pop('DISPATCH_TOKEN')}"
    assert "as test-commanded " in ok(run_cli(env, "ping"))


def test_settings_come_from_config_toml_and_the_environment_wins(shared_broker, tmp_path):
    (tmp_path / "dispatch").mkdir()
    (tmp_path / "dispatch" / "config.toml").write_text(
        f'url = "{shared_broker.url}"\ntoken = "{shared_broker.token("test")}"\nname = "test-fromfile"\n')
    (tmp_path / "dispatch" / "config.toml").chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "CLAUDE_"))}
    env["XDG_CONFIG_HOME"] = str(tmp_path)
    assert "as test-fromfile " in ok(run_cli(env, "ping"))
    assert "as test-fromenv " in ok(run_cli({**env, "DISPATCH_NAME": "test-fromenv"}, "ping"))


def test_default_name_without_a_session_id_is_stable_so_replies_wait_in_its_inbox(shared_broker):
    shell = plugin_env(shared_broker, "test")  # no DISPATCH_NAME, no CLAUDE_CODE_SESSION_ID
    names = {re.search(r" as (\S+) ", ok(run_cli(shell, "ping")))[1] for _ in range(2)}
    [name] = names
    assert re.fullmatch(r"test-[0-9a-f]{8}", name)
    ok(run_cli(plugin_env(shared_broker, "test", "test-peer"), "send", "--to", name, "got your note"))
    assert "got your note" in ok(run_cli(shell, "inbox"))


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_a_config_toml_holding_a_token_that_others_can_read_is_refused_like_an_ssh_key(shared_broker, tmp_path, mode):
    config = tmp_path / "dispatch" / "config.toml"
    config.parent.mkdir()
    config.write_text(f'url = "{shared_broker.url}"\ntoken = "{shared_broker.token("test")}"\n')
    config.chmod(mode)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "CLAUDE_"))}
    result = run_cli({**env, "XDG_CONFIG_HOME": str(tmp_path)}, "ping")
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "can be read by other users" in line and f"chmod 600 {config}" in line, line


def test_a_config_toml_without_a_token_may_be_readable_by_others(shared_broker, tmp_path):
    config = tmp_path / "dispatch" / "config.toml"
    config.parent.mkdir()
    config.write_text(f'url = "{shared_broker.url}"\nname = "test-public"\n')
    config.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "CLAUDE_"))}
    env.update(XDG_CONFIG_HOME=str(tmp_path), DISPATCH_TOKEN=shared_broker.token("test"))
    assert "as test-public " in ok(run_cli(env, "ping"))


#: What a server answers that wants a token it did not get.
UNAUTHORIZED = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("file_mode, dir_mode, writable", [
    (0o666, 0o755, "file"), (0o620, 0o755, "file"), (0o600, 0o777, "directory"), (0o600, 0o775, "directory"),
], ids=["file 666", "file 620", "directory 777", "directory 775"])
def test_a_config_toml_others_can_write_is_refused_before_its_token_command_runs_or_its_url_is_called(
        tmp_path, file_mode, dir_mode, writable):
    config = tmp_path / "dispatch" / "config.toml"
    config.parent.mkdir()
    ran = tmp_path / "token-command-ran"
    requests: list[bytes] = []
    with impostor(UNAUTHORIZED, requests) as url:
        # No token in it: the token comes from the environment, and token_command is a planted one.
        config.write_text(f'url = "{url}"\ntoken_command = "touch {ran}; echo {unknown_token("test")}"\n')
        config.chmod(file_mode)
        config.parent.chmod(dir_mode)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "CLAUDE_"))}
        secret = unknown_token("test")
        result = run_cli({**env, "XDG_CONFIG_HOME": str(tmp_path), "DISPATCH_TOKEN": secret}, "ping")
        doctor = run_cli({**env, "XDG_CONFIG_HOME": str(tmp_path)}, "doctor")
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.splitlines()
    where = config if writable == "file" else config.parent
    assert "can be written by other users" in line and f"chmod go-w {where}`" in line, line
    assert not ran.exists(), "token_command ran"
    assert requests == [], "the config's url was called"
    assert doctor.returncode == 1 and doctor.stdout.startswith("✘ configuration: ") \
        and f"chmod go-w {where}`" in doctor.stdout, doctor.stdout


def test_inbox_in_a_terminal_shows_control_characters_escaped(shared_broker):
    reader = register(shared_broker, "test-terminal")
    body = "\x1b[2J\x1b]0;owned\x07\x1b]52;c;aGk=\x07 tab\tand\u202edone"
    ok(run_cli(plugin_env(shared_broker, "test", "test-escaper"), "send", "--to", "test-terminal", body))
    shown = ok(run_cli(reader, "inbox"))
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]", shown), repr(shown)
    assert "\\x1b[2J\\x1b]0;owned\\x07\\x1b]52;c;aGk=\\x07 tab\tand\\u202edone" in shown


def test_a_redirect_is_not_followed_so_the_token_goes_nowhere_else(shared_broker):
    elsewhere = socket.create_server(("127.0.0.1", 0))
    elsewhere.settimeout(0.5)
    target = f"http://127.0.0.1:{elsewhere.getsockname()[1]}/mcp"
    answer = f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n".encode()
    env = plugin_env(shared_broker, "test", "test-redirected")
    try:
        with impostor(answer) as url:
            result = run_cli({**env, "DISPATCH_URL": url}, "ping")
        with pytest.raises(TimeoutError):
            elsewhere.accept()  # nobody came
    finally:
        elsewhere.close()
    assert result.returncode == 1
    assert "follows no redirects" in result.stderr and target in result.stderr, result.stderr


#: What a hostile broker puts in everything it says: clear screen, set the title, write the
#: clipboard (OSC 52), a C1 CSI, a carriage return and a right-to-left override.
HOSTILE = "\x1b[2J\x1b]0;owned\x07\x1b]52;c;aGk=\x07\x9b31m\rover\u202e"
#: A Location header can carry only Latin-1 bytes: ESC and BEL are among them.
HOSTILE_HEADER = "http://127.0.0.1:1/\x1b[2J\x1b]0;owned\x07"
#: Bytes no terminal should get from the CLI: C0 and C1 controls but newline and tab.
RAW_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]")


class HostileBroker:
    """A loopback server speaking just enough of the broker's protocol to be believed, which puts
    escape sequences in whatever it says, in one way (`mode`): 'answers' (names, times, the send
    text and /healthz's version), 'tool error', 'rpc error' (a JSON-RPC error), 'http 500' (in
    the body), 'redirect' (in the Location). identify succeeds except in 'rpc error' and 'redirect'."""

    def __init__(self, mode: str):
        import http.server

        self.mode = mode
        hostile = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.reply(200, {"status": "ok", "version": HOSTILE, "uptime": HOSTILE})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                tool = request["params"].get("name")
                if hostile.mode == "http 500":
                    return self.reply(500, None, HOSTILE.encode())
                if hostile.mode == "redirect":
                    self.send_response(307)
                    self.send_header("Location", HOSTILE_HEADER)
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                if hostile.mode == "rpc error":
                    return self.reply(200, {"jsonrpc": "2.0", "id": request["id"],
                                            "error": {"code": -32000, "message": HOSTILE}})
                if hostile.mode == "tool error" and tool != "identify":
                    result = {"content": [{"type": "text", "text": HOSTILE}], "isError": True}
                else:
                    result = {"content": [{"type": "text", "text": HOSTILE}], "isError": False,
                              "structuredContent": ANSWERS.get(tool, {})}
                self.reply(200, {"jsonrpc": "2.0", "id": request["id"], "result": result})

            def reply(self, status, message, raw=None):
                body = raw if raw is not None else json.dumps(message).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mcp"

    def __enter__(self) -> "HostileBroker":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


#: The structured answers of the 'answers' mode: every string the CLI prints is hostile.
ANSWERS = {
    "identify": {"name": "test-target"},
    "who": {"participants": [{"name": HOSTILE, "live": False, "last_seen": HOSTILE, "pending_for_you": HOSTILE}]},
    "ping": {"name": HOSTILE, "base": HOSTILE, "server_time": HOSTILE, "pending": HOSTILE},
    "send": {"delivered_to": [HOSTILE], "queued": [], "dropped": [], "chat_id": HOSTILE},
    "inbox": {"messages": [{"id": "m_0123456789abcdef", "chat_id": HOSTILE, "from": HOSTILE, "sent_at": HOSTILE,
                            "body": HOSTILE, "attempt": 0}], "pending": HOSTILE},
    "mail.ack": {"acked": 1},
}

#: Each command's run against each mode. `send` under 'http 500' is left out: it retries for
#: SEND_RETRY_SECONDS before it reports the same error through the same print as the others.
HOSTILE_RUNS = [(mode, command) for mode in ("answers", "tool error", "rpc error", "http 500", "redirect")
                for command in (["who"], ["ping"], ["send", "--to", "test-x", "hi"], ["inbox"], ["doctor"])
                if not (mode == "http 500" and command[0] == "send")]


@pytest.mark.parametrize("mode, command", HOSTILE_RUNS, ids=[f"{m}: {c[0]}" for m, c in HOSTILE_RUNS])
def test_the_cli_prints_a_hostile_brokers_escape_sequences_escaped(mode, command):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "CLAUDE_"))}
    with HostileBroker(mode) as broker:
        env.update(DISPATCH_URL=broker.url, DISPATCH_TOKEN=unknown_token("test"), DISPATCH_NAME="test-target")
        result = subprocess.run([sys.executable, str(PLUGIN), *command], env=env, capture_output=True, timeout=60)
    out = result.stdout + result.stderr
    assert "Traceback" not in out.decode(errors="replace"), out
    assert not RAW_CONTROL.search(out), out
    assert b"\\x1b[2J\\x1b]0;owned\\x07" in out, out  # shown, escaped


# --------------------------------------------------------------------------------------------
# HTTPS: a broker with a certificate of its own CA, directly and through HTTPS_PROXY
# --------------------------------------------------------------------------------------------


def self_signed(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, made with `cryptography` (the broker's SDK has it)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dispatch test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


class TlsBroker(BrokerProcess):
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/mcp"

    def healthy(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"broker exited with {self.proc.returncode}: {self.logs()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    work = tmp_path_factory.mktemp("tls-broker")
    cert, key = self_signed(work)
    broker = TlsBroker(work, extra=["--tls-cert", cert, "--tls-key", key]).start()
    broker.cert = cert
    yield broker
    broker.kill()


def test_doctor_shows_the_tls_version_against_a_broker_whose_ca_is_in_ssl_cert_file(tls_broker):
    out = ok(run_cli({**plugin_env(tls_broker, "test", "test-tls"), "SSL_CERT_FILE": tls_broker.cert}, "doctor"))
    [tls] = [line for line in out.splitlines() if line.startswith("✔ TLS")]
    assert re.match(r"✔ TLS: TLSv1\.[23], certificate valid until \w", tls), tls


def test_doctor_names_ssl_cert_file_when_the_brokers_certificate_is_not_trusted(tls_broker):
    result = run_cli(plugin_env(tls_broker, "test", "test-tls"), "doctor")
    assert result.returncode == 1
    assert "✘ TLS" in result.stdout and "SSL_CERT_FILE" in result.stdout, result.stdout


class ConnectProxy:
    """An HTTPS_PROXY of the test's own: answers CONNECT and pipes bytes; counts its tunnels."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.tunnels = 0
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self.tunnel, args=(client,), daemon=True).start()

    def tunnel(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                head += client.recv(4096)
            host, port = head.split()[1].decode().rsplit(":", 1)
            with socket.create_connection((host, int(port))) as upstream:
                self.tunnels += 1
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
                pipe(client, upstream)

    def close(self) -> None:
        self.server.close()


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def test_https_goes_through_https_proxy_unless_no_proxy_names_the_host(tls_broker):
    proxy = ConnectProxy()
    env = {**plugin_env(tls_broker, "test", "test-proxied"), "SSL_CERT_FILE": tls_broker.cert,
           "HTTPS_PROXY": proxy.url}
    try:
        assert "as test-proxied " in ok(run_cli(env, "ping"))
        assert proxy.tunnels >= 1
        before = proxy.tunnels
        assert "as test-proxied " in ok(run_cli({**env, "NO_PROXY": "localhost,127.0.0.1"}, "ping"))
        assert proxy.tunnels == before
    finally:
        proxy.close()
