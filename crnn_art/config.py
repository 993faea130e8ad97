"""Typed run configuration: dataclass defaults (the recipe of docs/model-and-recipe.md), YAML presets, CLI overrides.

Everything is resolved and validated before any data is touched or any model is built, so a typo
in ``--set train.epoch=3`` costs a second, not a generated dataset and a crashed first epoch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from crnn_art.errors import ConfigError

TASKS = ("style", "genre", "artist", "combined")
HEADS_OF_TASK = {"style": ("style",), "genre": ("genre",), "artist": ("artist",),
                 "combined": ("style", "genre", "artist")}
PRECISIONS = ("auto", "no", "bf16", "fp16")
TRACKERS = ("none", "tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab")


SPLIT_BY = ("row", "artist", "duplicate_group")


@dataclass
class DataConfig:
    """Where paintings come from and which labels are learned."""

    source: str = "huggan/wikiart"
    """'demo', 'artgan', a Hub dataset id, a parquet file, or a local folder: save_to_disk, prepared
    shards (``crnn-art prepare``), parquet files in the Hub's layout, or an image folder."""
    revision: str | None = None
    """Hub dataset revision (branch, tag or commit) to read; null = the default branch."""
    streaming: bool = False
    """Read a Hub id or parquet files as a stream instead of downloading and caching them first."""
    shuffle_buffer: int = 1000
    """Streaming: rows shuffled together (blocks of the epoch's shard order); a reader holds one block's JPEG
    bytes (~0.3 GB for WikiArt at 1000)."""
    task: str = "style"
    """What to learn: style, genre, artist, or combined (all three heads at once)."""
    image_size: int = 384
    """Training crop side; evaluation resizes the short side to 416/384 of it, then centre-crops."""
    val_fraction: float = 0.15
    """Share of the rows held out for validation (model selection), when the source has no splits of its own."""
    test_fraction: float = 0.15
    """Share of the rows held out for the final test, when the source has no splits of its own."""
    split_seed: int = 0
    """Seed of the split: each row's split is a hash of (split_seed, row id), so it never depends on the order of
    rows."""
    split_by: str = "row"
    """What the split hashes: row (each painting alone), artist (all of an artist's paintings in one split: no
    artist in both train and test), or duplicate_group (all copies of a painting in one split; needs
    data.duplicates). Rows without copies or without a known artist keep their row's split."""
    duplicates: str | None = None
    """With split_by=duplicate_group: the duplicates.json that crnn-art duplicates wrote for this source."""
    label_overrides: str | None = None
    """A reviewer's decisions.csv (row, path, head, decision, new_label; decision keep, relabel or drop): relabels
    and drops applied by row id before the split, in training and in every evaluation of the run."""
    min_artist_count: int = 1
    """Artists with fewer paintings than this are left out of the artist head (their rows keep their other labels)."""
    artist_list: str | None = None
    """'artgan': keep only the 23 artists of the ArtGAN protocol; null: every known artist."""
    folder_label: str | None = None
    """Image folders: which column the folder names label (default: the task; style for combined)."""
    artist_from_filename: bool = False
    """Image folders / ArtGAN: take the artist from WikiArt file names (``artist-name_title.jpg``)."""
    lists_dir: str | None = None
    """data.source=artgan: the folder with <task>_train_clean.csv, <task>_val_clean.csv, <task>_class.txt."""
    image_root: str | None = None
    """data.source=artgan: the root the lists' relative image paths start from."""
    num_workers: int | None = None
    """DataLoader worker processes per training process (decode and augment in parallel); 0 = in the training
    process; null = half of the process's cores, at most 4 (its threads: its share of the cores)."""
    max_bad_fraction: float = 0.1
    """Stop the run when more than this share of the training images drawn fail to decode (each failure is
    skipped, counted and listed in ``RUN/bad_images.tsv``); 0 stops at the first, 1 never stops."""
    log_rows: bool = False
    """Write the row ids each process trained on, per epoch, to ``<run>/rows/`` (to audit what was seen)."""
    demo_dir: str = "data/demo"
    """data.source=demo: where the generated demo dataset is written (reused when its parameters match)."""
    demo_size: int = 1600
    """data.source=demo: number of generated paintings."""
    demo_image_side: int = 96
    """data.source=demo: side (px) of the generated paintings."""
    demo_styles: int = 8
    """data.source=demo: number of styles drawn (at most 8)."""
    demo_noise: float = 0.03
    """data.source=demo: share of paintings given a wrong style on purpose (what `crnn-art outliers` should find)."""
    demo_seed: int = 0
    """data.source=demo: seed of the generator."""


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    """resnet50 (torchvision), or timm:NAME for any timm model with a 2-D feature map (CNN stages, ViT patch
    tokens), e.g. timm:convnext_tiny."""
    backbone_weights: str | None = "imagenet"
    """'imagenet' (torchvision IMAGENET1K_V2 for resnet50, timm's own pretrained weights for timm:NAME), a local
    state-dict file of the backbone, or null (random init)."""
    proj_channels: int = 320
    """Channels of the 1x1 projection of the backbone's feature map (2048 for ResNet-50) before the GRUs."""
    gru_hidden: int = 256
    """Hidden size of each direction of the row and column GRUs."""
    gru_layers: int = 2
    """Stacked layers of each bidirectional GRU."""
    gru_dropout: float = 0.2
    """Dropout between stacked GRU layers."""
    dropout: float = 0.4
    """Dropout on the pooled embedding before the linear heads."""
    channels_last: bool = True
    """NHWC memory layout for the convolutions (faster on recent GPUs and on CPUs with oneDNN; see bench)."""
    compile_trunk: bool = False
    """``torch.compile`` the ResNet trunk in place (GRUs stay eager; weights and checkpoints unchanged).
    Compiling costs a minute or more once per process: ``crnn-art bench --compile`` shows the step-time
    gain on your hardware and after how many steps it pays the compile back."""


