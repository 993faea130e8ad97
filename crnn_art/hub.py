"""Publishing a run: a generated model card, and ``crnn-art push`` to the Hugging Face Hub.

The pushed repository is a ``save_pretrained`` folder (``config.json`` with heads and class names,
``model.safetensors``) plus ``README.md`` (the card) and the run's reports, so
``CRNNArtClassifier.from_pretrained("user/name")`` works in one line. The token comes from
``huggingface_hub``'s usual places (``HF_TOKEN``, ``hf auth login``) and is never printed or written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.repocard_data import EvalResult

from crnn_art.checkpoints import read_history
from crnn_art.config import load_run_config
from crnn_art.console import fmt
from crnn_art.errors import HubError, first_line
from crnn_art.evaluation.evaluate import find_evaluation
from crnn_art.evaluation.metrics import METRIC_KEYS

WIKIART_LIMITS = """\
- **Label noise and bias.** WikiArt's labels are crowd-curated; styles overlap (Impressionism vs
  Post-Impressionism), some paintings are mislabelled (`crnn-art outliers` finds candidates), and the
  collection over-represents European painting of the 15th-20th centuries and a few prolific artists.
  The per-class figures of the evaluation show where the model is weak; do not read its outputs as
  art-historical fact.
- **Copyright.** Many works in WikiArt are still under copyright; the model was trained for research.
  Check the rights of any images you use it on or with.
- **Domain.** Trained on digitised paintings at a fixed input size; photographs, sculpture or heavily
  cropped details are out of distribution.
"""

DEMO_LIMITS = """\
- **A demonstration model.** It was trained on crnn-art's generated demo paintings (coloured shapes
  drawn per style, with some labels flipped on purpose), not on real art: it only shows that the
  pipeline works. Do not use it on real paintings.
"""

OWN_DATA_LIMITS = """\
- **Your data, your limits.** The model knows only the classes and the kind of images of
  {dataset}; its figures hold for images like those of that split. Labels of any collection contain
  mistakes (`crnn-art outliers` finds candidates).
- **Domain.** Trained at a fixed input size; images unlike the training data are out of distribution.
"""

MIT_LICENSE = """\
MIT License

Copyright (c) {year} the authors of this model, trained with crnn-art

Permission is hereby granted, free of charge, to any person obtaining a copy of this model and
associated files (the "Software"), to deal in the Software without restriction, including without
limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do so, subject to the
following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial
portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT
LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO
EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER
IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR
THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""

MODEL_INDEX_METRICS = (("top1", "accuracy", None, "top-1 accuracy"),
                       ("top5", "top_5_accuracy", None, "top-5 accuracy"),
                       ("macro_f1", "f1", "macro", "macro F1"), ("weighted_f1", "f1", "weighted", "weighted F1"))
"""(our key, the Hub's metric type, its averaging, the name shown); averages over the classes present in the split."""


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def hub_dataset_id(source: str, recorded: bool | None = None) -> str | None:
    """``owner/name`` when the run's ``data.source`` was a Hub dataset id, else None (demo, artgan, a local path).

    ``recorded`` is what training found where it ran (``split.json``'s ``hub_dataset``: the source was not a local
    path there); the text decides for older runs, never the folder the card is written from."""
    import re

    if source in ("demo", "artgan") or source.startswith((".", "/", "~")) or source.endswith(".parquet"):
        return None
    return source if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) and recorded is not False else None


def is_wikiart(source: str) -> bool:
    """The run trained on WikiArt (the ArtGAN lists or a source named after it): the card's WikiArt tag and limits."""
    return source == "artgan" or "wikiart" in source.lower()


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _results(per_head: dict[str, dict], dataset_id: str | None, dataset_name: str, split: str) -> list[EvalResult]:
    results = []
    for head, m in per_head.items():
        for key, metric_type, averaging, shown in MODEL_INDEX_METRICS:
            if m.get(key) is None:
                continue
            results.append(EvalResult(
                task_type="image-classification", dataset_type=dataset_id or "custom",
                dataset_name=f"{dataset_name} ({head}, {split} split)", dataset_split=split,
                metric_type=metric_type, metric_config=averaging, metric_value=round(float(m[key]), 3),
                metric_name=f"{head} {shown} (%)",
            ))
    return results


