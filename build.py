"""Build Dispatch's single-file zipapps: dist/plugin.pyz, and one dist/broker-<platform>.pyz each.

    dispatch_plugin.py ──zipfile──> dist/plugin.pyz      standard library only: any OS, CPython >= 3.11
    pyproject.toml [project].dependencies ──(--relock)──> pex.lock   (every wheel pinned by sha256)
    pex.lock + dispatch_broker.py ──pex──> dist/broker-linux-x86_64.pyz   one per platform, each
                                           dist/broker-linux-aarch64.pyz  for CPython 3.11-3.14
                                           dist/broker-macos-arm64.pyz
                                           dist/broker-macos-x86_64.pyz   fat binaries cut to x86_64
                                     copy> dist/broker.pyz   the one for the machine that builds
    python3 dist/broker.pyz ──1st run──> $PEX_ROOT/  (unpack the wheels, make a venv: ~60 MB)
                            ──later───> re-exec that venv

The plugin imports only the standard library, so plugin.pyz is a plain zipapp (PEP 441) that
CPython runs straight from the zip: dispatch_plugin.py, a __main__.py calling its main(), and
dispatch_plugin.pyc (the building CPython's compiled code, which only that CPython version runs;
every other compiles the source), behind a `#!/usr/bin/env python3` line. Nothing is unpacked and
nothing is written; one file serves every OS, CPU and CPython >= 3.11.

The broker needs the SDK's compiled wheels (pydantic_core, cryptography, cffi), which cannot be
imported from inside a zip, so pex writes it and its first run unpacks it into PEX_ROOT, which
defaults to $XDG_CACHE_HOME/pex or ~/.cache/pex (~/Library/Caches/pex on macOS). Set PEX_ROOT to
move it; the systemd unit points it at its CacheDirectory. If PEX_ROOT is not writable, pex
unpacks into a temporary directory on every run. A broker file started on a platform it was not
built for stops in its first lines (a pex preamble, before pex looks at a wheel) with one line
naming the right file.

Run (the broker needs pex; without it build.py first installs the pinned pex into build/venv):
    python3 build.py                 # writes dist/, prints size and sha256 of each file
    python3 build.py serve           # then runs dist/broker.pyz serve --dev from the repo root
    python3 build.py --out DIR       # somewhere else (the reproducibility test builds twice)
    python3 build.py --platform macos-arm64   # only that broker (and the plugin); repeatable
    python3 build.py --relock        # after changing dependencies in pyproject.toml

Size (plugin 123 kB; brokers 15.9 MB macOS arm64, 16.7 MB macOS x86_64, 17.0 MB Linux aarch64,
17.6 MB Linux x86_64): each compiled wheel but cryptography's (abi3) is carried once per CPython,
4 copies a file; pydantic_core's (~2.2 MB each) are half of it. cryptography's only Intel-Mac
wheel is universal2, both Mac CPUs in one binary (7.8 MB deflated): the Intel file keeps only its
x86_64 half (3.9 MB), as `lipo -thin x86_64` would: carried whole, it would make that file
20.5 MB, over the 20 MB each file may weigh.
BROKER_EXCLUDES leaves out the locked projects the broker never imports. pex deflates at zlib's
default level with no setting for it (level 9 would save 0.4%); --no-pre-install-wheels carries the
wheels as published (~3% larger); --layout packed/loose is a directory, not one file.

Time: ~20 s for all five files with pex's caches warm (on 2 busy cores; running the four pex
builds side by side was no faster); the first build also downloads ~80 MB of wheels.

Reproducible: plugin.pyz is written entry by entry in a fixed order, dated 1980-01-01, mode
0644; its bytes follow the building CPython's version (the compiled entry) and zlib (both
entries are deflated: zlib builds differ in what they emit), its entries' contents only the
former. pex writes zip entries in a fixed order dated 1980-01-01, and
pex.lock pins each wheel by hash, so two builds of one commit with the same pex and the same build
Python (pex's bootstrap differs either side of 3.12) give the same sha256. SOURCE_DATE_EPOCH is
not needed. Downloaded wheels stay in pex's own cache (~/.cache/pex), so only the first build uses
the network.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import py_compile
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

# --- defaults -------------------------------------------------------------------------------

#: Paths are relative to this file, so the build works from any working directory.
ROOT = Path(__file__).resolve().parent
#: Checked in: the universal lock every build resolves from, so no build resolves anew.
LOCK_FILE = ROOT / "pex.lock"
PYPROJECT = ROOT / "pyproject.toml"

#: CPython versions every broker file must run on; each one adds a copy of every compiled wheel.
PYTHONS = ("3.11", "3.12", "3.13", "3.14")
#: One pip for locking and building, so both resolve alike. Not pex's default (26.2.2): the
#: package index this project uses does not serve that release.
PIP_VERSION = "26.2.1"
#: Intel Macs get their own lock: cryptography's last release with a wheel for them is 48.0.1
#: (universal2: both CPUs in one binary, of which the Intel file keeps only the x86_64 half, see
#: Platform.thin_to), and a universal lock holds one version of each project, so pex.lock would
#: push that older and twice as heavy wheel on every other platform too.
INTEL_MAC_LOCK_FILE = ROOT / "pex-macos-x86_64.lock"
#: What that lock changes; every other project is pinned to pex.lock's version.
INTEL_MAC_PINS = {"cryptography": "cryptography<49"}


@dataclass(frozen=True)
class Platform:
    """A machine a broker file is built for: its file name's suffix, the wheel platform pex
    resolves for, and how that machine's Python names itself (sys.platform, platform.machine())."""

    name: str
    title: str
    wheel_platform: str
    system: str
    machines: tuple
    lock: Path = LOCK_FILE
    #: The one CPU to keep of each universal (fat) Mach-O binary in the file, or None to carry
    #: every binary as its wheel ships it.
    thin_to: str | None = None

    @property
    def filename(self):
        return f"broker-{self.name}.pyz"


