"""Build Dispatch's two single-file zipapps with pex: dist/broker.pyz and dist/plugin.pyz.

    pyproject.toml [project].dependencies ──(--relock)──> pex.lock   (every wheel pinned by sha256)
    pex.lock + dispatch_broker.py ──pex──> dist/broker.pyz   Linux x86_64/aarch64, CPython 3.11-3.14
    pex.lock + dispatch_plugin.py ──pex──> dist/plugin.pyz   the same + macOS arm64
    python3 dist/plugin.pyz ──1st run──> $PEX_ROOT/  (unpack every target's wheels, make a venv:
                            ──later───> re-exec that venv     ~140 MB and ~5 s for the plugin,
                                                              ~100 MB for the broker)

Each file needs only a CPython interpreter at run time: no venv, pip or network. The compiled
wheels (pydantic_core, cryptography, cffi, and rpds-py in the plugin) cannot be imported from
inside a zip, so the first run unpacks the zipapp into PEX_ROOT, which defaults to
$XDG_CACHE_HOME/pex or ~/.cache/pex (~/Library/Caches/pex on macOS). Set PEX_ROOT to move it;
the systemd unit points it at its CacheDirectory. If PEX_ROOT is not writable, pex unpacks into a
temporary directory on every run.

Run (without pex importable, build.py first installs the pinned pex into build/venv):
    python3 build.py                 # writes dist/, prints size and sha256 of each file
    python3 build.py serve           # then runs dist/broker.pyz serve --dev from the repo root
    python3 build.py --out DIR       # somewhere else (the reproducibility test builds twice)
    python3 build.py --relock        # after changing dependencies in pyproject.toml

Size (31.5 MB broker, 48.7 MB plugin): each compiled wheel but cryptography's (abi3: one per
platform, ~4.7 MB) is carried once per CPython x platform, 8 copies in the broker and 12 in the
plugin. pydantic_core's copies (~2.1 MB each) are over half of each file, cryptography's most of
the rest. ZIPAPPS leaves out the locked projects nothing we run imports (see NEVER_IMPORTED and
CLIENT_ONLY); the tests run the real files without them. pex has no smaller form of a single-file
zipapp: it deflates at zlib's default level with no setting for it, --no-pre-install-wheels
carries the wheels as published (~3% larger), --layout packed/loose is a directory, and --rc's
zstd needs a native launcher fetched from outside the package index. One file per platform would
be 17-19 MB each.

Reproducible: pex writes zip entries in a fixed order dated 1980-01-01, and pex.lock pins each
wheel by hash, so two builds of one commit with the same pex and the same build Python (pex's
bootstrap differs either side of 3.12) give the same sha256. SOURCE_DATE_EPOCH is not needed.
Downloaded wheels stay in pex's own cache (~/.cache/pex), so only the first build uses the network.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

# --- defaults -------------------------------------------------------------------------------

#: Paths are relative to this file, so the build works from any working directory.
ROOT = Path(__file__).resolve().parent
#: Checked in: the universal lock every build resolves from, so no build resolves anew.
LOCK_FILE = ROOT / "pex.lock"
PYPROJECT = ROOT / "pyproject.toml"

#: CPython versions every zipapp must run on; each one adds a copy of every compiled wheel.
PYTHONS = ("3.11", "3.12", "3.13", "3.14")
#: manylinux2014 is glibc 2.17+, so pex picks the most portable wheel each project offers.
LINUX = ("manylinux2014_x86_64", "manylinux2014_aarch64")
#: macOS 11 was the first release on arm64, so its wheels run on every Apple-silicon Mac.
MACOS = ("macosx_11_0_arm64",)
#: One pip for locking and building, so both resolve alike. Not pex's default (26.2.2): the
#: package index this project uses does not serve that release.
PIP_VERSION = "26.2.1"


@dataclass(frozen=True)
class Zipapp:
    """One output file: which module it carries, the wheel platforms it must run on, and the
    locked projects it leaves out because nothing it runs imports them."""

    name: str
    module: str
    systems: tuple
    excludes: tuple = ()

    @property
    def entry_point(self):
        # pex runs sys.exit(main()), so main's return value is the exit status.
        return f"{self.module}:main"


#: Only cffi's Python package imports pycparser (to parse C declarations when an FFI object is
#: made); cryptography's compiled bindings load the _cffi_backend extension alone and nothing we
#: run imports `cffi` itself. cffi and cryptography stay: `import mcp.client` and `import
#: mcp.server` both reach mcp.server.request_state, which imports cryptography at module level.
NEVER_IMPORTED = ("pycparser",)
#: Only mcp's client imports jsonschema (mcp.client.session, lazily, to check a tool's result
#: against its output schema); no server module of mcp, starlette, uvicorn or pydantic does. pex
#: drops what only it needs: referencing, jsonschema-specifications, attrs and rpds-py (a compiled
#: wheel per CPython x platform, ~2.9 MB of the broker). The plugin keeps it: the broker's tools
#: declare output schemas, so the plugin's first tools/call imports jsonschema.
CLIENT_ONLY = ("jsonschema",)

ZIPAPPS = (
    # A service on Linux hosts.
    Zipapp("broker", "dispatch_broker", LINUX, excludes=NEVER_IMPORTED + CLIENT_ONLY),
    # Runs wherever Claude Code does.
    Zipapp("plugin", "dispatch_plugin", LINUX + MACOS, excludes=NEVER_IMPORTED),
)


class BuildError(Exception):
    """The build cannot go on; the message says what to do."""


# --- lock -----------------------------------------------------------------------------------


def runtime_requirements():
    """What goes in the zipapps: pyproject's runtime dependencies, never its extras."""
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def normalized(requirements):
    # The lock stores requirements as pex rewrote them ("mcp<3,>=2.3"): compare them the same way.
    from pex.third_party.packaging.requirements import Requirement

    return sorted(str(Requirement(requirement)) for requirement in requirements)


