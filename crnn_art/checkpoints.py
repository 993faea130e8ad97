"""Model folders of a run (``best/``, ``last/``) and training checkpoints: written whole or not at all.

Each folder is what ``CRNNArtClassifier.save_pretrained`` writes (``config.json`` with the
architecture, heads and class names, ``model.safetensors``), plus ``training.json`` saying
which epoch and step it is and its validation metrics. A folder is written under a temporary
name and renamed, so a crash mid-save leaves the previous one intact.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

from crnn_art.model import WEIGHTS_NAME, CRNNArtClassifier, ModelLoadError

HISTORY = "history.jsonl"


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, whether raised as OSError or wrapped by safetensors' Rust writer as a message."""
    return getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc)


def _disk_full_error(target: Path, what: str) -> CheckpointError:
    free = shutil.disk_usage(target.parent if target.parent.exists() else Path.cwd()).free / 2**30
    return CheckpointError(
        f"disk full while writing {what} {target} ({free:.1f} GiB free): free space there or lower train.keep_last, "
        f"then resume with --resume latest; what was saved before is intact"
    )


def save_model_folder(model: CRNNArtClassifier, folder: str | Path, info: dict[str, Any]) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        info = {**info, "weights_sha256": _sha256(tmp / WEIGHTS_NAME)}
        (tmp / "training.json").write_text(json.dumps(info, indent=2))
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(exc):
            raise _disk_full_error(folder, "the model folder") from exc
        raise
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's ``history.jsonl``: one record per evaluated epoch (``partial`` for a stopped one)."""
    path = Path(run_dir) / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def load_model_folder(folder: str | Path, map_location: str = "cpu") -> CRNNArtClassifier:
    """Load a ``best/`` or ``last/`` folder, or a run folder: its ``best/`` (``last/`` if no epoch finished)."""
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).exists():
        for name in ("best", "last"):
            if (folder / name).is_dir():
                folder = folder / name
                break
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} has no config.json; pass a run's best/ or last/ folder (or the run folder itself)"
        )
    try:
        json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{folder / 'config.json'} is damaged ({exc}); use another checkpoint") from exc
    info_file = folder / "training.json"
    expected = json.loads(info_file.read_text()).get("weights_sha256") if info_file.is_file() else None
    if expected and (folder / WEIGHTS_NAME).is_file() and _sha256(folder / WEIGHTS_NAME) != expected:
        raise ModelLoadError(
            f"{folder / WEIGHTS_NAME} was altered or damaged after it was saved (its SHA-256 differs from "
            "training.json); use another checkpoint or retrain"
        )
    return CRNNArtClassifier.from_pretrained(str(folder), map_location=map_location)


# -- training checkpoints: everything needed to continue a run exactly ----------------------------

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A training checkpoint that is missing, incomplete or altered; the message says what to use instead."""


class TrainState:
    """Where the run is: registered with ``accelerator.register_for_checkpointing``.

    ``epoch`` is the 1-based epoch in progress and ``batch`` the global batches already done in it,
    so a resumed run asks the sampler for exactly the batches that remain.
    """

    def __init__(self) -> None:
        self.epoch = 1
        self.batch = 0
        self.step = 0
        self.best_score = float("-inf")
        self.best_step: int | None = None
        self.nonfinite_steps = 0
        self.scaler_skips = 0
        self.tracker_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def save_checkpoint(accelerator, run_dir: Path, state: TrainState, keep_last: int) -> Path:
    """Write ``checkpoints/step_XXXXXXXX`` atomically: every process saves into a temporary folder
    (``save_state`` is collective), the main process records a manifest of file hashes, then renames.
    A crash at any point leaves earlier checkpoints whole; the temporary folder is never resumed from.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{state.step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(output_dir=str(tmp))
    except Exception as exc:
        if _is_disk_full(exc):
            shutil.rmtree(tmp, ignore_errors=True)
            raise _disk_full_error(final, "checkpoint") from exc
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"step": state.step, "epoch": state.epoch, "batch": state.batch,
                                                "files": files}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        rotate(root, keep_last, state.best_step)
    accelerator.wait_for_everyone()
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints (with a manifest), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / MANIFEST).is_file())


def rotate(root: Path, keep_last: int, best_step: int | None) -> None:
    """Keep the newest ``keep_last`` checkpoints and the best one; delete the rest and stale temporaries."""
    done = complete_checkpoints(root)
    keep = set(done[-keep_last:])
    if best_step is not None:
        keep.add(root / f"step_{best_step:08d}")
    for path in done:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def verify_checkpoint(path: Path) -> None:
    """Every file the manifest lists exists with the same hash, and nothing is missing."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {MANIFEST}: the save was interrupted); "
            f"resume from another one in {path.parent} or use --resume latest"
        )
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{manifest} is damaged; resume from an older checkpoint") from exc
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} lacks {name}; resume from an older checkpoint")
        if _sha256(file) != digest:
            raise CheckpointError(
                f"checkpoint {path} is damaged ({name} does not match its recorded hash); "
                "resume from an older checkpoint with --resume PATH"
            )


def find_checkpoint(run_dir: Path, spec: str) -> Path:
    """``latest`` -> the newest complete checkpoint of the run; otherwise a path. Verified either way."""
    if spec == "latest":
        done = complete_checkpoints(Path(run_dir) / CHECKPOINTS)
        if not done:
            raise CheckpointError(
                f"no complete checkpoint in {Path(run_dir) / CHECKPOINTS}; start without --resume"
            )
        path = done[-1]
    else:
        path = Path(spec)
        if not path.is_dir():
            raise CheckpointError(f"--resume {spec}: no such checkpoint folder; use --resume latest")
    verify_checkpoint(path)
    return path
