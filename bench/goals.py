"""The goals, as data: each row names the figure it judges, its bound, and the floor it is read
beside, all from the same run. `judge(results)` turns them into the rows that the printed goals
table, the JSON's "goals" and BENCHMARKS.md's goals table all come from.

    results (bench.json) ──figure(path)──▶ Goal row ──judge()──▶ {goal, target, measured, floor, verdict}
                                                                      └──▶ report.goals_table() ──▶ BENCHMARKS.md

A figure is named by its path in the results: `startup/plugin_warm_ms/p50`; in a list, the
element whose field has a value: `scale[sessions=1000]/rss_mb`. A bound is either fixed or a
multiple of a figure of the same run (`scale`): a goal relative to its floor moves with the
machine, as the floor does. Standard library only.
"""

import operator
from dataclasses import dataclass
from typing import Any, Callable

Figure = str | Callable[[dict], float | None]  # a path, or a function of the results

#: How each goal compares its figure with its bound.
OPS = {"<": operator.lt, "≤": operator.le, "≥": operator.ge, "=": operator.eq}


def figure(results: dict, path: str) -> Any:
    """The figure at `path` in the results, None when the run has no such figure."""
    value: Any = results
    for part in path.split("/"):
        name, _, match = part.partition("[")
        value = value.get(name) if isinstance(value, dict) else None
        if match and isinstance(value, list):
            key, wanted = match.rstrip("]").split("=")
            value = next((x for x in value if str(x.get(key)) == wanted), None)
        if value is None:
            return None
    return value


def total(*paths: str) -> Callable[[dict], float | None]:
    """The sum of several figures (a floor made of steps), None if any is missing."""
    def of(results: dict) -> float | None:
        values = [figure(results, p) for p in paths]
        return None if None in values else sum(values)
    return of


def slowest_rate(run: str) -> Callable[[dict], float | None]:
    """A throughput run's rate: delivered or acked per second, whichever is lower."""
    def of(results: dict) -> float | None:
        found = figure(results, run)
        return min(found["delivered_per_s"], found["acked_per_s"]) if found else None
    return of


def times_sequential(section: str, senders: int) -> Callable[[dict], float | None]:
    """A crowd's rate over its section's sequential sender's: `throughput` is Dispatch's,
    `throughput_sdk` the same crowds through the SDK alone (its floor)."""
    def of(results: dict) -> float | None:
        crowd, one = slowest_rate(f"{section}[senders={senders}]")(results), slowest_rate(f"{section}[depth=1]")(results)
        return crowd / one if crowd and one else None
    return of


def faults(results: dict) -> int | None:
    """Duplicates and losses over every throughput run."""
    runs = results.get("throughput")
    return sum(r["duplicates"] + r["losses"] for r in runs) if runs else None


@dataclass(frozen=True)
class Goal:
    """One goal. `shows` and `floor_shows` are format strings: {m} the figure, {x} the figure over
    `scale`, {f} the floor, {r[section][key]} any figure of the run; `scaled` is added to the
    target once `scale` is known, with {t} the bound."""

    name: str
    measured: Figure
    op: str
    limit: float  #: the bound, or with `scale` the multiple of that figure
    target: str
    shows: str
    floor: Figure | None = None  #: the same run's floor, shown beside the figure
    floor_shows: str = "—"
    scale: Figure | None = None  #: the figure the bound is a multiple of
    scaled: str = ""
    per: float = 1.0  #: the figure's unit: bytes / 1e3 = KB
    none_of: str | None = None  #: a figure that must be 0 as well (a fan-out's missing copies)

    def judge(self, results: dict) -> dict[str, Any]:
        def get(what: Figure | None) -> Any:
            return None if what is None else what(results) if callable(what) else figure(results, what)

        raw, f, s = get(self.measured), get(self.floor), get(self.scale)
        m = None if raw is None else raw / self.per
        bound = self.limit * s if self.scale and s else None if self.scale else self.limit
        known = m is not None and bound is not None
        ok = known and OPS[self.op](m, bound) and not get(self.none_of)
        return {"goal": self.name, "target": self.target + (self.scaled.format(t=bound) if self.scale and bound else ""),
                "measured": self.shows.format(m=m, x=m / s if s else None, r=results) if known else "-",
                "floor": self.floor_shows.format(f=f) if f is not None else "—",
                "verdict": "not run" if not known else "met" if ok else "MISS",
                "value": m, "bound": bound, "floor_value": f}


