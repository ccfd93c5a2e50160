"""build.py: two single-file zipapps that need nothing but a CPython interpreter.

The `dist` fixture (tests/conftest.py) builds once per session, or reuses DISPATCH_DIST.
Zipapps run with `python -I`, an empty HOME, PEX_ROOT under tmp and a bare PATH: no venv, no
pip, no network. The `stand_in_dist` zipapps carry throwaway modules, so the packaging is
checked under every Python whatever state dispatch_broker.py and dispatch_plugin.py are in.
"""

import hashlib
import json
import os
import re
import subprocess
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Every CPython the zipapps must run on; versions this machine lacks are skipped.
TARGET_PYTHONS = ("3.11", "3.12", "3.13", "3.14")
#: zipapp name -> the module it runs.
ZIPAPPS = {"broker": "dispatch_broker", "plugin": "dispatch_plugin"}
#: Tools that must never ride along in a zipapp.
BUILD_AND_TEST_TOOLS = {"pex", "pip", "setuptools", "wheel", "pytest", "hypothesis"}
#: Locked projects each zipapp leaves out (build.py says why none is imported), as distributions
#: and as the modules that must then be missing at run time. The tests that run the real zipapps
#: fail if anything they exercise comes to need one of them.
LEFT_OUT = {
    "broker": {"pycparser", "jsonschema", "referencing", "jsonschema-specifications", "attrs", "rpds-py"},
    "plugin": {"pycparser"},
}
MISSING_MODULES = {
    "broker": ("pycparser", "jsonschema", "referencing", "jsonschema_specifications", "attrs", "attr", "rpds"),
    "plugin": ("pycparser",),
}
#: What the stand-in imports with --import-mcp: every compiled extension the zipapp carries
#: (none can be imported from inside a zip) and the mcp side its program uses.
STAND_IN_IMPORTS = {
    "broker": "import _cffi_backend, pydantic_core, mcp.server.mcpserver",
    "plugin": "import _cffi_backend, pydantic_core, rpds, jsonschema, mcp.client.client",
}
#: A first run unpacks every wheel for every target (~140 MB): seconds, not minutes.
RUN_TIMEOUT_S = 120

STAND_IN = '''"""Stand-in for {module}: exercises the zipapp, not the program."""
import argparse
import importlib.util


def main(argv=None):
    parser = argparse.ArgumentParser(prog="{module}")
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--import-mcp", action="store_true")
    parser.add_argument("--missing", nargs="*", default=[], help="modules that must not be found")
    args = parser.parse_args(argv)
    if args.import_mcp:
        {imports}
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        print("mcp imported from", mcp.__file__)
    found = [name for name in args.missing if importlib.util.find_spec(name) is not None]
    if found:
        print("found", *found)
        return 1
    return args.exit_code
'''


# --- helpers ----------------------------------------------------------------------------------


