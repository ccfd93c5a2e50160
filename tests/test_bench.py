"""Smoke test of the benchmark: `bench/run.py --quick` runs every section against the built zipapps.

It checks that each section is reported, never the figures: timings on a shared CI machine say
nothing, and the goals are judged in BENCHMARKS.md, not here. About 50 s on 2 cores (the first
start of a pex-built .pyz unpacks into a fresh PEX_ROOT: that is the `cold` start-up figure).
BENCHMARKS.md's goals table is checked against the goal rows judging the run it reports
(bench/results/), without running anything.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "run.py"
#: The full run BENCHMARKS.md reports, as its --json wrote it.
REPORTED_RUN = ROOT / "bench" / "results" / "2026-12-08-09ea6ee-2.json"
#: No module of the bench grows back into one file.
MAX_LINES = 500
#: A hard bound for a run meant to take under a minute; a hang fails instead of blocking CI.
TIMEOUT_S = 240

SECTIONS = {
    "size": {"broker.pyz", "plugin.pyz"},
    "startup": {"python_pass_ms", "plugin_cold_ms", "plugin_warm_ms", "plugin_link_up_ms", "broker_cold_ms",
                "broker_warm_ms"},
    "floor": {"sqlite_commit_ms", "stdio_rtt_ms", "http_rtt_ms", "http_commit_ms", "python_idle_rss_mb"},
    "latency": {"n", "p50", "p99", "max", "floor_ms", "sdk_floor_ms"},
    "send_cpu": {"n", "cpu_ms_per_send"},
    "plugin_rss_mb": {"n", "mean", "max"},
}


@pytest.mark.bench
def test_quick_bench_reports_every_section(dist, tmp_path):
    assert dist.broker.parent == dist.plugin.parent
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out), "--dist", str(dist.broker.parent),
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"bench exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads(out.read_text())

    for section, keys in SECTIONS.items():
        assert keys <= set(report.get(section, {})), f"{section}: missing {keys - set(report.get(section, {}))}"
    assert report["latency"]["n"] > 0

    throughput = report["throughput"]
    assert any(run["depth"] == 1 for run in throughput), "no sequential-sender run"
    assert any(run["depth"] > 1 for run in throughput), "no pipelined run"
    for run in throughput:
        assert {"delivered_per_s", "acked_per_s", "duplicates", "losses"} <= set(run)
    # The same crowds through the SDK alone, the ratios' floor: every message delivered and acked, once.
    floor = report["throughput_sdk"]
    assert [(run["senders"], run["depth"]) for run in floor] == [(run["senders"], run["depth"]) for run in throughput]
    assert all(run["delivered"] == run["acked"] == run["messages"] and not run["duplicates"] for run in floor), floor

    kinds = {run["kind"] for run in report["fanout"]}
    assert any("plugin processes" in kind for kind in kinds) and any("sessions" in kind for kind in kinds), kinds
    assert all(run["last_ms"] is not None for run in report["fanout"])

    sessions = [row["sessions"] for row in report["scale"]]
    assert 0 in sessions and max(sessions) > 0
    assert all({"rss_mb", "fds", "cpu_pct"} <= set(row) for row in report["scale"])

    assert report["goals"] and all(goal["verdict"] in ("met", "MISS", "not run") for goal in report["goals"])
    assert all({"goal", "target", "measured", "floor"} <= set(goal) for goal in report["goals"])
    # Issue 11's goals are judged in every run, quick included.
    judged = {goal["goal"] for goal in report["goals"] if goal["verdict"] != "not run"}
    assert {"plugin RSS per session, link up", "plugin spawn → initialize answered, warm",
            "plugin spawn → link up (first ping answered)", "sender CPU per send (the plugin's BrokerClient)",
            "send→channel p50", "send→channel p99"} <= judged, judged
    assert report["meta"]["quick"] is True
    # The printed tables: the goals, then a row for every section.
    assert "| goal " in done.stdout
    for section in ("floor", "plugins", "latency", "send CPU", "throughput", "fan-out", "scale", "startup", "size"):
        assert f"| {section}" in done.stdout, f"no {section} row in the table"


def test_benchmarks_md_goals_table_is_the_goal_rows_of_its_run():
    sys.path.insert(0, str(ROOT / "bench"))
    from goals import judge
    from report import goals_table

    table = goals_table(judge(json.loads(REPORTED_RUN.read_text())))
    assert table in (ROOT / "BENCHMARKS.md").read_text(), f"BENCHMARKS.md's goals table is not:\n{table}"


def test_bench_modules_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "bench").glob("*.py")}
    assert max(sizes.values()) <= MAX_LINES, sizes
