"""Section `fan-out`: send(to="*") from one plugin to everyone live, timed to the last arrival.

    snd-fan ──send(to="*")──▶ broker ──push × N──▶ N plugin processes (channel lines on stdout)
                                                   or N sessions on the plugin's BrokerClient
                                                      (bench/plugin_client.py, from the scale section)

Each round waits until every copy is acked (so the next starts on an idle broker); a level's
figure is its median round by the last arrival.
"""

import asyncio
import time

from context import Bench, BrokerProc, PluginProc
from measure import now, proc_sample, say, stats


async def settle(broker: BrokerProc, body: str, expected: int, wall0: float, timeout: float = 90) -> float | None:
    """Wait until every copy of a fan-out is acked; ms from the send to the last ack, None if not
    all were acked in time."""
    deadline = now() + timeout
    while True:
        stored, count, last = (await asyncio.to_thread(
            broker.query, "SELECT count(*), count(acked_at), max(acked_at) FROM messages WHERE body = ?", body))[0]
        if stored and count >= min(expected, stored):  # one that was not live got no copy to ack
            return round((last - wall0) * 1000, 1)
        if now() > deadline:
            return None
        await asyncio.sleep(0.05)


def round_figures(times: list[float], t0: float, t_answer: float, acked_ms: float | None) -> dict:
    """One round's arrival times (seconds after the send) as the row's figures."""
    return {"first_ms": round(times[0] * 1000, 1) if times else None, "p50_ms": stats(times).get("p50"),
            "last_ms": round(times[-1] * 1000, 1) if times else None,
            "send_answer_ms": round((t_answer - t0) * 1000, 1), "all_acked_ms": acked_ms}


def summary(bench: Bench, rounds: list[dict]) -> None:
    """The median round by the last arrival, with every round's last and the most missing."""
    best = dict(sorted(rounds, key=lambda r: r["last_ms"] if r["last_ms"] is not None else 1e12)[len(rounds) // 2])
    best["runs_last_ms"] = [r["last_ms"] for r in rounds]
    best["missing"] = max(r["missing"] for r in rounds)
    bench.results.setdefault("fanout", []).append(best)
    say(f"  last arrival after {best['last_ms']} ms (median of {len(rounds)})")


async def to_plugins(bench: Bench, broker: BrokerProc, sender: PluginProc, listeners: list[PluginProc]) -> None:
    say(f"fan-out: send(to='*') to {len(listeners)} plugin listeners")
    rounds = []
    for rep in range(bench.plan.fanout_reps):
        body = f"fanp-{rep}"
        arrivals = [p.expect(body) for p in listeners]
        prof = bench.profile_start(broker, "fanout-plugins") if rep == 0 else None
        wall0 = time.time()
        t0, answered = sender.tool_nowait("send", to="*", body=body)
        done, pending = await asyncio.wait(arrivals, timeout=60)
        t_answer, _ = await asyncio.wait_for(answered, 60)
        bench.profile_stop(prof)
        acked_ms = await settle(broker, body, len(listeners), wall0)
        times = sorted(f.result() - t0 for f in done if not f.exception())
        rounds.append({"listeners": len(listeners), "kind": "plugin processes", "received": len(times),
                       "missing": len(pending), **round_figures(times, t0, t_answer, acked_ms)})
        for f in pending:
            f.cancel()
        await asyncio.sleep(bench.plan.pause)  # acks settle before the next round
    summary(bench, rounds)


async def to_sessions(bench: Bench, broker: BrokerProc, sender: PluginProc, names: set[str], arrivals: dict,
                      workers: list) -> None:
    """To the scale section's sessions; `arrivals` maps a body to the (name, time) of each copy."""
    level = len(names)
    say(f"fan-out: send(to='*') to {level} plugin-client sessions")
    rounds = []
    for rep in range(bench.plan.fanout_reps):
        body = f"fans-{level}-{rep}"
        prof = bench.profile_start(broker, f"fanout-sessions-{level}") if rep == 0 else None
        cpu0 = (broker.sample()["cpu_s"], sum(proc_sample(w.pid)["cpu_s"] for w in workers))
        wall0 = time.time()
        t0, answered = sender.tool_nowait("send", to="*", body=body)
        t_answer, _ = await asyncio.wait_for(answered, 120)
        deadline = now() + 60
        while len({n for n, _ in arrivals.get(body, [])}) < len(names) and now() < deadline:
            await asyncio.sleep(0.01)
        bench.profile_stop(prof)
        acked_ms = await settle(broker, body, len(names), wall0)
        cpu1 = (broker.sample()["cpu_s"], sum(proc_sample(w.pid)["cpu_s"] for w in workers))
        got = arrivals.get(body, [])
        received = {n for n, _ in got}
        if names - received:  # say what the broker knows of each message that did not arrive
            rows = await asyncio.to_thread(
                broker.query, "SELECT recipient, attempt, pushed_at IS NOT NULL, acked_at IS NOT NULL FROM messages "
                "WHERE body = ?", body)
            bench.results.setdefault("fanout_missing", []).extend(
                {"body": body, "recipient": r[0], "attempt": r[1], "pushed": bool(r[2]), "acked": bool(r[3])}
                for r in rows if r[0] in names - received)
            bench.results.setdefault("fanout_missing_not_stored", []).extend(
                sorted(names - received - {r[0] for r in rows})[:10])
        rounds.append({"listeners": level, "kind": "plugin-client sessions in worker processes",
                       "received": len(received), "missing": len(names - received), "duplicates": len(got) - len(received),
                       **round_figures(sorted(t - t0 for _, t in got), t0, t_answer, acked_ms),
                       # CPU seconds the round cost (send to last ack), idle load included.
                       "cpu_s": {"broker": round(cpu1[0] - cpu0[0], 2), "listeners": round(cpu1[1] - cpu0[1], 2)}})
        await asyncio.sleep(bench.plan.pause)
    summary(bench, rounds)