def model_card(run_dir: str | Path, model_dir: str | Path, repo_id: str | None = None,
               staged: bool = False) -> ModelCard:
    """The card of one model folder: YAML metadata (model-index results) and the prose a user needs.

    Its figures belong to exactly these weights: the newest test-split evaluation whose SHA-256 matches
    ``model.safetensors`` (``crnn-art evaluate``), else the validation figures saved with the folder, and
    the card then says that the test split was not evaluated. ``staged``: the card goes into an upload folder
    beside a copy of the evaluation's reports (else it links to them in the run).
    """
    run_dir, model_dir = Path(run_dir), Path(model_dir)
    cfg = load_run_config(run_dir / "config.yaml")
    config = json.loads((model_dir / "config.json").read_text())
    training = _read_json(model_dir / "training.json") or {}
    found = find_evaluation(run_dir, model_dir, "test")
    metrics = found[0] if found else training.get("metrics") or {}
    split = "test" if found else "validation"
    recorded = (_read_json(run_dir / "split.json") or {}).get("hub_dataset")
    dataset_id = hub_dataset_id(cfg.data.source, recorded)
    dataset_name = {"demo": "crnn-art demo (generated)", "artgan": "WikiArt, ArtGAN protocol"}.get(
        cfg.data.source, dataset_id or Path(cfg.data.source).name)
    heads = list(config["heads"])
    per_head = metrics.get("heads") or ({heads[0]: metrics} if metrics else {})
    data = ModelCardData(
        library_name="crnn-art", license="mit", pipeline_tag="image-classification",
        tags=["image-classification", "art", "crnn", "pytorch"] + ["wikiart"] * is_wikiart(cfg.data.source),
        datasets=[dataset_id] if dataset_id else None, metrics=["accuracy", "f1"],
        model_name=repo_id or f"crnn-art {cfg.data.task} ({model_dir.name})",
        eval_results=_results(per_head, dataset_id, dataset_name, split) or None,
    )
    picture = None
    if found is not None and len(heads) == 1:
        picture = "confusion_matrix.png" if staged else os.path.relpath(found[1] / "confusion_matrix.png", model_dir)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + _card_text(cfg, config, run_dir, model_dir, metrics, split,
                                                                     found is not None, per_head, dataset_name,
                                                                     training, repo_id, picture))


def _review_line(cfg, run_dir: Path) -> str:
    """What a label review changed in the training data (``data.label_overrides``), for the card; nothing when the
    file is gone or is no longer the one the run was trained with."""
    if not cfg.data.label_overrides or not Path(cfg.data.label_overrides).is_file():
        return ""
    from crnn_art.data.sources import check_overrides_unchanged, read_decisions
    from crnn_art.errors import DataError

    try:
        check_overrides_unchanged(run_dir, cfg.data)
    except DataError:
        return ""

    decisions = read_decisions(cfg.data.label_overrides)
    changed = len({(d["row"], d["head"]) for d in decisions if d["decision"].strip() == "relabel"})
    dropped = len({(d["row"], d["head"]) for d in decisions if d["decision"].strip() == "drop"})
    return (f"\n\nLabels reviewed before training (`data.label_overrides`): {changed} labels relabelled and "
            f"{dropped} labels dropped by review.")


