"""Sections `size` and `startup`: what the .pyz files weigh, and how long each program takes to start.

    python3 -I -c pass      spawn ──────────────▶ exit                  (the interpreter's floor)
    plugin.pyz              spawn ──▶ initialize answered ──▶ link up   (first start, then warm)
    dispatch_plugin.py      spawn ──▶ initialize answered                (warm; compiled at each start)
    broker.pyz serve        spawn ──────────────▶ GET /healthz 200      (cold PEX_ROOT, then warm)

`startup` also starts the main broker (the cold one), with tokens minted by the harness
(dispatch_broker.py's `token add`) before its timed start: base `snd` for senders, `rcv` for receiver
plugins, `cpu` for the send loop. A broker's start is timed to the harness's /healthz poll (every
50 ms).
"""

import asyncio
import subprocess
from typing import Any

from context import Bench, BrokerProc, PluginProc, free_port
from measure import now, say, stats

#: Between two warm plugin starts: the previous session's teardown at the broker is over by then.
SETTLE_S = 0.3


def size(bench: Bench) -> None:
    """plugin.pyz, broker.pyz (this machine's broker file) and each platform's broker-*.pyz, in bytes."""
    names = ["broker.pyz", "plugin.pyz", *sorted(p.name for p in bench.dist.glob("broker-*.pyz"))]
    bench.results["size"] = {name: (bench.dist / name).stat().st_size for name in names}


async def startup(bench: Bench) -> BrokerProc:
    """Cold then warm starts; returns the main broker (the cold-started one, tokens loaded)."""
    plan, result = bench.plan, {}
    say("startup: cold broker (fresh PEX_ROOT)")
    main = BrokerProc(bench, "main", "snd", "rcv", "cpu")
    result["broker_cold_ms"] = round(main.start_timed() * 1000, 1)
    say(f"  broker cold {result['broker_cold_ms']} ms")

    for i in range(plan.broker_warm_reps):
        extra = BrokerProc(bench, f"warm{i}")
        bench.broker_warm.append(extra.start_timed())
        extra.stop()

    say(f"startup: `python3 -I -c pass` x {plan.python_reps}, the interpreter's own start")
    samples = []
    for _ in range(plan.python_reps):
        t0 = now()
        subprocess.run([bench.py, "-I", "-c", "pass"], check=True)
        samples.append(now() - t0)
    result["python_pass_ms"] = stats(samples)

    say("startup: first plugin start (fresh PEX_ROOT)")
    closed = f"http://127.0.0.1:{free_port()}/mcp"  # initialize must not depend on the broker
    cold = await PluginProc(bench, "snd-cold", main.token("snd"), closed).spawn()
    result["plugin_cold_ms"] = round(await cold.handshake() * 1000, 1)
    await cold.close()
    samples, link = [], []
    for i in range(plan.plugin_warm_reps):
        # Against the live broker: initialize does not wait for it, the link-up time does.
        p = await PluginProc(bench, f"snd-warm{i}", main.token("snd"), main.url).spawn()
        samples.append(await p.handshake())
        link.append(await p.wait_connected())
        await p.close()
        # The floor's starts meet an idle machine; let this session's teardown (its listen ending
        # at the broker) finish before the next start, or it lands in that start's figure.
        await asyncio.sleep(SETTLE_S)
    result["plugin_warm_ms"] = stats(samples)
    result["plugin_link_up_ms"] = stats(link)
    samples = []
    for i in range(plan.plugin_warm_reps):  # no compiled code: the source is compiled at each start
        p = await PluginProc(bench, f"snd-source{i}", main.token("snd"), closed, program=bench.plugin_source).spawn()
        samples.append(await p.handshake())
        await p.close()
    result["plugin_source_warm_ms"] = stats(samples)
    say(f"  python3 -I -c pass p50 {result['python_pass_ms']['p50']} ms; plugin first {result['plugin_cold_ms']} "
        f"ms, warm p50 {result['plugin_warm_ms']['p50']} ms, link up p50 {result['plugin_link_up_ms']['p50']} ms, "
        f"from source p50 {result['plugin_source_warm_ms']['p50']} ms")
    bench.results["startup"] = result
    return main


def broker_warm(bench: Bench) -> dict[str, Any]:
    """Every warm broker start of the run (the spare ones and the scale broker), once they are all in."""
    bench.results["startup"]["broker_warm_ms"] = stats(bench.broker_warm)
    return bench.results["startup"]
