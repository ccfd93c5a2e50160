"""Section `throughput` (on the plugins' crowd): S sender plugins → S receiver plugins, in pairs.

    sender i ──`send` × depth in flight──▶ broker ──▶ receiver i: channel line ──▶ transcript ──▶ mail.ack
       └─ accepted (answered "Sent.…")                  └─ delivered (seen on stdout)    acked_at in the db

Delivered per second counts first arrivals at the channels; acked per second reads the broker's
`acked_at`. A duplicate is a second arrival of one body or message id; a loss is a send reported
done whose message never reached the receiver's channel (a send reported failed may still have
been stored, its answer lost: then it arrives, and it is not a loss).

The SDK alone, the same crowds (the floor the ratios are read against, `throughput_sdk`):

    floor-send i ──`send` × depth──▶ bench/sdk_floor_server.py ──notification──▶ floor-receive i ──`ack`
    (bench/plugin_client.py: the plugin's BrokerClient, no stdio)   a commit a send and an ack, no fsync

It shows how far the mandated stack (the SDK on uvicorn, bearer auth, a send, a push and an ack a
message) scales from one sequential sender to S concurrent ones on this machine, in the same run,
with nothing of Dispatch in it and no commit waiting on the disk (synchronous=OFF): the ceiling of
any broker on the SDK here.
"""

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from typing import Any

from context import BENCH, Bench, BrokerProc, PluginProc, cpu_of
from floor import ServerProcess
from measure import Threads, now, proc_sample, say


async def throughput(bench: Bench, broker: BrokerProc, senders: list[PluginProc], receivers: list[PluginProc]) -> None:
    """One sequential sender (depth 1), then each of the plan's levels with `depth` sends in flight."""
    plan = bench.plan
    runs = [await run(bench, broker, [(senders[0], receivers[0])], plan.seq_n, depth=1, tag="tq1")]
    largest = max(s for s, _ in plan.levels)
    for s, per_sender in plan.levels:
        runs.append(await run(bench, broker, list(zip(senders[:s], receivers[:s])), per_sender, depth=plan.depth,
                              tag=f"tp{s}", profile=f"throughput-{s}" if s == largest else None))
    bench.results["throughput"] = runs
    bench.results["throughput_sdk"] = await sdk_floor(bench)


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
    count, last_ack = await until_acked(lambda: broker.query(
        "SELECT count(*), max(acked_at) FROM messages WHERE acked_at IS NOT NULL AND body LIKE ?", prefix + "%")[0],
        total - len(errors))
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


async def until_acked(acked, expected: int) -> tuple[int, float | None]:
    """`acked()`'s (count, wall time of the last ack), read again until `expected` are acked or 60 s passed."""
    deadline = now() + 60
    while True:
        count, last = await asyncio.to_thread(acked)
        if count >= expected or now() > deadline:
            return count, last
        await asyncio.sleep(0.05)


# --- the SDK alone, the same crowds ------------------------------------------------------------

class SdkCrowd(ServerProcess):
    """bench/sdk_floor_server.py, with `pairs` receivers listening on it and as many senders
    waiting for their runs (bench/plugin_client.py floor-receive / floor-send processes)."""

    SCRIPT = "sdk_floor_server.py"
    TOKEN = "dsp_bench_" + os.urandom(24).hex()

    def __init__(self, bench: Bench, pairs: int):
        super().__init__(bench, self.TOKEN, "OFF")
        self.db = bench.work / "sdk_crowd.db"
        self.args[1] = str(self.db)
        self.pairs = pairs
        self.sink = None  # (body, arrival time) for each message a receiver reports
        self.readers: list[asyncio.Task] = []

    async def connect(self) -> None:
        url = f"http://127.0.0.1:{self.port}/mcp"
        (self.bench.work / "plugins").mkdir(exist_ok=True)

        async def driver(role: str, name: str):
            with open(self.bench.work / "plugins" / f"{name}.stderr", "ab") as errors:
                proc = self.bench.children.add(await asyncio.create_subprocess_exec(
                    self.bench.py, str(BENCH / "plugin_client.py"), role, str(self.bench.plugin_pyz), url,
                    self.TOKEN, name, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=errors, env=self.bench.env(self.bench.plugin_root)))
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if "ready" not in json.loads(line or b"{}"):
                raise RuntimeError(f"{role} {name} did not start: {line!r}")
            return proc

        self.receivers = [await driver("floor-receive", f"frcv-{i}") for i in range(self.pairs)]
        self.senders = [await driver("floor-send", f"fsnd-{i}") for i in range(self.pairs)]
        self.readers = [asyncio.create_task(self.read(r)) for r in self.receivers]

    async def read(self, receiver) -> None:
        async for line in receiver.stdout:
            report = json.loads(line)
            if "m" in report and self.sink:
                self.sink(report["m"], now())
            elif "error" in report:
                say(f"  SDK floor: {report['error']}")

    def disconnect(self) -> None:
        for task in self.readers:
            task.cancel()
        for sender in self.senders:
            sender.stdin.close()  # its loop over stdin ends, and the process with it

    def acked(self, prefix: str) -> tuple[int, float | None]:
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as db:
            return db.execute("SELECT count(*), max(acked_at) FROM m WHERE acked_at IS NOT NULL AND body LIKE ?",
                              (prefix + "%",)).fetchone()