@dataclass
class AugmentConfig:
    crop_scale: list[float] = field(default_factory=lambda: [0.7, 1.0])
    """RandomResizedCrop: range of the crop's area as a share of the painting."""
    crop_ratio: list[float] = field(default_factory=lambda: [0.85, 1.15])
    """RandomResizedCrop: range of the crop's aspect ratio (narrow, to keep composition)."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    color_jitter: list[float] = field(default_factory=lambda: [0.12, 0.12, 0.10, 0.03])
    """ColorJitter brightness, contrast, saturation, hue (small: colour carries style)."""
    erase_prob: float = 0.2
    """Probability of RandomErasing one rectangle."""
    erase_scale: list[float] = field(default_factory=lambda: [0.02, 0.12])
    """RandomErasing: range of the erased area as a share of the crop."""
    erase_ratio: list[float] = field(default_factory=lambda: [0.3, 3.3])
    """RandomErasing: range of the erased rectangle's aspect ratio."""
    mixup_prob: float = 0.35
    """Probability that a batch is mixed with MixUp (one draw per batch; MixUp, CutMix or neither)."""
    cutmix_prob: float = 0.35
    """Probability that a batch is mixed with CutMix."""
    mixup_alpha: float = 0.3
    """MixUp's Beta(alpha, alpha) for the mixing weight."""
    cutmix_alpha: float = 1.0
    """CutMix's Beta(alpha, alpha) for the box area."""
    on_device: bool | None = None
    """Colour jitter, normalisation and erasing on the training device (workers only decode, crop, flip).
    null: on when training on a GPU (where ``crnn-art bench`` shows it pays), off on CPUs."""


