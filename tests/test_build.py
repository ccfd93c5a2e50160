"""build.py: a standard-library plugin.pyz for every machine, and a broker file per platform.

The `dist` fixture (tests/conftest.py, through harness.build) builds once per session, or reuses DISPATCH_DIST.
Zipapps run with `python -I`, an empty HOME, PEX_ROOT under tmp and a bare PATH: no venv, no
pip, no network. The `stand_in_dist` zipapps carry throwaway modules, so the packaging is
checked under every Python whatever state dispatch_broker.py and dispatch_plugin.py are in.
"""

import hashlib
import importlib.util
import json
import os
import platform
import re
import struct
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from harness import build

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import build as build_module  # noqa: E402  (harness's build() runs it; this is the module)

REPO = Path(__file__).resolve().parent.parent
#: Every CPython the zipapps must run on; versions this machine lacks are skipped.
TARGET_PYTHONS = ("3.11", "3.12", "3.13", "3.14")
#: Broker file -> the platform tag each compiled wheel in it must carry. universal2 holds both
#: macOS CPUs: cryptography's only wheel for Intel Macs (build.py keeps its x86_64 half).
BROKER_PLATFORMS = {
    "linux-x86_64": r"manylinux(2014|_2_\d+)_x86_64",
    "linux-aarch64": r"manylinux(2014|_2_\d+)_aarch64",
    "macos-arm64": r"macosx_\d+_\d+_arm64",
    "macos-x86_64": r"macosx_\d+_\d+_(x86_64|universal2)",
}
#: Each broker file's lock (build.py says why Intel Macs have their own).
BROKER_LOCKS = {"macos-x86_64": REPO / "pex-macos-x86_64.lock"}
#: (sys.platform, platform.machine()) -> the broker file for this machine.
HOST_PLATFORMS = {("linux", "x86_64"): "linux-x86_64", ("linux", "aarch64"): "linux-aarch64",
                  ("darwin", "arm64"): "macos-arm64", ("darwin", "x86_64"): "macos-x86_64"}
