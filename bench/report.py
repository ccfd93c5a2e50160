#!/usr/bin/env python3
"""The bench's report: the goals table, then every figure as a row (section, metric, measured).

    python3 bench/report.py bench.json            # the whole report, as bench/run.py prints it
    python3 bench/report.py bench.json --goals    # only the goals table, as BENCHMARKS.md shows it

    bench.json ──goals.judge()──▶ goal rows ──goals_table()──▶ | goal | target | measured | floor | verdict |
               ──figures_table()──────────────────────────────▶ | section | metric | measured |

The goals are judged again from the figures, so a run written before a goal changed reads with
the goals as they are now. Standard library only.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from goals import judge


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f} ms" if x < 10 else f"{x:.1f} ms" if x < 100 else f"{x:.0f} ms"


def markdown(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def goals_table(goal_rows: list[dict[str, Any]]) -> str:
    """The goals, one row each, as BENCHMARKS.md shows them."""
    return markdown(("goal", "target", "measured", "floor, same run", "verdict"),
                    [(g["goal"], g["target"], g["measured"], g["floor"], g["verdict"]) for g in goal_rows])


def crowd_label(t: dict[str, Any]) -> str:
    """A throughput run's senders and receivers, as its rows name them."""
    return (f"{t['senders']} sender → {t['receivers']} receiver, sequential" if t["depth"] == 1 else
            f"{t['senders']} senders → {t['receivers']} receivers, {t['depth']} in flight each")


