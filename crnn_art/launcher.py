"""``crnn-art-launch``: ``accelerate launch`` with an exit status that says what happened.

``accelerate launch`` (torch elastic underneath) exits 1 whenever any process fails, whatever the
reason, and prints a ChildFailedError report. A scheduler then cannot tell a preempted run, which
saved a checkpoint and should be requeued, from a crash or a configuration error, which should
not. This wrapper runs the same command with the same arguments, collects the status each
crnn-art process records at exit (``crnn_art.exits.report_exit``), prints each distinct message
once and exits with the status that explains the run (see ``exit_status``): 143 after SIGTERM,
130 after SIGINT, 2 for a user error, 3 for non-finite losses, 1 for an unexpected error.

Nothing here imports torch: the wrapper only starts, forwards and reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from crnn_art.exits import EXIT_DIR_ENV

KNOWN_ERRORS = (2, 3, 1)
"""Recorded error codes, most informative first: a user error (2) and non-finite losses (3) are
diagnoses crnn-art made on purpose; an unexpected error (1) on one rank is often only the echo of
a peer that left (its collective operation fails), so a 2 or 3 elsewhere explains the run better."""

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""Signals that ask a run to stop (crnn-art checkpoints and exits 128+N); torch elastic also sends
SIGTERM to the remaining processes once one has failed."""

HOLD_SECONDS = 5.0
"""How long a traceback on stderr is held back while the launcher keeps running: the launcher's
final report is printed just before it exits, so a traceback still followed by a running launcher
is something else (a process's own output) and is released."""

TRACEBACK = b"Traceback (most recent call last):"
CHAINED = ("The above exception was the direct cause of the following exception:",
           "During handling of the above exception, another exception occurred:")
REPORT_EXCEPTION = re.compile(r"\b(ChildFailedError|SignalException)\b")
PR_SET_PDEATHSIG = 1


@dataclass
class LauncherReport:
    """The traceback ``accelerate launch`` prints when it fails: where it starts in the held lines,
    its kind, and the failures it lists (rank -> exit code, negative for a signal)."""

    start: int
    kind: str
    failures: dict[int, int] = field(default_factory=dict)


class StderrRelay:
    """Copies the launcher's stderr (its own and its processes') to ours as it comes, line by line.

    A traceback is held back, because the last one may be the launcher's ChildFailedError report,
    which repeats what the processes recorded; ``finish`` returns what is held when the launcher
    has exited, and the caller decides. Held lines are released if the launcher runs on.
    """

    def __init__(self, source: IO[bytes], sink: IO[bytes], hold_seconds: float = HOLD_SECONDS) -> None:
        self._sink = sink
        self._hold_seconds = hold_seconds
        self._lock = threading.Lock()
        self._held: list[bytes] = []
        self._held_since: float | None = None
        self._finished = False
        self._thread = threading.Thread(target=self._pump, args=(source,), name="stderr-relay", daemon=True)
        self._thread.start()

    def _write(self, data: bytes) -> None:
        try:
            self._sink.write(data)
            self._sink.flush()
        except (OSError, ValueError):
            pass  # our stderr is gone: keep draining so the launcher never blocks on a full pipe

    def _pump(self, source: IO[bytes]) -> None:
        for line in iter(source.readline, b""):
            with self._lock:
                if self._finished or (self._held_since is None and not line.startswith(TRACEBACK)):
                    self._write(line)
                    continue
                if self._held_since is None:
                    self._held_since = time.monotonic()
                self._held.append(line)

    def release_stale(self) -> None:
        """Write out held lines once they have waited ``hold_seconds`` with the launcher still running."""
        with self._lock:
            if self._held_since is not None and time.monotonic() - self._held_since > self._hold_seconds:
                self._write(b"".join(self._held))
                self._held, self._held_since = [], None

    def finish(self, timeout: float = 5.0) -> list[str]:
        """Wait (bounded: an orphaned process may keep the pipe open) for the end of the launcher's
        stderr; return the held lines. Anything arriving later is passed straight through."""
        self._thread.join(timeout)
        with self._lock:
            held, self._held, self._held_since, self._finished = self._held, [], None, True
        return [line.decode("utf-8", "replace") for line in held]

    def write(self, text: str) -> None:
        with self._lock:
            self._write(text.encode("utf-8", "replace"))


