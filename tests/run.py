"""Run the whole test suite, installing what it needs first (README's test command).

    python3 tests/run.py [pytest arguments]

Set-up, each step skipped when already done:
  1. .venv with this project and its `test` and `build` extras (pinned by requirements.lock);
  2. Claude Code from npm into .claude-code/ (for the `claude mcp list` and `plugin validate` tests);
  3. systemd-analyze from Debian's `systemd` package when running as root (for the unit's tests).
Then pytest runs inside .venv and its exit code is ours.
"""

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
#: Name the version: a bare install may resolve an older Claude Code without channels.
CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.330"


def step(what: str, command: list[str], **kwargs) -> None:
    print(f"==> {what}", flush=True)
    subprocess.run(command, check=True, **kwargs)


def ensure_venv() -> None:
    if not PYTHON.exists():
        print("==> creating .venv", flush=True)
        venv.create(VENV, with_pip=True)
    constraints = ["-c", str(ROOT / "requirements.lock")] if (ROOT / "requirements.lock").exists() else []
    step("installing the project with its test and build extras",
         [str(PYTHON), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", f"{ROOT}[test,build]",
          *constraints])


def ensure_claude_code() -> None:
    if (ROOT / ".claude-code" / "node_modules" / ".bin" / "claude").exists():
        return
    if not shutil.which("npm"):
        print("==> npm not found: the Claude Code tests will be skipped", flush=True)
        return
    step(f"installing {CLAUDE_CODE} into .claude-code/",
         ["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(ROOT / ".claude-code"), CLAUDE_CODE])


def ensure_systemd_analyze() -> None:
    if shutil.which("systemd-analyze"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("==> systemd-analyze not found and not root: the unit checks will be skipped", flush=True)
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    step("apt-get update", ["apt-get", "update", "-qq"], env=env)
    step("installing systemd (for systemd-analyze)",
         ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "systemd"], env=env)


def main() -> int:
    os.chdir(ROOT)
    ensure_venv()
    ensure_claude_code()
    ensure_systemd_analyze()
    print("==> pytest", flush=True)
    return subprocess.run([str(PYTHON), "-m", "pytest", "-ra", *sys.argv[1:]]).returncode


if __name__ == "__main__":
    sys.exit(main())