def figures_table(r: dict[str, Any]) -> str:
    """Every figure as one Markdown table: section, metric, measured."""
    rows: list[tuple[str, str, str]] = []

    def row(section: str, metric: str, measured: str) -> None:
        rows.append((section, metric, measured))

    def ms(s: dict, key="p50") -> str:
        return fmt_ms(s[key]) if s.get("n") else "-"

    def p50_p99(s: dict) -> str:
        return f"{ms(s)} / {ms(s, 'p99')}"

    def each(*values: float, spec: str = ".2f", unit: str = "ms") -> str:
        return " / ".join(format(v, spec) for v in values) + f" {unit}"

    f = r.get("floor", {})
    if f:
        row("floor", "SQLite WAL insert+commit, synchronous=FULL (p50 / p99)", p50_p99(f["sqlite_commit_ms"]))
        row("floor", "stdio pipe round trip (p50)", ms(f["stdio_rtt_ms"]))
        row("floor", "kept-alive stdlib POST to bare Starlette on uvicorn (p50 / p99)", p50_p99(f["http_rtt_ms"]))
        row("floor", "the same POST, endpoint does 1 SQLite insert + FULL commit (p50 / p99)",
            p50_p99(f["http_commit_ms"]))
        spaced = f["http_commit_spaced_ms"]
        row("floor", f"the same, spaced {spaced.get('gap_ms', 20):.0f} ms apart (p50 / p99)", p50_p99(spaced))
        row("floor", "client CPU per kept-alive POST", fmt_ms(f["http_commit_ms"]["client_cpu_ms"]))
        row("floor", "1 sequential sender floor = 1 / (stdio rtt + POST with commit)",
            f"{f['sequential_sender_floor_per_s']:.0f} msg/s")
        row("floor", "RSS: idle `python3 -I` / the floor server (Starlette, uvicorn)",
            f"{f['python_idle_rss_mb']:.1f} MB / {f['server_rss_mb']:.1f} MB")
    rss = r.get("plugin_rss_mb")
    if rss:
        row("plugins", f"plugin process RSS, link up, {rss['n']} processes: mean / max",
            each(rss["mean"], rss["max"], spec=".1f", unit="MB"))
    lat = r.get("latency", {})
    if lat.get("n"):
        row("latency", f"send→channel ({lat['n']} sequential sends, back to back): p50 / p99 / max",
            each(lat["p50"], lat["p99"], lat["max"]))
        if lat.get("floor_ms"):
            row("latency", "its floor: the POST with 1 FULL commit, between blocks of 50 sends = send→channel floor "
                "(p50 / p99)", p50_p99(lat["floor_ms"]))
        if lat.get("sdk_floor_ms"):
            sdk = lat["sdk_floor_ms"]
            row("latency", "the SDK alone, between the same blocks: send tool call → notification on a pending listen "
                "(MCPServer, bearer auth, 1 FULL commit; no Dispatch, no stdio), p50 / p99",
                p50_p99(sdk) + (f" = {sdk['p50'] / lat['floor_ms']['p50']:.2f}× floor" if lat.get("floor_ms") else ""))
        row("latency", "send tool call answered at A (p50 / p99)",
            each(lat["send_answer_ms"]["p50"], lat["send_answer_ms"]["p99"]))
        sp = lat.get("spaced")
        if sp:
            row("latency", f"send→channel spaced {sp['gap_ms']:.0f} ms apart (idle processes wake at each hop), "
                "p50 / p99 / max", each(sp["p50"], sp["p99"], sp["max"]))
        cpu = lat.get("cpu_ms_per_msg")
        if cpu:
            row("latency", "CPU per message (send + push + ack): broker / sender plugin / receiver plugin",
                each(cpu["broker"], cpu["senders"], cpu["receivers"]))
    sc = r.get("send_cpu")
    if sc:
        row("send CPU", f"the plugin's BrokerClient, {sc['n']} sends in a loop: CPU / wall per send",
            f"{sc['cpu_ms_per_send']:.3f} / {sc['wall_ms_per_send']:.2f} ms")
    for t in r.get("throughput", []):
        label = crowd_label(t)
        row("throughput", f"{label}: delivered / acked ({t['messages']} msgs)",
            f"{t['delivered_per_s']:.0f} / {t['acked_per_s']:.0f} msg/s")
        row("throughput", f"{label}: duplicates / losses / errors; broker CPU per message",
            f"{t['duplicates']} / {t['losses']} / {t['errors']}; {fmt_ms(t['cpu_ms_per_msg']['broker'])}")
    for t in r.get("throughput_sdk", []):
        label = crowd_label(t)
        row("throughput", f"the SDK alone (send, push, ack; no fsync), {label}: delivered / acked; "
            "dups / losses / errors; server CPU per message",
            f"{t['delivered_per_s']:.0f} / {t['acked_per_s']:.0f} msg/s; {t['duplicates']} / {t['losses']} / "
            f"{t['errors']}; {fmt_ms(t['cpu_ms_per_msg']['server'])}")
    for fo in r.get("fanout", []):
        row("fan-out", f"send(to=\"*\") → {fo['listeners']} {fo['kind']}: last write (first / p50)",
            f"{fmt_ms(fo['last_ms'])} ({fmt_ms(fo['first_ms'])} / {fmt_ms(fo['p50_ms'])}), missing {fo['missing']}")
        row("fan-out", f"send(to=\"*\") → {fo['listeners']}: send answered at the sender / every copy acked",
            f"{fmt_ms(fo['send_answer_ms'])} / {fmt_ms(fo.get('all_acked_ms'))}")
        if fo.get("cpu_s"):
            row("fan-out", f"send(to=\"*\") → {fo['listeners']}: CPU the round cost, broker / listener processes",
                f"{fo['cpu_s']['broker']:.2f} s / {fo['cpu_s']['listeners']:.2f} s")
    for s in r.get("scale", []):
        row("scale", f"broker, {s['sessions']} live sessions: RSS / fds / threads / CPU",
            f"{s['rss_mb']:.0f} MB / {s['fds']} / {s['threads']} / {s['cpu_pct']:.1f}%")
    if r.get("broker_with_plugins"):
        b = r["broker_with_plugins"]
        row("scale", f"broker after the plugin runs, {b['sessions']} plugin sessions: RSS / fds",
            f"{b['rss_mb']:.0f} MB / {b['fds']}")
    soak = r.get("soak")
    if soak:
        row("soak", f"{soak['seconds']} s, {soak['sessions']} sessions, {soak['fanouts']} fan-outs: RSS first → last (max)",
            f"{soak['rss_first_mb']:.0f} → {soak['rss_last_mb']:.0f} MB ({soak['rss_max_mb']:.0f})")
        row("soak", "fds first → last; mean CPU; fewest receivers of a fan-out",
            f"{soak['fds_first']} → {soak['fds_last']}; {soak['cpu_pct_mean']}%; {soak['fanout_min_received']}")
        row("soak", "sessions live at the end; links rebuilt by the sessions (reconnects)",
            f"{soak.get('live_at_end')} of {soak['sessions']}; {soak.get('reconnects')}")
    ways = r.get("ways", {})
    for way, label in (("channel", "channel (the development flag)"), ("socket", "session inbox (no flag)")):
        if way in ways:
            w = ways[way]
            row("ways", f"Claude Code {ways.get('claude_code', '')}, idle, {label}: send → model request p50 / max "
                        f"(n); a typed prompt → its request p50", f"{ms(w['send_to_model_ms'])} / "
                f"{ms(w['send_to_model_ms'], 'max')} ({w['send_to_model_ms']['n']}); {ms(w['typed_to_model_ms'])}")
    st = r.get("startup", {})
    if st:
        row("startup", "`python3 -I -c pass` spawn → exit (p50, max)",
            f"{ms(st['python_pass_ms'])} ({ms(st['python_pass_ms'], 'max')})")
        row("startup", "plugin spawn → initialize answered, first start (fresh PEX_ROOT)", f"{st['plugin_cold_ms']:.0f} ms")
        row("startup", "plugin spawn → initialize answered, warm (p50, max)",
            f"{ms(st['plugin_warm_ms'])} ({ms(st['plugin_warm_ms'], 'max')})")
        if "plugin_source_warm_ms" in st:
            row("startup", "the same from source: dispatch_plugin.py, or plugin.pyz on another CPython (p50, max)",
                f"{ms(st['plugin_source_warm_ms'])} ({ms(st['plugin_source_warm_ms'], 'max')})")
        row("startup", "plugin spawn → link up (first ping answered), warm (p50, max)",
            f"{ms(st['plugin_link_up_ms'])} ({ms(st['plugin_link_up_ms'], 'max')})")
        row("startup", "broker spawn → /healthz 200, cold (fresh PEX_ROOT)", f"{st['broker_cold_ms']:.0f} ms")
        row("startup", "broker spawn → /healthz 200, warm (p50)", ms(st.get("broker_warm_ms", {})))
    for name, size in r.get("size", {}).items():
        row("size", name, f"{size / 1e6:.2f} MB ({size:,} bytes)")
    return markdown(("section", "metric", "measured"), rows)


