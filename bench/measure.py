"""What every section measures with: percentiles, a process's RSS/fds/CPU from /proc, and the
machine the run happened on (cores, load, other processes' CPU, the source and filesystem).

    section ──samples (s)──▶ stats() ──▶ {"n", "p50", "p99", "max", …} in ms
            ──pid──────────▶ proc_sample() ──▶ {"rss_mb", "fds", "threads", "cpu_s"}
            ──pid──────────▶ Threads ──▶ CPU of the main thread and of the others, share of time in disk wait

Standard library only; Linux (/proc).
"""

import contextlib
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: CLOCK_MONOTONIC: comparable across processes on one machine (the plugins' arrival stamps).
now = time.monotonic


def say(*parts: Any) -> None:
    """Progress on stderr: stdout carries the report."""
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def stats(samples_s: list[float]) -> dict[str, Any]:
    """Milliseconds: n, p50, p90, p99, max, mean, min (nearest-rank percentiles)."""
    if not samples_s:
        return {"n": 0}
    xs = sorted(x * 1000 for x in samples_s)

    def pct(p: float) -> float:
        return xs[min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))]

    return {"n": len(xs), "p50": round(pct(50), 3), "p90": round(pct(90), 3), "p99": round(pct(99), 3),
            "max": round(xs[-1], 3), "min": round(xs[0], 3), "mean": round(sum(xs) / len(xs), 3)}


def proc_sample(pid: int) -> dict[str, float]:
    """RSS (MB), open fds, threads and CPU seconds of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15 of stat)
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return {"rss_mb": round(rss, 1), "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(fields[17]),
            "cpu_s": cpu}


class Threads:
    """Where a process's time goes, thread by thread: CPU seconds of its main thread (the
    broker's event loop: HTTP, the SDK, the tools) and of its other threads (the broker's writer:
    SQLite), from /proc/PID/task/*/schedstat, and the share of wall time each group spent in
    uninterruptible sleep (state D: waiting on the disk), sampled every SAMPLE_S in a thread of
    this process. Kernel delay accounting would count disk wait exactly, but it is off by default."""

    SAMPLE_S = 0.005

    def __init__(self, pid: int):
        self.pid = pid
        self.samples = 0
        self.waiting = {"main": 0, "others": 0}
        self.stopped = threading.Event()
        self.cpu0 = self.cpu()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def group(self, tid: str) -> str:
        return "main" if tid == str(self.pid) else "others"

    def cpu(self) -> dict[str, float]:
        cpu = {"main": 0.0, "others": 0.0}
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                with open(f"/proc/{self.pid}/task/{tid}/schedstat") as f:
                    cpu[self.group(tid)] += int(f.read().split()[0]) / 1e9
        return cpu

    def sample(self) -> None:
        while not self.stopped.wait(self.SAMPLE_S):
            states = {"main": False, "others": False}
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                with contextlib.suppress(OSError):
                    with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                        states[self.group(tid)] |= f.read().rsplit(")", 1)[1].split()[0] == "D"
            self.samples += 1
            for group, waiting in states.items():
                self.waiting[group] += waiting

    def stop(self, messages: int) -> dict[str, Any]:
        """Stop sampling: CPU ms a message of each group, and each group's share of time in disk wait."""
        self.stopped.set()
        self.thread.join()
        cpu = self.cpu()
        return {"cpu_ms_per_msg": {g: round((cpu[g] - self.cpu0[g]) * 1000 / max(1, messages), 3) for g in cpu},
                "disk_wait_share": {g: round(w / max(1, self.samples), 3) for g, w in self.waiting.items()}}


def base_interpreter() -> str:
    """The interpreter a user's `python3 dist/plugin.pyz` would run: the venv's base, shims resolved."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return str(Path(exe).resolve())


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory, kernel, and the load average before the bench adds its own."""
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_kb / 1024 / 1024, 1),
            "kernel": platform.release(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and every child it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def source_state() -> str:
    """The checkout the bench ran from: HEAD and whether the working tree differs (the .pyz files
    may be older than the source: compare their `built` time)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}{' + uncommitted changes' if dirty else ''}" if head else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def filesystem_of(path: Path) -> str:
    """The filesystem the broker's database lives on (the commit floor depends on it)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/mounts"):
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], f"{parts[2]} ({parts[0]} on {parts[1]})"
    return kind


def interpreter(py: str) -> dict[str, Any]:
    """The .pyz interpreter's version and what `python3 -I` imports before any code of ours: a site
    hook (a .pth) shows here, and in every start-up and RSS figure."""
    def run(code: str) -> str:
        return subprocess.run([py, "-I", "-c", code], capture_output=True, text=True).stdout.strip()

    return {"pyz_interpreter": py, "pyz_interpreter_version": run("import platform; print(platform.python_version())"),
            "pyz_interpreter_modules_at_start": int(run("import sys; print(len(sys.modules))"))}