@dataclass
class TrainConfig:
    epochs: int = 20
    """Passes over the training split (class-balanced draws of its size when train.balanced_sampling)."""
    max_steps: int | None = None
    """Stop cleanly after this many optimizer steps; the LR schedule still spans all epochs."""
    batch_size: int = 64
    """Global batch: split evenly over processes."""
    eval_batch_size: int = 64
    """Evaluation batch per process."""
    seed: int = 0
    """Seed of the initial weights, the draw of batches, augmentation, dropout and mixing."""
    lr: float = 8e-4
    """Learning rate of the new modules (projection, GRUs, attention, heads)."""
    backbone_lr: float = 1.5e-4
    """Learning rate of the pretrained ResNet-50 trunk (lower: it is already good)."""
    weight_decay: float = 1e-4
    """AdamW's decoupled weight decay."""
    min_lr: float = 1e-6
    """Floor of the cosine schedule, reached at the end of the last epoch."""
    label_smoothing: float = 0.03
    """Label smoothing of the cross-entropy (PyTorch's definition)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 = no clipping (the norm is still checked for inf/NaN)."""
    freeze_stem: bool = True
    """Keep the backbone's stem fixed (ResNet-50: conv1, bn1; timm: its first stage): its generic edge filters
    need no retraining."""
    unfreeze_epoch: int | None = None
    """1-based epoch from which the stem trains too; null keeps it frozen for the whole run."""
    balanced_sampling: bool = True
    """Draw training batches class-balanced (with replacement), so rare styles are seen as often as common ones."""
    mixed_precision: str = "auto"
    """auto (bf16 on GPUs that have it, else fp16 with loss scaling; fp32 on CPUs), no, bf16 or fp16."""
    grad_accum_steps: int = 1
    """Split each global batch into this many micro-batches per process (same result, less memory)."""
    fused_adamw: bool | None = None
    """AdamW's fused kernel (one pass over all parameters). null: on for CPUs and CUDA GPUs, where torch
    has it (``crnn-art bench``: 3.5-4.7x faster optimizer step on a 2-core CPU); off elsewhere."""
    ema_decay: float | None = None
    """EMA of the weights (e.g. 0.999), evaluated and saved beside the raw weights; null = off."""
    checkpoint_every_steps: int | None = None
    """Also checkpoint every N optimizer steps (epoch ends always are); null = epoch ends only."""
    keep_last: int = 2
    """Checkpoints kept besides the best one (which is never deleted)."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss (each is skipped)."""
    log_every: int = 10
    """Log the training loss and learning rate every this many optimizer steps."""
    log_with: str = "none"
    """Experiment tracker through Accelerate: none, tensorboard, wandb, trackio, mlflow, comet_ml, aim..."""
    project_name: str = "crnn-art"
    """Tracker project name (a folder under the run for tensorboard)."""


@dataclass
class HubConfig:
    push_to_hub: str | None = None
    """USER/NAME: push best/ (with a generated model card) when training ends; null = don't."""
    private: bool = False
    """Create the Hub repository private (hub.push_to_hub)."""
    revision: str | None = None
    """A branch to push to (created if needed); null = main."""


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    @property
    def heads(self) -> tuple[str, ...]:
        return HEADS_OF_TASK[self.data.task]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- presets and overrides -----------------------------------------------------------------------

def available_presets() -> list[str]:
    folder = resources.files("crnn_art") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of sections (data, model, augment, train, hub)")
    return data


def load_preset(name: str) -> dict[str, Any]:
    names = available_presets()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(names)}")
    text = (resources.files("crnn_art") / "presets" / f"{name}.yaml").read_text()
    return _read_yaml(text, f"preset {name!r}")


