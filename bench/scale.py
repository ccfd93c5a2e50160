"""Sections `scale` and `soak`: a fresh broker with N live sessions at the plugin's cadence.

    bench/plugin_client.py listeners × ⌈N / 250⌉ processes ──identify, listen(120 s), keepalives──▶ broker
        one thread a session, on the plugin's own BrokerClient      RSS · fds · threads · CPU sampled
    snd-fan (a plugin process) ──send(to="*") at each level──▶ fan-out to the N sessions

The sessions skip the stdio side and the transcript: 1,000 of them fit in a few processes, where
1,000 plugin processes would not fit this machine. --soak keeps the largest level for
--soak-seconds (10 minutes) with a fan-out every 30 s.
"""

import asyncio
import json

import fanout
from context import BENCH, Bench, BrokerProc, Observer, PluginProc
from measure import now, say

#: Scale sessions (threads on the plugin's BrokerClient) per worker process.
LISTENERS_PER_WORKER = 250
#: Seconds between the soak's fan-outs, and between its samples.
SOAK_FANOUT_S, SOAK_SAMPLE_S = 30, 10


class ListenerWorker:
    """A process of sessions on the plugin's BrokerClient (`plugin_client.py listeners`), one
    thread each, reporting mail on stdout to `sink(name, t, body)`."""

    def __init__(self, bench: Bench, broker: BrokerProc, base: str, start: int, count: int, sink):
        self.bench, self.broker, self.base, self.start, self.count, self.sink = bench, broker, base, start, count, sink
        self.names = [f"{base}-{i:04d}" for i in range(start, start + count)]
        self.ready = asyncio.Event()
        self.errors: list[str] = []
        self.reconnects: list[dict] = []  # links the worker rebuilt, as the plugin would

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def spawn(self) -> None:
        with open(self.bench.work / f"listeners-{self.start}.stderr", "ab") as errors:
            self.proc = self.bench.children.add(await asyncio.create_subprocess_exec(
                self.bench.py, str(BENCH / "plugin_client.py"), "listeners", str(self.bench.plugin_pyz), self.broker.url,
                self.broker.token(self.base), self.base, str(self.start), str(self.count), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=errors, limit=1 << 24))
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while line := await self.proc.stdout.readline():
            message = json.loads(line)
            if "m" in message:
                self.sink(message["n"], message["t"], message["m"])
            elif "reconnect" in message:
                self.reconnects.append(message)
                if len(self.reconnects) <= 2:
                    say(f"  listener reconnect: {message['reconnect']}: {message['why']}")
            elif "ready" in message:
                self.ready.set()
            elif "error" in message:
                self.errors.append(message["error"])
                if len(self.errors) <= 3:
                    say(f"  listener error: {message['error'][:300]}")
        self.ready.set()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def sample(bench: Bench, broker: BrokerProc, sessions: int, kind: str, profile: str | None = None) -> dict:
    """The broker over the plan's idle window: RSS, fds and threads at the end, CPU in between."""
    prof = bench.profile_start(broker, profile) if profile else None
    before, t0 = broker.sample(), now()
    await asyncio.sleep(bench.plan.idle_window)
    after, elapsed = broker.sample(), now() - t0
    bench.profile_stop(prof)
    row = {"sessions": sessions, "kind": kind, "rss_mb": after["rss_mb"], "fds": after["fds"],
           "threads": after["threads"], "cpu_pct": round((after["cpu_s"] - before["cpu_s"]) / elapsed * 100, 1),
           "window_s": round(elapsed, 1)}
    say(f"  {sessions} sessions: RSS {row['rss_mb']} MB, {row['fds']} fds, CPU {row['cpu_pct']}%")
    return row


