"""Section `ways` (real Claude Code): send → the model's request, for each way mail reaches a session.

    t0: BrokerClient send ──▶ broker ──▶ the bench's plugin, the stdio server of a real Claude Code
        ──channel event (flag) / inbox socket write (no flag)──▶ Claude Code starts a turn
        ──▶ t1: POST /v1/messages holding the body, at the Messages API stand-in

One idle session per way, the plugin added with `claude mcp add` as `dispatch`: `channel` started
with --dangerously-load-development-channels server:dispatch, `socket` with no flag and the inbox
gate open. Each send waits until the previous one reached the model, then GAP_S, as mail comes
in a conversation (the plugin's own bucket for the inbox refills one write per 4 s past a burst
of 10; the gap and the typed prompt between sends keep every send under it, so this measures the
way, not the pacing). The floor beside each: Claude Code's own, a prompt typed into the same
session (tmux send-keys) → its request. Needs tmux and Claude Code (`python3 tests/run.py`
installs the pinned one); without them the section says so and is "not run".
"""

import asyncio
import os
import subprocess
import time
from typing import Any

from context import Bench, BrokerProc, dispatch_plugin
from measure import say, stats

import claude_session as cs  # the tests' driver of real Claude Code (context put tests/ on the path)

#: Sends each way (after WARMUP), and the pause after each reached the model.
N, QUICK_N, WARMUP, GAP_S = 20, 5, 2, 1.0
FLAGS = {"channel": ["--dangerously-load-development-channels", "server:dispatch"], "socket": []}


async def ways(bench: Bench) -> None:
    if not (cs.CLAUDE and cs.TMUX):
        say("ways: no Claude Code or tmux here: not run")
        return
    broker = BrokerProc(bench, "ways", "ways", "peer")
    broker.start_timed()
    try:
        n = QUICK_N if bench.plan.quick else N
        result = {way: await asyncio.to_thread(measure, bench, broker, way, n) for way in FLAGS}
    finally:
        broker.stop()
    version = subprocess.run([cs.CLAUDE, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    bench.results["ways"] = {**result, "claude_code": version}


def measure(bench: Bench, broker: BrokerProc, way: str, n: int) -> dict[str, Any]:
    say(f"ways: {way}: {n} sends to an idle real Claude Code session, each with a typed prompt beside it")
    home, project = bench.work / f"ways-{way}" / "home", bench.work / f"ways-{way}" / "project"
    cs.prepare_home(home, project)
    bindir = cs.python3_shim(bench.work / f"ways-{way}" / "bin", bench.py)
    path = f"{bindir}{os.pathsep}{os.environ['PATH']}"
    cs.run_claude(home, "mcp", "add", "--scope", "user", "dispatch", "--", "python3", str(bench.plugin_pyz),
                  cwd=project, env={"PATH": path})
    api = cs.MessagesStandIn()
    env = {"DISPATCH_URL": broker.url, "DISPATCH_TOKEN": broker.token("ways"), "PATH": path,
           "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1"}
    session = cs.ClaudeSession(home, project, FLAGS[way], api, env)
    session.env.pop("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", None)  # the inbox's gate is read only without it
    try:
        session.start()
        session.submit("first prompt")
        name = f"ways-{session.session_id.replace('-', '')[:8]}"
        cs.wait_for(lambda: broker.query("SELECT 1 FROM participants WHERE name = ?", name), 30,
                    what=f"{name} known to the broker")
        time.sleep(2)  # its listen (or socket) settles, as in a session that has been up a while
        sender = dispatch_plugin.BrokerClient(dispatch_plugin.Config(
            url=broker.url, token=broker.token("peer"), base="peer", name="peer-ways", token_source="bench"))
        sender.identify()
        mail, typed = [], []
        for i in range(WARMUP + n):
            body = f"ways-{way}-{i}-{os.urandom(3).hex()}"
            t0 = time.time()
            sender.send("send", to=name, body=body)
            seen = reached(api, body) - t0
            time.sleep(GAP_S)
            prompt = f"typed {i} {os.urandom(3).hex()}"
            t0 = time.time()
            session.type(prompt)
            shown = reached(api, prompt) - t0
            time.sleep(GAP_S)
            if i >= WARMUP:
                mail.append(seen)
                typed.append(shown)
        return {"send_to_model_ms": stats(mail), "typed_to_model_ms": stats(typed)}
    finally:
        session.close()
        api.close()


def reached(api: "cs.MessagesStandIn", needle: str, timeout: float = 30) -> float:
    """When the first /v1/messages request holding `needle` reached the stand-in (wall clock)."""
    def first():
        return next((r["time"] for r in api.messages_records()
                     if isinstance(r["body"], dict) and cs.occurrences(needle, r["body"])), None)
    return cs.wait_for(first, timeout, 0.02, what=f"a request to the model with {needle!r}")
