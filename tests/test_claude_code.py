"""Claude Code itself as the host: it validates the plugin package and reports the plugin Connected.

Uses the pinned Claude Code in .claude-code/ (`npm install --prefix .claude-code
@anthropic-ai/claude-code@2.1.330`), else `claude` on PATH; skipped when there is neither.
Every run is offline, in a throwaway HOME, from an empty working directory (the repo's own
.mcp.json would otherwise be listed too, as a project server pending approval).

`claude mcp list` exits 0 even when a server fails, so the tests read its output:
    dispatch: python3 /x/plugin.pyz - ✔ Connected
    dispatch: python3 /x/plugin.pyz - ✘ Failed to connect — CONNECTION_CLOSED: Connection closed
It waits up to MCP_TIMEOUT ms (default 30000) for initialize + tools/list.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PINNED = ROOT / ".claude-code" / "node_modules" / ".bin" / "claude"
CLAUDE = str(PINNED) if PINNED.exists() else shutil.which("claude")
PACKAGE = [".claude-plugin", ".mcp.json", "hooks"]  # the plugin's files, besides dist/plugin.pyz

needs_claude = pytest.mark.skipif(CLAUDE is None, reason="Claude Code not installed: npm install --prefix "
                                  ".claude-code @anthropic-ai/claude-code@2.1.330")


def isolated_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment minus its Claude Code / Dispatch settings, pointed at `home`, offline."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLAUDE", "ANTHROPIC_", "DISPATCH_", "MCP_")) and k != "AI_AGENT"}
    env.update(HOME=str(home), CLAUDE_CONFIG_DIR=str(home / ".claude"), CLAUDE_CODE_TMPDIR=str(home / "tmp"),
               XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"),
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",  # no telemetry, update check or DNS at all
               DISABLE_AUTOUPDATER="1")
    env.update(extra or {})
    return env


def claude(*args: str, home: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
           timeout: float = 90) -> str:
    """Run `claude ARGS` in the isolated `home`; return stdout + stderr, failing on a non-zero exit."""
    project = home / "project"
    for d in (project, home / "tmp"):
        d.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([CLAUDE, *args], cwd=cwd or project, env=isolated_env(home, env), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"claude {' '.join(args)} exited {r.returncode}:\n{out}"
    return out


def claude_mcp_list(command: list[str], env: dict[str, str], home: Path, name: str = "dispatch") -> str:
    """Register `command` as user-scope stdio server `name` (`env` given with -e), then `claude mcp list`."""
    flags = [f"--env={k}={v}" for k, v in env.items()]  # after the name: -e takes several values
    claude("mcp", "add", "--scope", "user", name, *flags, "--", *command, home=home)
    return claude("mcp", "list", home=home)


def claude_mcp_list_plugin(plugin_root: Path, env: dict[str, str], home: Path) -> str:
    """`claude --plugin-dir ROOT mcp list`: the package's own .mcp.json; the server inherits `env`."""
    return claude("--plugin-dir", str(plugin_root), "mcp", "list", home=home, env=env)


def connected(output: str, name: str) -> bool:
    return re.search(rf"^{re.escape(name)}: .* - ✔ Connected$", output, re.M) is not None


def mcp_logs(home: Path) -> str:
    """Claude Code's per-server debug log (timeouts, the server's stderr), for failure messages."""
    return "".join(p.read_text(errors="replace") for p in sorted((home / ".cache").rglob("mcp-logs-*/*.jsonl")))


def package_with(pyz: Path, where: Path) -> Path:
    """A copy of the plugin package whose dist/plugin.pyz is `pyz`."""
    (where / "dist").mkdir(parents=True)
    for part in PACKAGE:
        src, dst = ROOT / part, where / part
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    shutil.copy(pyz, where / "dist" / "plugin.pyz")
    return where


@needs_claude
def test_claude_plugin_package_validates(tmp_path):
    out = claude("plugin", "validate", "--strict", ".", home=tmp_path / "home", cwd=ROOT)
    assert "✔ Validation passed" in out, out
    assert "mcpServers: dispatch stdio python3" in out, out
    assert "commands: dispatch:doctor" in out and "commands: dispatch:status" in out, out


@needs_claude
@pytest.mark.parametrize("via", ["mcp add", "plugin dir"])
def test_claude_code_reports_the_plugin_connected(broker, dist, tmp_path, via):
    pyz = Path(dist.plugin if hasattr(dist, "plugin") else dist["plugin"])
    token = broker.token if isinstance(broker.token, str) else broker.token("claude")
    env = {"DISPATCH_URL": broker.url, "DISPATCH_TOKEN": token}
    home = tmp_path / "home"
    if via == "mcp add":  # what the broker's banner tells people to run
        name, out = "dispatch", claude_mcp_list(["python3", str(pyz)], env, home)
    else:  # the plugin package itself: .mcp.json with ${CLAUDE_PLUGIN_ROOT}
        name, out = "plugin:dispatch:dispatch", claude_mcp_list_plugin(package_with(pyz, tmp_path / "pkg"), env, home)
    assert connected(out, name), f"{out}\n{mcp_logs(home)[-4000:]}"
