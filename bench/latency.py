"""Section `latency` (on the plugins' crowd): send → channel, one message at a time.

    t0: `send` tools/call written to A's stdin ──▶ broker ──▶ t1: B's notifications/claude/channel
                                                              line read from B's stdout
    t2: A's answer to the send read from A's stdout

Back to back (the headline, measured like the floor): the next send is written the moment the
previous one is on B's stdout and answered at A, so every process stays hot. Spaced: each send
starts floor.GAP_S after the previous one landed, as in a conversation, so every hop pays for
waking an idle process; it compares with the floor's spaced figure.
"""

import asyncio
from typing import Any

from context import Bench, BrokerProc, PluginProc, cpu_of
from floor import GAP_S
from measure import say, stats


async def latency(bench: Bench, a: PluginProc, b: PluginProc, broker: BrokerProc) -> None:
    plan = bench.plan
    say(f"latency: {plan.latency_n} sequential sends {a.name} -> {b.name} back to back, then "
        f"{plan.latency_n} spaced {GAP_S * 1000:.0f} ms apart")
    result: dict[str, Any] = {}
    for mode, gap in (("back_to_back", 0.0), ("spaced", GAP_S)):
        samples, answers = [], []
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
            if gap:
                await asyncio.sleep(gap)
        bench.profile_stop(profile)
        cpu1 = cpu_of(broker, [(a, b)])
        run = stats(samples)
        run["send_answer_ms"] = stats(answers)
        run["cpu_ms_per_msg"] = {k: round((cpu1[k] - cpu0[k]) * 1000 / (plan.latency_warmup + plan.latency_n), 3)
                                 for k in cpu0}
        if gap:
            run["gap_ms"] = gap * 1000
            result["spaced"] = run
        else:
            result.update(run)
        say(f"  {mode}: p50 {run['p50']} ms, p99 {run['p99']} ms, max {run['max']} ms")
    bench.results["latency"] = result