def read_lock():
    """Return the lock, refusing one that no longer matches pyproject.toml."""
    if not LOCK_FILE.exists():
        raise BuildError(f"{LOCK_FILE.name} is missing: run python3 build.py --relock")
    lock = json.loads(LOCK_FILE.read_text())
    if normalized(lock["requirements"]) != normalized(runtime_requirements()):
        raise BuildError(
            f"{LOCK_FILE.name} locks {lock['requirements']} but pyproject.toml asks for "
            f"{runtime_requirements()}: run python3 build.py --relock"
        )
    return lock


def relock():
    """Rewrite pex.lock: one universal resolve that covers every target of every zipapp."""
    newest = PYTHONS[-1].split(".")
    command = [
        sys.executable, "-m", "pex.cli", "lock", "create",
        "--style", "universal",
        "--target-system", "linux", "--target-system", "mac",
        "--interpreter-constraint", f"CPython>={PYTHONS[0]},<{newest[0]}.{int(newest[1]) + 1}",
        "--pip-version", PIP_VERSION,
        "--no-build",  # wheels only: nothing may be compiled for a machine we are not on
        "--elide-unused-requires-dist",
        "--indent", "2",
        "--output", str(LOCK_FILE),
        *runtime_requirements(),
    ]
    subprocess.run(command, check=True, env=pex_environment())


# --- build ----------------------------------------------------------------------------------


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


def warn_unless_pex_wrote(lock, pex_version):
    """The pex version is part of the output's bytes, so a different one cannot reproduce them."""
    if pex_version != lock["pex_version"]:
        print(
            f"warning: pex {pex_version} is not the pex {lock['pex_version']} that wrote "
            f"{LOCK_FILE.name}; the zipapps will not match other builds byte for byte",
            file=sys.stderr,
        )


