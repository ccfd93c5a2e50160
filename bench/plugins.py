"""Section `plugins`: one crowd of plugin processes, connected and listening, and what runs on it.

    S sender plugins ─┐                         ┌─▶ S receiver plugins (channel → transcript → ack)
    snd-fan ──────────┼── broker.pyz serve ─────┤
    cpu-0001 (BrokerClient loop, no stdio) ─────┘
         rss · latency (snd-0001 → rcv-0001) · send CPU · throughput (pairs) · fan-out (to="*")

Sender plugins share a token base five at a time (SENDERS_PER_BASE): a broker that rate-limits
per base would then cap no run.
"""

import asyncio
import json
import subprocess

import fanout
import latency
import throughput
from context import BENCH, Bench, BrokerProc, Observer, PluginProc
from measure import now, proc_sample, say

#: Sender plugins per token base. A broker may rate-limit sends per base (200/s by default once it
#: does): five senders share one, so 50 senders use 10 bases and the limit never caps the run.
SENDERS_PER_BASE = 5


def sender_base(i: int) -> str:
    """Token base of sender i (1-based): snd for the first SENDERS_PER_BASE, then snd2, snd3, ..."""
    group = (i - 1) // SENDERS_PER_BASE
    return "snd" if group == 0 else f"snd{group + 1}"


async def send_cpu(bench: Bench, broker: BrokerProc, receiver: PluginProc) -> None:
    """The plugin's BrokerClient alone (bench/plugin_client.py send-loop), sending one message
    after another to a live receiver plugin: CPU time of its process over the loop / sends."""
    n = bench.plan.send_cpu_n
    say(f"send CPU: the plugin's BrokerClient, {n} sends in a loop to {receiver.name}")
    done = await asyncio.to_thread(subprocess.run, [
        bench.py, str(BENCH / "plugin_client.py"), "send-loop", str(bench.plugin_pyz), broker.url,
        broker.token("cpu"), "cpu-0001", receiver.name, str(n)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"send loop failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    result = bench.results["send_cpu"] = {"n": report["n"], "cpu_ms_per_send": round(report["cpu_s"] * 1000 / report["n"], 3),
                                          "wall_ms_per_send": round(report["wall_s"] * 1000 / report["n"], 3)}
    say(f"  {result['cpu_ms_per_send']} ms CPU a send ({result['wall_ms_per_send']} ms wall)")


async def plugins(bench: Bench, broker: BrokerProc) -> None:
    """Latency, send CPU, throughput and the plugin fan-out, on one crowd of plugins."""
    smax = max(s for s, _ in bench.plan.levels)
    bases = [sender_base(i) for i in range(1, smax + 1)]
    broker.mint(*bases)
    senders = [f"{base}-{i:04d}" for i, base in enumerate(bases, start=1)]
    receivers = [f"rcv-{i:04d}" for i in range(1, smax + 1)]
    say(f"plugins: starting {2 * smax + 1} plugin processes")
    t0 = now()
    crowd = await bench.start_plugins([(n, n.split("-")[0]) for n in senders] + [(n, "rcv") for n in receivers]
                                      + [("snd-fan", "snd")], broker)
    by_name = {p.name: p for p in crowd}
    observer = await asyncio.to_thread(Observer, broker.url, broker.token("snd"), "snd-observer")
    await observer.wait_live({p.name for p in crowd})
    say(f"  {len(crowd)} plugins connected and listening in {now() - t0:.1f} s")
    rss = [proc_sample(p.pid)["rss_mb"] for p in crowd]
    bench.results["plugin_rss_mb"] = {"n": len(rss), "mean": round(sum(rss) / len(rss), 1), "min": min(rss),
                                      "max": max(rss)}
    say(f"  plugin RSS with the link up: mean {bench.results['plugin_rss_mb']['mean']} MB, max {max(rss)} MB")

    await latency.latency(bench, by_name["snd-0001"], by_name["rcv-0001"], broker)
    await send_cpu(bench, broker, by_name["rcv-0001"])
    await throughput.throughput(bench, broker, [by_name[n] for n in senders], [by_name[n] for n in receivers])
    await fanout.to_plugins(bench, broker, by_name["snd-fan"], [p for p in crowd if p.name != "snd-fan"])
    with_plugins = bench.results["broker_with_plugins"] = {k: v for k, v in broker.sample().items() if k != "cpu_s"}
    with_plugins["sessions"] = len(crowd)
    await asyncio.gather(*(p.close() for p in crowd))