PLATFORMS = (
    # manylinux2014 is glibc 2.17+, so pex picks the most portable wheel each project offers.
    Platform("linux-x86_64", "Linux x86_64", "manylinux2014_x86_64", "linux", ("x86_64", "amd64")),
    Platform("linux-aarch64", "Linux aarch64", "manylinux2014_aarch64", "linux", ("aarch64", "arm64")),
    # macOS 11 was the first release on arm64, so its wheels run on every Apple-silicon Mac.
    Platform("macos-arm64", "macOS arm64", "macosx_11_0_arm64", "darwin", ("arm64",)),
    # 10.15 is the oldest macOS for which every locked compiled wheel has an Intel build.
    # Its cryptography wheel is universal2; an Intel Mac never loads the arm64 half.
    Platform("macos-x86_64", "macOS x86_64", "macosx_10_15_x86_64", "darwin", ("x86_64",),
             lock=INTEL_MAC_LOCK_FILE, thin_to="x86_64"),
)

BROKER_MODULE = "dispatch_broker"
PLUGIN_MODULE = "dispatch_plugin"
#: The machine that builds gets a copy of its own broker under this name, the one README's
#: commands and dispatch.service use.
HOST_BROKER = "broker.pyz"

#: Only cffi's Python package imports pycparser (to parse C declarations when an FFI object is
#: made); cryptography's compiled bindings load the _cffi_backend extension alone and nothing we
#: run imports `cffi` itself. cffi and cryptography stay: `import mcp.server` reaches
#: mcp.server.request_state, which imports cryptography at module level.
NEVER_IMPORTED = ("pycparser",)
#: Only mcp's client imports jsonschema (mcp.client.session, lazily, to check a tool's result
#: against its output schema); no server module of mcp, starlette, uvicorn or pydantic does. pex
#: drops what only it needs: referencing, jsonschema-specifications, attrs and rpds-py (a compiled
#: wheel per CPython, ~0.7 MB a file).
CLIENT_ONLY = ("jsonschema",)
#: Locked projects the broker files leave out; pex's runtime does not look for them.
BROKER_EXCLUDES = NEVER_IMPORTED + CLIENT_ONLY

#: plugin.pyz: `python3 plugin.pyz` and `./plugin.pyz` both run it with the first python3 on PATH.
SHEBANG = b"#!/usr/bin/env python3\n"
#: pex runs sys.exit(main()) for the broker; the plugin's zipapp does the same.
PLUGIN_MAIN = f"import sys\n\nimport {PLUGIN_MODULE}\n\nsys.exit({PLUGIN_MODULE}.main())\n".encode()
#: The earliest date a zip entry can hold: no build time leaks into the file.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class BuildError(Exception):
    """The build cannot go on; the message says what to do."""