def _card_text(cfg, config: dict, run_dir: Path, model_dir: Path, metrics: dict, split: str, evaluated: bool,
               per_head: dict, dataset_name: str, training: dict, repo_id: str | None, picture: str | None) -> str:
    heads = list(config["heads"])
    classes = "; ".join(f"**{h}** ({len(n)}): {', '.join(n[:30])}{' ...' if len(n) > 30 else ''}"
                        for h, n in config["class_names"].items())
    head_rows = "\n".join(f"| {head} | " + " | ".join(fmt(m.get(k), 2) for k in METRIC_KEYS[1:])
                          + f" | {m.get('num_samples', '')} |" for head, m in per_head.items())
    if evaluated:
        where = (f"Test split of the run ({metrics.get('num_samples', '?')} paintings, never used for training or "
                 f"model selection), evaluated on exactly these weights (SHA-256 "
                 f"`{metrics['model']['sha256'][:16]}...`).")
    else:
        where = (f"**The test split was not evaluated for these weights.** The figures are the validation split at "
                 f"epoch {training.get('epoch', '?')} (the split used to choose the model, so they flatter it); "
                 f"`crnn-art evaluate --checkpoint RUN/{model_dir.name} --split test` evaluates it and refreshes "
                 "this card.")
    copies = metrics.get("copies_in_train") if evaluated else None
    if copies is not None:
        rest = copies.get("metrics_without_them") or {}
        verb = "has" if copies["rows"] == 1 else "have"
        where += (f" {copies['rows']} of these {copies['of']} test paintings {verb} a copy in the training split "
                  "(found by `crnn-art duplicates`)"
                  + (f"; without them top-1 is {rest['top1']:.2f} and macro F1 {rest['macro_f1']:.2f}."
                     if copies["rows"] and rest.get("top1") is not None else "."))
    joint = (f"\nJoint exact match (all heads right): {metrics['joint_exact_match']:.2f} %.\n"
             if metrics.get("joint_exact_match") is not None else "")
    picture = f"\n![confusion matrix of the test split]({picture})\n" if picture else ""
    history = [h for h in read_history(run_dir) if not h.get("partial")]
    epochs = ""
    key = "val_ema" if training.get("ema") else "val"  # the EMA folder's card shows the EMA's figures
    if history and all(key in h for h in history):
        epochs = (f"\n### Per epoch (validation split{', EMA weights' if key == 'val_ema' else ''})\n\n"
                  "| epoch | train loss | val loss | top-1 | top-5 | macro F1 |\n"
                  "| --- | --- | --- | --- | --- | --- |\n"
                  + "\n".join(f"| {h['epoch']} | {fmt(h['train_loss'], 3)} | {h[key]['loss']:.3f} | "
                               f"{h[key]['top1']:.2f} | {fmt(h[key].get('top5'), 2)} | {h[key]['macro_f1']:.2f} |"
                               for h in history) + "\n")
    processes = history[-1]["processes"] if history else 1
    hardware = history[-1].get("hardware", "unrecorded hardware") if history else "unrecorded hardware"
    t, a = cfg.train, cfg.augment
    name = repo_id or str(model_dir)
    limits = {"demo": DEMO_LIMITS}.get(cfg.data.source) or (
        WIKIART_LIMITS if is_wikiart(cfg.data.source)
        else OWN_DATA_LIMITS.format(dataset=dataset_name))
    backbone = cfg.model.backbone_weights or "random initialisation"
    trunk = {"resnet50": "ResNet-50"}.get(config.get("backbone", "resnet50"), config.get("backbone", "resnet50"))
    mean, std = (", ".join(str(v) for v in config.get(key, [])) for key in ("mean", "std"))
    review = _review_line(cfg, run_dir)
    return f"""# crnn-art: {', '.join(heads)} classifier of paintings

A convolutional-recurrent classifier ({trunk} backbone, row and column bidirectional GRUs with
attention pooling, one linear head per task) trained with crnn-art on
**{dataset_name}**. Input: RGB, {config['image_size']} px (evaluation: resize the short side to
{round(config['image_size'] * 416 / 384)}, centre-crop), normalised with mean {mean} and std {std}.
Heads: {classes}.{review}

## Install and use

```bash
pip install crnn-art   # or, in a clone of the crnn-art repository: pip install .
crnn-art predict --model {name} painting.jpg my_folder/ --top-k 3 --json
```

```python
from crnn_art import CRNNArtClassifier, predict

model = CRNNArtClassifier.from_pretrained("{name}")
for result in predict(model, ["painting.jpg"], top_k=3):
    print(result["image"], result["predictions"])
```

## Results ({split} split, %)

{where} Macro and weighted F1 average over the classes present in the split; top-5 is n/a for
heads of 5 or fewer classes.

| head | top-1 | top-5 | macro F1 | weighted F1 | samples |
| --- | --- | --- | --- | --- | --- |
{head_rows}
{joint}{picture}{epochs}
## Training

Task `{cfg.data.task}`, {t.epochs} epochs, global batch {t.batch_size} on {processes} process(es) ({hardware}),
precision `{t.mixed_precision}`, AdamW (learning rate {t.lr:g} for the new modules, {t.backbone_lr:g} for the
backbone, weight decay {t.weight_decay:g}), cosine schedule to {t.min_lr:g}, label smoothing {t.label_smoothing:g},
gradient clipping at norm {t.grad_clip:g}, class-balanced sampling: {_yes_no(t.balanced_sampling)},
MixUp/CutMix probability {a.mixup_prob:g}/{a.cutmix_prob:g}, image size {cfg.data.image_size} px, backbone
initialised from {backbone}, seed {t.seed}. `config.yaml` holds the full configuration.

## Limits

{limits}"""


