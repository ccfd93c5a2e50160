"""dispatch.service: systemd accepts it, its sandbox scores well, and its command line works.

systemd is not PID 1 here, so the unit is checked offline with `systemd-analyze` (Debian package
`systemd`; tests/run.py installs it), and its ExecStart is run by hand in an environment laid out
the way systemd lays it out: STATE_DIRECTORY, CACHE_DIRECTORY, CREDENTIALS_DIRECTORY, the unit's
Environment= lines with %C expanded, an empty working directory and HOME.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from harness import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "dispatch.service"
#: Where the unit expects the zipapp; the test runs dist/broker.pyz in its place.
INSTALLED_BROKER = "/opt/dispatch/broker.pyz"
MAX_EXPOSURE = 1.5
#: The first run unpacks the zipapp into PEX_ROOT, which takes a few seconds on a slow machine.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                         "clientInfo": {"name": "t", "version": "0"}}}


def systemd_analyze(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian package `systemd`: apt-get install systemd)")
    return subprocess.run([exe, "--no-pager", *args], capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# Reading the unit the way systemd does (the parts this unit uses)
# ---------------------------------------------------------------------------------------------


def read_service_section(path: Path) -> dict[str, list[str]]:
    """[Service] as key -> values in order; an empty assignment resets the list, as in systemd."""
    settings: dict[str, list[str]] = {}
    section = None
    lines = iter(path.read_text().splitlines())
    for line in lines:
        line = line.strip()
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines, "").strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            key, value = key.strip(), value.strip()
            settings[key] = settings.get(key, []) + [value] if value else []
    return settings


def expand_specifiers(text: str, specifiers: dict[str, str]) -> str:
    def one(match: re.Match) -> str:
        letter = match.group(1)
        if letter not in specifiers:
            pytest.fail(f"dispatch.service uses %{letter}, which this test does not know how to expand")
        return specifiers[letter]
    return re.sub(r"%(.)", one, text)


def expand_variables(argv: list[str], env: dict[str, str]) -> list[str]:
    """systemd's rules: `$NAME` as a whole word splits into words, `${NAME}` expands in place."""
    def value(name: str) -> str:
        if name not in env:
            pytest.fail(f"ExecStart uses ${name}, which neither the unit nor systemd sets")
        return env[name]

    out: list[str] = []
    for word in argv:
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            out += value(whole.group(1)).split()
        else:
            out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: value(m.group(1)), word))
    return out


def replace_option(argv: list[str], option: str, value: str) -> list[str]:
    """Set `option`'s value, whether written `--opt VALUE` or `--opt=VALUE`; fail if absent."""
    for i, word in enumerate(argv):
        if word == option and i + 1 < len(argv):
            return argv[:i + 1] + [value] + argv[i + 2:]
        if word.startswith(option + "="):
            return argv[:i] + [f"{option}={value}"] + argv[i + 1:]
    pytest.fail(f"ExecStart has no {option}: {shlex.join(argv)}")


# ---------------------------------------------------------------------------------------------
# Talking to the broker with the standard library only
# ---------------------------------------------------------------------------------------------


def post_initialize(url: str, token: str | None) -> tuple[int, str]:
    """POST an initialize request; return (status, first JSON-RPC message or error body)."""
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(INITIALIZE).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.headers.get_content_type() == "text/event-stream":
                # Read only up to the first event: the stream itself may stay open.
                for raw in response:
                    line = raw.decode().strip()
                    if line.startswith("data:"):
                        return response.status, line[len("data:"):].strip()
                return response.status, ""
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def get_healthz(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return json.loads(response.read()) if response.status == 200 else None
    except (OSError, ValueError):  # URLError and refused connections are OSErrors
        return None


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    """Poll `predicate` until truthy; fail at once, with the log, if the broker exits first."""
    def check():
        if proc.poll() is not None:
            pytest.fail(f"broker exited with {proc.returncode} while waiting for {what}:\n{tail(log)}")
        return predicate()
    try:
        return wait_for(check, timeout, 0.2, what)
    except AssertionError as timed_out:
        pytest.fail(f"{timed_out}:\n{tail(log)}")


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no output)"


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_service_gives_the_broker_descriptors_for_its_whole_connection_cap():
    import dispatch_broker

    [limit] = read_service_section(UNIT)["LimitNOFILE"]
    assert int(limit) >= 2 * dispatch_broker.DEFAULT_MAX_CONNECTIONS + dispatch_broker.FD_RESERVE


def test_service_unit_verifies_clean():
    result = systemd_analyze("verify", str(UNIT))
    output = (result.stdout + result.stderr).splitlines()
    complaints = [line for line in output if "dispatch.service" in line]
    assert result.returncode == 0 and not complaints, "\n".join(output)


