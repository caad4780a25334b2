"""Ctrl-C state shared by the entry point and the error printer (standard library only, imports nothing else)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

_INTERRUPTED = threading.Event()
MESSAGE = "interrupted: nothing was written at the output path (temporary files removed)"


def interrupted() -> bool:
    """True once SIGINT was received in this process."""
    return _INTERRUPTED.is_set()


def exit_interrupted() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
    print(MESSAGE, file=sys.stderr, flush=True)
    raise SystemExit(130)


def _on_sigint(signum, frame) -> None:
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def run_with_interrupts(run: Callable[[], None]) -> None:
    """Run the CLI with the SIGINT handler installed: Ctrl-C anywhere ends with one line and exit 130."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        run()
    except KeyboardInterrupt:
        exit_interrupted()
    except SystemExit as exc:
        if interrupted() and exc.code not in (0, None):  # typer turns Ctrl-C into a silent Exit(130)
            exit_interrupted()
        raise
