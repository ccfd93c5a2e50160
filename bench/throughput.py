"""Section `throughput` (on the plugins' crowd): S sender plugins → S receiver plugins, in pairs.

    sender i ──`send` × depth in flight──▶ broker ──▶ receiver i: channel line ──▶ transcript ──▶ mail.ack
       └─ accepted (answered "Sent.…")                  └─ delivered (seen on stdout)    acked_at in the db

Delivered per second counts first arrivals at the channels; acked per second reads the broker's
`acked_at`. A duplicate is a second arrival of one body or message id; a loss is a send reported
done whose message never reached the receiver's channel (a send reported failed may still have
been stored, its answer lost: then it arrives, and it is not a loss).
"""

import asyncio
import contextlib
import time
from typing import Any

from context import Bench, BrokerProc, PluginProc, cpu_of
from measure import Threads, now, say


async def throughput(bench: Bench, broker: BrokerProc, senders: list[PluginProc], receivers: list[PluginProc]) -> None:
    """One sequential sender (depth 1), then each of the plan's levels with `depth` sends in flight."""
    plan = bench.plan
    runs = [await run(bench, broker, [(senders[0], receivers[0])], plan.seq_n, depth=1, tag="tq1")]
    largest = max(s for s, _ in plan.levels)
    for s, per_sender in plan.levels:
        runs.append(await run(bench, broker, list(zip(senders[:s], receivers[:s])), per_sender, depth=plan.depth,
                              tag=f"tp{s}", profile=f"throughput-{s}" if s == largest else None))
    bench.results["throughput"] = runs


async def run(bench: Bench, broker: BrokerProc, pairs: list[tuple[PluginProc, PluginProc]], per_sender: int, depth: int,
              tag: str, profile: str | None = None) -> dict[str, Any]:
    total = len(pairs) * per_sender
    say(f"throughput {tag}: {len(pairs)} sender(s) x {per_sender} msgs, {depth} in flight each")
    seen_bodies: dict[str, int] = {}
    seen_ids: dict[str, int] = {}
    last = [0.0]
    complete = asyncio.Event()
    prefix = f"{tag}-"

    def sink(plugin, t, message_id, body):
        if not body.startswith(prefix):
            return
        seen_ids[message_id] = seen_ids.get(message_id, 0) + 1
        seen_bodies[body] = seen_bodies.get(body, 0) + 1
        if seen_bodies[body] == 1:
            last[0] = t
            if len(seen_bodies) == total:
                complete.set()

    for _, receiver in pairs:
        receiver.sink = sink
    errors, queued, accepted = [], 0, set()

    async def sender(index: int, snd: PluginProc, rcv: PluginProc) -> None:
        bodies = iter(range(per_sender))  # shared by the lanes: each body is sent once

        async def lane() -> None:
            nonlocal queued
            for n in bodies:
                body = f"{tag}-{index}-{n}"
                text, is_error = await snd.tool("send", timeout=120, to=rcv.name, body=body)
                if is_error:
                    errors.append(text)
                    continue
                accepted.add(body)
                if not text.startswith("Sent."):
                    queued += 1
        await asyncio.gather(*(lane() for _ in range(depth)))

    prof = bench.profile_start(broker, profile, list(pairs[0])) if profile else None
    cpu0 = cpu_of(broker, pairs)
    threads = Threads(broker.pid)
    wall0, t0 = time.time(), now()
    await asyncio.gather(*(sender(i, s, r) for i, (s, r) in enumerate(pairs)))
    t_sent = now()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(complete.wait(), 60 + total / 50)
    # Acked = the broker's acked_at (the plugin acks after the channel write and flush).
    deadline = now() + 60
    while True:
        count, last_ack = (await asyncio.to_thread(
            broker.query, "SELECT count(*), max(acked_at) FROM messages WHERE acked_at IS NOT NULL AND body LIKE ?",
            prefix + "%"))[0]
        if count >= total - len(errors) or now() > deadline:
            break
        await asyncio.sleep(0.05)
    bench.profile_stop(prof)
    cpu1 = cpu_of(broker, pairs)
    broker_threads = threads.stop(total)
    await asyncio.sleep(0.5)  # room for a late duplicate to show
    for _, receiver in pairs:
        receiver.sink = None
    rows, pushes = (await asyncio.to_thread(broker.query, "SELECT count(*), coalesce(sum(attempt), 0) FROM messages "
                                            "WHERE body LIKE ?", prefix + "%"))[0]
    delivered_s = (last[0] - t0) if seen_bodies else float("nan")
    acked_s = (last_ack - wall0) if last_ack else float("nan")
    result = {
        "senders": len(pairs), "receivers": len(pairs), "depth": depth, "messages": total,
        "sent_per_s": round(total / (t_sent - t0), 1),
        "delivered_per_s": round(len(seen_bodies) / delivered_s, 1) if seen_bodies else 0,
        "acked_per_s": round(count / acked_s, 1) if last_ack else 0,
        "delivered": len(seen_bodies), "acked": count,
        "duplicates": sum(c - 1 for c in seen_bodies.values()) + sum(c - 1 for c in seen_ids.values()),
        "losses": len(accepted - seen_bodies.keys()), "errors": len(errors), "queued": queued,
        "pushes": pushes, "rows": rows,
        "cpu_ms_per_msg": {k: round((cpu1[k] - cpu0[k]) * 1000 / max(1, total), 3) for k in cpu0},
        "broker_threads": broker_threads,
    }
    if errors:
        result["first_error"] = errors[0][:300]
    say(f"  sent {result['sent_per_s']}/s, delivered {result['delivered_per_s']}/s, acked {result['acked_per_s']}/s, "
        f"dup {result['duplicates']}, lost {result['losses']}, errors {len(errors)}; broker CPU a message "
        f"{result['cpu_ms_per_msg']['broker']} ms, threads {broker_threads}")
    return result
