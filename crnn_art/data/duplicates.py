"""The same painting filed twice: exact and near copies found from image hashes, without comparing all pairs.

Each image gets two 64-bit hashes and a tiny colour thumbnail (8 x 8 RGB):

- the average hash of the thumbnail (``imagehash.average_hash``: which of 64 cells are brighter than the mean),
  which re-encoding, resizing and metadata leave almost untouched;
- the perceptual hash (``imagehash.phash``: the signs of the low frequencies of the DCT of a 32 x 32 greyscale
  thumbnail), which a small crop or a colour shift moves only a little.

Two images are **exact copies** when their thumbnails differ by at most ``EXACT_LEVEL`` levels (0-255) on
average and their perceptual hashes by at most ``EXACT_PHASH_BITS`` bits: the same pixels after decoding and
shrinking (re-encoded, resized, other EXIF). The thumbnail alone would join different sparse drawings on the
same paper; the hash tells them apart. They are **near
copies** when their perceptual hashes differ in at most ``near_bits`` bits (default ``NEAR_BITS`` of 64): a
crop, a colour shift, another scan; raising it finds more copies and more false ones (paintings with the
same composition), docs/duplicates.md shows the effect.

With a trained model, two images are also near copies when the cosine of their embeddings reaches a threshold
(``cosine_pairs``) *and* their perceptual hashes are within ``EMBEDDING_PHASH_BITS``: the model proposes, the hash
confirms loosely. That finds crops the hash alone misses at its default bits; the embeddings alone do not tell copies
from paintings of the same style, since a classifier learns to map those together (docs/duplicates.md has the
figures). The price is comparing every pair of embeddings (in blocks, as matrix products on the accelerator).

Candidate pairs come from multi-index hashing, not from all pairs: split a hash into ``t + 1`` chunks; two
hashes within ``t`` bits agree exactly on at least one chunk (pigeonhole), so only images that share a chunk
value are compared; the candidates are checked in vectorised chunks. Copies are joined into groups (connected
components).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crnn_art.errors import DataError

EXACT_LEVEL = 3.0
"""Mean absolute difference (0-255) of the 8 x 8 RGB thumbnails up to which two images count as exact copies."""
EXACT_PHASH_BITS = 12
"""Perceptual-hash bits in which exact copies may differ (a re-encoded small image moves up to ~8)."""
EXACT_SEARCH_BITS = 8
"""Average-hash bits in which exact copies may differ (cells near the mean flip): how wide the search is."""
NEAR_BITS = 8
EMBEDDING_PHASH_BITS = 16
"""Perceptual-hash bits within which a pair of close embeddings counts as a near copy (a 5 % crop moves 10-18)."""


def _as_int(bits: np.ndarray) -> int:
    return int(np.packbits(bits.flatten().astype(np.uint8)).view(">u8")[0])


def image_key(image) -> tuple[int, int, np.ndarray]:
    """``(perceptual hash, average hash, 8 x 8 x 3 uint8 thumbnail)`` of a PIL image."""
    import imagehash
    from PIL import Image

    rgb = image.convert("RGB")
    thumb = np.asarray(rgb.resize((8, 8), Image.Resampling.BOX), dtype=np.uint8)
    return _as_int(imagehash.phash(rgb, hash_size=8).hash), _as_int(imagehash.average_hash(rgb, 8).hash), thumb


_POPCOUNT16 = np.array([bin(i).count("1") for i in range(1 << 16)], dtype=np.uint8)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of uint64 values, element-wise."""
    return sum(_POPCOUNT16[(x >> np.uint64(s)) & np.uint64(0xFFFF)].astype(np.int64) for s in (0, 16, 32, 48))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between uint64 hashes, element-wise."""
    return popcount(np.bitwise_xor(a, b))


def _close_in_bucket(members: np.ndarray, hashes: np.ndarray, near_bits: int, limit: int,
                     earlier: list[tuple[int, int]]) -> np.ndarray:
    """Pairs of one bucket's members within ``near_bits``, as keys ``i * n + j`` (``i < j``), leaving out pairs that
    also share one of the ``earlier`` chunks (found there already, so every pair comes once without a merge).
    Compared in blocks of rows so that at most about ``limit`` pairs are in memory at once (a bucket of 20,000
    near-blank images would otherwise hold 2e8)."""
    m, n = len(members), np.int64(len(hashes))
    if m * (m - 1) // 2 <= limit:
        i, j = np.triu_indices(m, k=1)
        blocks = [(members[i], members[j])]
    else:
        step = max(1, limit // m)
        rows = [np.arange(lo, min(lo + step, m - 1)) for lo in range(0, m - 1, step)]
        blocks = ((np.repeat(members[i], m - 1 - i), members[np.concatenate([np.arange(k + 1, m) for k in i])])
                  for i in rows)
    found = []
    for a, b in blocks:
        x = np.bitwise_xor(hashes[a], hashes[b])
        keep = popcount(x) <= near_bits
        for lo, hi in earlier:
            keep &= ((x >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)) != 0
        found.append(np.minimum(a, b)[keep].astype(np.int64) * n + np.maximum(a, b)[keep])
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def _pair_keys(hashes: np.ndarray, near_bits: int, limit: int) -> np.ndarray:
    """Sorted keys ``i * n + j`` of the pairs within ``near_bits`` (see ``candidate_pairs``), each once: a pair is
    taken in the first chunk its two hashes share."""
    n = len(hashes)
    bounds = np.linspace(0, 64, near_bits + 2).astype(int)
    chunks = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
    found = []
    for c, (lo, hi) in enumerate(chunks):
        part = (hashes >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(part, kind="stable")
        values = part[order]
        starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
        ends = np.r_[starts[1:], n]
        found += [_close_in_bucket(order[s:e], hashes, near_bits, limit, chunks[:c])
                  for s, e in zip(starts, ends, strict=True) if e - s > 1]
    return np.sort(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)


def candidate_pairs(hashes: np.ndarray, near_bits: int, limit: int = 1 << 22) -> np.ndarray:
    """Index pairs ``(i, j)``, ``i < j``, whose hashes differ in at most ``near_bits`` bits, each once, sorted;
    ``limit``: about how many pairs are compared at once."""
    keys = _pair_keys(hashes, near_bits, limit)
    return np.stack([keys // len(hashes), keys % len(hashes)], axis=1) if len(keys) else np.zeros((0, 2), np.int64)


@dataclass
class Group:
    """Copies of one painting: positions in the hashed list, and how they were matched."""

    members: list[int]
    kind: str
    """``exact`` when every copy is an exact copy of another, else ``near``."""
    pairs: list[tuple[int, int, int, str, float | None]] = field(default_factory=list)
    """``(a, b, bits, kind, cosine)`` for the matches that joined the group (cosine: None unless embeddings were
    compared)."""


MAX_COSINE_PAIRS = 5_000_000
"""More pairs than this at a ``--cosine`` threshold means the embeddings do not tell copies apart there."""


def cosine_pairs(z: np.ndarray, threshold: float, block: int = 1024, device: str = "cpu",
                 max_pairs: int = MAX_COSINE_PAIRS) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)``, ``i < j``, of the rows of ``z`` ((N, D) embeddings) whose cosine is at least
    ``threshold``, and those cosines ((K, 2) int64, (K,) float32). Exact: each block of ``block`` rows is
    multiplied with the rows from it on (N^2 D / 2 multiply-adds in all, a block x N matrix in memory).

    The embeddings are centred (their mean subtracted) first: a CNN's pooled features are non-negative and share
    one large direction, so raw cosines of unrelated paintings sit near 0.97 and say little; centred, unrelated
    paintings fall near 0 and only copies stay near 1. More than ``max_pairs`` pairs raise ``DataError`` (one
    line: raise the threshold) before they fill the memory."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.asarray(z, dtype=np.float32), device=device)
    t = F.normalize(t - t.mean(dim=0, keepdim=True), dim=1)
    found, values = [], []
    for lo in range(0, len(t), block):
        sims = t[lo:lo + block] @ t[lo:].T
        i, j = torch.nonzero(sims >= threshold, as_tuple=True)
        above = j > i  # the block's own diagonal and below it are not pairs
        found.append(torch.stack([i[above] + lo, j[above] + lo], dim=1).cpu())
        values.append(sims[i[above], j[above]].float().cpu())
        if sum(len(f) for f in found) > max_pairs:
            raise DataError(f"--cosine {threshold} joins more than {max_pairs:,} pairs: at this threshold the "
                            "embeddings do not tell copies apart; raise it (docs/duplicates.md: 0.95 to 0.999)")
    if not found:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32)
    return torch.cat(found).numpy().astype(np.int64), torch.cat(values).numpy()


def _matches(pairs: np.ndarray, phashes: np.ndarray, thumbs: np.ndarray, near_bits: int, exact_level: float,
             proposed: np.ndarray, chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Which candidate ``pairs`` are copies, checked a chunk at a time: ``(K,)`` codes 0 (not a copy), 1 (near),
    2 (exact), and the pairs' perceptual-hash bits. ``proposed``: sorted keys ``i * n + j`` of the pairs whose
    embeddings are close."""
    codes, bits = np.zeros(len(pairs), dtype=np.int8), np.zeros(len(pairs), dtype=np.int64)
    for lo in range(0, len(pairs), chunk):
        a, b = pairs[lo:lo + chunk, 0], pairs[lo:lo + chunk, 1]
        d = hamming(phashes[a], phashes[b])
        level = np.full(len(a), np.inf)
        maybe = np.flatnonzero(d <= EXACT_PHASH_BITS)  # thumbnails only where the hash allows an exact copy
        level[maybe] = np.abs(thumbs[a[maybe]].astype(np.int16)
                              - thumbs[b[maybe]].astype(np.int16)).mean(axis=(1, 2, 3))
        exact = (level <= exact_level) & (d <= EXACT_PHASH_BITS)
        near = (d <= near_bits) | (np.isin(a * len(phashes) + b, proposed) & (d <= EMBEDDING_PHASH_BITS))
        codes[lo:lo + chunk] = np.where(exact, 2, np.where(near, 1, 0))
        bits[lo:lo + chunk] = d
    return codes, bits


