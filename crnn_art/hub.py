"""Publishing a run: a generated model card, and ``crnn-art push`` to the Hugging Face Hub.

The pushed repository is a ``save_pretrained`` folder (``config.json`` with heads and class names,
``model.safetensors``) plus ``README.md`` (the card) and the run's reports, so
``CRNNArtClassifier.from_pretrained("user/name")`` works in one line. The token comes from
``huggingface_hub``'s usual places (``HF_TOKEN``, ``hf auth login``) and is never printed or written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.repocard_data import EvalResult

from crnn_art.checkpoints import read_history
from crnn_art.config import load_run_config
from crnn_art.errors import first_line
from crnn_art.evaluation import METRIC_KEYS

LIMITS = """\
- **Label noise and bias.** WikiArt's labels are crowd-curated; styles overlap (Impressionism vs
  Post-Impressionism), some paintings are mislabelled (`crnn-art outliers` finds candidates), and the
  collection over-represents European painting of the 15th-20th centuries and a few prolific artists.
  Per-class recall below shows where the model is weak; do not read its outputs as art-historical fact.
- **Copyright.** Many works in WikiArt are still under copyright; the model was trained for research.
  Check the rights of any images you use it on or with.
- **Domain.** Trained on digitised paintings at a fixed input size; photographs, sculpture or heavily
  cropped details are out of distribution.
"""


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def model_card(run_dir: str | Path, model_dir: str | Path, repo_id: str | None = None) -> ModelCard:
    """The card for a run: YAML metadata (with model-index results) and the prose a user needs."""
    run_dir, model_dir = Path(run_dir), Path(model_dir)
    cfg = load_run_config(run_dir / "config.yaml")
    config = json.loads((model_dir / "config.json").read_text())
    training = _read_json(model_dir / "training.json") or {}
    evaluated = _read_json(run_dir / "eval_test" / "metrics.json")
    metrics = evaluated or training.get("metrics") or _read_json(run_dir / "metrics.json") or {}
    split = metrics.get("split", "validation")
    dataset_id = cfg.data.source if cfg.data.source not in ("demo", "artgan") and "/" in cfg.data.source \
        and not Path(cfg.data.source).exists() else None
    dataset_name = {"demo": "crnn-art demo (generated)", "artgan": "WikiArt, ArtGAN protocol"}.get(
        cfg.data.source, dataset_id or Path(cfg.data.source).name)
    heads = list(config["heads"])
    results = []
    per_head = metrics.get("heads") or ({heads[0]: metrics} if metrics else {})
    for head, m in per_head.items():
        for key in ("top1", "top5", "macro_f1", "weighted_f1"):
            if key in m:
                results.append(EvalResult(
                    task_type="image-classification", dataset_type=dataset_id or "custom",
                    dataset_name=f"{dataset_name} ({head}, {split})", metric_type=key,
                    metric_value=round(float(m[key]), 3), metric_name=f"{head} {key} (%)",
                ))
    data = ModelCardData(
        library_name="crnn-art", license="mit", pipeline_tag="image-classification",
        tags=["image-classification", "art", "wikiart", "crnn", "pytorch"],
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy", "f1"],
        model_name=repo_id or model_dir.name, eval_results=results or None,
    )
    history = read_history(run_dir)
    rows = "\n".join(
        f"| {h['epoch']} | {h['train_loss']:.3f} | {h['val']['loss']:.3f} | {h['val']['top1']:.2f} | "
        f"{h['val']['top5']:.2f} | {h['val']['macro_f1']:.2f} |" for h in history if not h.get("partial")
    )
    head_rows = "\n".join(
        f"| {head} | " + " | ".join(f"{m.get(k, float('nan')):.2f}" for k in METRIC_KEYS[1:])
        + f" | {m.get('num_samples', '')} |" for head, m in per_head.items()
    )
    classes = "; ".join(f"**{h}** ({len(n)}): {', '.join(n[:30])}{' ...' if len(n) > 30 else ''}"
                        for h, n in config["class_names"].items())
    processes = history[-1]["processes"] if history else 1
    hardware = history[-1].get("hardware", "unrecorded hardware") if history else "unrecorded hardware"
    joint = (f"Joint exact match (all heads right): {metrics['joint_exact_match']:.2f} %."
             if "joint_exact_match" in metrics else "")
    t = cfg.train
    name = repo_id or "path/to/model"
    content = f"""---
{data.to_yaml()}
---

# crnn-art: {', '.join(heads)} classifier of paintings

A convolutional-recurrent classifier (ResNet-50 trunk, row and column bidirectional GRUs with
attention pooling, one linear head per task) trained with crnn-art on
**{dataset_name}**. Input: RGB, {config['image_size']} px (evaluation: resize the short side to
{round(config['image_size'] * 416 / 384)}, centre-crop), ImageNet mean/std. Heads: {classes}.

