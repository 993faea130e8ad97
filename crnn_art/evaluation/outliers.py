"""Paintings whose label does not fit (docs/evaluation.md#outliers), computed exactly across processes.

On the L2-normalised 3,072-d embeddings of a split: class centroids from the given labels
(normalised); per sample the cosine to its own class centroid, the margin to the nearest other
centroid, and the classifier's prediction and confidence from the real logits (the seed took its
predictions from the head applied to normalised features — a bug not copied here).

Across processes only small things travel: per-class embedding sums and counts are all-reduced
(classes x 3,072 numbers, whatever the number of images), every sample is scored on the process
that embedded it, and only the per-sample scores are gathered.

The shipped ranking score is ``(1 - own_sim) - margin + (1 - p_given) + (1 - knn_agree)``: the
seed's geometric terms, how improbable the classifier finds the given label (continuous, where the
seed added 0.25 for a mismatch), and the share of the painting's nearest neighbours in embedding
space that carry another label. Centroids see a class as one blob; neighbours see its sub-groups
(a style painted in several genres), and a painting with a wrong label sits among paintings of
its true class. ``crnn-art outliers`` measures the score against the two baselines when the wrong
labels are known (the demo data).

Neighbours are looked up among about ``MAX_REFERENCES`` reference paintings, about the same
number per class (all of a class when it has fewer), picked by a hash of the row id so the choice
does not depend on the number of processes. References travel as 64-d random projections of the
embeddings (cosines kept to within about 1/sqrt(64); on the demo runs 32 to 256 dimensions gave
the same precision@k): what crosses processes stays near ``MAX_REFERENCES`` x 64 numbers,
whatever the size of the split.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from crnn_art.data.duplicates import copies_file, read_groups
from crnn_art.evaluation.review_page import SCRIPT, STYLE, review_bar, review_body, review_controls

SELECT_MODES = ("top", "threshold", "zscore")
KNN_K = 10
KNN_DIM = 64
MAX_REFERENCES = 4096
SCORERS = {
    "crnn-art": "shipped: (1 - own_sim) - margin + (1 - p_given) + (1 - knn_agree)",
    "low-confidence": "baseline: 1 - p_given (lowest confidence in the given label)",
    "seed": "baseline: (1 - own_sim) - margin + 0.25 * mismatch (the seed's formula)",
}


@dataclass
class Scored:
    """One sample of one head."""

    head: str
    row: int
    label: int
    pred: int
    confidence: float
    p_given: float
    own_sim: float
    margin: float
    knn_agree: float
    score: float
    seed_score: float
    low_conf_score: float
    flags: str = ""
    zscore: float = 0.0
    probs: Any = None
    """The model's softmax over the head's classes (float32 numpy), for other tools (``pred_probs_<head>.npz``)."""


def class_sums(z: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of normalised embeddings and counts (what processes all-reduce).

    One (classes x N) @ (N x D) product: fast and memory-light at 80,000 x 3,072.
    """
    onehot = F.one_hot(labels, num_classes).to(z.dtype)
    return onehot.T @ z, onehot.sum(dim=0)