# --- lock -----------------------------------------------------------------------------------


def runtime_requirements():
    """What goes in the broker files: pyproject's runtime dependencies, never its extras."""
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def normalized(requirements):
    # The lock stores requirements as pex rewrote them ("mcp<3,>=2.3"): compare them the same way.
    from pex.third_party.packaging.requirements import Requirement

    return sorted(str(Requirement(requirement)) for requirement in requirements)


def read_lock(path=LOCK_FILE):
    """Return a lock, refusing one that no longer matches pyproject.toml."""
    if not path.exists():
        raise BuildError(f"{path.name} is missing: run python3 build.py --relock")
    lock = json.loads(path.read_text())
    if normalized(lock["requirements"]) != normalized(runtime_requirements()):
        raise BuildError(
            f"{path.name} locks {lock['requirements']} but pyproject.toml asks for "
            f"{runtime_requirements()}: run python3 build.py --relock"
        )
    return lock


def locked_versions(lock):
    return {r["project_name"]: r["version"] for r in lock["locked_resolves"][0]["locked_requirements"]}


def lock_command(output, target_systems, constraints=None):
    newest = PYTHONS[-1].split(".")
    command = [
        sys.executable, "-m", "pex.cli", "lock", "create",
        "--style", "universal",
        *(arg for system in target_systems for arg in ("--target-system", system)),
        "--interpreter-constraint", f"CPython>={PYTHONS[0]},<{newest[0]}.{int(newest[1]) + 1}",
        "--pip-version", PIP_VERSION,
        "--no-build",  # wheels only: nothing may be compiled for a machine we are not on
        "--elide-unused-requires-dist",
        "--indent", "2",
        "--output", str(output),
    ]
    if constraints is not None:
        command += ["--constraints", str(constraints)]
    return command + runtime_requirements()


def relock():
    """Rewrite pex.lock (one universal resolve for Linux and macOS, every CPython), then the Intel
    Mac lock from it."""
    subprocess.run(lock_command(LOCK_FILE, ("linux", "mac")), check=True, env=pex_environment())
    relock_intel_mac()


def relock_intel_mac():
    """Rewrite pex-macos-x86_64.lock: pex.lock's versions, but for INTEL_MAC_PINS."""
    pins = {project: f"{project}=={version}" for project, version in locked_versions(read_lock()).items()}
    pins.update(INTEL_MAC_PINS)
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("".join(f"{pin}\n" for pin in sorted(pins.values())))
        subprocess.run(lock_command(INTEL_MAC_LOCK_FILE, ("mac",), constraints), check=True,
                       env=pex_environment())


# --- plugin: a standard-library zipapp ------------------------------------------------------


def zip_entry(name, compress_type=zipfile.ZIP_STORED):
    """A zip entry whose header is the same bytes whoever builds it, wherever, whenever."""
    entry = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    entry.create_system = 3  # Unix, also when Windows builds: the field is part of the bytes
    entry.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
    entry.compress_type = compress_type
    return entry


