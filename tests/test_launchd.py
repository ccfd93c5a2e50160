"""net.dispatch.broker.plist: a launchd agent that plutil would accept, and whose command works.

There is no launchd here, so the file is parsed with plistlib (what `plutil -lint` checks: a
well-formed property list), its keys are checked, and its ProgramArguments run by hand in the
environment launchd would give them: the agent's EnvironmentVariables with __HOME__ filled in
(as README's install line does with sed), its WorkingDirectory, and stdout and stderr into the
log file. Only the port differs, so the test cannot collide with a broker already on 8765.
"""

import os
import plistlib
import shutil
import signal
import subprocess
from pathlib import Path

from harness import free_port
from test_service import get_healthz, post_initialize, tail, wait_until

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "net.dispatch.broker.plist"
HOME = "__HOME__"
SUPPORT = f"{HOME}/Library/Application Support/dispatch"


def agent() -> dict:
    with AGENT.open("rb") as f:
        return plistlib.load(f)


def filled_in(value, home: Path):
    """The agent's values with __HOME__ replaced, as `sed "s|__HOME__|$HOME|g"` does."""
    if isinstance(value, str):
        return value.replace(HOME, str(home))
    if isinstance(value, list):
        return [filled_in(v, home) for v in value]
    if isinstance(value, dict):
        return {k: filled_in(v, home) for k, v in value.items()}
    return value


def test_launchd_agent_is_a_property_list_labelled_as_its_file_name():
    assert agent()["Label"] == AGENT.name.removesuffix(".plist")
    assert "__HOME__" not in agent()["Label"]


def test_launchd_agent_runs_broker_pyz_serve_with_python3():
    arguments = agent()["ProgramArguments"]
    assert arguments == ["/usr/bin/env", "python3", f"{SUPPORT}/broker.pyz", "serve"]


def test_launchd_agent_gives_the_broker_descriptors_for_its_whole_connection_cap():
    import dispatch_broker

    wanted = 2 * dispatch_broker.DEFAULT_MAX_CONNECTIONS + dispatch_broker.FD_RESERVE
    plist = agent()
    assert plist["SoftResourceLimits"]["NumberOfFiles"] >= wanted
    assert plist["HardResourceLimits"]["NumberOfFiles"] >= plist["SoftResourceLimits"]["NumberOfFiles"]


def test_launchd_agent_starts_at_login_and_again_after_a_crash():
    plist = agent()
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] >= 1


def test_launchd_agent_logs_under_library_logs_and_keeps_state_under_application_support():
    plist = agent()
    env = plist["EnvironmentVariables"]
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert plist[key].startswith(f"{HOME}/Library/Logs/dispatch/"), plist[key]
    assert env["DISPATCH_DB"] == f"{SUPPORT}/dispatch.db"
    assert env["DISPATCH_TOKENS"] == f"{SUPPORT}/tokens"
    assert env["DISPATCH_HOST"] == "127.0.0.1"
    assert env["PEX_ROOT"].startswith(f"{HOME}/Library/Caches/")
    assert plist["WorkingDirectory"] == SUPPORT
    assert plist["Umask"] == 0o077
    # Apple's /usr/bin/python3 is 3.9: a newer python3 must come first on PATH.
    path = env["PATH"].split(":")
    assert path.index("/opt/homebrew/bin") < path.index("/usr/bin")
    assert path.index("/usr/local/bin") < path.index("/usr/bin")


def test_launchd_agent_program_serves_and_stops_cleanly_by_hand(dist, tmp_path):
    home = tmp_path / "Users" / "me"
    plist = filled_in(agent(), home)
    env = {**plist["EnvironmentVariables"], "HOME": str(home)}
    port = free_port()
    env["DISPATCH_PORT"] = str(port)
    support = Path(plist["WorkingDirectory"])
    log = Path(plist["StandardOutPath"])
    # README's install lines: the directories, then the zipapp in place.
    for directory in (support, log.parent):
        directory.mkdir(parents=True)
    shutil.copyfile(dist.broker, support / "broker.pyz")
    argv = plist["ProgramArguments"]
    done = subprocess.run([*argv[:3], "token", "add", "me"], env=env, cwd=support,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip().splitlines()[-1]
    assert Path(env["DISPATCH_TOKENS"]).exists()

    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, cwd=support, stdout=out, stderr=out, start_new_session=True)
    try:
        wait_until(lambda: get_healthz(port), 60, "GET /healthz to answer 200", proc, log)
        status, body = post_initialize(f"http://127.0.0.1:{port}/mcp", token)
        assert status == 200, body
        assert Path(env["DISPATCH_DB"]).exists()
        assert os.listdir(env["PEX_ROOT"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=plist["ExitTimeOut"]) == 0, tail(log)  # a clean exit: KeepAlive leaves it down
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert log.read_text().strip(), "nothing logged"
