"""Section `latency` (on the plugins' crowd): send → channel, one message at a time.

    t0: `send` tools/call written to A's stdin ──▶ broker ──▶ t1: B's notifications/claude/channel
                                                              line read from B's stdout
    t2: A's answer to the send read from A's stdout

Back to back (the headline, measured like the floor): the next send is written the moment the
previous one is on B's stdout and answered at A, so every process stays hot. After every BLOCK
sends, BLOCK of the floor's POSTs with a FULL commit (floor.FloorServer, /insert): the floor the
p50 is read beside, measured side by side with it, so that a drift in the machine's speed during
the run moves both alike. Then BLOCK sends through the SDK alone (floor.SdkFloor): what the
broker's mandated stack costs for the same message, without Dispatch and without stdio. Spaced: each send
starts floor.GAP_S after the previous one landed, as in a conversation, so every hop pays for
waking an idle process; it compares with the floor's spaced figure.
"""

import asyncio
from typing import Any

from context import Bench, BrokerProc, PluginProc, cpu_of
from floor import GAP_S, WARMUP, FloorServer, SdkFloor
from measure import say, stats

#: Sends between two runs of floor POSTs, and floor POSTs in each.
BLOCK = 50


async def latency(bench: Bench, a: PluginProc, b: PluginProc, broker: BrokerProc) -> None:
    plan = bench.plan
    say(f"latency: {plan.latency_n} sequential sends {a.name} -> {b.name} back to back, then "
        f"{plan.latency_n} spaced {GAP_S * 1000:.0f} ms apart")
    result: dict[str, Any] = {}
    async with FloorServer(bench) as floor_server, SdkFloor(bench) as sdk_floor:
        floor_server.posts("/insert", 0)  # the warm-up: the first connection, the server's caches
        sdk_floor.sends(WARMUP)
        for mode, gap in (("back_to_back", 0.0), ("spaced", GAP_S)):
            result.update(await sends(bench, a, b, broker, mode, gap, (floor_server, sdk_floor)))
    bench.results["latency"] = result


async def sends(bench: Bench, a: PluginProc, b: PluginProc, broker: BrokerProc, mode: str, gap: float,
                floors: tuple[FloorServer, SdkFloor]) -> dict[str, Any]:
    """One mode's sends A → B, timed; back to back, with the floors' between blocks of them."""
    plan = bench.plan
    floor_server, sdk_floor = floors
    samples, answers, floor, sdk = [], [], [], []
    profile = bench.profile_start(broker, f"latency-{mode}", [a, b])
    cpu0 = cpu_of(broker, [(a, b)])
    for i in range(plan.latency_warmup + plan.latency_n):
        body = f"lat-{mode}-{i}"
        arrived = b.expect(body)
        t0, answered = a.tool_nowait("send", to=b.name, body=body)
        t1 = await asyncio.wait_for(arrived, 30)
        t2, message = await asyncio.wait_for(answered, 30)
        if message["result"].get("isError"):
            raise RuntimeError(f"send failed: {message}")
        if i >= plan.latency_warmup:
            samples.append(t1 - t0)
            answers.append(t2 - t0)
            if not gap and len(samples) % BLOCK == 0:
                floor += floor_server.posts("/insert", BLOCK, warmup=0)
                sdk += sdk_floor.sends(BLOCK)
        if gap:
            await asyncio.sleep(gap)
    bench.profile_stop(profile)
    cpu1 = cpu_of(broker, [(a, b)])
    run = stats(samples)
    run["send_answer_ms"] = stats(answers)
    run["cpu_ms_per_msg"] = {k: round((cpu1[k] - cpu0[k]) * 1000 / (plan.latency_warmup + plan.latency_n), 3)
                             for k in cpu0}
    say(f"  {mode}: p50 {run['p50']} ms, p99 {run['p99']} ms, max {run['max']} ms")
    if gap:
        run["gap_ms"] = gap * 1000
        return {"spaced": run}
    run["floor_ms"] = stats(floor or floor_server.posts("/insert", BLOCK, warmup=0))
    run["sdk_floor_ms"] = stats(sdk or sdk_floor.sends(BLOCK))
    say(f"  floor POST + FULL commit between the blocks: p50 {run['floor_ms']['p50']} ms; the SDK's own "
        f"send → notification: p50 {run['sdk_floor_ms']['p50']} ms")
    return run
