"""Model folders of a run (``best/``, ``last/``) and training checkpoints: written whole or not at all.

Each folder is what ``CRNNArtClassifier.save_pretrained`` writes (``config.json`` with the
architecture, heads and class names, ``model.safetensors``), plus ``training.json`` saying
which epoch and step it is and its validation metrics. A folder is written under a temporary
name and renamed, so a crash mid-save leaves the previous one intact.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.utils import load
from safetensors.torch import load_file, save_file

from crnn_art.config import RunConfig, check_resume_config, load_run_config
from crnn_art.errors import CheckpointError, ModelLoadError, first_line
from crnn_art.model import WEIGHTS_NAME, CRNNArtClassifier
from crnn_art.runs import writing

HISTORY = "history.jsonl"


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(folder: str | Path) -> str:
    """SHA-256 (hex) of a model folder's ``model.safetensors``: what every evaluation and card names its model by."""
    return _sha256(Path(folder) / WEIGHTS_NAME)


def save_model_folder(model: CRNNArtClassifier, folder: str | Path, info: dict[str, Any]) -> Path:
    """Write ``folder`` whole or not at all (a temporary folder renamed over it); a failed write is one line."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(folder, "the model folder", partial=tmp):
        model.save_pretrained(tmp)
        info = {**info, "weights_sha256": _sha256(tmp / WEIGHTS_NAME)}
        (tmp / "training.json").write_text(json.dumps(info, indent=2))
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's ``history.jsonl``: one record per evaluated epoch (``partial`` for a stopped one).

    A last line cut short (the process was killed while appending) is left out.
    """
    path = Path(run_dir) / HISTORY
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


@dataclass
class ModelFolder:
    """Where a ``--checkpoint``/``--model`` argument leads: the model folder, its run, what was chosen."""

    path: Path
    """The folder with ``config.json`` and ``model.safetensors``."""
    run_dir: Path | None
    """The run it belongs to (the folder with ``config.yaml``), if any."""
    note: str = ""
    """Said to the user when a run folder was given and its ``best/`` is missing."""


def resolve_model_folder(given: str | Path) -> ModelFolder:
    """A run folder (its ``best/``, else ``last/`` with a note) or a model folder; anything else is a
    ``ModelLoadError`` that names the path as given and what to pass instead."""
    folder = Path(given)
    what = "pass a run folder (e.g. runs/demo) or its best/ or last/ folder"
    if not folder.exists():
        raise ModelLoadError(f"{given} does not exist; {what}")
    if not folder.is_dir():
        raise ModelLoadError(f"{given} is a file; {what}")
    if (folder / MANIFEST).is_file() or folder.parent.name == CHECKPOINTS:
        raise ModelLoadError(f"{given} is a training checkpoint (for train --resume), not a model; pass the run "
                             f"folder {folder.parent.parent} or its best/ folder")
    if (folder / "config.json").is_file() or (folder / WEIGHTS_NAME).is_file():
        run = folder.parent if (folder.parent / "config.yaml").is_file() else None
        return ModelFolder(folder, run)
    if (folder / "config.yaml").is_file():
        if (folder / "best" / "config.json").is_file():
            return ModelFolder(folder / "best", folder)
        if (folder / "last" / "config.json").is_file():
            return ModelFolder(folder / "last", folder, f"{given} has no best/ (no whole epoch was completed with a "
                                                        "best score): using last/")
        raise ModelLoadError(f"{given} is a run without a saved model yet (no best/ or last/): train it first, "
                             "or continue it with train --resume latest")
    raise ModelLoadError(f"{given} is neither a run folder (config.yaml) nor a model folder (config.json and "
                         f"{WEIGHTS_NAME}); {what}")


def load_model_folder(folder: str | Path, map_location: str = "cpu") -> CRNNArtClassifier:
    """Load a ``best/`` or ``last/`` folder, or a run folder (see ``resolve_model_folder``), strictly."""
    folder = resolve_model_folder(folder).path
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json; pass a run's best/ or last/ folder (or the run folder)")
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
STATE_FILE = "train_state.json"
EMA_FILE = "ema.safetensors"
ACCELERATE_FILES = ("model.safetensors", "optimizer.bin")
FORMAT = 2
"""Checkpoint format: 2 = the run's own state as JSON and safetensors, nothing of it pickled."""