def test_service_exposure_is_at_most_1_5():
    result = systemd_analyze("security", "--offline=yes", str(UNIT))
    match = re.search(r"Overall exposure level for dispatch\.service: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no exposure line in systemd-analyze output:\n{result.stdout}{result.stderr}"
    exposed = "\n".join(line for line in result.stdout.splitlines() if line.startswith("✗"))
    assert float(match.group(1)) <= MAX_EXPOSURE, f"exposure {match.group(1)} > {MAX_EXPOSURE}:\n{exposed}"


def test_service_execstart_runs_the_broker_by_hand(dist, tmp_path):
    service = read_service_section(UNIT)
    state = tmp_path / "lib" / service["StateDirectory"][0]
    cache = tmp_path / "cache" / service["CacheDirectory"][0]
    credentials = tmp_path / "credentials" / "dispatch.service"
    etc_tokens = tmp_path / "etc" / "tokens"
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    for directory in (state, cache, credentials, etc_tokens.parent, cwd, home, tmp_path / "tmp"):
        directory.mkdir(parents=True)
    specifiers = {"C": str(cache.parent), "S": str(state.parent), "d": str(credentials),
                  "n": "dispatch.service", "N": "dispatch", "%": "%"}

    # The environment systemd gives the service: its own variables plus the unit's.
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "HOME": str(home), "TMPDIR": str(tmp_path / "tmp"),
           "STATE_DIRECTORY": str(state), "CACHE_DIRECTORY": str(cache), "CREDENTIALS_DIRECTORY": str(credentials)}
    for line in service.get("Environment", []):
        for assignment in shlex.split(expand_specifiers(line, specifiers)):
            name, _, value = assignment.partition("=")
            env[name] = value
    assert env.get("PEX_ROOT") == str(cache), "the unit must unpack the zipapp in its CacheDirectory (PEX_ROOT=%C/...)"

    (exec_start,) = service["ExecStart"]
    argv = expand_variables(shlex.split(expand_specifiers(exec_start.lstrip("-:+!"), specifiers)), env)
    assert INSTALLED_BROKER in argv, f"ExecStart does not run {INSTALLED_BROKER}: {exec_start}"
    argv = [str(dist.broker) if word == INSTALLED_BROKER else word for word in argv]
    port = free_port()
    argv = replace_option(replace_option(argv, "--host", "127.0.0.1"), "--port", str(port))
    python = argv[0]
    if not Path(python).exists():
        pytest.skip(f"the unit's interpreter {python} is not installed here")

    def token_add(base: str) -> str:
        """Mint a token into /etc/dispatch/tokens (here: etc_tokens) as root would, by hand."""
        result = subprocess.run([python, str(dist.broker), "token", "add", base, "--tokens", str(etc_tokens)],
                                env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"token add failed ({result.returncode}): {result.stderr}"
        assert etc_tokens.exists(), f"token add wrote no {etc_tokens}: {result.stderr}"
        return result.stdout.strip().splitlines()[-1]

    def load_credential() -> None:
        """What LoadCredential=tokens:/etc/dispatch/tokens does: a private copy, read-only."""
        credentials.chmod(0o700)
        shutil.copyfile(etc_tokens, credentials / "tokens")
        (credentials / "tokens").chmod(0o400)
        credentials.chmod(0o500)

    token = token_add("testbase")
    load_credential()

    log = tmp_path / "broker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        health = wait_until(lambda: get_healthz(port), START_TIMEOUT, "GET /healthz to answer 200", proc, log)
        assert {"version", "uptime"} <= health.keys(), health

        url = f"http://127.0.0.1:{port}/mcp"
        status, body = post_initialize(url, token=None)
        assert status == 401, f"/mcp without a token answered {status}: {body}"
        status, body = post_initialize(url, token)
        assert status == 200, f"initialize with the token answered {status}: {body}"
        assert "result" in json.loads(body), body

        assert (state / "dispatch.db").exists(), f"no database in STATE_DIRECTORY: {os.listdir(state)}"
        assert os.listdir(cache), "nothing unpacked in PEX_ROOT (the CacheDirectory)"

        # ExecReload=: SIGHUP re-reads $CREDENTIALS_DIRECTORY/tokens and keeps serving.
        second = token_add("second")
        load_credential()
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: post_initialize(url, second)[0] == 200, 10, "the new token after SIGHUP", proc, log)

        # KillSignal=SIGTERM: a clean exit, well inside TimeoutStopSec.
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"broker still running {STOP_TIMEOUT:.0f} s after SIGTERM:\n{tail(log)}")
        assert code == 0, f"broker exited with {code} on SIGTERM:\n{tail(log)}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    # Under the unit everything else is read-only: the broker wrote nowhere but its directories.
    assert not os.listdir(cwd), f"broker wrote into its working directory: {os.listdir(cwd)}"
    assert not os.listdir(home), f"broker wrote into HOME: {os.listdir(home)}"