def pex_environment():
    # ~/.pexrc and /etc/pexrc would change the build from one machine to the next.
    return {**os.environ, "PEX_IGNORE_RCFILES": "1"}


def pex_platforms(zipapp):
    """Abbreviated pex platforms, one per (system, Python) pair.

    The full version (3.12.0, not 3.12) lets pip evaluate python_full_version markers, which
    it must do for some wheels when it downloads them for a machine other than this one.
    """
    return [
        f"{system}-cp-{python}.0-cp{python.replace('.', '')}"
        for system in zipapp.systems
        for python in PYTHONS
    ]


def pex_command(zipapp, out_dir):
    command = [
        sys.executable, "-m", "pex",
        "--lock", str(LOCK_FILE),
        "--pip-version", PIP_VERSION,
        "--no-build",
        "--module", zipapp.module,
        "--entry-point", zipapp.entry_point,
        # Warm starts re-exec a venv kept in PEX_ROOT: ~160 ms here, against ~730 ms for the
        # default mode, which checks every unpacked wheel on each start.
        "--venv",
        # `./plugin.pyz` uses whichever python3 is first on PATH, like `python3 plugin.pyz`.
        "--python-shebang", "/usr/bin/env python3",
        "--output-file", str(out_dir / f"{zipapp.name}.pyz"),
    ]
    for platform in pex_platforms(zipapp):
        command += ["--platform", platform]
    # pex leaves each one out with whatever only it needs, and its runtime does not look for them.
    for project in zipapp.excludes:
        command += ["--exclude", project]
    return command


def build(zipapp, src_dir, out_dir):
    """Write out_dir/<name>.pyz from the module in src_dir and the locked wheels."""
    if not (src_dir / f"{zipapp.module}.py").exists():
        raise BuildError(f"no {zipapp.module}.py in {src_dir}")
    # pex finds --module relative to the working directory; its stdout only echoes the path.
    subprocess.run(pex_command(zipapp, out_dir), cwd=src_dir, env=pex_environment(),
                   stdout=subprocess.DEVNULL, check=True)
    return out_dir / f"{zipapp.name}.pyz"


def describe(path):
    """One line for the build log: path, size in MB and sha256."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"{path}  {path.stat().st_size / 1e6:.1f} MB  sha256 {digest}"


# --- CLI ------------------------------------------------------------------------------------


def serve(out_dir):
    """Replace this process with the development broker (README's quick start).

    From the repo root, so ./dispatch.db, ./tokens and the dist/plugin.pyz path that `--dev`
    prints for `claude mcp add` are where README says. DISPATCH_* variables set its flags.
    """
    os.chdir(ROOT)
    sys.stdout.flush()
    broker = [sys.executable, str(out_dir / "broker.pyz"), "serve", "--dev"]
    os.execv(sys.executable, broker)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", choices=("build", "serve"), default="build",
                        help="serve: build, then run the development broker (default: build)")
    parser.add_argument("--out", type=Path, default=ROOT / "dist",
                        help="directory for the .pyz files (default: dist/)")
    parser.add_argument("--src", type=Path, default=ROOT,
                        help="directory holding dispatch_broker.py and dispatch_plugin.py "
                             "(default: this repo; tests point it at stand-in modules)")
    parser.add_argument("--relock", action="store_true",
                        help="rewrite pex.lock from pyproject.toml's dependencies, then build")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    started = time.monotonic()
    try:
        pex_version = require_pex()
        if args.relock:
            relock()
        warn_unless_pex_wrote(read_lock(), pex_version)
        args.out.mkdir(parents=True, exist_ok=True)
        built = [build(zipapp, args.src.resolve(), args.out.resolve()) for zipapp in ZIPAPPS]
    except BuildError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"Error: pex failed (exit {e.returncode}); its message is above", file=sys.stderr)
        return 1
    for path in built:
        print(describe(path))
    print(f"built in {time.monotonic() - started:.0f} s")
    if args.command == "serve":
        serve(args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