class TrainState:
    """Where the run is, saved with every checkpoint (as JSON: nothing in a checkpoint executes code on resume).

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
        self.data_skipped_steps = 0
        self.nonfinite_in_row = 0
        """Consecutive non-finite steps so far (``train.max_bad_steps`` stops the run)."""
        self.images_drawn = 0
        self.images_failed = 0
        """Training images drawn and undecodable since the run started, or since it stopped for too many of
        them (``data.max_bad_fraction``), all processes."""
        self.tracker_run_id: str | None = None
        # the epoch in progress, so that a resumed epoch's history line equals the uninterrupted one's
        self.epoch_loss_sum = 0.0
        """Sum over applied steps of the step's loss averaged over processes."""
        self.epoch_applied_steps = 0
        self.epoch_skipped_images = 0
        """Training images of this epoch that failed to decode, all processes."""
        self.epoch_seconds = 0.0
        self.stream_legs: list[dict] = []
        """Streamed runs: which processes ran the epoch in progress from which batch (``partition.Leg``), so that
        a resume on another number of processes trains exactly the rows not yet trained."""

    def start_epoch(self, epoch: int) -> None:
        """Enter ``epoch``; its running sums restart unless it is the epoch a checkpoint stopped in."""
        if epoch != self.epoch or self.batch == 0:
            self.epoch, self.batch = epoch, 0
            self.epoch_loss_sum, self.epoch_applied_steps, self.epoch_skipped_images = 0.0, 0, 0
            self.epoch_seconds = 0.0
            self.stream_legs = []

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def _write_own_state(folder: Path, state: TrainState, scheduler, ema) -> None:
    """The run's own state beside what Accelerate saves: JSON for the position and the schedule, safetensors for EMA."""
    own = {"format": FORMAT, "train_state": state.state_dict(), "scheduler": scheduler.state_dict()}
    (folder / STATE_FILE).write_text(json.dumps(own, indent=1))
    if ema is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, str(folder / EMA_FILE))


def save_checkpoint(accelerator, run_dir: Path, state: TrainState, keep_last: int, scheduler, ema=None) -> Path:
    """Write ``checkpoints/step_XXXXXXXX`` atomically: every process saves into a temporary folder
    (``save_state`` is collective), the main process adds the run's own state and a manifest of file
    hashes, then renames. A crash at any point leaves earlier checkpoints whole; the temporary folder
    is never resumed from; a failed write removes it and is one line (``RunFolderError``).
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{state.step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(root, "the checkpoints folder"):
            root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    with writing(final, "checkpoint", partial=tmp):
        accelerator.save_state(output_dir=str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with writing(final, "checkpoint", partial=tmp):
            _write_own_state(tmp, state, scheduler, ema)
            files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": state.step, "epoch": state.epoch,
                                                    "batch": state.batch, "processes": accelerator.num_processes,
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


def read_manifest(path: Path) -> dict[str, Any]:
    """A checkpoint's manifest; a missing or damaged one is a ``CheckpointError`` naming the fix."""
    manifest = path / MANIFEST
    if (path / CHECKPOINTS).is_dir() or (path / "config.yaml").is_file():
        raise CheckpointError(f"{path} is a run folder, not a checkpoint: continue it with --output-dir {path} "
                              "--resume latest")
    if not manifest.is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {MANIFEST}: the save was interrupted); "
            f"resume from another one in {path.parent} or use --resume latest"
        )
    try:
        info = json.loads(manifest.read_text())
        if not isinstance(info.get("files"), dict) or not isinstance(info.get("epoch"), int):
            raise TypeError("files or epoch missing")
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{manifest} is damaged; resume from an older checkpoint with --resume PATH") from exc
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{path} was written by an older crnn-art (checkpoint format {info.get('format', 1)}, "
                              f"this one reads {FORMAT}); start the run again in another --output-dir")
    return info


def _known_file(name: str) -> bool:
    """The files a checkpoint may hold: Accelerate's (weights, optimizer, scaler, per-process RNG) and the run's own."""
    return name in (*ACCELERATE_FILES, "scaler.pt", "sampler.bin", STATE_FILE, EMA_FILE) or (
        name.startswith("random_states_") and name.endswith(".pkl") and name[14:-4].isdigit())


def verify_checkpoint(path: Path, processes: int | None = None) -> dict[str, Any]:
    """Every file a resume needs is listed in the manifest, exists and has its recorded hash, and nothing else is
    there; returns the manifest. What is needed is decided here, not read from the manifest (which anyone who
    can write the folder can rewrite): the weights, the optimizer, the run's state and one RNG file per process
    (``processes``, default: the manifest's count)."""
    info = read_manifest(path)
    files = info["files"]
    count = processes if processes is not None else int(info.get("processes") or 1)
    needed = [*ACCELERATE_FILES, STATE_FILE, *(f"random_states_{i}.pkl" for i in range(max(count, 1)))]
    missing = [name for name in needed if name not in files]
    extra_rng = [name for name in files if name.startswith("random_states_") and name not in needed]
    if extra_rng:
        raise CheckpointError(f"checkpoint {path} holds {', '.join(extra_rng)} beyond its {count} process(es): it "
                              "was altered; resume from another checkpoint with --resume PATH")
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; resume from an older checkpoint")
    present = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
    unknown = [name for name in {*files, *present} if not _known_file(name) or name not in files]
    if unknown:
        raise CheckpointError(f"checkpoint {path} holds files crnn-art never writes or did not list "
                              f"({', '.join(sorted(unknown))}); it was altered: resume from another checkpoint "
                              "with --resume PATH")
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} lacks {name}; resume from an older checkpoint")
        if _sha256(file) != digest:
            raise CheckpointError(
                f"checkpoint {path} is damaged ({name} does not match its recorded hash); "
                "resume from an older checkpoint with --resume PATH"
            )
    return info