## Results ({split} split, %)

| head | top-1 | top-5 | macro F1 | weighted F1 | samples |
| --- | --- | --- | --- | --- | --- |
{head_rows}
{joint}

![confusion matrix](confusion_matrix.png)

### Per epoch (validation)

| epoch | train loss | val loss | top-1 | top-5 | macro F1 |
| --- | --- | --- | --- | --- | --- |
{rows}

## Training

Task `{cfg.data.task}`, {t.epochs} epochs, global batch {t.batch_size} on {processes} process(es) ({hardware}),
precision `{t.mixed_precision}`, AdamW (lr {t.lr:g} new modules / {t.backbone_lr:g} backbone, weight decay
{t.weight_decay:g}), cosine schedule to {t.min_lr:g}, label smoothing {t.label_smoothing}, gradient clipping
{t.grad_clip}, class-balanced sampling {t.balanced_sampling}, MixUp/CutMix probability
{cfg.augment.mixup_prob}/{cfg.augment.cutmix_prob}, image size {cfg.data.image_size}, backbone init
`{cfg.model.backbone_weights}`, seed {t.seed}. The full config is `config.yaml` of the run.

## Use

```python
from crnn_art import CRNNArtClassifier, predict
model = CRNNArtClassifier.from_pretrained("{name}")
print(predict(model, ["painting.jpg"], top_k=3))
```

```bash
crnn-art predict --model {name} painting.jpg my_folder/ --top-k 3 --json
```

## Limits

{LIMITS}"""
    return ModelCard(content)


def stage_model(checkpoint: str | Path, target: Path, repo_id: str | None = None) -> Path:
    """Copy what a repository needs into ``target``: weights, config, card, reports."""
    from crnn_art.checkpoints import load_model_folder, resolve_model_folder

    found = resolve_model_folder(checkpoint)
    folder, run_dir = found.path, found.run_dir or found.path.parent
    load_model_folder(folder)  # refuse to publish a damaged or mismatched folder
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "training.json"):
        if (folder / name).is_file():
            shutil.copy2(folder / name, target / name)
    for report in ("eval_test/confusion_matrix.png", "eval_test/metrics.json", "eval_test/classification_report.txt"):
        if (run_dir / report).is_file():
            shutil.copy2(run_dir / report, target / Path(report).name)
    if (run_dir / "config.yaml").is_file():
        shutil.copy2(run_dir / "config.yaml", target / "config.yaml")
        model_card(run_dir, folder, repo_id).save(target / "README.md")
    return target


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub endpoint (``HF_ENDPOINT``) cannot be reached within ``timeout`` seconds, or None.

    huggingface_hub retries a failed connection five times with back-off (about 25 s) before it gives
    up; one TCP connection tells at once. None also when offline mode is on (the cache alone is read)
    or a proxy is set (only huggingface_hub knows how to go through it)."""
    import os
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                                                                       "all_proxy")):
        return None
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port} cannot be reached: {exc.strerror or exc}"


class HubError(RuntimeError):
    """The Hub could not be reached or refused the upload; the message names the repository and the fix."""


def check_repo_id(repo_id: str) -> None:
    """``USER/NAME`` or ``ORG/NAME`` as the Hub accepts it; checked before anything is staged or sent."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") != 1:
            raise HFValidationError("it needs exactly one '/'")
    except HFValidationError as exc:
        first = first_line(exc, 160)
        raise HubError(f"--repo-id {repo_id!r} is not a Hub repository id ({first}); use USER/NAME or ORG/NAME "
                       "(letters, digits, '-', '_', '.')") from exc


def push(checkpoint: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         api: HfApi | None = None) -> str:
    """Create (or reuse) ``repo_id`` and upload the staged model; returns the commit URL.

    Raises ``HubError`` (one line) when the Hub cannot be reached or refuses: offline, no or a wrong token,
    no write access. The run folder is only read.
    """
    check_repo_id(repo_id)
    api = api or HfApi()
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_model(checkpoint, Path(tmp) / "model", repo_id)
        try:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(staged), revision=revision,
                                       commit_message=f"crnn-art: upload {Path(checkpoint).name}")
        except Exception as exc:
            first = first_line(exc)
            raise HubError(
                f"could not push to the Hub repository {repo_id} ({type(exc).__name__}: {first}); check the network "
                "and your token (HF_TOKEN or `hf auth login`, with write access), then run "
                f"`crnn-art push --checkpoint {checkpoint} --repo-id {repo_id}`; nothing local was changed"
            ) from exc
    return str(getattr(commit, "commit_url", commit))
