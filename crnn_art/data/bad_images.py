"""Training images that cannot be decoded: counted on every process, listed in ``RUN/bad_images.tsv``,
and a clean stop when there are too many of them.

A few broken files in 80,000 paintings must not stop a 20-epoch run; a wrong image folder or a damaged
download (every other file broken) must not train for hours on what is left. The run therefore stops
only when more than ``data.max_bad_fraction`` of the training images drawn since it (re)started failed,
judged once at least ``MIN_DRAWN`` images were drawn (so that an early streak cannot stop a healthy
run) and at every epoch end. A step whose micro-batch keeps fewer than two decodable images on any
process is skipped by every process alike (DDP needs all of them in each backward; BatchNorm needs
two samples) and counted in ``history.jsonl`` as ``data_skipped_steps``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crnn_art.runs import append_line

BAD_IMAGES = "bad_images.tsv"
"""``split<TAB>row<TAB>path<TAB>reason``, one line per file that failed, each file listed once."""

MIN_DRAWN = 1000
"""Training images drawn before the share that failed is judged in the middle of an epoch."""


class BadImages:
    """What failed on this process since the last ``flush``; the global counts live in ``TrainState`` (so a
    resumed run judges exactly as the uninterrupted one would)."""

    def __init__(self, out: Path, max_fraction: float, is_main: bool) -> None:
        self.path = out / BAD_IMAGES
        self.max_fraction = max_fraction
        self.is_main = is_main
        self.pending: list[tuple[int, str, str]] = []
        self.drawn = 0
        self.failed = 0
        self.listed = _listed_rows(self.path) if is_main else set()

    def collect(self, micro_batches: list[dict[str, Any]]) -> list[float]:
        """Remember this process's failed files; return what every process must agree on before the step:
        ``[a micro-batch has fewer than 2 images, images failed, images drawn]`` (the padding of a stream's last,
        smaller step, row -1, fills a micro-batch but is neither drawn nor failed)."""
        for batch in micro_batches:
            self.pending += batch["failed"]
        return [float(any(len(b["row"]) < 2 for b in micro_batches)),
                float(sum(int(b["skipped"]) for b in micro_batches)),
                float(sum(int((b["row"] >= 0).sum()) + int(b["skipped"]) for b in micro_batches))]

    def count(self, state, failed: int, drawn: int) -> None:
        """Add one step's global counts (the sums over processes of ``collect``'s last two numbers)."""
        state.images_failed += failed
        state.images_drawn += drawn
        self.failed, self.drawn = state.images_failed, state.images_drawn

    def reset(self, state) -> None:
        """After a stop for too many failures: the checkpoint the resumed run starts from (the user fixed files
        or raised the limit) judges afresh; this run keeps its counts for the stop message."""
        state.images_failed = state.images_drawn = 0

    def too_many(self, epoch_end: bool) -> bool:
        judged = epoch_end or self.drawn >= MIN_DRAWN or self.max_fraction == 0
        return judged and self.drawn > 0 and self.failed > self.max_fraction * self.drawn

    def flush(self, gather_object) -> None:
        """Gather every process's failed files and append the ones not yet listed (main process writes).

        Every process must call it at the same point (``gather_object`` is a collective)."""
        everyone = gather_object(self.pending)
        self.pending = []
        if not self.is_main:
            return
        for row, path, reason in sorted(set(map(tuple, everyone))):
            if row not in self.listed:
                self.listed.add(row)
                fields = [" ".join(str(text).split()) for text in (path, reason)]  # one line, tab-free fields
                append_line(self.path, f"train\t{row}\t{fields[0]}\t{fields[1]}",
                            "the list of images that failed to decode")

    def stop_message(self, resume_hint: str) -> str:
        return (f"{self.failed} of the {self.drawn} training images drawn since the run started failed to decode "
                f"({100 * self.failed / self.drawn:.1f}% > data.max_bad_fraction={self.max_fraction:g}); they are "
                f"listed in {self.path}: fix or remove those files (or raise data.max_bad_fraction), then "
                f"{resume_hint}")


def _listed_rows(path: Path) -> set[int]:
    if not path.is_file():
        return set()
    rows = set()
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1].isdigit():
            rows.add(int(parts[1]))
    return rows
