"""The broker's command line as an operator uses it: tokens, help, serve and its health probe."""

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import BROKER, MODERN, BrokerProcess, broker_module, free_port, http, peer, until_live, wait_for

dispatch_broker = broker_module()


@pytest.fixture(scope="module")
def added(tmp_path_factory):
    """`token add backend` run once in a fresh directory: (broker process handle, completed run).
    The tests using it only read the tokens file, or check that a failed command left it alone."""
    broker = BrokerProcess(tmp_path_factory.mktemp("cli"))
    return broker, broker.cli("token", "add", "backend", "--tokens", str(broker.tokens_file))


def test_token_add_prints_exactly_one_token_line_on_stdout(added):
    _, run = added

    [token] = run.stdout.splitlines()
    assert token.startswith("dsp_")
    assert dispatch_broker.TOKEN_RE.fullmatch(token)
    assert token not in run.stderr  # shown once, on stdout only


def test_tokens_file_holds_no_plaintext_and_is_owner_only(added):
    broker, run = added
    token = run.stdout.strip()

    text = broker.tokens_file.read_text()
    assert token not in text
    assert token[len("dsp_"):] not in text
    assert dispatch_broker.hash_token(token) in text
    assert stat.S_IMODE(broker.tokens_file.stat().st_mode) == 0o600


def test_token_list_shows_id_and_base_but_never_the_token(added):
    broker, run = added
    token_id = re.search(r"token (\S+) for base backend", run.stderr)[1]

    listing = broker.cli("token", "list", "--tokens", str(broker.tokens_file)).stdout

    assert [line.split()[:2] for line in listing.splitlines()] == [[token_id, "backend"]]
    assert run.stdout.strip() not in listing


def test_token_revoke_of_unknown_id_exits_1_with_error_line(added):
    broker, _ = added
    before = broker.tokens_file.read_text()

    run = broker.cli("token", "revoke", "deadbeef", "--tokens", str(broker.tokens_file), check=False)

    assert run.returncode == 1
    assert run.stderr.startswith("Error: ") and "deadbeef" in run.stderr
    assert "Traceback" not in run.stderr
    assert broker.tokens_file.read_text() == before


COMMANDS = ["", "serve", "token", "token add", "token list", "token revoke"]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c or "top-level")
def test_every_subcommand_help_exits_0(capsys, command):
    # In-process through main(), the console script's entry point: argparse exits from inside it.
    with pytest.raises(SystemExit) as exited:
        dispatch_broker.main([*command.split(), "--help"])

    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: dispatch-broker {command}".rstrip())


@pytest.mark.anyio
async def test_serve_exits_0_within_10s_of_sigterm_even_with_a_listen_open(broker):
    async with peer(broker, "test", "test-1", MODERN) as listener:
        listener.listen(300)
        await until_live(listener, "test-1")

        stopped = time.monotonic()
        broker.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(broker.proc.wait, 10)

    assert code == 0
    assert time.monotonic() - stopped < 10
    assert "dispatch broker stopped" in broker.logs()


def test_healthz_answers_200_json_with_version_and_uptime_without_auth(broker):
    status, headers, text = http(f"http://127.0.0.1:{broker.port}/healthz")

    assert status == 200
    assert headers["content-type"] == "application/json"
    health = json.loads(text)
    assert health["version"] == dispatch_broker.__version__
    assert isinstance(health["uptime"], (int, float)) and 0 <= health["uptime"] < 60  # seconds since this start


# -- settings from the environment, and the tokens file (issue 12) ---------------------------------


@pytest.mark.parametrize("variable, value", [("DISPATCH_SYNCHRONOUS", "OFF"), ("DISPATCH_PORT", "http"),
                                             ("DISPATCH_MAX_BODY", "-1"), ("DISPATCH_RATE", "fast"),
                                             ("DISPATCH_TTL", "forever")])
def test_serve_refuses_a_bad_environment_setting_at_start_and_names_it(tmp_path, variable, value):
    tokens = tmp_path / "tokens"
    dispatch_broker.mint_token(tokens, "backend")
    env = {**os.environ, variable: value}
    command = [sys.executable, str(BROKER), "serve", "--db", str(tmp_path / "db"), "--tokens", str(tokens)]
    if variable != "DISPATCH_PORT":
        command += ["--port", str(free_port())]
    try:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{variable}={value} was accepted: the broker started serving")

    assert run.returncode != 0
    assert f"{variable}={value!r}" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_serve_logs_the_durability_level_in_effect_at_start(broker):
    assert "durability: synchronous=FULL" in broker.logs()


def test_token_add_never_writes_through_a_planted_temp_file_link(tmp_path):
    tokens, victim = tmp_path / "tokens", tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "tokens.tmp").symlink_to(victim)

    dispatch_broker.main(["token", "add", "backend", "--tokens", str(tokens)])

    assert victim.read_text() == "precious\n"
    assert not tokens.is_symlink()
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert [t.base for t in dispatch_broker.read_tokens(tokens)] == ["backend"]


def test_token_add_leaves_the_tokens_file_owner_only_when_a_world_writable_temp_file_was_planted(tmp_path):
    tokens, planted = tmp_path / "tokens", tmp_path / "tokens.tmp"
    planted.write_text("# planted\n")
    planted.chmod(0o666)

    dispatch_broker.main(["token", "add", "backend", "--tokens", str(tokens)])

    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert [t.base for t in dispatch_broker.read_tokens(tokens)] == ["backend"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tokens") and p != planted] == ["tokens"]


def test_token_revoke_replaces_a_linked_tokens_file_instead_of_writing_the_links_target(tmp_path):
    real, link = tmp_path / "real-tokens", tmp_path / "tokens"
    dispatch_broker.mint_token(real, "backend")
    before = real.read_text()
    link.symlink_to(real)
    token = dispatch_broker.read_tokens(link)[0]

    dispatch_broker.main(["token", "revoke", token.id, "--tokens", str(link)])

    assert real.read_text() == before
    assert not link.is_symlink() and dispatch_broker.read_tokens(link) == []


# -- the mailbox's file modes (issue 21) ----------------------------------------------------------


def umask_022() -> None:
    os.umask(0o022)


@pytest.mark.parametrize("flags", [[], ["--dev"]], ids=["serve", "serve --dev"])
def test_serve_creates_the_mailbox_and_its_wal_files_owner_only_under_a_022_umask(tmp_path, flags):
    broker = BrokerProcess(tmp_path, extra=flags, preexec=umask_022)
    try:
        broker.start()
        files = [broker.db, Path(f"{broker.db}-wal"), Path(f"{broker.db}-shm")]
        wait_for(lambda: all(f.exists() for f in files), what="the mailbox, its -wal and -shm")
        modes = {f.name: oct(f.stat().st_mode & 0o777) for f in files}
    finally:
        broker.kill()
    assert modes == {f.name: "0o600" for f in files}


def test_serve_narrows_a_mailbox_an_older_broker_left_readable_to_others(tmp_path):
    broker = BrokerProcess(tmp_path, preexec=umask_022)
    for name in (broker.db, Path(f"{broker.db}-wal"), Path(f"{broker.db}-shm")):
        name.touch(mode=0o644)
    os.chmod(broker.db, 0o644)
    try:
        broker.start()
        modes = {f.name: oct(f.stat().st_mode & 0o777) for f in tmp_path.glob("dispatch.db*")}
    finally:
        broker.kill()
    assert modes == {"dispatch.db": "0o600", "dispatch.db-wal": "0o600", "dispatch.db-shm": "0o600"}
    assert "readable by others: now 0600" in broker.logs()
