#!/usr/bin/env python3
"""A/B: sequential send→channel latency of two builds in one run, in alternating blocks.

    python3 bench/ab.py DIST_A DIST_B [--blocks 20] [--plugin FILE] [--python /usr/bin/python3] [--json out.json]

    block 1: A's sender ──50 sends──▶ A's broker ──▶ A's receiver   then the same through B
    block 2: B first, then A, …          (each send waits for its channel event, as latency.py)

Each build (a directory with broker.pyz and plugin.pyz) gets its own broker and one sender and
one receiver plugin, all alive for the whole run; --plugin gives both sides the same plugin file. The order flips every block, so a machine that
speeds up or slows down mid-run (this VM does) weighs on both alike: a p50 read beside the other
build's from the same blocks is "the same run". Also reports each broker's CPU per message.
"""

import argparse
import asyncio
import json
import sys
from pathlib import Path

from context import FULL, Bench, BrokerProc, Observer
from measure import now, say, stats

BLOCK = 50


class Side:
    """One build under test: its bench (scratch copies), broker and plugin pair."""

    def __init__(self, label: str, dist: str, args: argparse.Namespace):
        self.label = label
        self.bench = Bench(argparse.Namespace(**{**vars(args), "dist": dist}), FULL)
        self.samples: list[float] = []
        self.cpu_s = 0.0

    async def start(self) -> None:
        self.broker = BrokerProc(self.bench, self.label, "snd", "rcv")
        self.broker.start_timed()
        self.sender, self.receiver = await self.bench.start_plugins([("snd-ab", "snd"), ("rcv-ab", "rcv")], self.broker)
        observer = await asyncio.to_thread(Observer, self.broker.url, self.broker.token("snd"), "snd-observer")
        await observer.wait_live({"rcv-ab"})

    async def block(self, n: int, keep: bool) -> None:
        cpu0 = self.broker.sample()["cpu_s"]
        for i in range(n):
            body = f"ab-{self.label}-{len(self.samples)}-{i}"
            arrived = self.receiver.expect(body)
            t0, answered = self.sender.tool_nowait("send", to="rcv-ab", body=body)
            t1 = await asyncio.wait_for(arrived, 30)
            await asyncio.wait_for(answered, 30)
            if keep:
                self.samples.append(t1 - t0)
        if keep:
            self.cpu_s += self.broker.sample()["cpu_s"] - cpu0

    def result(self) -> dict:
        return {**stats(self.samples), "broker_cpu_ms_per_msg": round(self.cpu_s * 1000 / len(self.samples), 3)}


async def run(args: argparse.Namespace) -> dict:
    sides = [Side("a", args.dist_a, args), Side("b", args.dist_b, args)]
    try:
        for side in sides:
            await side.start()
            await side.block(BLOCK, keep=False)  # warm-up
        t0 = now()
        for number in range(args.blocks):
            for side in sides if number % 2 == 0 else sides[::-1]:
                await side.block(BLOCK, keep=True)
        say(f"{args.blocks} blocks of {BLOCK} in {now() - t0:.0f} s")
        return {side.label: {"dist": getattr(args, f"dist_{side.label}"), **side.result()} for side in sides}
    finally:
        for side in sides:
            side.bench.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dist_a")
    p.add_argument("dist_b")
    p.add_argument("--blocks", type=int, default=20, help="blocks of 50 sends per build (default 20)")
    p.add_argument("--plugin", metavar="FILE", help="the plugin both sides run (default: each build's plugin.pyz)")
    p.add_argument("--python", help="interpreter for the .pyz files (default: the base python3)")
    p.add_argument("--json", metavar="FILE", help="write the figures here")
    args = p.parse_args(argv)
    args.__dict__.update(workdir=None, keep=False, synchronous="FULL", profile=None)
    results = asyncio.run(run(args))
    for label, r in results.items():
        print(f"{label} ({r['dist']}): p50 {r['p50']} ms, p99 {r['p99']} ms, max {r['max']} ms, "
              f"broker CPU {r['broker_cpu_ms_per_msg']} ms a message")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