def report(results: dict[str, Any]) -> str:
    """What bench/run.py prints: the run, the goals table, every figure, the goals missed."""
    meta, goal_rows = results["meta"], judge(results)
    m = meta["machine"]
    lines = [
        f"Dispatch benchmarks, {meta['date']}: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
        f"Python {meta['python']}, SQLite {meta['sqlite']}, {meta['filesystem']}"
        f"{' — QUICK (indicative only)' if meta['quick'] else ''}",
        f"$ {meta['command']}   ({meta['duration_s']} s; other processes used {meta['other_load_cores']} "
        f"of {m['cores']} cores meanwhile; load average {' '.join(map(str, m['load_avg_at_start']))} at start, "
        f"{' '.join(map(str, meta['load_avg_at_end']))} at the end)",
        f"plugins and .pyz files on {meta['pyz_interpreter']} (CPython {meta['pyz_interpreter_version']}, "
        f"{meta['pyz_interpreter_modules_at_start']} modules loaded by `-I -c pass`)",
        f"source {meta['source']}; " + "; ".join(f"{n} built {d['built']}, sha256 {d['sha256'][:12]}"
                                                 for n, d in meta["dist_files"].items()) + "\n",
        goals_table(goal_rows) + "\n",
        figures_table(results)]
    misses = [g for g in goal_rows if g["verdict"] == "MISS"]
    lines.append(f"\n{len(misses)} goal(s) missed" + (": " + "; ".join(
        f"{g['goal']} {g['measured']} (goal {g['target']})" for g in misses) if misses else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Print a bench run's report from its --json file.")
    p.add_argument("json", help="the file bench/run.py --json wrote")
    p.add_argument("--goals", action="store_true", help="only the goals table, as BENCHMARKS.md shows it")
    args = p.parse_args(argv)
    results = json.loads(Path(args.json).read_text())
    print(goals_table(judge(results)) if args.goals else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
