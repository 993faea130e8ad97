"""Run a trained model on your own images: ``crnn-art predict`` and ``crnn_art.predict(...)``.

Inputs are image files, folders (searched recursively) or text files listing one path per line.
Broken files are reported and skipped, never fatal. Each result holds, per head, the top-k class
names with probabilities; with ``heatmaps`` the row x column attention over each image is saved.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from crnn_art.data.schema import IMAGE_EXTENSIONS
from crnn_art.errors import first_line
from crnn_art.hub_reach import hub_unreachable


def collect_paths(inputs: Iterable[str | Path]) -> list[str]:
    """Expand folders (recursively, image extensions) and ``.txt`` lists; keep files as given."""
    paths: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += [str(f) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        elif p.suffix.lower() == ".txt" and p.is_file():
            base = p.parent
            for line in p.read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    entry = Path(line.strip())
                    paths.append(str(entry if entry.is_absolute() else base / entry))
        else:
            paths.append(str(p))
    return paths


def _is_local(model: str | Path) -> bool:
    """A path, not a Hub id: it exists, or it is written like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``, or
    ``a/b`` whose ``a`` is a local folder, e.g. a mistyped ``runs/dmeo``). Such a path that does not exist is
    an error at once, not a Hub request."""
    text = str(model)
    parts = text.replace("\\", "/").split("/")
    return (isinstance(model, Path) or Path(text).exists() or text.startswith((".", "/", "~")) or len(parts) > 2
            or (len(parts) == 2 and Path(parts[0]).is_dir()))


def _from_hub(repo_id: str):
    """``from_pretrained`` from the Hub, or from the local cache at once when the Hub cannot be reached; a
    repository that cannot be had either way is one ``ModelLoadError`` line."""
    from crnn_art.errors import ModelLoadError
    from crnn_art.model import CRNNArtClassifier

    unreachable = hub_unreachable()
    try:
        return CRNNArtClassifier.from_pretrained(repo_id, local_files_only=unreachable is not None)
    except ModelLoadError:
        raise
    except Exception as exc:
        where = (f"the Hub cannot be reached ({unreachable}) and it is not in the local cache" if unreachable
                 else f"it could not be loaded from the Hub ({type(exc).__name__}: {first_line(exc)})")
        raise ModelLoadError(
            f"--model {repo_id} is not a local folder and {where}; give a run folder or a best/ folder, or a Hub id "
            "USER/NAME with the network reachable (or already downloaded once)"
        ) from exc


def load_model(model: str | Path, device: str | torch.device | None = None):
    """A model folder, a run folder (its best/), or a Hub id; strict loading from safetensors only."""
    from crnn_art.checkpoints import load_model_folder

    net = load_model_folder(model) if _is_local(model) else _from_hub(str(model))
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return net.to(device).eval()


@torch.no_grad()
def predict_images(model, inputs: Iterable[str | Path], top_k: int = 5, batch_size: int = 16,
                   heatmaps: str | Path | None = None, side_by_side: bool = False,
                   embeddings: bool = False) -> Iterator[dict[str, Any]]:
    """Yield one result per input image, in order: ``{"image", "predictions": {head: [{"label", "score"}]}}``
    or ``{"image", "error"}`` for a file that cannot be read. With ``heatmaps`` each image's attention
    overlay is saved there (``side_by_side``: the painting and the overlay next to each other); with
    ``embeddings`` each result also holds ``"embedding"`` (the model's pooled vector, a float32 numpy array)."""
    from crnn_art.data.decoding import decode_image
    from crnn_art.data.transforms import eval_resize, eval_transform
    from crnn_art.errors import DecodeError
    from crnn_art.heatmaps import attention_map, eval_view, overlay
    from crnn_art.heatmaps import side_by_side as pair

    model.eval()
    device = next(model.parameters()).device
    transform = eval_transform(model.image_size, model.mean, model.std)
    out_dir = Path(heatmaps) if heatmaps else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[str, Any, Any]] = []

    def flush() -> Iterator[dict[str, Any]]:
        if not pending:
            return
        batch = torch.stack([t for _, t, _ in pending]).to(device)
        output = model(batch)
        probs = {h: logits.float().softmax(dim=1).cpu() for h, logits in output.logits.items()}
        maps = attention_map(output.row_attention, output.col_attention).cpu().numpy()
        for i, (path, _, image) in enumerate(pending):
            result: dict[str, Any] = {"image": path, "predictions": {}}
            if embeddings:
                result["embedding"] = output.embedding[i].float().cpu().numpy()
            for head, p in probs.items():
                values, idx = p[i].topk(min(top_k, p.shape[1]))
                result["predictions"][head] = [
                    {"label": model.class_names[head][j], "score": round(float(v), 6)}
                    for v, j in zip(values, idx.tolist(), strict=True)
                ]
            if out_dir:
                target = out_dir / f"{Path(path).stem}_attention.png"
                view = eval_view(image, model.image_size)
                (pair(view, maps[i]) if side_by_side else overlay(view, maps[i])).save(target)
                result["heatmap"] = str(target)
            yield result
        pending.clear()

    for path in collect_paths(inputs):
        try:
            image = decode_image(str(path), eval_resize(model.image_size))
        except DecodeError as exc:
            yield from flush()
            yield {"image": str(path), "error": f"cannot decode: {exc}"}
            continue
        pending.append((str(path), transform(image), image if out_dir else None))
        if len(pending) == batch_size:
            yield from flush()
    yield from flush()