HOST = HOST_PLATFORMS.get((sys.platform, platform.machine().lower()))
#: What issue 13 asked each file to weigh at most.
BROKER_MAX_BYTES = 20_000_000
PLUGIN_MAX_BYTES = 200_000
#: Tools that must never ride along in a zipapp.
BUILD_AND_TEST_TOOLS = {"pex", "pip", "setuptools", "wheel", "pytest", "hypothesis"}
#: Locked projects the broker leaves out (build.py says why none is imported), as distributions
#: and as the modules that must then be missing at run time. The tests that run the real broker
#: fail if anything they exercise comes to need one of them.
BROKER_LEFT_OUT = {"pycparser", "jsonschema", "referencing", "jsonschema-specifications", "attrs", "rpds-py"}
BROKER_MISSING = ("pycparser", "jsonschema", "referencing", "jsonschema_specifications", "attrs", "attr", "rpds")
#: The plugin carries the standard library only: none of the SDK's modules may be found.
PLUGIN_MISSING = ("mcp", "httpx2", "pydantic", "pydantic_core", "anyio", "jsonschema")
#: What each stand-in imports with --import-deps: for the broker every compiled extension it
#: carries (none can be imported from inside a zip) and the mcp server; for the plugin the
#: standard-library modules a client needs.
STAND_IN_IMPORTS = {
    "broker": "import _cffi_backend, pydantic_core, mcp.server.mcpserver; "
              "from cryptography.hazmat.primitives.ciphers.aead import AESGCM",
    "plugin": "import asyncio, http.client, json, ssl, tomllib, urllib.request",
}
#: Mac broker file -> the one CPU its Mach-O binaries may be for: build.py cuts the Intel file's
#: universal2 binaries to x86_64, and the Apple-silicon file carries its wheels' as they ship.
MAC_CPUS = {"macos-x86_64": "x86_64", "macos-arm64": "arm64"}
#: cputype in a Mach-O header (mach/machine.h).
CPU_TYPES = {"x86_64": 0x01000007, "arm64": 0x0100000C}
#: How a Mach-O binary starts: thin (0xfeedfacf 64-bit or 0xfeedface 32-bit, written
#: little-endian) or universal, "fat" (0xcafebabe, or 0xcafebabf with 64-bit offsets, big-endian).
THIN_MACHO = (b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe")
FAT_MACHO = {0xCAFEBABE: ">IIIII", 0xCAFEBABF: ">IIQQI4x"}  # magic -> its fat_arch layout
#: A first run of a broker file unpacks its wheels (~70 MB): seconds, not minutes.
RUN_TIMEOUT_S = 120

STAND_IN = '''"""Stand-in for {module}: exercises the zipapp, not the program."""
import argparse
import importlib.util
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="{module}")
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--import-deps", action="store_true")
    parser.add_argument("--missing", nargs="*", default=[], help="modules that must not be found")
    args = parser.parse_args(argv)
    if args.import_deps:
        {imports}
        print("imported from", sys.modules["{probe}"].__file__)
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


def host_only(test):
    return pytest.mark.skipif(HOST is None, reason=f"no broker file is built for {sys.platform} {platform.machine()}")(test)


def bare_env(home):
    """Nothing but an interpreter: a bare PATH, an empty HOME, PEX_ROOT beside it."""
    (home / "home").mkdir(exist_ok=True)
    return {"PATH": "/usr/bin:/bin", "HOME": str(home / "home"), "PEX_ROOT": str(home / "pex-root")}


def run_zipapp(python, pyz, *args, home, env=None, flags=("-I",)):
    """Run `python -I pyz ARGS` in bare_env(home) (or `env`), from an empty working directory."""
    cwd = home / "cwd"
    cwd.mkdir(exist_ok=True)
    return subprocess.run([str(python), *flags, str(pyz), *args], env=env or bare_env(home), cwd=cwd,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


#: The plugin also runs with -S: not even the interpreter's own site-packages (where a user's
#: python3 may well have pydantic or mcp) is on its path.
PLUGIN_FLAGS = ("-I", "-S")


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


def wheels(pyz):
    """The wheel file names a broker file carries, as PEX-INFO lists them (each is a .deps/ entry)."""
    return sorted(pex_info(pyz)["distributions"])


def projects(pyz):
    return {canonical(wheel.split("-")[0]) for wheel in wheels(pyz)}


def locked(platform_name):
    lock = json.loads(BROKER_LOCKS.get(platform_name, REPO / "pex.lock").read_text())
    return {canonical(r["project_name"]): r["version"] for r in lock["locked_resolves"][0]["locked_requirements"]}


def our_files(pyz):
    """Top-level entries that are neither pex's runtime nor third-party wheels."""
    pex_runtime = {".bootstrap", ".deps", "__pex__", "__main__.py", "PEX-INFO"}
    with zipfile.ZipFile(pyz) as z:
        return {name.split("/")[0] for name in z.namelist()} - pex_runtime


def mach_o_binaries(pyz):
    """{entry: "fat", or the CPU of a thin Mach-O} for each Mach-O binary in a zipapp."""
    cpus = {cputype: cpu for cpu, cputype in CPU_TYPES.items()}
    found = {}
    with zipfile.ZipFile(pyz) as z:
        for entry in z.infolist():
            with z.open(entry) as f:
                head = f.read(8)
            if len(head) == 8 and struct.unpack(">I", head[:4])[0] in FAT_MACHO:
                found[entry.filename] = "fat"
            elif head[:4] in THIN_MACHO:
                cputype = struct.unpack("<I", head[4:])[0]
                found[entry.filename] = cpus.get(cputype, f"{cputype:#x}")
    return found


def fat_binary(slices, magic=0xCAFEBABE):
    """A universal Mach-O holding `slices` ({cputype: bytes}) back to back after its header."""
    arch = FAT_MACHO[magic]
    offset = struct.calcsize(">II") + len(slices) * struct.calcsize(arch)
    header, body = struct.pack(">II", magic, len(slices)), b""
    for cputype, data in slices.items():
        header += struct.pack(arch, cputype, 3, offset, len(data), 0)
        body += data
        offset += len(data)
    return header + body


def thin_slice(cpu):
    """A stand-in thin Mach-O for `cpu`: its header's first two words, then bytes only it has."""
    return THIN_MACHO[0] + struct.pack("<I", CPU_TYPES[cpu]) + f"the {cpu} slice".encode() * 8


def listing(directory):
    """Every path under `directory`, for checking that a run wrote nothing."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.fixture(scope="session")
def stand_in_dist(tmp_path_factory):
    """This machine's broker file and plugin.pyz, built by build.py --src from throwaway modules."""
    if HOST is None:
        pytest.skip(f"no broker file is built for {sys.platform} {platform.machine()}")
    src = tmp_path_factory.mktemp("stand-in-src")
    for name, module in (("broker", "dispatch_broker"), ("plugin", "dispatch_plugin")):
        probe = "mcp" if name == "broker" else "json"
        (src / f"{module}.py").write_text(STAND_IN.format(module=module, imports=STAND_IN_IMPORTS[name], probe=probe))
    return build(tmp_path_factory.mktemp("stand-in-dist"), src=src, platforms=[HOST])


# --- plugin.pyz -------------------------------------------------------------------------------


def test_plugin_zipapp_holds_the_plugin_its_compiled_code_and_a_main_behind_a_shebang(dist):
    data = dist.plugin.read_bytes()
    assert data.startswith(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(dist.plugin) as pyz:
        assert pyz.namelist() == ["__main__.py", "dispatch_plugin.py", "dispatch_plugin.pyc"]
        main = pyz.read("__main__.py").decode()
        assert "sys.exit(dispatch_plugin.main())" in main
        assert {info.date_time for info in pyz.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        source, pyc = pyz.read("dispatch_plugin.py"), pyz.read("dispatch_plugin.pyc")
        if not dist.prebuilt:
            assert source == (REPO / "dispatch_plugin.py").read_bytes()
    # A hash-checked .pyc of exactly that source (PEP 552): no CPython runs it beside another source.
    assert int.from_bytes(pyc[4:8], "little") == 0b11
    assert pyc[8:16] == importlib.util.source_hash(source)


def plugin_module_file(python, pyz, home):
    """(the CPython's .pyc magic number, the file it imported dispatch_plugin from), run as the zipapp runs."""
    code = ("import importlib.util, sys; sys.path.insert(0, sys.argv[1]); import dispatch_plugin; "
            "print(importlib.util.MAGIC_NUMBER.hex(), dispatch_plugin.__file__)")
    done = subprocess.run([str(python), *PLUGIN_FLAGS, "-c", code, str(pyz)], env=bare_env(home),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    magic, path = done.stdout.split()
    return bytes.fromhex(magic), path


@pytest.mark.parametrize("python", each_python())
def test_plugin_zipapp_runs_its_compiled_code_on_the_cpython_that_built_it_and_its_source_on_any_other(
        dist, python, tmp_path):
    with zipfile.ZipFile(dist.plugin) as pyz:
        built_by = pyz.read("dispatch_plugin.pyc")[:4]
    magic, path = plugin_module_file(python, dist.plugin, tmp_path)
    assert path == f"{dist.plugin}/dispatch_plugin.{'pyc' if magic == built_by else 'py'}"


def test_plugin_zipapp_runs_its_source_when_the_compiled_code_is_of_another_source(dist, tmp_path):
    """The .pyc is this CPython's, but the source beside it was changed after the build."""
    changed = tmp_path / "plugin.pyz"
    with zipfile.ZipFile(dist.plugin) as old, zipfile.ZipFile(changed, "w") as new:
        for info in old.infolist():
            data = old.read(info)
            new.writestr(info, data + b"\nCHANGED = True\n" if info.filename == "dispatch_plugin.py" else data)
            built_by = data[:4] if info.filename == "dispatch_plugin.pyc" else None
    magic, path = plugin_module_file(sys.executable, changed, tmp_path)
    assert magic == built_by, "dist was built by another CPython: unset DISPATCH_DIST to check this"
    assert path == f"{changed}/dispatch_plugin.py"


def test_plugin_zipapp_is_under_200_kb(dist):
    assert dist.plugin.stat().st_size < PLUGIN_MAX_BYTES


def test_plugin_zipapp_is_the_same_source_whichever_python_builds_it_and_the_same_bytes_from_one(dist, tmp_path):
    """Only the standard library writes it: each CPython >= 3.11 writes the same file each time,
    and all of them the same entries but for their own compiled code."""
    if dist.prebuilt:
        pytest.skip("DISPATCH_DIST may come from another commit: unset it to check this")
    entries = {}
    for version in TARGET_PYTHONS:
        python = find_python(version)
        if python is None:
            continue
        digests = set()
        for attempt in ("first", "second"):
            out = tmp_path / version / attempt
            out.mkdir(parents=True)
            code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import build, pathlib; " \
                   f"build.build_plugin(build.ROOT, pathlib.Path({str(out)!r}))"
            subprocess.run([str(python), "-I", "-c", code], check=True, timeout=60)
            digests.add(sha256(out / "plugin.pyz"))
        assert len(digests) == 1, version
        with zipfile.ZipFile(out / "plugin.pyz") as pyz:
            entries[version] = [(i.filename, i.CRC) for i in pyz.infolist() if not i.filename.endswith(".pyc")]
    assert entries
    with zipfile.ZipFile(dist.plugin) as pyz:
        ours = [(i.filename, i.CRC) for i in pyz.infolist() if not i.filename.endswith(".pyc")]
    assert all(e == ours for e in entries.values()), entries


@pytest.mark.parametrize("python", each_python())
def test_plugin_zipapp_prints_usage_with_only_a_python_and_writes_nothing(dist, python, tmp_path):
    before = listing(dist.dir)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")}  # no PEX_ROOT: nothing to unpack
    done = run_zipapp(python, dist.plugin, "--help", home=tmp_path, env=env, flags=PLUGIN_FLAGS)
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower()
    (tmp_path / "home").mkdir(exist_ok=True)
    assert listing(tmp_path) == ["cwd", "home"]  # no cache, no pex-root, no __pycache__
    assert listing(dist.dir) == before


# --- broker files -----------------------------------------------------------------------------


def test_zipapps_are_reproducible_byte_for_byte(dist, tmp_path):
    if dist.prebuilt:
        pytest.skip("DISPATCH_DIST may come from another commit: unset it to check this")
    again = build(tmp_path / "again")
    names = sorted(path.name for path in dist.dir.glob("*.pyz"))
    assert names == sorted(path.name for path in again.dir.glob("*.pyz"))
    assert {name: sha256(again.dir / name) for name in names} == {name: sha256(dist.dir / name) for name in names}


@pytest.mark.parametrize("platform_name", BROKER_PLATFORMS)
def test_broker_file_is_under_20_mb(dist, platform_name):
    assert dist.broker_for(platform_name).stat().st_size < BROKER_MAX_BYTES


@pytest.mark.parametrize("platform_name", MAC_CPUS)
def test_mac_broker_file_holds_only_thin_mach_o_binaries_for_its_cpu(dist, platform_name):
    binaries = mach_o_binaries(dist.broker_for(platform_name))
    # cryptography's is universal2 in its Intel-Mac wheel: the one binary the thinning must cut.
    assert any(name.endswith("/cryptography/hazmat/bindings/_rust.abi3.so") for name in binaries), binaries
    assert set(binaries.values()) == {MAC_CPUS[platform_name]}, binaries


@pytest.mark.parametrize("magic", FAT_MACHO, ids=("fat", "fat64"))
def test_thin_macho_copies_out_exactly_the_x86_64_slice(magic):
    fat = fat_binary({CPU_TYPES[cpu]: thin_slice(cpu) for cpu in ("arm64", "x86_64")}, magic)
    assert build_module.thin_macho(fat, "x86_64", "fake.so") == thin_slice("x86_64")


@pytest.mark.parametrize("data", [
    pytest.param(thin_slice("x86_64"), id="thin-mach-o"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\xca\xfe\xba\xbe\x00\x00\x00\x41" + b"\x00" * 64, id="java-class"),
    pytest.param(fat_binary({CPU_TYPES["arm64"]: thin_slice("arm64")}), id="fat-without-x86_64"),
])
def test_thin_macho_refuses_what_has_no_x86_64_slice_to_cut_out(data):
    with pytest.raises(build_module.BuildError, match="fake.so"):
        build_module.thin_macho(data, "x86_64", "fake.so")


def test_thin_fat_binaries_changes_only_fat_entries_and_keeps_the_prefix(tmp_path):
    fat = fat_binary({CPU_TYPES[cpu]: thin_slice(cpu) for cpu in ("arm64", "x86_64")})
    entries = [("lib/", b"", zipfile.ZIP_STORED, 0o40755), ("lib/fat.so", fat, zipfile.ZIP_DEFLATED, 0o100755),
               ("lib/thin.so", thin_slice("arm64"), zipfile.ZIP_STORED, 0o100644),
               ("a.py", b"print('a')\n" * 50, zipfile.ZIP_DEFLATED, 0o100644)]
    pyz = tmp_path / "app.pyz"
    with pyz.open("wb") as f:
        f.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(f, "w") as z:
            for name, data, compress_type, mode in entries:
                info = zipfile.ZipInfo(name, date_time=(2001, 2, 3, 4, 5, 6))
                info.compress_type, info.external_attr = compress_type, mode << 16
                z.writestr(info, data)

    build_module.thin_fat_binaries(pyz, "x86_64")

    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\nPK")
    with zipfile.ZipFile(pyz) as z:
        assert z.testzip() is None
        kept = [(i.filename, z.read(i), i.compress_type, i.external_attr >> 16, i.date_time) for i in z.infolist()]
    thinned = {"lib/fat.so": thin_slice("x86_64")}
    assert kept == [(name, thinned.get(name, data), compress_type, mode, (2001, 2, 3, 4, 5, 6))
                    for name, data, compress_type, mode in entries]


@pytest.mark.parametrize("platform_name", BROKER_PLATFORMS)
def test_broker_file_carries_wheels_for_its_platform_and_every_cpython(dist, platform_name):
    tag = re.compile(BROKER_PLATFORMS[platform_name])
    compiled = {}
    for wheel in wheels(dist.broker_for(platform_name)):
        project, _version, python_tag, abi, platform_tags = wheel[:-len(".whl")].split("-")
        if platform_tags == "any":
            assert abi == "none", wheel
            continue
        assert all(tag.fullmatch(t) for t in platform_tags.split(".")), wheel
        compiled.setdefault(project, set()).add(python_tag)
    assert {"pydantic_core", "cffi", "cryptography"} <= compiled.keys()
    every = {f"cp{version.replace('.', '')}" for version in TARGET_PYTHONS}
    # abi3 wheels (cryptography's) serve every CPython from one copy.
    assert all(tags == every for project, tags in compiled.items() if project != "cryptography"), compiled


@pytest.mark.parametrize("platform_name", BROKER_PLATFORMS)
def test_broker_file_carries_its_module_and_the_locked_projects_it_needs(dist, platform_name):
    pyz = dist.broker_for(platform_name)
    info = pex_info(pyz)
    with open(REPO / "pyproject.toml", "rb") as f:
        runtime = tomllib.load(f)["project"]["dependencies"]
    assert our_files(pyz) == {"dispatch_broker.py"}
    assert info["entry_point"] == "dispatch_broker:main"
    assert requirement_names(info["requirements"]) == requirement_names(runtime)
    assert not projects(pyz) & BUILD_AND_TEST_TOOLS
    versions = {canonical(wheel.split("-")[0]): wheel.split("-")[1] for wheel in wheels(pyz)}
    lock = locked(platform_name)
    assert versions == {project: lock[project] for project in lock.keys() - BROKER_LEFT_OUT}


def test_intel_mac_lock_is_pex_lock_but_for_cryptography():
    main, intel = locked("linux-x86_64"), locked("macos-x86_64")
    assert {p: v for p, v in intel.items() if p != "cryptography"} == {p: v for p, v in main.items() if p != "cryptography"}
    assert int(intel["cryptography"].split(".")[0]) < 49


def test_dev_venv_pins_the_same_runtime_versions_as_the_zipapps():
    zipapps = locked("linux-x86_64")
    pins = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", (REPO / "requirements.lock").read_text(), re.M)
    venv = {canonical(name): version for name, version in pins}
    assert {name: venv.get(name) for name in zipapps} == zipapps


@host_only
def test_broker_pyz_is_this_machines_broker_file(dist):
    assert sha256(dist.broker) == sha256(dist.broker_for(HOST))


@pytest.mark.parametrize("platform_name", BROKER_PLATFORMS)
def test_broker_file_started_on_another_platform_names_the_right_file_in_one_line(dist, platform_name, tmp_path):
    if platform_name == HOST:
        pytest.skip("this machine's own file")
    done = run_zipapp(sys.executable, dist.broker_for(platform_name), "--help", home=tmp_path)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert f"broker-{platform_name}.pyz is for" in line
    if HOST is not None:
        assert f"use broker-{HOST}.pyz" in line
    assert not (tmp_path / "pex-root").exists()  # stopped before pex unpacked anything


@host_only
@pytest.mark.parametrize("python", each_python())
def test_broker_prints_usage_with_only_a_python_and_an_empty_home(dist, python, tmp_path):
    done = run_zipapp(python, dist.broker, "--help", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower()
    assert listing(tmp_path / "home") == []


# --- stand-ins: the packaging, whatever state the programs are in -----------------------------


@pytest.mark.parametrize("python", each_python())
@pytest.mark.parametrize("name", ("broker", "plugin"))
def test_stand_in_zipapp_runs_main_and_imports_what_it_carries_with_only_a_python(stand_in_dist, name, python, tmp_path):
    pyz = getattr(stand_in_dist, name)
    flags = ("-I",) if name == "broker" else PLUGIN_FLAGS

    done = run_zipapp(python, pyz, "--help", home=tmp_path, flags=flags)
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower()

    # sys.exit(main()): main's return value is the exit status.
    assert run_zipapp(python, pyz, "--exit-code", "3", home=tmp_path, flags=flags).returncode == 3

    missing = BROKER_MISSING if name == "broker" else PLUGIN_MISSING
    done = run_zipapp(python, pyz, "--import-deps", "--missing", *missing, home=tmp_path, flags=flags)
    assert done.returncode == 0, done.stdout + done.stderr
    # The broker's wheels were unpacked into PEX_ROOT; the plugin's imports are the interpreter's own.
    where = tmp_path / "pex-root" if name == "broker" else Path(python).resolve().parent.parent
    assert f"imported from {where}" in done.stdout
    assert (tmp_path / "pex-root").exists() == (name == "broker")
    assert listing(tmp_path / "home") == []


# --- the real programs, exchanging mail ---------------------------------------------------------


def plugin_needs_the_sdk():
    """True until the standard-library plugin lands: the old one imports the SDK, which
    plugin.pyz does not carry."""
    source = (REPO / "dispatch_plugin.py").read_text()
    return re.search(r"^\s*(import|from) (mcp|httpx2|pydantic)\b", source, re.M) is not None


@host_only
@pytest.mark.parametrize("python", each_python())
def test_real_zipapps_serve_and_exchange_mail_with_only_a_python(dist, python, tmp_path):
    """broker.pyz serves, and two plugin.pyz channels answer initialize, pass a message and a
    reply, and call every tool the plugin offers, so every broker tool runs inside a zipapp."""
    from harness import BrokerProcess, PluginProcess, http, plugin_env

    bare = bare_env(tmp_path)
    broker = BrokerProcess(tmp_path, command=[str(python), "-I", str(dist.broker)], env=bare)
    carol = broker.cli("token", "add", "carol", "--tokens", str(broker.tokens_file)).stdout.strip()  # the zipapp's own
    broker.start()
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                  "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
    status, _, body = http(broker.url, json.dumps(initialize).encode(), {"Authorization": f"Bearer {carol}"})
    assert status == 200 and "protocolVersion" in body, (status, body)
    if plugin_needs_the_sdk():
        broker.kill()
        pytest.skip("broker serves; dispatch_plugin.py still imports the SDK, which plugin.pyz does not carry")
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
    assert listing(tmp_path / "home") == []
