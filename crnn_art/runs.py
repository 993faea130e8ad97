"""The run folder as a place on disk: one writer at a time, files replaced whole, write failures in one line.

Every file of a run (``config.yaml``, ``split.json``, ``history.jsonl``, ``metrics.json``, the
model folders and the checkpoints) is written through here, so that a failure while writing
(a full disk, a read-only mount, a quota) leaves what was saved before whole and ends the
command with one line that names the free space and the fix, whatever words the library that
failed used for it (PyTorch reports a full disk as ``RuntimeError: ... unexpected pos``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from crnn_art.errors import RunFolderError, first_line

LOCK = ".crnn-art.lock"
HOLDER = ".crnn-art.holder.json"


def free_gib(path: Path) -> float:
    """Free space (GiB) on the filesystem that holds ``path`` (or its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free / 2**30


def write_error(target: Path, what: str, exc: BaseException) -> RunFolderError:
    """The one line for a failed write: what, where, the library's first words, the free space, the fix."""
    first = first_line(exc, 160, empty=type(exc).__name__)
    return RunFolderError(
        f"could not write {what} {target} ({type(exc).__name__}: {first}); {free_gib(target):.2f} GiB free there: "
        "free space (or lower train.keep_last) and check the folder is writable, then run the command again "
        "(add --resume latest if the run has a checkpoint); what was saved before is intact"
    )


@contextmanager
def writing(target: Path, what: str, partial: Path | None = None) -> Iterator[None]:
    """Turn any failure inside the block into :func:`write_error`, removing ``partial`` (a temporary folder) first."""
    try:
        yield
    except RunFolderError:
        raise
    except Exception as exc:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise write_error(target, what, exc) from exc


def atomic_write_text(path: Path, text: str, what: str) -> None:
    """Replace ``path`` whole: written beside it under a temporary name, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path, what):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def append_line(path: Path, line: str, what: str) -> None:
    """Append one line; a failed append is cut back so the file never ends in half a record."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    try:
        with writing(path, what), open(path, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except RunFolderError:
        with open(path, "r+") as fh:
            fh.truncate(size)
        raise


def check_output_dir(path: Path) -> None:
    """A run folder must be a folder (or not exist yet)."""
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"--output-dir {path} is a file, not a folder: give a folder (new or an earlier run's)")


class RunLock:
    """One writer per run folder, for the run's whole life (the main process holds it).

    A second ``train`` on the same folder (a restart while the killed job's processes still run,
    two jobs given the same ``--output-dir``) fails at once with the holder's host and pid. The
    lock is the operating system's (``filelock``), so it is released on any exit, SIGKILL included.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._lock = FileLock(str(self.run_dir / LOCK), timeout=0)

    def acquire(self) -> None:
        with writing(self.run_dir, "the run folder"):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise RunFolderError(
                f"{self.run_dir} is in use by another training ({self.holder()}): wait for it to end or stop it, "
                "or give another --output-dir"
            ) from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_text(self.run_dir / HOLDER, json.dumps(holder), "the run's lock holder")

    def holder(self) -> str:
        try:
            info = json.loads((self.run_dir / HOLDER).read_text())
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def release(self) -> None:
        if self._lock.is_locked:
            (self.run_dir / HOLDER).unlink(missing_ok=True)
            Path(self._lock.lock_file).unlink(missing_ok=True)
            self._lock.release()