def compiled(source):
    """The building CPython's bytecode for the plugin, as a .pyc that carries the source's hash.

    Compiling the 80 kB module takes longer than the interpreter's own start, on every start:
    zipimport keeps no compiled copy. It runs this .pyc instead when the running CPython is the
    version that built it and the source beside it has that hash; any other CPython compiles
    the source as before."""
    with tempfile.TemporaryDirectory() as tmp:
        source_file, pyc = Path(tmp) / f"{PLUGIN_MODULE}.py", Path(tmp) / f"{PLUGIN_MODULE}.pyc"
        source_file.write_bytes(source)
        py_compile.compile(str(source_file), str(pyc), dfile=source_file.name, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
        return pyc.read_bytes()


def build_plugin(src_dir, out_dir):
    """Write out_dir/plugin.pyz: the shebang line, then a zip of __main__.py, the plugin and its
    compiled code."""
    source = src_dir / f"{PLUGIN_MODULE}.py"
    if not source.exists():
        raise BuildError(f"no {source.name} in {src_dir}")
    out = out_dir / "plugin.pyz"
    partial = out.with_name(out.name + ".partial")
    with partial.open("wb") as f:
        f.write(SHEBANG)  # zipimport finds the archive from its end, so a prefix is allowed
        with zipfile.ZipFile(f, "w") as pyz:
            pyz.writestr(zip_entry("__main__.py"), PLUGIN_MAIN)
            # Both deflated (stored, the two would make the file over 200 kB): the compiled entry
            # already ties the bytes to the building zlib, so a stored source bought nothing.
            pyz.writestr(zip_entry(source.name, zipfile.ZIP_DEFLATED), source.read_bytes())
            pyz.writestr(zip_entry(f"{PLUGIN_MODULE}.pyc", zipfile.ZIP_DEFLATED), compiled(source.read_bytes()))
    partial.chmod(0o755)
    partial.replace(out)
    return out


# --- broker: universal Mach-O binaries cut to one CPU ----------------------------------------

#: A universal (fat) Mach-O starts with a big-endian fat_header (magic, number of slices), then
#: one fat_arch per slice: cputype, cpusubtype, offset, size, align (mach-o/fat.h). The 64-bit
#: form has 64-bit offsets and sizes and a reserved word.
FAT_ARCH_FORMATS = {0xCAFEBABE: ">IIIII", 0xCAFEBABF: ">IIQQI4x"}
FAT_HEADER = ">II"
#: A Java class file starts with 0xcafebabe too, then its version (45 or more) where a fat
#: Mach-O counts its slices; file(1) reads fewer than 20 as a Mach-O.
MAX_FAT_SLICES = 19
#: cputype, as fat_arch and a thin Mach-O's header hold it (mach/machine.h).
CPU_TYPES = {"x86_64": 0x01000007, "arm64": 0x0100000C}


def is_fat_macho(data):
    if len(data) < struct.calcsize(FAT_HEADER):
        return False
    magic, slices = struct.unpack_from(FAT_HEADER, data)
    return magic in FAT_ARCH_FORMATS and 0 < slices <= MAX_FAT_SLICES


def fat_slices(data):
    """{cputype: (offset, size)} of each slice a fat Mach-O holds."""
    magic, count = struct.unpack_from(FAT_HEADER, data)
    arch = FAT_ARCH_FORMATS[magic]
    entries = (struct.unpack_from(arch, data, struct.calcsize(FAT_HEADER) + i * struct.calcsize(arch))
               for i in range(count))
    return {cputype: (offset, size) for cputype, _subtype, offset, size, _align in entries}


def thin_macho(data, cpu, name):
    """What `lipo -thin cpu` writes: the slice for `cpu`, copied out. Each slice is a complete thin
    Mach-O, load commands and code signature (if any) included, so nothing in it needs changing.
    `name` is for errors."""
    if not is_fat_macho(data):
        raise BuildError(f"{name} is not a universal (fat) Mach-O binary")
    slices = fat_slices(data)
    if CPU_TYPES[cpu] not in slices:
        held = ", ".join(f"{cputype:#010x}" for cputype in slices)
        raise BuildError(f"{name} has no {cpu} slice (it holds cputypes {held})")
    offset, size = slices[CPU_TYPES[cpu]]
    if offset + size > len(data):
        raise BuildError(f"{name}: its {cpu} slice runs past the end of the file")
    return data[offset:offset + size]


def zip_prefix(path, pyz):
    """The bytes before the zip's first entry: a pex's shebang line."""
    start = min((entry.header_offset for entry in pyz.infolist()), default=pyz.start_dir)
    with path.open("rb") as f:
        return f.read(start)


def thin_fat_binaries(path, cpu):
    """Rewrite the zipapp at `path` with each fat Mach-O entry cut to its `cpu` slice.

    Every entry keeps its ZipInfo (name, date, compression, mode) and place, and the prefix stays.
    Each is deflated again by the same zlib at pex's level (the default), which gives pex's bytes
    back, so the output is as reproducible as pex's: a file without fat binaries comes out
    unchanged. PEX-INFO and the wheels' RECORDs keep the published wheel's hashes: pex uses the
    first only to name its cache directories and checks neither at run time.
    """
    partial = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(path) as pyz, partial.open("wb") as f:
        f.write(zip_prefix(path, pyz))
        with zipfile.ZipFile(f, "w") as thinned:
            for entry in pyz.infolist():
                data = pyz.read(entry)
                if is_fat_macho(data):
                    data = thin_macho(data, cpu, entry.filename)
                thinned.writestr(entry, data)
    shutil.copymode(path, partial)
    partial.replace(path)


# --- broker: one pex per platform -----------------------------------------------------------


#: Runs before pex's bootstrap in each broker file's __main__.py, so a wrong machine hears one
#: line instead of pex's list of wheels it could not use. %-formatting only: any python3 parses it.
PREAMBLE = '''\
# Dispatch: on a machine this file's compiled wheels were not built for, say so in one line.
import platform as _platform
import sys as _sys

_files = {files!r}
_here = (_sys.platform, _platform.machine().lower())
if _files.get(_here) != {filename!r}:
    _sys.exit("dispatch: {filename} is for {title}, and this machine is %s %s: %s" % (
        _sys.platform, _platform.machine(),
        "use %s (python3 build.py writes it)" % _files[_here] if _here in _files
        else "install Dispatch from a checkout with pip instead (README)"))
if _sys.implementation.name != "cpython" or not {oldest} <= _sys.version_info[:2] <= {newest}:
    _sys.exit("dispatch: {filename} needs CPython {first} to {last}, and this is %s %d.%d" % (
        _sys.implementation.name, _sys.version_info[0], _sys.version_info[1]))
del _platform, _sys, _files, _here
'''


def preamble(target):
    files = {(p.system, machine): p.filename for p in PLATFORMS for machine in p.machines}
    version = lambda python: tuple(int(part) for part in python.split("."))  # noqa: E731
    return PREAMBLE.format(files=files, filename=target.filename, title=target.title,
                           oldest=version(PYTHONS[0]), newest=version(PYTHONS[-1]),
                           first=PYTHONS[0], last=PYTHONS[-1])


def host_platform():
    """The Platform this Python runs on, or None when no broker file is built for it."""
    here = (sys.platform, platform.machine().lower())
    return next((p for p in PLATFORMS if here[0] == p.system and here[1] in p.machines), None)


#: Where build.py installs pex for itself when the running Python has none (a fresh machine).
TOOLS_VENV = ROOT / "build" / "venv"


def require_pex():
    """Return pex's version. Without pex, install the pinned one into build/venv and re-run there."""
    if importlib.util.find_spec("pex") is None:
        bootstrap_pex()
    from pex.version import __version__

    return __version__


def bootstrap_pex():
    """Make build/venv with the pex requirements.lock pins, then replace this process with
    build.py running in it: README's quick start needs nothing but Python and pip."""
    python = TOOLS_VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == TOOLS_VENV.resolve():
        raise BuildError(f"pex is still missing in {TOOLS_VENV}: delete it and run again")
    print(f"pex not found: installing it into {TOOLS_VENV.relative_to(ROOT)}", file=sys.stderr, flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TOOLS_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "-c", str(ROOT / "requirements.lock"), "pex"], check=True)
    os.execv(str(python), [str(python), str(ROOT / "build.py"), *sys.argv[1:]])