def write_model_card(run_dir: str | Path, model_dir: str | Path, repo_id: str | None = None) -> Path:
    """Write the card (``README.md``) and its ``LICENSE`` into ``model_dir``: every saved model folder carries
    the card a Hub user would read, refreshed when the folder is evaluated."""
    from crnn_art.runs import atomic_write_text

    model_dir = Path(model_dir)
    atomic_write_text(model_dir / "README.md", str(model_card(run_dir, model_dir, repo_id)), "the model card")
    atomic_write_text(model_dir / "LICENSE", _license(), "the licence")
    return model_dir / "README.md"


def _license() -> str:
    import datetime

    return MIT_LICENSE.format(year=datetime.date.today().year)


def stage_model(checkpoint: str | Path, target: Path, repo_id: str | None = None) -> Path:
    """Copy what a repository needs into ``target``: weights, config, card, licence, config.yaml, and the reports
    of the test evaluation of exactly these weights (if any)."""
    from crnn_art.checkpoints import load_model_folder, resolve_model_folder

    found = resolve_model_folder(checkpoint)
    folder, run_dir = found.path, found.run_dir or found.path.parent
    load_model_folder(folder)  # refuse to publish a damaged or mismatched folder
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "training.json"):
        if (folder / name).is_file():
            shutil.copy2(folder / name, target / name)
    evaluation = find_evaluation(run_dir, folder, "test")
    if evaluation is not None:
        for report in sorted(evaluation[1].iterdir()):
            if report.is_file() and report.suffix in (".png", ".json", ".txt", ".csv"):
                shutil.copy2(report, target / report.name)
    if (run_dir / "config.yaml").is_file():
        shutil.copy2(run_dir / "config.yaml", target / "config.yaml")
        (target / "README.md").write_text(str(model_card(run_dir, folder, repo_id, staged=True)))
        (target / "LICENSE").write_text(_license())
    return target


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


def preview(checkpoint: str | Path, repo_id: str) -> str:
    """What ``push`` would upload to ``repo_id``, staged exactly as ``push`` stages it, with no network call:
    each file with its size, then the model card."""
    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_model(checkpoint, Path(tmp) / "model", repo_id)
        files = sorted(f for f in staged.rglob("*") if f.is_file())
        width = max(len(f.name) for f in files)
        lines = [f"would upload to https://huggingface.co/{repo_id} ({len(files)} files):"]
        lines += [f"  {f.relative_to(staged).as_posix():<{width}}  {f.stat().st_size:>12,} bytes" for f in files]
        card = (staged / "README.md").read_text() if (staged / "README.md").is_file() else "(no model card)"
    return "\n".join(lines) + "\n\nREADME.md (the model card):\n\n" + card


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