def crowd_goals(senders: int, times: float) -> tuple[Goal, Goal]:
    """Issue 23's pair for a crowd: its rate against the sequential sender's, beside the SDK alone's
    rate for the same crowd; then its ratio judged against the SDK alone's ratio."""
    return (
        Goal(f"{senders} senders → {senders} receivers against 1 sequential sender",
             slowest_rate(f"throughput[senders={senders}]"), "≥", times, f"≥ {times:g}× sequential",
             "{m:.0f} msg/s = {x:.2f}× sequential", scale=slowest_rate("throughput[depth=1]"),
             scaled=" ({t:.0f} msg/s)", floor=slowest_rate(f"throughput_sdk[senders={senders}]"),
             floor_shows="the SDK alone, the same crowds: {f:.0f} msg/s"),
        Goal(f"{senders} senders' × sequential, against the SDK alone's", times_sequential("throughput", senders),
             "≥", 1, "≥ the SDK alone's", "{m:.2f}× = {x:.2f}× the SDK alone's",
             scale=times_sequential("throughput_sdk", senders), scaled=" ({t:.2f}×)",
             floor=times_sequential("throughput_sdk", senders), floor_shows="the SDK alone: {f:.2f}× its sequential"),
    )


#: Issue 11's goals (the plugin, per session) first, then the earlier issues' goals for the
#: broker and the whole path. BENCHMARKS.md's goals table is these rows for its run.
GOALS = (
    Goal("plugin RSS per session, link up", "plugin_rss_mb/max", "<", 25, "< 25 MB",
         "{m:.1f} MB max of {r[plugin_rss_mb][n]} (mean {r[plugin_rss_mb][mean]:.1f})",
         floor="floor/python_idle_rss_mb", floor_shows="idle `python3 -I`: {f:.1f} MB"),
    Goal("plugin spawn → initialize answered, warm", "startup/plugin_warm_ms/p50", "≤", 2.5, "≤ 2.5× floor",
         "{m:.0f} ms = {x:.2f}× floor", scale="startup/python_pass_ms/p50", scaled=" ({t:.0f} ms)",
         floor="startup/python_pass_ms/p50", floor_shows="`python3 -I -c pass`: {f:.0f} ms"),
    Goal("plugin spawn → link up (first ping answered)", "startup/plugin_link_up_ms/p50", "<", 300, "< 300 ms",
         "{m:.0f} ms (max {r[startup][plugin_link_up_ms][max]:.0f})",
         floor=total("startup/python_pass_ms/p50", "floor/http_rtt_ms/p50", "floor/http_rtt_ms/p50"),
         floor_shows="python3 start + 2 POSTs: {f:.0f} ms"),
    Goal("sender CPU per send (the plugin's BrokerClient)", "send_cpu/cpu_ms_per_send", "<", 0.5, "< 0.5 ms",
         "{m:.3f} ms", floor="floor/http_commit_ms/client_cpu_ms", floor_shows="stdlib POST client: {f:.3f} ms"),
    Goal("send→channel p50", "latency/p50", "≤", 2, "≤ 2× floor", "{m:.2f} ms = {x:.2f}× floor",
         scale="latency/floor_ms/p50", scaled=" ({t:.2f} ms)",
         floor="latency/floor_ms/p50", floor_shows="POST + FULL commit: {f:.2f} ms"),
    Goal("send→channel p99", "latency/p99", "≤", 3, "≤ 3× p50", "{m:.2f} ms = {x:.2f}× p50",
         scale="latency/p50", scaled=" ({t:.2f} ms)", floor="floor/http_commit_ms/p99", floor_shows="floor p99: {f:.2f} ms"),
    Goal("plugin.pyz size", "size/plugin.pyz", "<", 200, "< 200 KB", "{m:,.0f} KB", per=1e3),
    Goal("1 sequential sender, delivered and acked", slowest_rate("throughput[depth=1]"), "≥", 400, "≥ 400 msg/s",
         "{m:.0f} msg/s", floor="floor/sequential_sender_floor_per_s",
         floor_shows="1 / (stdio + POST + commit): {f:.0f} msg/s"),
    Goal("50 senders → 50 receivers, delivered and acked", slowest_rate("throughput[senders=50]"), "≥", 1000,
         "≥ 1,000 msg/s", "{m:.0f} msg/s"),
    # More load must make the broker faster, not slower: concurrent sends share commits (issue 23).
    # Each is read beside the SDK alone's rate for the same crowds in the same run (the stack's own
    # ceiling here, bench/throughput.py's sdk_floor), and its ratio judged against the SDK alone's.
    *crowd_goals(20, 1.5),
    *crowd_goals(50, 3),
    Goal("broker CPU per message, 20 concurrent senders", "throughput[senders=20]/cpu_ms_per_msg/broker", "≤", 1,
         "≤ sequential", "{m:.2f} ms = {x:.2f}× sequential", scale="throughput[depth=1]/cpu_ms_per_msg/broker",
         scaled=" ({t:.2f} ms)", floor="throughput[depth=1]/cpu_ms_per_msg/broker",
         floor_shows="sequential: {f:.2f} ms"),
    Goal("throughput duplicates and losses", faults, "=", 0, "0", "{m:.0f}"),
    Goal("fan-out to 1,000 listeners, last write", "fanout[listeners=1000]/last_ms", "<", 1000, "< 1 s", "{m:.0f} ms",
         none_of="fanout[listeners=1000]/missing"),
    Goal("broker RSS with 1,000 idle sessions", "scale[sessions=1000]/rss_mb", "<", 250, "< 250 MB", "{m:.0f} MB",
         floor="scale[sessions=0]/rss_mb", floor_shows="no sessions: {f:.0f} MB"),
    Goal("broker.pyz size (this machine's file)", "size/broker.pyz", "<", 20, "< 20 MB", "{m:.1f} MB", per=1e6),
)


