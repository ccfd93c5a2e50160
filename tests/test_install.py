"""pyproject.toml: `pip install` from a checkout gives working `dispatch-broker` and `dispatch`.

A full install, dependencies and all, into a fresh venv (~25 s with pip's cache warm), as a user
on any OS would run it; pipx and uv read the same pyproject.toml. It installs from a copy of the
files pyproject.toml names, so the build leaves nothing (build/, *.egg-info) in the checkout.
"""

import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from harness import free_port
from test_service import get_healthz, post_initialize, tail, wait_until

ROOT = Path(__file__).resolve().parent.parent
#: What the sdist needs: pyproject.toml, its readme, and its py-modules.
CHECKOUT_FILES = ("pyproject.toml", "README.md", "dispatch_broker.py", "dispatch_plugin.py")
INSTALL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ directory of a fresh venv with `pip install CHECKOUT` done."""
    where = tmp_path_factory.mktemp("install")
    checkout = where / "checkout"
    checkout.mkdir()
    for name in CHECKOUT_FILES:
        shutil.copy(ROOT / name, checkout / name)
    venv.create(where / "venv", with_pip=True)
    bin_dir = where / "venv" / "bin"
    done = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           str(checkout)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    return bin_dir


@pytest.mark.parametrize("command", ["dispatch-broker", "dispatch"])
def test_pip_install_gives_a_command_that_prints_usage(installed, command):
    done = subprocess.run([str(installed / command), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {command} ")


def test_pip_installed_dispatch_broker_serves(installed, tmp_path):
    broker = str(installed / "dispatch-broker")
    tokens, port, log = tmp_path / "tokens", free_port(), tmp_path / "broker.log"
    done = subprocess.run([broker, "token", "add", "me", "--tokens", str(tokens)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip().splitlines()[-1]
    with log.open("wb") as out:
        proc = subprocess.Popen([broker, "serve", "--port", str(port), "--db", str(tmp_path / "dispatch.db"),
                                 "--tokens", str(tokens)], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_until(lambda: get_healthz(port), 30, "GET /healthz to answer 200", proc, log)
        status, body = post_initialize(f"http://127.0.0.1:{port}/mcp", token)
        assert status == 200, body
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert proc.returncode == 0, tail(log)