def find_python(version):
    """A base (non-venv) CPython `version` under pyenv or in /usr, or None."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = sorted(pyenv.glob(f"{version}.*/bin/python{version}"), reverse=True)
    candidates += [Path(f"/usr/local/bin/python{version}"), Path(f"/usr/bin/python{version}")]
    return next((c for c in candidates if c.is_file()), None)


def each_python():
    """pytest params over TARGET_PYTHONS, skipping any this machine lacks."""
    params = []
    for version in TARGET_PYTHONS:
        python = find_python(version)
        skip = pytest.mark.skipif(python is None, reason=f"no CPython {version} on this machine")
        params.append(pytest.param(python, id=version, marks=skip))
    return params


def run_zipapp(python, pyz, *args, home):
    """Run `python -I pyz ARGS` with nothing but the interpreter: empty HOME, PEX_ROOT beside it."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home / "home"), "PEX_ROOT": str(home / "pex-root")}
    (home / "home").mkdir(exist_ok=True)
    return subprocess.run([str(python), "-I", str(pyz), *args], env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pex_info(pyz):
    with zipfile.ZipFile(pyz) as z:
        return json.loads(z.read("PEX-INFO"))


def canonical(project):
    """PEP 503 name: PyJWT, pyjwt and py_jwt are one project."""
    return re.sub(r"[-_.]+", "-", project).lower()


def requirement_names(requirements):
    return sorted(canonical(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements)


def our_files(pyz):
    """Top-level entries that are neither pex's runtime nor third-party wheels."""
    pex_runtime = {".bootstrap", ".deps", "__pex__", "__main__.py", "PEX-INFO"}
    with zipfile.ZipFile(pyz) as z:
        return {name.split("/")[0] for name in z.namelist()} - pex_runtime


@pytest.fixture(scope="session")
def stand_in_dist(build_zipapps, tmp_path_factory):
    """Zipapps built by build.py --src from throwaway modules with a working main()."""
    src = tmp_path_factory.mktemp("stand-in-src")
    for name, module in ZIPAPPS.items():
        (src / f"{module}.py").write_text(STAND_IN.format(module=module, imports=STAND_IN_IMPORTS[name]))
    return build_zipapps(tmp_path_factory.mktemp("stand-in-dist"), src=src)


# --- the files --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZIPAPPS)
def test_zipapp_is_a_zip_with_a_main(dist, name):
    # Its size is a benchmark figure (bench/run.py, BENCHMARKS.md), not a test assertion.
    with zipfile.ZipFile(getattr(dist, name)) as pyz:
        assert "__main__.py" in pyz.namelist()


def test_zipapps_are_reproducible_byte_for_byte(dist, build_zipapps, tmp_path):
    if dist.prebuilt:
        pytest.skip("DISPATCH_DIST may come from another commit: unset it to check this")
    again = build_zipapps(tmp_path / "again")
    assert (sha256(again.broker), sha256(again.plugin)) == (sha256(dist.broker), sha256(dist.plugin))


@pytest.mark.parametrize("name", ZIPAPPS)
def test_zipapp_carries_its_module_and_runtime_dependencies_only(dist, name):
    pyz = getattr(dist, name)
    projects = {canonical(wheel.split("-")[0]) for wheel in pex_info(pyz)["distributions"]}
    with open(REPO / "pyproject.toml", "rb") as f:
        runtime = tomllib.load(f)["project"]["dependencies"]
    assert our_files(pyz) == {f"{ZIPAPPS[name]}.py"}
    assert "mcp" in projects and "pydantic-core" in projects
    assert not projects & BUILD_AND_TEST_TOOLS
    assert requirement_names(pex_info(pyz)["requirements"]) == requirement_names(runtime)


@pytest.mark.parametrize("name", ZIPAPPS)
def test_zipapp_carries_every_locked_project_but_those_it_leaves_out(dist, name):
    pyz = getattr(dist, name)
    projects = {canonical(wheel.split("-")[0]) for wheel in pex_info(pyz)["distributions"]}
    locked = json.loads((REPO / "pex.lock").read_text())["locked_resolves"][0]["locked_requirements"]
    assert projects == {canonical(r["project_name"]) for r in locked} - LEFT_OUT[name]


@pytest.mark.parametrize("name", ZIPAPPS)
def test_zipapp_entry_point_is_its_modules_main(dist, name):
    assert pex_info(getattr(dist, name))["entry_point"] == f"{ZIPAPPS[name]}:main"


def test_dev_venv_pins_the_same_runtime_versions_as_the_zipapps():
    locked = json.loads((REPO / "pex.lock").read_text())["locked_resolves"][0]["locked_requirements"]
    zipapps = {canonical(r["project_name"]): r["version"] for r in locked}
    pins = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", (REPO / "requirements.lock").read_text(), re.M)
    venv = {canonical(name): version for name, version in pins}
    assert {name: venv.get(name) for name in zipapps} == zipapps


# --- running them -----------------------------------------------------------------------------


@pytest.mark.parametrize("python", each_python())
@pytest.mark.parametrize("name", ZIPAPPS)
def test_zipapp_prints_usage_with_only_a_python_and_an_empty_home(dist, name, python, tmp_path):
    # Passes once the real modules parse --help; the stubs print "not yet" and exit 2.
    done = run_zipapp(python, getattr(dist, name), "--help", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower()


@pytest.mark.parametrize("python", each_python())
@pytest.mark.parametrize("name", ZIPAPPS)
def test_stand_in_zipapp_runs_main_and_imports_mcp_with_only_a_python(stand_in_dist, name, python, tmp_path):
    pyz = getattr(stand_in_dist, name)

    done = run_zipapp(python, pyz, "--help", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower()

    # pex calls sys.exit(main()): main's return value is the exit status.
    assert run_zipapp(python, pyz, "--exit-code", "3", home=tmp_path).returncode == 3

    done = run_zipapp(python, pyz, "--import-mcp", "--missing", *MISSING_MODULES[name], home=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"mcp imported from {tmp_path / 'pex-root'}" in done.stdout

    # Everything was unpacked into PEX_ROOT; nothing went into HOME.
    assert list((tmp_path / "home").iterdir()) == []


@pytest.mark.parametrize("python", each_python())
def test_real_zipapps_serve_and_exchange_mail_with_only_a_python(dist, python, tmp_path):
    """broker.pyz serves, and two plugin.pyz channels answer initialize, pass a message and a
    reply, and call every tool the plugin offers, so every broker tool runs inside a zipapp."""
    from conftest import BrokerProcess, PluginProcess, plugin_env

    (tmp_path / "home").mkdir()
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "PEX_ROOT": str(tmp_path / "pex-root")}
    broker = BrokerProcess(tmp_path, command=[str(python), "-I", str(dist.broker)], env=bare).start()
    plugins = []
    try:
        for base in ("alice", "bob"):
            env = {**bare, **{k: v for k, v in plugin_env(broker, base, f"{base}-pyz").items() if k.startswith("DISPATCH_")}}
            plugins.append(PluginProcess([str(python), "-I", str(dist.plugin)], env))
        alice, bob = plugins
        assert alice.handshake()["protocolVersion"] == "2025-11-25"
        bob.handshake()
        bob.tool("ping")  # bob's link is up, so the mail is pushed, not only queued
        text, is_error = alice.tool("send", to="bob-pyz", body="from a zipapp")
        assert not is_error, text
        [event] = bob.wait_channel(1)
        assert event["content"] == "from a zipapp" and event["meta"]["from"] == "alice-pyz"
        text, is_error = bob.tool("reply", chat_id=event["meta"]["chat_id"], body="back from a zipapp")
        assert not is_error, text
        [answer] = alice.wait_channel(1)
        assert answer["content"] == "back from a zipapp"
        for tool in ("who", "inbox"):
            text, is_error = alice.tool(tool)
            assert not is_error, text
    finally:
        for p in plugins:
            p.kill()
        broker.kill()
    assert list((tmp_path / "home").iterdir()) == []