def load_checkpoint(accelerator, path: Path, state: TrainState, scheduler, ema=None) -> int:
    """Restore a verified checkpoint without executing anything it holds; returns how many processes saved it.

    Accelerate loads the weights from safetensors and the optimizer, scaler and RNG files with
    ``weights_only=True``; its RNG load swallows failures (the resume would silently differ), so
    this process's RNG file is read the same way first. The run's own state is JSON and
    safetensors. Any file that does not load is one line naming the checkpoint.

    On another number of processes (elastic resume) the per-process RNG files do not map to the new
    processes and are not needed: every random draw of a step is seeded from (seed, step, rank) and every
    augmentation from (seed, epoch, row or draw slot), and the weights, optimizer, schedule and position
    are the same for all processes.
    """
    saved_by = int(read_manifest(path).get("processes") or 1)
    elastic = saved_by != accelerator.num_processes
    if (ema is not None) != (path / EMA_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} {'lacks' if ema is not None else 'holds'} EMA weights but this run "
                              f"{'keeps' if ema is not None else 'keeps no'} EMA (train.ema_decay); resume from a "
                              "checkpoint of this run")
    if (path / "scaler.pt").is_file() != (accelerator.scaler is not None):
        raise CheckpointError(f"checkpoint {path} does not match this run's precision (fp16 loss-scaler state "
                              f"{'present' if (path / 'scaler.pt').is_file() else 'missing'}); resume with the "
                              "precision it was saved with")
    if not elastic and not (path / f"random_states_{accelerator.process_index}.pkl").is_file():
        raise CheckpointError(f"checkpoint {path} has no random state for process {accelerator.process_index}; "
                              "it was altered: resume from another checkpoint with --resume PATH")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols: the load below fails or not
            if not elastic:
                load(str(path / f"random_states_{accelerator.process_index}.pkl"))
            accelerator.load_state(str(path))
        own = json.loads((path / STATE_FILE).read_text())
        state.load_state_dict(own["train_state"])
        scheduler.load_state_dict(own["scheduler"])
        if ema is not None:
            ema.load_state_dict(load_file(str(path / EMA_FILE), device=str(accelerator.device)))
    except Exception as exc:
        first = first_line(exc)
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {first}): it does not fit this run or holds "
            "something other than saved tensors; resume from an older checkpoint with --resume PATH"
        ) from exc
    return saved_by


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


@dataclass
class ResumePlan:
    """What ``train --resume`` will do, decided before anything is written."""

    checkpoint: Path | None
    finished: bool = False
    """The last checkpoint is past the final epoch."""
    at_max_steps: bool = False
    """The run stopped at ``train.max_steps`` and the config still says so: nothing to train."""


def plan_resume(cfg: RunConfig, run_dir: Path, resume: str | None) -> ResumePlan:
    """Check ``--resume`` against the run folder without writing to it.

    ``auto`` is ``latest`` when the run has a checkpoint, else a fresh start. A fresh start in a
    folder that holds checkpoints, a config that changes what the run trains, and a missing or
    damaged checkpoint are errors here, before any file is touched. A run whose last checkpoint
    is past its final epoch is ``finished``: nothing to train.
    """
    run_dir = Path(run_dir)
    done = complete_checkpoints(run_dir / CHECKPOINTS)
    if resume == "auto":
        resume = "latest" if done else None
    if resume is None:
        if done:
            raise CheckpointError(
                f"{run_dir} already holds checkpoints of a run: continue it with --resume latest, "
                "or give another --output-dir"
            )
        return ResumePlan(None)
    path = find_checkpoint(run_dir, resume)
    info = read_manifest(path)
    own = run_dir / "config.yaml"
    own = own if own.is_file() else path.parent.parent / "config.yaml"
    if own.is_file():
        check_resume_config(load_run_config(own), cfg, own.parent)
    max_steps = cfg.train.max_steps
    return ResumePlan(path, finished=info["epoch"] > cfg.train.epochs,
                      at_max_steps=max_steps is not None and info["step"] >= max_steps)