async def sdk_floor(bench: Bench) -> list[dict[str, Any]]:
    """The sequential sender and each level, through the SDK alone."""
    plan = bench.plan
    async with SdkCrowd(bench, max(s for s, _ in plan.levels)) as crowd:
        await sdk_run(crowd, 1, 20, 1, "fwarm")  # the first connections, the server's caches
        runs = [await sdk_run(crowd, 1, plan.seq_n, 1, "fq1")]
        for s, per_sender in plan.levels:
            runs.append(await sdk_run(crowd, s, per_sender, plan.depth, f"fp{s}"))
    return runs


async def sdk_run(crowd: SdkCrowd, senders: int, per_sender: int, depth: int, tag: str) -> dict[str, Any]:
    total = senders * per_sender
    say(f"throughput, the SDK alone {tag}: {senders} sender(s) x {per_sender} msgs, {depth} in flight each")
    seen: dict[str, int] = {}
    last = [0.0]
    complete = asyncio.Event()
    prefix = f"{tag}-"

    def sink(body: str, t: float) -> None:
        if body.startswith(prefix):
            seen[body] = seen.get(body, 0) + 1
            if seen[body] == 1:
                last[0] = t
                if len(seen) == total:
                    complete.set()

    crowd.sink = sink
    cpu0 = proc_sample(crowd.server.pid)["cpu_s"]
    wall0, t0 = time.time(), now()
    for i, sender in enumerate(crowd.senders[:senders]):
        sender.stdin.write(f"frcv-{i} {per_sender} {depth} {prefix}{i}\n".encode())
    reports = [json.loads(await asyncio.wait_for(s.stdout.readline(), 120 + total / 50))
               for s in crowd.senders[:senders]]
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(complete.wait(), 60 + total / 50)
    errors = sum(total // senders - r["sent"] for r in reports)
    count, last_ack = await until_acked(lambda: crowd.acked(prefix), total - errors)
    cpu1 = proc_sample(crowd.server.pid)["cpu_s"]
    await asyncio.sleep(0.5)  # room for a late duplicate to show
    crowd.sink = None
    result = {
        "senders": senders, "receivers": senders, "depth": depth, "messages": total,
        "delivered_per_s": round(len(seen) / (last[0] - t0), 1) if seen else 0,
        "acked_per_s": round(count / (last_ack - wall0), 1) if last_ack else 0,
        "delivered": len(seen), "acked": count, "duplicates": sum(c - 1 for c in seen.values()),
        "losses": total - errors - len(seen), "errors": errors,
        "cpu_ms_per_msg": {"server": round((cpu1 - cpu0) * 1000 / total, 3)},
    }
    if errors:
        result["first_error"] = next(r["errors"][0] for r in reports if r["errors"])[:300]
    say(f"  delivered {result['delivered_per_s']}/s, acked {result['acked_per_s']}/s, dup {result['duplicates']}, "
        f"lost {result['losses']}, errors {errors}; server CPU a message {result['cpu_ms_per_msg']['server']} ms")
    return result
