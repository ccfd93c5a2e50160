"""`install` and `uninstall`: the broker as one user's service, and the plugin pointed at it.

No service manager is touched: each install here runs with --files-only, without systemctl or
launchctl on PATH, or in process with no manager, under a HOME of the test's own. The unit and
the agent it writes are parsed (as tests/test_service.py and tests/test_launchd.py parse the
repository's) and their command is run by hand; then the plugin, given nothing but that HOME,
reaches the broker through the config.toml install wrote.
"""

import os
import plistlib
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import dispatch_broker
from dispatch_broker import Layout
from harness import BROKER, PLUGIN, free_port
from test_launchd import agent, filled_in
from test_service import (UNIT, expand_specifiers, expand_variables, get_healthz, read_service_section, systemd_analyze,
                          tail, wait_until)

USER = "tester"
#: The broker's first start from a zipapp unpacks it into PEX_ROOT.
START_TIMEOUT = 60.0


@pytest.fixture
def home(tmp_path) -> Path:
    home = tmp_path / "home" / USER
    home.mkdir(parents=True)
    return home


def user_env(home: Path, path: str | None = None) -> dict[str, str]:
    """A login's environment: HOME and the user, no XDG_* (so their defaults) and no DISPATCH_*."""
    return {"HOME": str(home), "USER": USER, "LOGNAME": USER, "LANG": "C.UTF-8",
            "PATH": os.environ["PATH"] if path is None else path}


def run_install(home: Path, *args: str, command: str = "install", broker: Path = BROKER,
                path: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(broker), command, *args], env=user_env(home, path), cwd=home,
                          capture_output=True, text=True, timeout=120)


def installed(home: Path, *args: str, **kwargs) -> str:
    """stdout of an install that must succeed."""
    done = run_install(home, "--files-only", *args, **kwargs)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def files_under(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file: (content, mode, mtime_ns), to see that nothing was written again."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def config_of(home: Path) -> dict:
    import tomllib

    return tomllib.loads((home / ".config" / "dispatch" / "config.toml").read_text())


def plugin_ping(home: Path) -> subprocess.CompletedProcess:
    """The plugin's `ping` with nothing but HOME: its configuration can come only from config.toml."""
    return subprocess.run([sys.executable, str(PLUGIN), "ping"], env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)


def serve_by_hand(argv: list[str], env: dict[str, str], cwd: Path, log: Path, port: int, home: Path) -> None:
    """Run a service's command as its manager would, check the plugin reaches it, stop it with SIGTERM."""
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=out, start_new_session=True)
    try:
        wait_until(lambda: get_healthz(port), START_TIMEOUT, "GET /healthz to answer 200", proc, log)
        pinged = plugin_ping(home)
        assert pinged.returncode == 0, pinged.stdout + pinged.stderr
        assert f"http://127.0.0.1:{port}/mcp as {USER}-" in pinged.stdout, pinged.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, tail(log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# What it writes runs
# ---------------------------------------------------------------------------------------------


def test_install_from_a_zipapp_writes_a_user_unit_whose_execstart_serves_the_plugin_it_configured(dist, home):
    port = free_port()
    installed(home, "--port", str(port), broker=dist.broker)
    data = home / ".local" / "share" / "dispatch"
    assert (data / "broker.pyz").read_bytes() == dist.broker.read_bytes()
    unit = home / ".config" / "systemd" / "user" / "dispatch.service"
    service = read_service_section(unit)
    # What the user's systemd gives a service: its own few variables, then the unit's.
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "USER": USER, "LANG": "C.UTF-8"}
    for line in service["Environment"]:
        for assignment in shlex.split(expand_specifiers(line, {"%": "%"})):
            name, _, value = assignment.partition("=")
            env[name] = value
    assert env["DISPATCH_HOST"] == "127.0.0.1" and env["DISPATCH_PORT"] == str(port)
    assert env["DISPATCH_DB"] == str(data / "dispatch.db") and env["DISPATCH_TOKENS"] == str(data / "tokens")
    (exec_start,) = service["ExecStart"]
    argv = expand_variables(shlex.split(expand_specifiers(exec_start, {"%": "%"})), env)
    assert argv[1:] == [str(data / "broker.pyz"), "serve"]
    assert Path(argv[0]).is_absolute() and os.access(argv[0], os.X_OK), "the unit runs no interpreter that is there"

    serve_by_hand(argv, env, home, home / "broker.log", port, home)
    assert (data / "dispatch.db").exists()
    assert os.listdir(env["PEX_ROOT"]), "the zipapp did not unpack into the PEX_ROOT uninstall removes"