def predict(model: str | Path | Any, inputs: str | Path | Iterable[str | Path], top_k: int = 5,
            batch_size: int = 16, heatmaps: str | Path | None = None, device: str | None = None) -> list[dict]:
    """Python API: ``crnn_art.predict("runs/style", ["a.jpg", "folder/"])`` -> a list of results."""
    net = model if isinstance(model, torch.nn.Module) else load_model(model, device)
    if isinstance(inputs, str | Path):
        inputs = [inputs]
    return list(predict_images(net, inputs, top_k=top_k, batch_size=batch_size, heatmaps=heatmaps))


def embed_images(model, inputs: Iterable[str | Path], output_dir: str | Path, batch_size: int = 16) -> Path:
    """``crnn-art embed --images``: the embedding and prediction of every image file as one parquet table
    (``images-00000-of-00001.parquet``: ``path``, per head ``<head>_predicted``/``<head>_confidence``,
    ``embedding``), the same columns as the split tables less the labels; one process. Files that cannot be
    decoded are left out and returned by name in the table's absence (printed by the CLI)."""
    from datasets import Dataset, Sequence, Value

    rows: dict[str, list] = {"path": [], "embedding": [],
                             **{f"{h}_{c}": [] for h in model.heads_spec for c in ("predicted", "confidence")}}
    skipped = []
    for r in predict_images(model, inputs, top_k=1, batch_size=batch_size, embeddings=True):
        if "error" in r:
            skipped.append(r["image"])
            continue
        rows["path"].append(r["image"])
        rows["embedding"].append(r["embedding"])
        for head, preds in r["predictions"].items():
            rows[f"{head}_predicted"].append(preds[0]["label"])
            rows[f"{head}_confidence"].append(preds[0]["score"])
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = Dataset.from_dict(rows).cast_column("embedding", Sequence(Value("float32"), length=model.embedding_dim))
    path = out / "images-00000-of-00001.parquet"
    table.to_parquet(str(path))
    for name in skipped:
        print(f"{name}: left out (cannot be decoded)", file=sys.stderr)
    return path


def explain_images(model, paths: list[str], out_dir: str | Path, top_k: int = 3) -> list[dict]:
    """Write ``<name>_attention.png`` (painting | overlay) per image; return the top-k per head.

    The same decode -> transform -> forward path as ``predict``, with side-by-side pictures.
    """
    results = []
    for r in predict_images(model, paths, top_k=top_k, heatmaps=out_dir, side_by_side=True):
        if "error" in r:
            results.append(r)
            continue
        tops = {head: [(p["label"], p["score"]) for p in preds] for head, preds in r["predictions"].items()}
        results.append({"image": r["image"], "attention_png": r["heatmap"], "top": tops})
    return results
