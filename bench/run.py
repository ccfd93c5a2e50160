#!/usr/bin/env python3
"""Dispatch benchmarks: the real dist/*.pyz processes, measured against the floor of their own stack.

    python3 bench/run.py [--quick] [--json out.json] [--soak] [--only floor,plugins,scale,ways] [--dist DIR]
                         [--plugin FILE] [--python EXE] [--profile DIR]
    python3 bench/report.py out.json [--goals]     # the report again, or BENCHMARKS.md's goals table

    size, startup ──▶ floor ──▶ plugins (latency · send CPU · throughput · fan-out) ──▶ scale (· soak)
         └── the main broker, tokens minted by its CLI ─┘            a fresh broker ──┘
    (--only ways: a fresh broker, real Claude Code sessions: send → the model's request per way)
    (throughput: Dispatch's crowds, then the same crowds through the SDK alone, their floor)
    results{section: figures} ──goals.judge()──▶ goal rows ──report.py──▶ stdout, --json

One module a section (bench/startup.py, floor.py, plugins.py, latency.py, throughput.py,
fanout.py, scale.py, ways.py); each says what it measures and how. Every figure goes through
dist/broker.pyz and dist/plugin.pyz as built (or the --plugin file), copied to a scratch
directory first so a concurrent rebuild cannot change them mid-run. The broker runs as
`broker.pyz serve --synchronous FULL --rate 0` on 127.0.0.1; plugins are driven over stdio as
Claude Code drives them (tests/harness.py, shared with the tests).

--quick runs every section with small counts (about a minute) for a smoke test; its figures are
indicative only. Goals (bench/goals.py) are reported (met / MISS), never asserted: the exit code
is 0 whenever the run itself worked.

Needs the project's .venv (uvicorn and Starlette, for the floor server): when the running
interpreter lacks them, the script re-executes itself with .venv/bin/python. The .pyz files, the
plugin's client processes and the `python3 -I` floor run on the base interpreter (--python), as
`python3 dist/plugin.pyz` would.
"""

import argparse
import asyncio
import json
import os
import platform
import signal
import sqlite3
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from context import FULL, QUICK, Bench, Plan
from floor import floor
from goals import judge
from measure import ROOT, filesystem_of, interpreter, machine, machine_busy_s, now, own_cpu_s, source_state
from plugins import plugins
from report import report
from scale import scale
from startup import broker_warm, size, startup
from ways import ways

VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
#: The sections --only chooses from by default; size and startup always run (startup starts the
#: main broker). `ways` drives real Claude Code sessions (minutes, tmux): only when named.
SECTIONS = ("floor", "plugins", "scale")
OPTIONAL = ("ways",)


async def run(bench: Bench, only: set[str]) -> dict[str, Any]:
    started, busy0, own0, t0 = time.time(), machine_busy_s(), own_cpu_s(), now()
    at_start = machine()  # the load average before the bench adds its own
    size(bench)
    main = await startup(bench)
    try:
        if "floor" in only:
            await floor(bench)
        if "plugins" in only:
            await plugins(bench, main)
    finally:
        main.stop()
    if "scale" in only:
        await scale(bench)
    if "ways" in only:
        await ways(bench)
    broker_warm(bench)
    results = bench.results
    results["goals"] = judge(results)
    elapsed = now() - t0
    others = max(0.0, (machine_busy_s() - busy0) - (own_cpu_s() - own0))
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "duration_s": round(time.time() - started, 1),
        "command": " ".join(["python3", "bench/run.py", *sys.argv[1:]]), "quick": bench.plan.quick,
        "soak": bool(bench.args.soak), "machine": at_start, "python": platform.python_version(), **interpreter(bench.py),
        "filesystem": filesystem_of(bench.work), "dist": str(bench.dist), "sqlite": sqlite3.sqlite_version,
        "plan": asdict(bench.plan), "profiles": bench.profiles, "source": source_state(), "dist_files": bench.dist_files,
        # Other processes' CPU during the run, in cores: > 0.2 means the figures are noisy.
        "other_load_cores": round(others / elapsed, 2), "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    return results


def ensure_venv() -> None:
    """Re-run under .venv/bin/python when this interpreter lacks uvicorn or Starlette (the floor server)."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        if VENV_PYTHON.exists() and not os.environ.get("DISPATCH_BENCH_REEXEC"):
            os.environ["DISPATCH_BENCH_REEXEC"] = "1"
            os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])
        raise SystemExit("bench/run.py needs uvicorn and Starlette: run `python3 tests/run.py` once to create .venv")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Dispatch benchmarks through the real dist/*.pyz processes.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="small counts, every section, under a minute (smoke test)")
    p.add_argument("--json", metavar="FILE", help="write every figure and the goal rows as JSON here")
    p.add_argument("--soak", action="store_true", help="also keep the largest scale level for --soak-seconds")
    p.add_argument("--soak-seconds", type=float, default=FULL.soak_seconds, help="the soak's length (default 600)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"sections to run besides size and startup (default {','.join(SECTIONS)}; also "
                        f"{','.join(OPTIONAL)}: real Claude Code sessions)")
    p.add_argument("--dist", metavar="DIR", help="directory with broker.pyz and plugin.pyz (default: dist/)")
    p.add_argument("--plugin", metavar="FILE", help="the plugin to run instead of DIST/plugin.pyz (e.g. "
                   "dispatch_plugin.py, as the Claude Code plugin package runs it)")
    p.add_argument("--python", metavar="EXE", help="interpreter for the .pyz files (default: the base python3)")
    p.add_argument("--workdir", metavar="DIR", help="parent of the scratch directory (default: the temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, databases)")
    p.add_argument("--profile", metavar="DIR", help="record the broker with py-spy (raw stacks) during each phase")
    p.add_argument("--plan", help="JSON overriding fields of the plan (counts), e.g. '{\"latency_n\": 300}'")
    p.add_argument("--synchronous", default="FULL", help="the broker's --synchronous (NORMAL, for comparison)")
    args = p.parse_args(argv)
    if unknown := set(args.only.split(",")) - set(SECTIONS + OPTIONAL):
        p.error(f"--only: no section {', '.join(sorted(unknown))} (choose from {', '.join(SECTIONS + OPTIONAL)})")
    return args


def plan_of(args: argparse.Namespace) -> Plan:
    override = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                for k, v in json.loads(args.plan or "{}").items()}
    return Plan(**{**asdict(QUICK if args.quick else FULL), "soak_seconds": args.soak_seconds, **override})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_venv()
    bench = Bench(args, plan_of(args))
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        results = asyncio.run(run(bench, set(args.only.split(","))))
    finally:
        bench.cleanup()
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
