"""Fixtures: real brokers on 127.0.0.1, plugin processes, listener processes and the built zipapps.

The processes, clients and helpers they use are in harness.py, which tests import directly.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import BASES, MODERN, PLUGIN, ROOT, BrokerProcess, Dist, PluginProcess, build


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def broker(tmp_path):
    b = BrokerProcess(tmp_path).start()
    yield b
    b.kill()


@pytest.fixture
def broker_factory(tmp_path):
    """make(*flags, workdir=None) -> a BrokerProcess not yet started; all are killed at the end."""
    made = []

    def make(*extra: str, workdir: Path | None = None) -> BrokerProcess:
        b = BrokerProcess(workdir or tmp_path, extra=list(extra))
        made.append(b)
        return b

    yield make
    for b in made:
        b.kill()


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory):
    """One broker for a whole test module whose tests keep to their own participant names:
    minting a token costs a ~2 s CLI run, so the module shares them."""
    b = BrokerProcess(tmp_path_factory.mktemp("shared-broker")).start()
    yield b
    b.kill()


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory):
    """One broker for a test module's tests that need no flags or restarts of their own. Each test
    keeps to fresh participant names (`fresh`). --ack-timeout 1s keeps redelivery tests short."""
    b = BrokerProcess(tmp_path_factory.mktemp("module-broker"), extra=["--ack-timeout", "1s"])
    b.mint(*BASES).start()
    yield b
    b.kill()


@pytest.fixture
def plugins():
    """Start plugin processes (source module by default); all are stopped at the end."""
    started: list[PluginProcess] = []

    def start(env: dict[str, str], command: list[str] | None = None, **host) -> PluginProcess:
        p = PluginProcess(command or [sys.executable, str(PLUGIN)], env, **host)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


@pytest.fixture
def listener_processes(tmp_path):
    """Start `tests/listener_process.py` participants; each is continued (if stopped) and killed at the end."""
    started: list[subprocess.Popen] = []

    def start(broker: BrokerProcess, base: str, name: str, mode: str = MODERN) -> subprocess.Popen:
        errors = open(tmp_path / f"{name}.stderr", "wb")
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "listener_process.py"), broker.url,
                                 broker.token(base), name, mode], stdout=subprocess.DEVNULL, stderr=errors)
        errors.close()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="session")
def build_zipapps():
    """build(out_dir, src=None, platforms=None) -> Dist: run build.py (harness.build)."""
    return build


@pytest.fixture(scope="session")
def dist(tmp_path_factory) -> Dist:
    """Every zipapp built once per session from this checkout, or taken from DISPATCH_DIST (a
    directory written by an earlier `python3 build.py`) to skip the build."""
    prebuilt = os.environ.get("DISPATCH_DIST")
    if prebuilt:
        return Dist.at(Path(prebuilt).resolve(), prebuilt=True)
    return build(tmp_path_factory.mktemp("dist"))
