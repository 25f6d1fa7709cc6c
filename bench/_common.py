"""Helpers every benchmark script uses (``bench/*.py`` run as scripts put this folder on
``sys.path``; ``make bench`` skips files starting with ``_``)."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType


def note(msg: str) -> None:
    """Progress on stderr; stdout is the report."""
    print(f"==> {msg}", file=sys.stderr, flush=True)


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every ``finally`` cleans up."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