def warn_unless_pex_wrote(path, lock, pex_version):
    """The pex version is part of the output's bytes, so a different one cannot reproduce them."""
    if pex_version != lock["pex_version"]:
        print(
            f"warning: pex {pex_version} is not the pex {lock['pex_version']} that wrote "
            f"{path.name}; the broker files will not match other builds byte for byte",
            file=sys.stderr,
        )


def pex_environment():
    # ~/.pexrc and /etc/pexrc would change the build from one machine to the next.
    return {**os.environ, "PEX_IGNORE_RCFILES": "1"}


def pex_platforms(target):
    """Abbreviated pex platforms, one per CPython.

    The full version (3.12.0, not 3.12) lets pip evaluate python_full_version markers, which
    it must do for some wheels when it downloads them for a machine other than this one.
    """
    return [f"{target.wheel_platform}-cp-{python}.0-cp{python.replace('.', '')}" for python in PYTHONS]


def pex_command(target, out_dir, preamble_file):
    command = [
        sys.executable, "-m", "pex",
        "--lock", str(target.lock),
        "--pip-version", PIP_VERSION,
        "--no-build",
        "--module", BROKER_MODULE,
        # pex runs sys.exit(main()), so main's return value is the exit status.
        "--entry-point", f"{BROKER_MODULE}:main",
        # Warm starts re-exec a venv kept in PEX_ROOT: ~160 ms here, against ~730 ms for the
        # default mode, which checks every unpacked wheel on each start.
        "--venv",
        # `./broker.pyz` uses whichever python3 is first on PATH, like `python3 broker.pyz`.
        "--python-shebang", "/usr/bin/env python3",
        "--preamble-file", str(preamble_file),
        "--output-file", str(out_dir / target.filename),
    ]
    for pex_platform in pex_platforms(target):
        command += ["--platform", pex_platform]
    # pex leaves each one out with whatever only it needs, and its runtime does not look for them.
    for project in BROKER_EXCLUDES:
        command += ["--exclude", project]
    return command