def find_launcher_report(lines: list[str]) -> LauncherReport | None:
    """Locate the launcher's final traceback (ChildFailedError or SignalException) among held lines.

    It is the last traceback, extended back over chained exceptions; the processes are dead when the
    launcher prints it, so nothing of theirs comes after its first line.
    """
    starts = [i for i, line in enumerate(lines) if line.rstrip("\r\n") == TRACEBACK.decode()]
    if not starts:
        return None
    start = starts.pop()
    while starts:
        before = [line.strip() for line in lines[starts[-1]:start] if line.strip()]
        if before[-1] not in CHAINED:  # the line just above is not "The above exception ..."
            break
        start = starts.pop()
    text = "".join(lines[start:])
    match = REPORT_EXCEPTION.search(text)
    if match is None:
        return None
    failures = {}
    for entry in re.finditer(r"^\s*rank\s*:\s*(\d+).*?^\s*exitcode\s*:\s*(-?\d+)", text, re.S | re.M):
        failures[int(entry.group(1))] = int(entry.group(2))
    return LauncherReport(start=start, kind=match.group(1), failures=failures)


def read_rank_files(folder: Path) -> dict[int, dict[str, Any]]:
    """The ``{"code", "message"}`` each process recorded, by rank; unreadable files are skipped
    (a process killed while writing leaves a partial one: treat it as not recorded)."""
    records: dict[int, dict[str, Any]] = {}
    for path in sorted(folder.glob("rank*.json")):
        match = re.fullmatch(r"rank(\d+)\.json", path.name)
        try:
            data = json.loads(path.read_text())
            records[int(match.group(1))] = {"code": int(data["code"]), "message": str(data.get("message", ""))}
        except (AttributeError, OSError, ValueError, KeyError, TypeError):
            continue
    return records


def _signal_status(code: int) -> int:
    """A process's status as a shell shows it: 128+N for a death by signal N (Popen gives -N)."""
    return 128 - code if code < 0 else code


def unrecorded_failures(report: LauncherReport | None, records: dict[int, dict[str, Any]]) -> dict[int, int]:
    """Ranks the launcher reports as failed that recorded nothing (killed, crashed in C, or not
    crnn-art), with their status as a shell would show it."""
    if report is None:
        return {}
    return {rank: _signal_status(code) for rank, code in report.failures.items() if rank not in records}


def exit_status(launcher_code: int, recorded: dict[int, int], unrecorded: dict[int, int], received: list[int]) -> int:
    """The status ``crnn-art-launch`` exits with. Rules, first that applies:

    1. the launcher exited 0: 0;
    2. an error some process recorded: 2, else 3, else 1, else any other code (see ``KNOWN_ERRORS``);
    3. this wrapper received SIGTERM/SIGINT (and forwarded it): 128+that signal (the first one), since
       every stop that followed is its consequence;
    4. a process that died without recording, of anything but a shutdown signal (137 killed, 139
       segfault, or its own exit code): the lowest such rank's status;
    5. a process stopped by SIGTERM/SIGINT, recorded or not: the lowest such rank's 128+N;
    6. the launcher's own status (128+N if a signal killed it).
    """
    if launcher_code == 0:
        return 0
    codes = [recorded[rank] for rank in sorted(recorded) if recorded[rank] != 0]
    errors = [c for c in codes if c < 128]
    if errors:
        return min(errors, key=lambda c: (KNOWN_ERRORS.index(c) if c in KNOWN_ERRORS else len(KNOWN_ERRORS), c))
    if received:
        return 128 + received[0]
    stops = {128 + int(s) for s in SHUTDOWN_SIGNALS}
    crashes = [unrecorded[rank] for rank in sorted(unrecorded) if unrecorded[rank] not in stops]
    if crashes:
        return crashes[0]
    stopped = codes + [unrecorded[rank] for rank in sorted(unrecorded)]
    if stopped:
        return stopped[0]
    return _signal_status(launcher_code)


