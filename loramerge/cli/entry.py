"""The console-script entry point: Ctrl-C at any moment ends with one clear line and exit code 130.

Standard library only, so the handler is in place before the heavy imports (torch, transformers) start;
a SIGINT during them, during the work, or during the atomic write ends the same way: the temporary
directory is removed by the writer, nothing is written at the output path, and no traceback is printed.
An error raised *because of* the interruption (a read interrupted mid-file) is never reported as a
damaged input: ``interrupted()`` is checked before any error is printed.
"""

from __future__ import annotations

from loramerge.cli.interrupt import run_with_interrupts


def _run_app() -> None:
    from loramerge.cli.app import run_app  # after the handler is installed

    run_app()


def main() -> None:
    run_with_interrupts(_run_app)


if __name__ == "__main__":
    main()