#: Issue 20's goals, judged only in a run with the `ways` section (real Claude Code sessions).
WAYS_GOALS = (
    Goal("idle session, no flag: send → model p50 (inbox socket)", "ways/socket/send_to_model_ms/p50", "≤", 2000,
         "≤ 2 s", "{m:.0f} ms (max {r[ways][socket][send_to_model_ms][max]:.0f} of "
         "{r[ways][socket][send_to_model_ms][n]})",
         floor="ways/socket/typed_to_model_ms/p50", floor_shows="a typed prompt → its request: {f:.0f} ms"),
    Goal("idle session, channel flag: send → model p50", "ways/channel/send_to_model_ms/p50", "≤", 2000,
         "≤ 2 s", "{m:.0f} ms (max {r[ways][channel][send_to_model_ms][max]:.0f} of "
         "{r[ways][channel][send_to_model_ms][n]})",
         floor="ways/channel/typed_to_model_ms/p50", floor_shows="a typed prompt → its request: {f:.0f} ms"),
)


def judge(results: dict) -> list[dict[str, Any]]:
    """Every goal's row for this run: 'met', 'MISS', or 'not run' where the run lacks the figure.
    The ways' rows only where the run has that section."""
    return [goal.judge(results) for goal in GOALS + (WAYS_GOALS if "ways" in results else ())]