def find_groups(phashes: np.ndarray, ahashes: np.ndarray, thumbs: np.ndarray, near_bits: int = NEAR_BITS,
                exact_level: float = EXACT_LEVEL,
                similar: tuple[np.ndarray, np.ndarray] | None = None) -> list[Group]:
    """Groups of copies among images given by their perceptual and average hashes (uint64) and thumbnails
    ((N, 8, 8, 3) uint8), ordered by their first member; single images are not groups. ``similar``: pairs whose
    embeddings are close and their cosines (``cosine_pairs``), near copies when their perceptual hashes are within
    ``EMBEDDING_PHASH_BITS``. Copies join into groups as connected components (``scipy.sparse.csgraph``)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(phashes)
    if n == 0:
        return []
    proposed, cosines = np.zeros(0, dtype=np.int64), np.zeros(0)  # sorted keys i * n + j and their cosines
    if similar is not None and len(similar[0]):
        close = np.asarray(similar[0], dtype=np.int64).reshape(-1, 2)
        order = np.argsort(close[:, 0] * n + close[:, 1])
        proposed, cosines = (close[:, 0] * n + close[:, 1])[order], np.asarray(similar[1], dtype=np.float64)[order]
    keys = np.union1d(np.union1d(_pair_keys(phashes, near_bits, 1 << 22),
                                 _pair_keys(ahashes, EXACT_SEARCH_BITS, 1 << 22)), proposed)
    pairs = np.stack([keys // n, keys % n], axis=1) if len(keys) else np.zeros((0, 2), np.int64)
    codes, bits = _matches(pairs, phashes, thumbs, near_bits, exact_level, proposed)
    kept = np.flatnonzero(codes > 0)
    a, b = pairs[kept, 0], pairs[kept, 1]
    at = np.searchsorted(proposed, keys[kept])
    hit = at < len(proposed)
    hit[hit] = proposed[at[hit]] == keys[kept][hit]
    cosine_of = [float(cosines[k]) if h else None for k, h in zip(at.tolist(), hit.tolist(), strict=True)]
    _, component = connected_components(coo_matrix((np.ones(len(kept)), (a, b)), shape=(n, n)), directed=False)
    sizes = np.bincount(component, minlength=1)
    groups: dict[int, Group] = {}
    for i in np.flatnonzero(sizes[component] > 1).tolist():
        groups.setdefault(int(component[i]), Group([], "exact")).members.append(i)
    for x, y, d, code, cos in zip(a.tolist(), b.tolist(), bits[kept].tolist(), codes[kept].tolist(), cosine_of,
                                  strict=True):
        group = groups[int(component[x])]
        group.pairs.append((x, y, d, "exact" if code == 2 else "near", cos))
        if code == 1:
            group.kind = "near"
    return sorted(groups.values(), key=lambda g: g.members[0])


def describe(group: Group, rows: np.ndarray, splits: list[str], labels: dict[str, list[Any]],
             paths: list[str]) -> dict[str, Any]:
    """A group as the reports show it: its copies' rows, paths, splits and labels, and whether it crosses splits
    (leakage) or carries different labels for the same painting (conflicts, per head)."""
    members = group.members
    conflicts = [head for head, values in labels.items()
                 if len({values[m] for m in members if values[m] is not None}) > 1]
    return {
        "kind": group.kind,
        "rows": [int(rows[m]) for m in members],
        "paths": [paths[m] for m in members],
        "splits": [splits[m] for m in members],
        "labels": {head: [values[m] for m in members] for head, values in labels.items()},
        "leakage": len({splits[m] for m in members}) > 1,
        "conflicts": conflicts,
        "matches": [{"a": int(rows[a]), "b": int(rows[b]), "bits": bits, "kind": kind,
                     **({"cosine": round(cos, 4)} if cos is not None else {})}
                    for a, b, bits, kind, cos in group.pairs],
    }


def copies_file(duplicates: str | None, run_dir: Path) -> Path | None:
    """Where a run's groups of copies are: the run's own ``duplicates/duplicates.json`` (``crnn-art duplicates
    --checkpoint RUN``, which may have looked further, e.g. with ``--cosine``) when it exists, else
    ``data.duplicates``; None when neither exists."""
    own = Path(run_dir) / "duplicates" / "duplicates.json"
    for path in (own, Path(duplicates) if duplicates else None):
        if path is not None and path.is_file():
            return path
    return None


def read_groups(path: Path, num_rows: int) -> list[list[int]]:
    """The groups of copies (row ids of the source) in a ``duplicates.json``.

    Raises ``DataError`` (one line, with the fix) when the file is not a duplicates.json or names rows past
    ``num_rows`` (it was written for another source).
    """
    try:
        groups = [[int(r) for r in group["rows"]] for group in json.loads(Path(path).read_text())["groups"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{str(path)!r} is not a duplicates.json ({type(exc).__name__}); run crnn-art duplicates "
                        "and give its duplicates.json") from exc
    if any(not 0 <= r < num_rows for rows in groups for r in rows):
        raise DataError(f"{str(path)!r} names rows this source does not have: it was written for another source; "
                        "run crnn-art duplicates on this one")
    return groups


def rows_with_a_copy_in(rows: np.ndarray, others: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """The ``rows`` (sorted, unique) that have a copy among ``others`` (e.g. test rows with a copy in train)."""
    wanted, found = set(np.asarray(rows).tolist()), set()
    other = set(np.asarray(others).tolist())
    for members in groups:
        found.update(r for r in members if r in wanted and any(m != r and m in other for m in members))
    return np.array(sorted(found), dtype=np.int64)