def parse_override(item: str) -> tuple[str, Any]:
    """``'train.epochs=3'`` -> ``('train.epochs', 3)``; the value is read as YAML (``null``, lists)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r} must look like section.key=value, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _merge(target: dict[str, Any], updates: dict[str, Any], where: str) -> None:
    for section, values in updates.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: {section!r} must be a section mapping (data, model, augment, train)")
        target.setdefault(section, {}).update(values)


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: str | Path | None = None,
) -> RunConfig:
    """Defaults <- preset (or ``base``, a run's own ``config.yaml``) <- config file <- ``--set`` overrides, then
    type-check and validate. From ``base`` the run's ``train.max_steps`` is not taken: where the last command
    stopped is not part of what the run trains (a resume that stops early again says so with ``--set``)."""
    raw: dict[str, Any] = {}
    if base:
        _merge(raw, _read_yaml(Path(base).read_text(), str(base)), str(base))
        raw.get("train", {}).pop("max_steps", None)
    if preset:
        _merge(raw, load_preset(preset), f"preset {preset!r}")
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        _merge(raw, _read_yaml(path.read_text(), str(path)), str(path))
    for item in overrides:
        key, value = parse_override(item)
        section, dot, name = key.partition(".")
        if not dot:
            raise ConfigError(f"--set {item!r}: keys are section.name, e.g. train.epochs")
        raw.setdefault(section, {})[name] = value
    return build_config(raw)


def build_config(raw: dict[str, Any]) -> RunConfig:
    sections = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    hints = typing.get_type_hints(RunConfig)
    built: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(_unknown(section, list(sections), "config section"))
        built[section] = _build_section(hints[section], section, values or {})
    config = RunConfig(**built)
    validate(config)
    for key in ("label_overrides", "duplicates"):  # recorded absolute: evaluate/outliers may run from elsewhere
        value = getattr(config.data, key)
        if value:
            setattr(config.data, key, str(Path(value).expanduser().resolve()))
    return config


def _unknown(name: str, allowed: list[str], what: str) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {name!r}{hint}; allowed: {', '.join(allowed)}"


def _build_section(cls: type, section: str, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        if name not in hints:
            raise ConfigError(_unknown(f"{section}.{name}", [f"{section}.{n}" for n in names], "config key"))
        kwargs[name] = _coerce(value, hints[name], f"{section}.{name}")
    return cls(**kwargs)


_NUMERAL = re.compile(r"[+-]?(\d[\d_]*(\.[\d_]*)?|\.\d[\d_]*)([eE][+-]?\d+)?")


def _numeral(value: Any) -> Any:
    """A number written as users write it (``3e-4``, ``1e6``, ``1_000``), which YAML 1.1 reads as a string."""
    if isinstance(value, str) and _NUMERAL.fullmatch(value.strip()):
        text = value.strip().replace("_", "")
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    return value


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list like [0.7, 1.0], got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        value = _numeral(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 1e6, 2.0
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        value = _numeral(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def validate(cfg: RunConfig) -> None:
    """Range and choice checks that types alone cannot express."""
    d, m, a, t = cfg.data, cfg.model, cfg.augment, cfg.train

    def need(ok: bool, key: str, allowed: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{key} = {value!r} is not allowed; {allowed}")

    need(d.task in TASKS, "data.task", f"choose one of {', '.join(TASKS)}", d.task)
    need(bool(d.source), "data.source", "give 'demo', a Hub dataset id or a local folder", d.source)
    need(d.image_size >= 32, "data.image_size", "use at least 32 (ResNet-50 downsamples 32x)", d.image_size)
    for key in ("val_fraction", "test_fraction"):
        value = getattr(d, key)
        need(0.0 <= value < 1.0, f"data.{key}", "use a fraction in [0, 1)", value)
    need(d.label_overrides is None or Path(d.label_overrides).is_file(), "data.label_overrides",
         "give the decisions.csv file a review wrote (row, path, head, decision, new_label)", d.label_overrides)
    need(d.split_by != "artist" or d.task in ("style", "genre"), "data.split_by",
         "split_by=artist keeps every artist out of the other splits, so an artist head could never be tested; "
         "use it with data.task=style or genre", d.split_by)
    need(d.split_by in SPLIT_BY, "data.split_by", f"choose one of {', '.join(SPLIT_BY)}", d.split_by)
    need(d.split_by != "duplicate_group" or bool(d.duplicates), "data.duplicates",
         "split_by=duplicate_group needs the duplicates.json of `crnn-art duplicates --source ...`", d.duplicates)
    need(d.val_fraction > 0, "data.val_fraction", "validation needs a fraction > 0", d.val_fraction)
    need(d.val_fraction + d.test_fraction < 1.0, "data.val_fraction + data.test_fraction",
         "leave some data for training (sum < 1)", d.val_fraction + d.test_fraction)
    need(d.min_artist_count >= 1, "data.min_artist_count", "use an integer >= 1", d.min_artist_count)
    need(d.artist_list in (None, "artgan"), "data.artist_list", "use null or 'artgan'", d.artist_list)
    need(d.folder_label in (None, "style", "genre", "artist"), "data.folder_label",
         "use null, style, genre or artist", d.folder_label)
    if d.source == "artgan":
        need(bool(d.lists_dir) and bool(d.image_root), "data.lists_dir / data.image_root",
             "data.source=artgan needs both folders", (d.lists_dir, d.image_root))
    need(d.shuffle_buffer >= 1, "data.shuffle_buffer", "use an integer >= 1 (rows shuffled together in a stream)",
         d.shuffle_buffer)
    need(d.num_workers is None or d.num_workers >= 0, "data.num_workers",
         "use null (from the cores), 0 (load in the main process) or more", d.num_workers)
    need(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", "use a share between 0 and 1, e.g. 0.1",
         d.max_bad_fraction)
    need(d.demo_size >= 40, "data.demo_size", "generate at least 40 rows", d.demo_size)
    need(d.demo_image_side >= 32, "data.demo_image_side", "use at least 32 pixels", d.demo_image_side)
    need(2 <= d.demo_styles <= 27, "data.demo_styles", "use 2 to 27 styles", d.demo_styles)
    need(0.0 <= d.demo_noise < 0.5, "data.demo_noise", "use a share of wrong labels in [0, 0.5)", d.demo_noise)

    bw = m.backbone_weights
    need(bw is None or bw == "imagenet" or bw.endswith((".pth", ".pt", ".bin", ".safetensors")),
         "model.backbone_weights", "use 'imagenet', a .pth/.pt/.bin/.safetensors file, or null", bw)
    need(m.backbone == "resnet50" or (m.backbone.startswith("timm:") and len(m.backbone) > 5), "model.backbone",
         "use resnet50 or timm:NAME, a timm model with a 2-D feature map (e.g. timm:convnext_tiny)", m.backbone)
    for key in ("proj_channels", "gru_hidden", "gru_layers"):
        need(getattr(m, key) >= 1, f"model.{key}", "use a positive integer", getattr(m, key))
    for key in ("gru_dropout", "dropout"):
        need(0.0 <= getattr(m, key) < 1.0, f"model.{key}", "use a probability in [0, 1)", getattr(m, key))

    for key in ("crop_scale", "crop_ratio", "erase_scale", "erase_ratio"):
        lo_hi = getattr(a, key)
        need(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1], f"augment.{key}",
             "use [low, high] with 0 < low <= high", lo_hi)
    need(a.crop_scale[1] <= 1.0, "augment.crop_scale", "the high end is at most 1.0", a.crop_scale)
    need(len(a.color_jitter) == 4 and all(v >= 0 for v in a.color_jitter) and a.color_jitter[3] <= 0.5,
         "augment.color_jitter", "use [brightness, contrast, saturation, hue] >= 0, hue <= 0.5", a.color_jitter)
    for key in ("hflip", "erase_prob", "mixup_prob", "cutmix_prob"):
        need(0.0 <= getattr(a, key) <= 1.0, f"augment.{key}", "use a probability in [0, 1]", getattr(a, key))
    need(a.mixup_prob + a.cutmix_prob <= 1.0, "augment.mixup_prob + augment.cutmix_prob",
         "the two probabilities must sum to at most 1", a.mixup_prob + a.cutmix_prob)
    for key in ("mixup_alpha", "cutmix_alpha"):
        need(getattr(a, key) > 0, f"augment.{key}", "use a positive Beta parameter", getattr(a, key))

    need(t.epochs >= 1, "train.epochs", "use an integer >= 1", t.epochs)
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "use null or an integer >= 1", t.max_steps)
    need(t.batch_size >= 2 and t.batch_size % 2 == 0, "train.batch_size",
         "use an even number >= 2 (MixUp/CutMix pair samples)", t.batch_size)
    need(t.eval_batch_size >= 1, "train.eval_batch_size", "use an integer >= 1", t.eval_batch_size)
    for key in ("lr", "backbone_lr", "min_lr", "weight_decay", "label_smoothing", "grad_clip"):
        need(math.isfinite(getattr(t, key)), f"train.{key}", "use a finite number", getattr(t, key))
    for key in ("lr", "backbone_lr"):
        need(getattr(t, key) > 0, f"train.{key}", "use a positive learning rate", getattr(t, key))
    need(0 <= t.min_lr <= min(t.lr, t.backbone_lr), "train.min_lr", "use 0 <= min_lr <= both learning rates",
         t.min_lr)
    need(t.weight_decay >= 0, "train.weight_decay", "use a value >= 0", t.weight_decay)
    need(0 <= t.label_smoothing < 1, "train.label_smoothing", "use a value in [0, 1)", t.label_smoothing)
    need(t.grad_clip >= 0, "train.grad_clip", "use 0 (off) or a positive norm", t.grad_clip)
    need(t.unfreeze_epoch is None or t.unfreeze_epoch >= 1, "train.unfreeze_epoch",
         "use null or a 1-based epoch number", t.unfreeze_epoch)
    need(t.mixed_precision in PRECISIONS, "train.mixed_precision", f"choose one of {', '.join(PRECISIONS)}",
         t.mixed_precision)
    need(t.log_every >= 1, "train.log_every", "use an integer >= 1", t.log_every)
    need(t.grad_accum_steps >= 1, "train.grad_accum_steps", "use an integer >= 1", t.grad_accum_steps)
    need(t.batch_size % t.grad_accum_steps == 0 and (t.batch_size // t.grad_accum_steps) % 2 == 0,
         "train.grad_accum_steps", f"use a divisor of train.batch_size={t.batch_size} leaving even micro-batches",
         t.grad_accum_steps)
    need(t.ema_decay is None or 0 < t.ema_decay < 1, "train.ema_decay", "use null or a decay in (0, 1)", t.ema_decay)
    need(t.checkpoint_every_steps is None or t.checkpoint_every_steps >= 1, "train.checkpoint_every_steps",
         "use null or an integer >= 1", t.checkpoint_every_steps)
    need(t.keep_last >= 1, "train.keep_last", "keep at least 1 checkpoint", t.keep_last)
    need(t.max_bad_steps >= 1, "train.max_bad_steps", "use an integer >= 1", t.max_bad_steps)
    h = cfg.hub
    need(h.push_to_hub is None or (h.push_to_hub.count("/") == 1 and all(h.push_to_hub.split("/"))),
         "hub.push_to_hub", "use USER/NAME (or ORG/NAME), or null", h.push_to_hub)
    need(t.log_with in TRACKERS, "train.log_with", f"choose one of {', '.join(TRACKERS)}", t.log_with)


def config_text(cfg: RunConfig) -> str:
    """``config.yaml`` as written into a run folder."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(config_text(cfg))


RESUME_SAFE_KEYS = frozenset({
    "data.num_workers", "data.max_bad_fraction", "data.log_rows", "model.compile_trunk", "train.max_steps",
    "train.eval_batch_size",
    "train.fused_adamw", "train.checkpoint_every_steps", "train.keep_last", "train.max_bad_steps",
    "train.log_every", "train.log_with", "train.project_name", "hub.push_to_hub", "hub.private", "hub.revision",
})
"""Keys a resumed run may change: how it runs (workers, logging, checkpoint cadence, when to stop), not what
it trains. Everything else (task, classes, data, sizes, batch, recipe, schedule, epochs) defines the run."""


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``: one entry per key, named as ``--set`` names it."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_config(run_cfg: RunConfig, cfg: RunConfig, run_dir: str | Path) -> None:
    """Refuse to continue a run with a config that changes what it trains (one ``ConfigError`` naming the keys)."""
    own, new = flat_config(run_cfg.to_dict()), flat_config(cfg.to_dict())
    changed = [k for k in sorted(own.keys() | new.keys()) if own.get(k) != new.get(k) and k not in RESUME_SAFE_KEYS]
    if "train.batch_size" in changed:
        raise ConfigError(
            f"--resume would change what the run in {run_dir} trains (train.batch_size {own['train.batch_size']} -> "
            f"{new['train.batch_size']}); it is the global batch (all processes together), which the learning rate, "
            "the schedule's length and the epoch's batches were planned for, so it stays the same on any number of "
            f"processes (each takes {own['train.batch_size']}/processes); resume without changing it, or start a new "
            "run in another --output-dir"
        )
    if changed:
        shown = ", ".join(f"{k} {own.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise ConfigError(
            f"--resume would change what the run in {run_dir} trains ({shown}{more}); resume with its own config "
            "(leave out --preset/--config/--set, or change only workers, logging, checkpointing, train.max_steps), "
            "or start a new run in another --output-dir"
        )


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run's ``config.yaml`` back (for evaluation and resume)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; is this a crnn-art run folder?")
    return build_config(_read_yaml(path.read_text(), str(path)))


# -- the reference page (docs/configuration.md is this function's output; a test keeps them equal) ---------------

SECTIONS = {"data": DataConfig, "model": ModelConfig, "augment": AugmentConfig, "train": TrainConfig, "hub": HubConfig}


def key_docs() -> dict[str, str]:
    """``section.key`` -> the attribute docstring written under it in this file ('' where there is none)."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        body = ast.parse(inspect.getsource(cls)).body[0].body
        for node, after in zip(body, [*body[1:], None], strict=True):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                text = ""
                if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                        and isinstance(after.value.value, str):
                    text = " ".join(after.value.value.split())
                docs[f"{section}.{node.target.id}"] = text
    return docs


def config_reference() -> str:
    """Every key, its default and what it does, as Markdown (written to docs/configuration.md)."""
    defaults = flat_config(RunConfig().to_dict())
    lines = ["# Configuration reference", "",
             "Every key of a run's config, its default and what it does. A run's config is a preset "
             f"({', '.join(available_presets())}), then a YAML file (`--config`), then `--set KEY=VALUE` overrides; "
             "`crnn-art train --preset NAME --print-config` prints the result. Every value is checked before any "
             "data is read; a wrong key or value is one line naming it and what is allowed. Keys a resume may "
             "change are marked *resume*.", "",
             "This page is generated from `crnn_art/config.py` (`python -c \"import crnn_art.config as c; "
             "print(c.config_reference(), end='')\" > docs/configuration.md`); a test keeps it current.", ""]
    docs = key_docs()
    for section in SECTIONS:
        lines += [f"## {section}", "", "| key | default | what |", "| --- | --- | --- |"]
        for key, doc in docs.items():
            if key.startswith(section + "."):
                value = defaults[key]
                shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
                mark = " *resume*" if key in RESUME_SAFE_KEYS else ""
                lines.append(f"| `{key}` | `{shown}` | {doc.replace('|', '/')}{mark} |")
        lines.append("")
    return "\n".join(lines)
