"""The broker with a wall clock the test can move, for clock-jump tests (no faketime, no root).

    DISPATCH_TEST_CLOCK=FILE python tests/clock_broker.py serve …

FILE holds seconds to add to time.time(); SIGUSR1 re-reads it. Only this process's wall clock
moves: time.monotonic (asyncio, the rate limit, listen deadlines) and the machine are untouched.
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLOCK = Path(os.environ["DISPATCH_TEST_CLOCK"])
wall = time.time
offset = float(CLOCK.read_text() or 0)


def moved() -> float:
    return wall() + offset


def reread(signum, frame) -> None:
    global offset
    offset = float(CLOCK.read_text() or 0)


time.time = moved
signal.signal(signal.SIGUSR1, reread)

import dispatch_broker  # noqa: E402  (after the clock is in place)

if __name__ == "__main__":
    sys.exit(dispatch_broker.main())