async def scale(bench: Bench) -> None:
    """A fresh broker: idle sample, then each level of sessions, sampled and fanned out to."""
    broker = BrokerProc(bench, "scale", "snd", "lsn")
    bench.broker_warm.append(broker.start_timed())
    observer = await asyncio.to_thread(Observer, broker.url, broker.token("snd"), "snd-observer")
    await asyncio.sleep(bench.plan.pause)
    rows = [await sample(bench, broker, 0, "no sessions")]
    say("scale: fan-out sender plugin")
    [sender] = await bench.start_plugins([("snd-fan", "snd")], broker)
    workers: list[ListenerWorker] = []
    arrivals: dict[str, list[tuple[str, float]]] = {}

    def sink(name: str, t: float, body: str) -> None:
        arrivals.setdefault(body, []).append((name, t))

    have = 0
    for level in bench.plan.session_levels:
        say(f"scale: {level} sessions on the plugin's BrokerClient")
        t_level = now()
        while have < level:
            count = min(LISTENERS_PER_WORKER, level - have)
            workers.append(ListenerWorker(bench, broker, "lsn", have + 1, count, sink))
            await workers[-1].spawn()
            have += count
        await asyncio.gather(*(w.ready.wait() for w in workers))
        names = {n for w in workers for n in w.names}
        await observer.wait_live(names | {"snd-fan"}, timeout=300)
        say(f"  {level} sessions live in {now() - t_level:.1f} s")
        await asyncio.sleep(bench.plan.pause)
        rows.append(await sample(bench, broker, level, "plugin-client sessions, plugin cadence, + 1 sender plugin",
                                 profile=f"idle-{level}"))
        await fanout.to_sessions(bench, broker, sender, names, arrivals, workers)
    bench.results["scale"] = rows
    if bench.args.soak:
        await soak(bench, broker, sender, workers, arrivals)
    for w in workers:
        await w.stop()
        if w.errors:
            bench.results.setdefault("listener_errors", []).extend(w.errors[:5])
            bench.results["listener_error_count"] = bench.results.get("listener_error_count", 0) + len(w.errors)
        bench.results["listener_reconnects"] = bench.results.get("listener_reconnects", 0) + len(w.reconnects)
    await sender.close()
    broker.stop()


async def soak(bench: Bench, broker: BrokerProc, sender: PluginProc, workers: list[ListenerWorker], arrivals: dict) -> None:
    seconds = bench.plan.soak_seconds
    expected = sum(w.count for w in workers)
    say(f"soak: {seconds:.0f} s with {expected} sessions, a fan-out every {SOAK_FANOUT_S} s")
    samples = []
    t_start = t_last = now()
    last = broker.sample()
    next_fan, n = t_start + SOAK_FANOUT_S, 0
    while now() - t_start < seconds:
        await asyncio.sleep(SOAK_SAMPLE_S)
        if now() >= next_fan:
            n += 1
            _, answered = sender.tool_nowait("send", to="*", body=f"soak-{n}")
            await asyncio.wait_for(answered, 120)
            next_fan += SOAK_FANOUT_S
        s, t = broker.sample(), now()
        samples.append({"t_s": round(t - t_start), "rss_mb": s["rss_mb"], "fds": s["fds"], "threads": s["threads"],
                        "cpu_pct": round((s["cpu_s"] - last["cpu_s"]) / (t - t_last) * 100, 1)})
        last, t_last = s, t
    observer = await asyncio.to_thread(Observer, broker.url, broker.token("snd"), "snd-observer")
    live_at_end = len(await asyncio.to_thread(observer.live) & {name for w in workers for name in w.names})

    def received(i: int) -> int:
        return len({name for name, _ in arrivals.get(f"soak-{i}", [])})

    deadline = now() + 60  # the last fan-out's copies are still arriving
    while n and now() < deadline and received(n) < expected:
        await asyncio.sleep(0.2)
    delivered = [received(i) for i in range(1, n + 1)]
    rss = [x["rss_mb"] for x in samples]
    bench.results["soak"] = {
        "seconds": round(now() - t_start), "sessions": expected, "fanouts": n,
        "fanout_min_received": min(delivered) if delivered else None, "fanout_received": delivered,
        "live_at_end": live_at_end, "reconnects": sum(len(w.reconnects) for w in workers),
        "reconnect_reasons": sorted({r["why"][:80] for w in workers for r in w.reconnects})[:5],
        "listener_errors": sum(len(w.errors) for w in workers),
        "rss_first_mb": rss[0], "rss_last_mb": rss[-1], "rss_max_mb": max(rss),
        "fds_first": samples[0]["fds"], "fds_last": samples[-1]["fds"],
        "cpu_pct_mean": round(sum(x["cpu_pct"] for x in samples) / len(samples), 1), "samples": samples}
    say(f"  RSS {rss[0]} -> {rss[-1]} MB (max {max(rss)}), fds {samples[0]['fds']} -> {samples[-1]['fds']}")