def build_broker(target, src_dir, out_dir):
    """Write out_dir/broker-<platform>.pyz from dispatch_broker.py in src_dir and the locked wheels."""
    if not (src_dir / f"{BROKER_MODULE}.py").exists():
        raise BuildError(f"no {BROKER_MODULE}.py in {src_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        preamble_file = Path(tmp) / "preamble.py"
        preamble_file.write_text(preamble(target))
        # pex finds --module relative to the working directory; its stdout only echoes the path.
        done = subprocess.run(pex_command(target, out_dir, preamble_file), cwd=src_dir,
                              env=pex_environment(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise BuildError(f"pex failed for {target.filename} (exit {done.returncode}):\n{done.stderr}")
    if target.thin_to is not None:
        thin_fat_binaries(out_dir / target.filename, target.thin_to)
    return out_dir / target.filename


def describe(path):
    """One line for the build log: path, size and sha256."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    size = path.stat().st_size
    shown = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
    return f"{path}  {shown}  sha256 {digest}"


# --- CLI ------------------------------------------------------------------------------------


def serve(out_dir):
    """Replace this process with the development broker (README's quick start).

    From the repo root, so ./dispatch.db, ./tokens and the dist/plugin.pyz path that `--dev`
    prints for `claude mcp add` are where README says. DISPATCH_* variables set its flags.
    """
    broker = out_dir / HOST_BROKER
    if not broker.exists():
        raise BuildError(f"no {broker}: no broker file is built for this machine")
    os.chdir(ROOT)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, str(broker), "serve", "--dev"])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", choices=("build", "serve"), default="build",
                        help="serve: build, then run the development broker (default: build)")
    parser.add_argument("--out", type=Path, default=ROOT / "dist",
                        help="directory for the .pyz files (default: dist/)")
    parser.add_argument("--src", type=Path, default=ROOT,
                        help="directory holding dispatch_broker.py and dispatch_plugin.py "
                             "(default: this repo; tests point it at stand-in modules)")
    parser.add_argument("--platform", dest="platforms", action="append",
                        choices=[p.name for p in PLATFORMS],
                        help="build only this platform's broker file (repeatable; default: all)")
    parser.add_argument("--relock", action="store_true",
                        help="rewrite pex.lock from pyproject.toml's dependencies, then build")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    started = time.monotonic()
    targets = [p for p in PLATFORMS if args.platforms is None or p.name in args.platforms]
    src_dir, out_dir = args.src.resolve(), args.out.resolve()
    host = host_platform()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        built = [build_plugin(src_dir, out_dir)]
        pex_version = require_pex()
        if args.relock:
            relock()
        for lock in sorted({target.lock for target in targets}):
            warn_unless_pex_wrote(lock, read_lock(lock), pex_version)
        built += [build_broker(target, src_dir, out_dir) for target in targets]
        if host in targets:
            shutil.copyfile(out_dir / host.filename, out_dir / HOST_BROKER)
            (out_dir / HOST_BROKER).chmod(0o755)
            built.append(out_dir / HOST_BROKER)
        elif args.command == "serve" or args.platforms is None:
            print(f"note: no broker file is built for this machine ({sys.platform} "
                  f"{platform.machine()}), so there is no {HOST_BROKER}", file=sys.stderr)
        for path in built:
            print(describe(path))
        print(f"built in {time.monotonic() - started:.0f} s")
        if args.command == "serve":
            serve(out_dir)
    except BuildError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"Error: {e.cmd[2]} failed (exit {e.returncode}); its message is above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
