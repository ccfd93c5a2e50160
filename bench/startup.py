"""Sections `size` and `startup`: what the .pyz files weigh, and how long each program takes to start.

    python3 -I -c pass      spawn ──────────────▶ exit                  (the interpreter's floor)
    plugin.pyz              spawn ──▶ initialize answered ──▶ link up   (first start, then warm)
                            (each warm start right after a floor start, both spawned alike)
    dispatch_plugin.py      spawn ──▶ initialize answered                (warm; compiled at each start)
    broker.pyz serve        spawn ──────────────▶ GET /healthz 200      (cold PEX_ROOT, then warm)

`startup` also starts the main broker (the cold one), with tokens minted by the harness
(dispatch_broker.py's `token add`) before its timed start: base `snd` for senders, `rcv` for receiver
plugins, `cpu` for the send loop. A broker's start is timed to the harness's /healthz poll (every
50 ms).
"""

import asyncio
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

    say("startup: first plugin start (fresh PEX_ROOT)")
    closed = f"http://127.0.0.1:{free_port()}/mcp"  # initialize must not depend on the broker
    cold = await PluginProc(bench, "snd-cold", main.token("snd"), closed).spawn()
    result["plugin_cold_ms"] = round(await cold.handshake() * 1000, 1)
    await cold.close()
    say(f"startup: warm plugin starts x {plan.plugin_warm_reps}, each after a `python3 -I -c pass` (the floor)")
    floor, samples, link = [], [], []
    for i in range(plan.plugin_warm_reps):
        # Side by side: a drift in the machine's speed moves the floor and the plugin alike.
        floor.append(await python_pass(bench))
        # Against the live broker: initialize does not wait for it, the link-up time does.
        p = await PluginProc(bench, f"snd-warm{i}", main.token("snd"), main.url).spawn()
        samples.append(await p.handshake())
        link.append(await p.wait_connected())
        await p.close()
        # Let this session's teardown (its listen ending at the broker) finish before the next
        # pair of starts, or it lands in their figures.
        await asyncio.sleep(SETTLE_S)
    result["python_pass_ms"] = stats(floor)
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


async def python_pass(bench: Bench) -> float:
    """Seconds from spawning `python3 -I -c pass` to its exit, spawned as PluginProc spawns a
    plugin (asyncio, pipes), so that the two figures differ only in what the programs do."""
    t0 = now()
    proc = await asyncio.create_subprocess_exec(bench.py, "-I", "-c", "pass", stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE)
    await proc.wait()
    return now() - t0


def broker_warm(bench: Bench) -> dict[str, Any]:
    """Every warm broker start of the run (the spare ones and the scale broker), once they are all in."""
    bench.results["startup"]["broker_warm_ms"] = stats(bench.broker_warm)
    return bench.results["startup"]
