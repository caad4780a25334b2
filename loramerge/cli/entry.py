"""The console-script entry point: Ctrl-C at any moment ends with one clear line and exit code 130.

Standard library only, so the handler is in place before the heavy imports (torch, transformers) start;
a SIGINT during them, during the work, or during the atomic write ends the same way: the temporary
directory is removed by the writer, nothing is written at the output path, and no traceback is printed.
An error raised *because of* the interruption (a read interrupted mid-file) is never reported as a
damaged input: ``interrupted()`` is checked before any error is printed.
"""

from __future__ import annotations

import signal
import sys
import threading

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


def main() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        from loramerge.cli.app import run_app

        run_app()
    except KeyboardInterrupt:
        exit_interrupted()
    except SystemExit as exc:
        if interrupted() and exc.code not in (0, None):  # typer turns Ctrl-C into a silent Exit(130)
            exit_interrupted()
        raise


if __name__ == "__main__":
    main()