def report_is_explained(report: LauncherReport, records: dict[int, dict[str, Any]]) -> bool:
    """Whether the launcher's report says nothing the recorded messages do not: some process
    recorded why it ended, and every failure the report lists is a process that recorded, or one
    that died of a shutdown signal (the launcher's own SIGTERM to the others). A report naming a
    process that died otherwise without a word (OOM-killed, segfault) is real information."""
    if not records:
        return False
    shutdown = {-int(s) for s in SHUTDOWN_SIGNALS}
    return all(rank in records or code in shutdown for rank, code in report.failures.items())


def format_messages(records: dict[int, dict[str, Any]]) -> list[str]:
    """Each distinct recorded message once, in rank order; prefixed with its ranks when they differ."""
    by_message: dict[str, list[int]] = {}
    for rank in sorted(records):
        message = records[rank]["message"].strip()
        if message:
            by_message.setdefault(message, []).append(rank)
    if len(by_message) <= 1:
        return list(by_message)
    return [f"[rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}] {message}"
            for message, ranks in by_message.items()]


def _die_with_parent(parent: int) -> Any:
    """A ``preexec_fn`` asking Linux to send the launcher SIGTERM when this wrapper dies (even by
    SIGKILL): the launcher, in its own session, would otherwise train on unsupervised. Skipped
    quietly where prctl is unavailable."""

    def preexec() -> None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the wrapper died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class _Forwarder:
    """SIGTERM/SIGINT handlers that pass each signal, once, to the launcher and let the wrapper wait.

    The launcher runs in its own session, so a signal to the wrapper's process group (Ctrl-C, a
    container runtime) reaches it only through here, once, and torch elastic passes it to every
    process, which checkpoints and exits 128+N.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.proc: subprocess.Popen | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SHUTDOWN_SIGNALS}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)
        self._send(signum)

    def _send(self, signum: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):  # already gone: its status tells the rest
                self.proc.send_signal(signum)

    def attach(self, proc: subprocess.Popen) -> None:
        """Start forwarding to ``proc``, including any signal that came while it was being started."""
        self.proc = proc
        for signum in self.received:
            self._send(signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _start(argv: list[str], exit_dir: str) -> subprocess.Popen:
    """Start ``accelerate launch ARGV`` in its own session, stderr piped to the relay."""
    env = {**os.environ, EXIT_DIR_ENV: exit_dir}
    linux = sys.platform.startswith("linux")
    return subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *argv], env=env,
                            stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_die_with_parent(os.getpid()) if linux else None)


def _conclude(code: int, exit_dir: Path, held: list[str], relay: StderrRelay, received: list[int]) -> int:
    """Print what the launcher held back (less its report when the records explain it) and the
    recorded messages; return the exit status."""
    records = read_rank_files(exit_dir)
    report = find_launcher_report(held)
    debug = os.environ.get("CRNN_ART_DEBUG") == "1"
    keep_report = report is None or debug or not report_is_explained(report, records)
    relay.write("".join(held if keep_report else held[:report.start]))
    for message in format_messages(records):  # recorded instead of printed: say it here, once
        relay.write(message + "\n")
    recorded = {rank: record["code"] for rank, record in records.items()}
    return exit_status(code, recorded, unrecorded_failures(report, records), received)


def main(argv: list[str] | None = None) -> int:
    """Run ``accelerate launch ARGV``, forward SIGTERM/SIGINT to it, and return the status that
    explains the run (see ``exit_status``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    exit_dir = Path(tempfile.mkdtemp(prefix="crnn-art-exit-"))
    forwarder = _Forwarder()
    try:
        proc = _start(argv, str(exit_dir))
        forwarder.attach(proc)
        relay = StderrRelay(proc.stderr, sys.stderr.buffer)
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                relay.release_stale()
        sys.stdout.flush()
        return _conclude(code, exit_dir, relay.finish(), relay, forwarder.received)
    finally:
        forwarder.restore()
        shutil.rmtree(exit_dir, ignore_errors=True)


def run() -> None:
    """The ``crnn-art-launch`` entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