def test_install_from_the_module_writes_a_launchd_agent_whose_program_serves_the_plugin_it_configured(
        home, monkeypatch, capsys):
    port = free_port()
    layout = Layout.for_user("darwin", user_env(home))
    dispatch_broker.install(layout, None, "--files-only", USER, port, force=False)
    assert "Not started: --files-only" in capsys.readouterr().out
    with layout.service.open("rb") as f:
        plist = plistlib.load(f)
    assert layout.service == home / "Library" / "LaunchAgents" / "net.dispatch.broker.plist"
    assert plist["ProgramArguments"] == [sys.executable, str(layout.data / "dispatch_broker.py"), "serve"]
    env = {**plist["EnvironmentVariables"], "HOME": str(home)}  # launchd gives an agent little else
    log = Path(plist["StandardOutPath"])
    assert log.parent.is_dir(), "launchd does not make the log's directory: install must"
    serve_by_hand(plist["ProgramArguments"], env, Path(plist["WorkingDirectory"]), log, port, home)
    assert log.read_text().strip(), "nothing logged"


def test_the_launchd_agent_is_the_repositorys_plist_with_this_users_paths_and_interpreter(home):
    layout = Layout.for_user("darwin", user_env(home))
    python = Path("/opt/py/bin/python3")
    written = plistlib.loads(dispatch_broker.launchd_agent(layout, layout.data / "broker.pyz", python, 8765))
    template = filled_in(agent(), home)
    assert written["ProgramArguments"] == [str(python), *template["ProgramArguments"][2:]]
    # The template finds python3 on PATH; the written agent names the interpreter that ran install.
    assert written["EnvironmentVariables"] == {k: v for k, v in template["EnvironmentVariables"].items() if k != "PATH"}
    for key in template.keys() - {"ProgramArguments", "EnvironmentVariables"}:
        assert written[key] == template[key], key
    assert written.keys() == template.keys()


def test_the_user_unit_has_dispatch_services_settings_that_a_users_systemd_can_apply(home):
    layout = Layout.for_user("linux", user_env(home))
    layout.service.parent.mkdir(parents=True)
    layout.service.write_text(dispatch_broker.user_unit(layout, layout.data / "broker.pyz", Path(sys.executable), 8765))
    user, system = read_service_section(layout.service), read_service_section(UNIT)
    for key in user.keys() - {"Environment", "ExecStart"}:
        assert user[key] == system.get(key), f"{key}: the user unit has {user[key]}, dispatch.service {system.get(key)}"
    for needs_namespaces in ("ProtectHome", "PrivateDevices", "PrivateUsers", "ProtectSystem", "DynamicUser"):
        assert needs_namespaces not in user, f"{needs_namespaces}= stops a user unit where user namespaces are off"


def test_the_user_unit_verifies_clean(home, tmp_path, monkeypatch):
    layout = Layout.for_user("linux", user_env(home))
    layout.service.parent.mkdir(parents=True)
    layout.data.mkdir(parents=True)
    (layout.data / "broker.pyz").touch()
    layout.service.write_text(dispatch_broker.user_unit(layout, layout.data / "broker.pyz", Path(sys.executable), 8765))
    runtime = tmp_path / "run"  # systemd-analyze --user wants a runtime directory, even offline
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    result = systemd_analyze("--user", "verify", str(layout.service))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output


# ---------------------------------------------------------------------------------------------
# Again, --force, someone else's config.toml, no service manager
# ---------------------------------------------------------------------------------------------