def centroids_from_sums(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Normalised class means; a class with no samples gets a zero vector (similarity 0)."""
    means = sums / counts.clamp(min=1)[:, None]
    return F.normalize(means, dim=1).to(torch.float32)


def project(z: torch.Tensor, dim: int = KNN_DIM, seed: int = 0) -> torch.Tensor:
    """A fixed random projection of normalised embeddings to ``dim``, normalised again (the same matrix
    on every process and run)."""
    matrix = torch.randn(z.shape[1], dim, generator=torch.Generator().manual_seed(seed)) / dim**0.5
    return F.normalize(z.float() @ matrix.to(z.device), dim=1)


def row_uniform(rows: torch.Tensor) -> torch.Tensor:
    """A uniform number in [0, 1) per row id (splitmix64), the same on every process and run."""
    x = rows.cpu().numpy().astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) / 2.0**53).to(rows.device)


def reference_mask(rows: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor,
                   max_references: int = MAX_REFERENCES) -> torch.Tensor:
    """Which samples serve as neighbours: about ``max_references / classes`` per class (all of a smaller
    class), chosen by row id only. ``counts`` are the split's per-class counts over all processes."""
    per_class = max_references / len(counts)
    keep = per_class / counts.to(torch.float64).clamp(min=1)
    return row_uniform(rows) < keep.to(rows.device)[labels]


def gather_references(zp: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
                      max_references: int = MAX_REFERENCES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every process's reference samples (projected embedding, label, row), on every process, in row order."""
    from accelerate.utils import gather_object

    keep = reference_mask(rows, labels, counts, max_references)
    parts = gather_object([(zp[keep].cpu(), labels[keep].cpu(), rows[keep].cpu())])
    ref_z, ref_labels, ref_rows = (torch.cat([p[i] for p in parts]) for i in range(3))
    order = ref_rows.argsort()
    return ref_z[order], ref_labels[order], ref_rows[order]


def knn_agreement(z: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, ref_z: torch.Tensor,
                  ref_labels: torch.Tensor, ref_rows: torch.Tensor, k: int = KNN_K, chunk: int = 4096) -> torch.Tensor:
    """Share of each sample's ``k`` most similar references (itself excluded) that carry its label.

    ``ref_rows`` must be sorted (``gather_references`` returns them so). One (chunk x references)
    product at a time keeps memory flat whatever the split's size.
    """
    ref_z, ref_labels, ref_rows = ref_z.to(z.device, torch.float32), ref_labels.to(z.device), ref_rows.to(z.device)
    k = min(k, len(ref_rows) - 1)
    if k < 1:
        return torch.ones(len(labels), device=z.device)
    out = []
    for start in range(0, len(labels), chunk):
        part = rows[start:start + chunk]
        sims = z[start:start + chunk].float() @ ref_z.T
        at = torch.searchsorted(ref_rows, part).clamp(max=len(ref_rows) - 1)
        is_ref = ref_rows[at] == part
        sims[is_ref.nonzero().squeeze(1), at[is_ref]] = -torch.inf  # a reference is not its own neighbour
        nearest = sims.topk(k, dim=1).indices
        out.append((ref_labels[nearest] == labels[start:start + chunk, None]).float().mean(dim=1))
    return torch.cat(out) if out else torch.zeros(0, device=z.device)


def score_head(head: str, z: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor,
               centroids: torch.Tensor, agreement: torch.Tensor) -> list[Scored]:
    """Score samples with a known label: centroid similarity, margin, real-logit prediction, and the
    neighbours' ``agreement`` with the label (from ``knn_agreement``)."""
    sims = z @ centroids.T
    n = len(labels)
    idx = torch.arange(n, device=z.device)
    own = sims[idx, labels]
    others = sims.clone()
    others[idx, labels] = -torch.inf
    margin = own - others.max(dim=1).values
    probs = logits.float().softmax(dim=1)
    confidence, pred = probs.max(dim=1)
    p_given = probs[idx, labels]
    mismatch = (pred != labels).float()
    agreement = agreement.to(own.device, own.dtype)
    score = (1 - own) - margin + (1 - p_given) + (1 - agreement)
    seed = (1 - own) - margin + 0.25 * mismatch
    cols = [t.detach().cpu().tolist()
            for t in (rows, labels, pred, confidence, p_given, own, margin, agreement, score, seed)]
    prob_rows = probs.detach().cpu().numpy().astype(np.float32)
    return [
        Scored(head, int(r), int(y), int(p), float(c), float(pg), float(o), float(m), float(a), float(s),
               float(sd), 1 - float(pg), probs=prob_rows[i])
        for i, (r, y, p, c, pg, o, m, a, s, sd) in enumerate(zip(*cols, strict=True))
    ]


def apply_rules(scored: list[Scored], z_threshold: float = 2.5, confident: float = 0.7) -> None:
    """Flag each sample by the rules it trips; ``zscore`` is its score's per-class robust z-score.

    low_similarity: own-centroid similarity more than ``z_threshold`` robust SDs below its class's
    median; small_margin: margin <= 0 (closer to another class's centroid); confident_mismatch:
    the classifier predicts another class with probability >= ``confident``; neighbours_disagree:
    fewer than half of its nearest neighbours carry its label.
    """
    by_class: dict[tuple[str, int], list[Scored]] = {}
    for s in scored:
        by_class.setdefault((s.head, s.label), []).append(s)
    for members in by_class.values():
        own = np.array([s.own_sim for s in members])
        score = np.array([s.score for s in members])
        own_med, own_mad = np.median(own), 1.4826 * np.median(np.abs(own - np.median(own))) + 1e-9
        sc_med, sc_mad = np.median(score), 1.4826 * np.median(np.abs(score - np.median(score))) + 1e-9
        for s in members:
            flags = []
            if (s.own_sim - own_med) / own_mad < -z_threshold:
                flags.append("low_similarity")
            if s.margin <= 0:
                flags.append("small_margin")
            if s.pred != s.label and s.confidence >= confident:
                flags.append("confident_mismatch")
            if s.knn_agree < 0.5:
                flags.append("neighbours_disagree")
            s.flags = "+".join(flags)
            s.zscore = float((s.score - sc_med) / sc_mad)


CONFLICT_BONUS = 100.0
"""Added to the score of a painting whose copy carries another label: that is evidence, whatever the model thinks,
so such paintings rank first (scores otherwise run from about -2 to 6)."""


def duplicate_conflicts(cfg, run_dir: Path, labels) -> dict[str, set[int]]:
    """Per head, the rows whose copy (``crnn-art duplicates``) carries another label *now* (``labels``: the run's
    task labels, review overrides applied, so a conflict a review resolved no longer counts): groups from the
    run's own ``duplicates/duplicates.json`` or ``data.duplicates``; empty when neither exists."""
    path = copies_file(cfg.data.duplicates, run_dir)
    if path is None:
        return {}
    conflicts: dict[str, set[int]] = {}
    for rows in read_groups(path, len(labels.labels)):
        for h, head in enumerate(labels.heads):
            known = {int(labels.labels[r, h]) for r in rows} - {-1}
            if len(known) > 1:
                conflicts.setdefault(head, set()).update(rows)
    return conflicts


def flag_duplicate_conflicts(scored: list[Scored], conflicts: dict[str, set[int]]) -> None:
    """Flag ``duplicate_conflict`` and rank first every painting whose copy is filed under another label."""
    for s in scored:
        if s.row in conflicts.get(s.head, ()):
            s.flags = "+".join(f for f in (s.flags, "duplicate_conflict") if f)
            s.score += CONFLICT_BONUS
            s.zscore += CONFLICT_BONUS


def rank(scored: list[Scored], key: str = "score") -> list[Scored]:
    """Highest first; scores rounded to 1e-6 and ties broken by row so 1 and N processes agree."""
    return sorted(scored, key=lambda s: (-round(getattr(s, key), 6), s.row))


def select(ranked: list[Scored], mode: str, top: int, threshold: float | None, z: float) -> list[Scored]:
    if mode == "top":
        return ranked[:top]
    if mode == "threshold":
        return [s for s in ranked if s.score >= threshold]
    return [s for s in ranked if s.zscore >= z]


def quality(scored: list[Scored], wrong_rows: set[int]) -> dict[str, dict[str, float]]:
    """Precision@k and recall@k (k = number of known wrong labels in the split), and average precision."""
    from sklearn.metrics import average_precision_score

    truth = np.array([s.row in wrong_rows for s in scored])
    k = int(truth.sum())
    result = {}
    for name, key in (("crnn-art", "score"), ("low-confidence", "low_conf_score"), ("seed", "seed_score")):
        ranked = rank(scored, key)
        hits = sum(s.row in wrong_rows for s in ranked[:k])
        values = np.array([getattr(s, key) for s in scored])
        result[name] = {
            "k": k,
            "precision_at_k": 100.0 * hits / k if k else 0.0,
            "recall_at_2k": 100.0 * sum(s.row in wrong_rows for s in ranked[: 2 * k]) / k if k else 0.0,
            "average_precision": 100.0 * float(average_precision_score(truth, values)) if k else 0.0,
        }
    return result


@torch.no_grad()
def embed_shard(model, loader, device, autocast, heads: tuple[str, ...], progress=None, normalize: bool = True,
                failed: list[int] | None = None):
    """This process's embeddings (L2-normalised unless ``normalize=False``), logits, labels and row ids
    (``progress``: a bar to advance; ``failed``: a list that gets the row ids of undecodable images, whose rows
    hold a blank image's embedding)."""
    zs, logits, labels, rows = [], {h: [] for h in heads}, [], []
    task = progress.add_task("embed", total=len(loader), status="") if progress is not None else None
    for batch in loader:
        if task is not None:
            progress.advance(task)
        if failed is not None:
            failed += [int(f[0]) for f in batch["failed"]]
        with autocast():
            out = model(batch["image"].to(device))
        zs.append(F.normalize(out.embedding.float(), dim=1) if normalize else out.embedding.float())
        for h in heads:
            logits[h].append(out.logits[h].float())
        labels.append(batch["labels"].to(device))
        rows.append(batch["row"].to(device))
    d = model.embedding_dim
    return (
        torch.cat(zs) if zs else torch.zeros(0, d, device=device),
        {h: torch.cat(v) if v else torch.zeros(0, model.heads_spec[h], device=device) for h, v in logits.items()},
        torch.cat(labels) if labels else torch.zeros(0, len(heads), dtype=torch.int64, device=device),
        torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64, device=device),
    )


def find_outliers(checkpoint: str, split: str = "train", top: int = 50, mode: str = "top",
                  threshold: float | None = None, z: float = 3.5, output_dir: str | None = None,
                  known_wrong: str | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """The ``crnn-art outliers`` command: score a split, write outliers.csv/.html, measure if labels are known."""
    from accelerate.utils import gather_object
    from torch.utils.data import Subset

    from crnn_art.console import make_console, make_progress, outliers_table, quality_table
    from crnn_art.data.loaders import eval_loader
    from crnn_art.errors import ConfigError
    from crnn_art.evaluation.evaluate import open_run_split
    from crnn_art.runtime import fit_to_cores

    if mode not in SELECT_MODES:
        raise ConfigError(f"--select {mode!r} is not allowed; choose one of {', '.join(SELECT_MODES)}")
    if mode == "threshold" and threshold is None:
        raise ConfigError("--select threshold needs --threshold SCORE (scores run from about -2 to 6)")
    run = open_run_split(checkpoint, split)
    cfg, run_dir, accelerator, dataset, rows = run.cfg, run.run_dir, run.accelerator, run.dataset, run.rows
    conflicts = duplicate_conflicts(cfg, run_dir, run.labels)  # before the work: a damaged file is one line now
    console = make_console(accelerator.is_main_process)
    console.print(f"scoring the {split} split with {run.folder}" + (f" (note: {run.note})" if run.note else ""))
    model = run.model.to(accelerator.device)
    # Each process embeds its own positions (no padding, so no sample is counted twice).
    shard = Subset(dataset, list(range(accelerator.process_index, len(dataset), accelerator.num_processes)))
    loader = eval_loader(shard, batch_size or cfg.train.eval_batch_size, fit_to_cores(cfg.data.num_workers).workers)
    with make_progress(console, accelerator.is_main_process) as progress:
        z_local, logits, label_mat, row_ids = embed_shard(model, loader, accelerator.device, accelerator.autocast,
                                                          cfg.heads, progress)

    scored: list[Scored] = []
    zp_local = project(z_local)  # one projection serves every head
    for i, head in enumerate(cfg.heads):
        known = label_mat[:, i] >= 0
        z, zp, y, rows_known = z_local[known], zp_local[known], label_mat[known, i], row_ids[known]
        sums, counts = class_sums(z, y, model.heads_spec[head])
        sums, counts = accelerator.reduce(sums, "sum"), accelerator.reduce(counts, "sum")
        centroids = centroids_from_sums(sums, counts)
        references = gather_references(zp, y, rows_known, counts)
        agreement = knn_agreement(zp, y, rows_known, *references)
        scored += score_head(head, z, logits[head][known], y, rows_known, centroids, agreement)
    scored = gather_object(scored)
    apply_rules(scored, confident=0.7)
    flag_duplicate_conflicts(scored, conflicts)

    result: dict[str, Any] = {"split": split, "heads": {}}
    wrong = _known_wrong_rows(cfg, known_wrong)
    if accelerator.is_main_process:
        out = Path(output_dir) if output_dir else run_dir / f"outliers_{split}"
        out.mkdir(parents=True, exist_ok=True)
        selected_all = []
        for head in cfg.heads:
            ranked = rank([s for s in scored if s.head == head])
            chosen = select(ranked, mode, top, threshold, z)
            selected_all += chosen
            info: dict[str, Any] = {"scored": len(ranked), "selected": len(chosen)}
            if wrong is not None and head == "style":
                info["quality"] = quality(ranked, wrong)
                console.print(quality_table(info["quality"], split, SCORERS))
            result["heads"][head] = info
        path_of = dict(zip(rows.tolist(), dataset.paths(), strict=True))
        _write_csv(out / "outliers.csv", selected_all, model.class_names, path_of)
        _write_csv(out / "all_scores.csv", [s for h in cfg.heads for s in rank([x for x in scored if x.head == h])],
                   model.class_names, path_of)
        _write_html(out / "outliers.html", selected_all, model, dataset, rows, split, path_of)
        for head in cfg.heads:  # the same probabilities for other tools (cleanlab's find_label_issues, ...)
            mine = sorted((s for s in scored if s.head == head), key=lambda s: s.row)
            np.savez_compressed(out / f"pred_probs_{head}.npz", rows=np.array([s.row for s in mine]),
                                labels=np.array([s.label for s in mine]),
                                pred_probs=np.stack([s.probs for s in mine]) if mine else np.zeros((0, 0)))
        result["outliers"] = [_record(s, model.class_names, path_of) for s in selected_all]
        (out / "outliers.json").write_text(json.dumps(result, indent=2))
        console.print(outliers_table(result["outliers"], split, len(scored)))
        console.print(f"written {out}/: outliers.csv, outliers.html, all_scores.csv, outliers.json, pred_probs_*.npz")
    accelerator.end_training()
    return result


def _known_wrong_rows(cfg, path: str | None) -> set[int] | None:
    """Rows known to be mislabelled: ``--known-wrong CSV`` (a ``row`` column), or the demo's own list."""
    if path is None and cfg.data.source == "demo":
        candidate = Path(cfg.data.demo_dir) / "wrong_labels.csv"
        path = str(candidate) if candidate.is_file() else None
    if path is None:
        return None
    with open(path, newline="") as fh:
        return {int(r["row"]) for r in csv.DictReader(fh)}


CSV_COLUMNS = ("rank", "row", "path", "head", "true_label", "predicted_label", "confidence", "own_similarity",
               "margin", "p_given", "knn_agreement", "score", "flagged_by")
"""``row`` is the row id in the source; ``path`` the image file as the source records it (empty when the source
holds only image bytes, e.g. the demo): what a curator opens to fix the label."""


def _record(s: Scored, class_names: dict[str, list[str]], path_of: dict[int, str], rank_: int | None = None) -> dict:
    names = class_names[s.head]
    record = {"row": s.row, "path": path_of.get(s.row, ""), "head": s.head, "true_label": names[s.label],
              "predicted_label": names[s.pred], "confidence": round(s.confidence, 4),
              "own_similarity": round(s.own_sim, 4), "margin": round(s.margin, 4), "p_given": round(s.p_given, 4),
              "knn_agreement": round(s.knn_agree, 2), "score": round(s.score, 4), "flagged_by": s.flags}
    return record if rank_ is None else {"rank": rank_, **record}


def _write_csv(path: Path, scored: list[Scored], class_names: dict[str, list[str]], path_of: dict[int, str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        ranks: dict[str, int] = {}
        for s in scored:
            ranks[s.head] = ranks.get(s.head, 0) + 1
            writer.writerow(_record(s, class_names, path_of, ranks[s.head]))


@torch.no_grad()
def _write_html(path: Path, selected: list[Scored], model, dataset, rows: np.ndarray, split: str,
                path_of: dict[int, str]) -> None:
    """A self-contained page (images inline): the whole painting (open it larger, or the file itself), the
    model's view with its attention, labels, scores, the file to fix, and keep / relabel / drop buttons whose
    decisions export as ``decisions.csv`` (``review_page``)."""
    from crnn_art.data.decoding import decode_image
    from crnn_art.data.transforms import eval_resize
    from crnn_art.heatmaps import attention_map, eval_view, overlay

    position = {int(r): i for i, r in enumerate(rows)}
    model.eval()
    cards = []
    for i, s in enumerate(selected, 1):
        item = dataset[position[s.row]]
        device = next(model.parameters()).device
        out = model(item["image"][None].to(device))
        amap = attention_map(out.row_attention, out.col_attention)[0].cpu().numpy()
        cell = dataset.images[int(dataset.image_index[position[s.row]])]["image"]
        painting = decode_image(cell, LARGE_SIDE)
        painting.thumbnail((LARGE_SIDE, LARGE_SIDE))
        view = eval_view(decode_image(cell, eval_resize(model.image_size)), model.image_size)
        names = model.class_names[s.head]
        file = path_of.get(s.row, "")
        where = (f"<a href='{html.escape(Path(file).resolve().as_uri())}'>{html.escape(file)}</a>"
                 if file and Path(file).is_absolute() else html.escape(file) or f"row {s.row}")
        cards.append(
            f"<div class='card'><div class='imgs'><img src='{_jpeg(painting)}' title='the painting'>"
            f"<img src='{_png(overlay(view, amap))}' title='what the model sees, with its row x column attention'>"
            f"</div><details><summary>larger</summary><img class='large' src='{_jpeg(painting)}'></details>"
            f"<b>#{i}</b> row {s.row} ({html.escape(s.head)})<br><span class='file'>{where}</span><br>"
            f"given <b>{html.escape(names[s.label])}</b>, predicted <b>{html.escape(names[s.pred])}</b> "
            f"({s.confidence:.2f})<br>own sim {s.own_sim:.3f}, margin {s.margin:.3f}, neighbours agree "
            f"{s.knn_agree:.0%}, score {s.score:.3f}<br><i>{html.escape(s.flags or '-')}</i>"
            + review_controls(s.row, s.head, file, names, names[s.label], names[s.pred]) + "</div>"
        )
    page = (
        "<!doctype html><meta charset='utf-8'><title>crnn-art outliers</title><style>"
        "body{font-family:sans-serif;margin:1em}.card{display:inline-block;width:310px;margin:6px;padding:6px;"
        "border:1px solid #ccc;font-size:12px;vertical-align:top;overflow-wrap:anywhere;word-break:break-word}"
        ".imgs img{width:150px;height:150px;object-fit:contain;margin-right:2px;image-rendering:auto}"
        ".large{max-width:100%}.file{color:#555}" + STYLE + "</style>"
        + review_body(path, "".join(cards)) + review_bar() +
        f"<h1>Paintings whose label does not fit — {html.escape(split)} split</h1>"
        "<p>Left: the whole painting (open 'larger', or its file); right: the part the model sees, with its "
        "row x column attention. Ranked by score = (1 - own-centroid similarity) - margin + (1 - p(given label)) "
        "+ (1 - share of nearest neighbours with the same label).</p>"
        + "".join(cards) + SCRIPT
    )
    path.write_text(page)


LARGE_SIDE = 512
"""Long side (px) of the painting shown in the outliers page."""


def _jpeg(image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
