"""How a crnn-art process ends: its one-line report (or the record ``crnn-art-launch`` reads), and its
DataLoader workers stopped so that the interpreter can exit. Imports no torch: the CLI uses it on every path."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

EXIT_DIR_ENV = "CRNN_ART_EXIT_DIR"
"""Set by ``crnn-art-launch``: each process records its exit status and message there instead of
printing, so the launcher prints every distinct message once and exits with the status that
says what happened (143 preempted, 2 a user error), not the launcher's own 1."""


def report_exit(code: int, message: str, every_rank: bool = True) -> int:
    """Say why this process ends (one line on stderr) and return ``code``.

    Under ``crnn-art-launch`` the line is recorded for the launcher instead. ``every_rank=False``
    prints it on the main process only (a stop that every process reports alike).
    """
    folder = os.environ.get(EXIT_DIR_ENV)
    rank = os.environ.get("RANK", "0")
    if folder:
        try:
            Path(folder, f"rank{rank}.json").write_text(json.dumps({"code": code, "message": message}))
            return code
        except OSError:
            pass  # the launcher's folder is gone: say it here instead
    if every_rank or rank == "0":
        print(message, file=sys.stderr, flush=True)
    return code


def stop_worker_processes(timeout: float = 5.0) -> int:
    """Kill this process's daemonic children (DataLoader workers) and wait for them; returns how many.

    Workers ignore SIGTERM (see ``loaders``), and a worker left alive by an error would make the
    interpreter's exit, which terminates them with SIGTERM and joins them, wait forever. SIGCHLD
    goes back to its default first: PyTorch's handler would report the killed workers as a crash.
    """
    import multiprocessing
    import signal

    children = [p for p in multiprocessing.active_children() if p.daemon]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in children:
            child.kill()
        for child in children:
            child.join(timeout)
    return len(children)