def test_install_twice_changes_nothing_and_keeps_the_token_and_the_mailbox(home):
    installed(home)
    mailbox = home / ".local" / "share" / "dispatch" / "dispatch.db"
    mailbox.write_bytes(b"stand-in mailbox")
    before = files_under(home)
    again = installed(home)
    assert "Nothing changed." in again and "(kept)" in again
    assert files_under(home) == before


def test_install_force_mints_a_new_token_and_revokes_the_one_config_toml_held(home):
    installed(home)
    old = config_of(home)["token"]
    forced = installed(home, "--force")
    new = config_of(home)["token"]
    assert new != old and "minted" in forced and "revoked" in forced
    tokens = home / ".local" / "share" / "dispatch" / "tokens"
    assert dispatch_broker.listed_token(tokens, new) and not dispatch_broker.listed_token(tokens, old)
    assert len(dispatch_broker.read_tokens(tokens)) == 1


def test_install_refuses_to_replace_a_config_toml_that_points_elsewhere_unless_forced(home):
    config = home / ".config" / "dispatch" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('url = "https://dispatch.example.net:8765/mcp"\ntoken_command = "pass show dispatch"\n')
    refused = run_install(home, "--files-only")
    assert refused.returncode == 1 and "--force" in refused.stderr and "dispatch.example.net" in refused.stderr
    assert not (home / ".local").exists(), "a refused install wrote something"
    installed(home, "--force")
    assert config_of(home)["url"] == f"http://127.0.0.1:{dispatch_broker.DEFAULT_PORT}/mcp"
    assert config.stat().st_mode & 0o777 == 0o600


def test_install_without_a_service_manager_says_so_writes_everything_and_prints_the_serve_command(home, tmp_path):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    done = run_install(home, path=str(empty))  # no systemctl, no launchctl
    assert done.returncode == 0, done.stderr
    assert "Not started: no " in done.stdout
    data = home / ".local" / "share" / "dispatch"
    serve = shlex.join([sys.executable, str(data / "dispatch_broker.py"), "serve", "--port", "8765",
                        "--db", str(data / "dispatch.db"), "--tokens", str(data / "tokens")])
    assert f"  {serve}\n" in done.stdout
    assert dispatch_broker.listed_token(data / "tokens", config_of(home)["token"])
    assert dispatch_broker.CLAUDE_LINE in done.stdout


def test_default_base_is_the_user_name_in_lower_case_letters_and_digits(monkeypatch):
    monkeypatch.setattr(dispatch_broker.getpass, "getuser", lambda: "John.Doe-2")
    assert dispatch_broker.default_base() == "johndoe2"


# ---------------------------------------------------------------------------------------------
# Uninstall
# ---------------------------------------------------------------------------------------------


def test_uninstall_removes_what_install_wrote_revokes_its_token_and_keeps_the_mailbox(home):
    installed(home)
    data = home / ".local" / "share" / "dispatch"
    token = config_of(home)["token"]
    (data / "dispatch.db").write_bytes(b"stand-in mailbox")
    done = run_install(home, "--files-only", command="uninstall")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in data.iterdir()) == ["dispatch.db", "tokens"]
    assert not dispatch_broker.listed_token(data / "tokens", token)
    assert not (home / ".config" / "dispatch").exists()
    assert not (home / ".config" / "systemd" / "user" / "dispatch.service").exists()
    assert "kept" in done.stdout and "--purge" in done.stdout

    purged = run_install(home, "--files-only", "--purge", command="uninstall")
    assert purged.returncode == 0, purged.stderr
    assert not data.exists()
    nothing = run_install(home, "--files-only", command="uninstall")
    assert nothing.returncode == 0 and "Nothing" in nothing.stdout


def test_uninstall_keeps_a_config_toml_whose_token_install_did_not_mint(home):
    installed(home)
    config = home / ".config" / "dispatch" / "config.toml"
    config.write_text(f'url = "https://dispatch.example.net:8765/mcp"\ntoken = "dsp_{USER}_{"0" * 48}"\n')
    done = run_install(home, "--files-only", command="uninstall")
    assert done.returncode == 0, done.stderr
    assert config.exists() and f"kept     {config}" in done.stdout
    assert not (home / ".local" / "share" / "dispatch" / "dispatch_broker.py").exists()
