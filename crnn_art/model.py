"""The CRNN: a ResNet-50 trunk read by row and column BiGRUs with attention pooling (docs/model-and-recipe.md).

A painting's style lives partly in texture (which global pooling keeps) and partly in how that
texture is laid out: horizontal bands, vertical strokes, block composition. The two recurrent
branches read the layer4 map row by row and column by column so that layout reaches the heads;
their attention weights say which rows and columns mattered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

from crnn_art.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from crnn_art.errors import ModelLoadError, first_line

STEM_MODULES = ("conv1", "bn1")
TRUNK_MODULES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
WEIGHTS_NAME = "model.safetensors"


@dataclass
class CRNNOutput:
    """What one forward pass returns.

    ``embedding`` is taken before dropout so that outlier detection sees the same features at
    train and eval time; ``row_attention``/``col_attention`` are softmax weights over the layer4
    rows and columns (their outer product is an ``h x w`` map of where the model looked).
    """

    logits: dict[str, torch.Tensor]
    embedding: torch.Tensor
    row_attention: torch.Tensor
    col_attention: torch.Tensor


class AttentionPool(nn.Module):
    """Softmax-weighted sum over a sequence: a learned score per position."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.softmax(self.score(x).squeeze(-1), dim=1)
        return torch.einsum("bs,bsd->bd", weights, x), weights


class AxisGRU(nn.Module):
    """A bidirectional GRU run along one axis of a feature map, averaged, then attention-pooled.

    With ``along="rows"`` every row is a sequence of ``w`` vectors; the GRU output is averaged
    over the ``w`` positions to give one vector per row, and attention picks among the ``h`` rows.
    The recurrent part runs in fp32 with autocast off: GRU kernels under bf16 autocast have been
    missing or wrong on some builds, and it is a small share of the compute.
    """

    def __init__(self, channels: int, hidden: int, layers: int, dropout: float, along: str) -> None:
        super().__init__()
        if along not in ("rows", "cols"):
            raise ValueError(f"along must be 'rows' or 'cols', got {along!r}")
        self.along = along
        self.gru = nn.GRU(
            channels,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.pool = AttentionPool(2 * hidden)

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = fmap.shape
        # rows: (B, h, w, C) -> B*h sequences of length w; cols: (B, w, h, C) -> B*w of length h
        seq = fmap.permute(0, 2, 3, 1) if self.along == "rows" else fmap.permute(0, 3, 2, 1)
        n_seq, seq_len = seq.shape[1], seq.shape[2]
        seq = seq.reshape(b * n_seq, seq_len, c)
        with torch.autocast(device_type=seq.device.type, enabled=False):
            out, _ = self.gru(seq.float().contiguous())
            per_line = out.mean(dim=1).reshape(b, n_seq, -1)
            return self.pool(per_line)


def _build_trunk(backbone_weights: str | None) -> nn.Sequential:
    if backbone_weights == "imagenet":
        try:
            net = resnet50(weights=ResNet50_Weights.IMAGENET1K_V2)
        except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
            raise ModelLoadError(
                f"could not fetch torchvision's ImageNet ResNet-50 weights ({type(exc).__name__}); "
                "run once with network access to cache them, or set model.backbone_weights to a local "
                "ResNet-50 .pth/.safetensors file, or to null for random init"
            ) from exc
    else:
        net = resnet50(weights=None)
        if backbone_weights is not None:
            _load_local_backbone(net, backbone_weights)
    return nn.Sequential(*[getattr(net, name) for name in TRUNK_MODULES])


WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""What wrappers put before a ResNet's own keys: DDP and ``AveragedModel`` (EMA) ``module.``,
``torch.compile`` ``_orig_mod.``, in any combination."""


def _backbone_key(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.removeprefix("module.").removeprefix("_orig_mod.")
    return key


def _load_local_backbone(net: nn.Module, path: str) -> None:
    """Load a ResNet-50 state dict from a local file without unpickling arbitrary objects."""
    if not os.path.isfile(path):
        raise ModelLoadError(
            f"backbone weights file {path!r} does not exist; give a ResNet-50 .pth or .safetensors "
            "file, 'imagenet', or null"
        )
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        first = first_line(exc, empty=type(exc).__name__)
        raise ModelLoadError(f"cannot read backbone weights {path!r} as tensors ({first}); give a ResNet-50 state "
                             "dict saved with torch.save(model.state_dict()) or safetensors") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path!r} holds a {type(state).__name__}, not a state dict; save model.state_dict()")
    state = {_backbone_key(k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and k != "n_averaged"}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ModelLoadError(
            f"{path!r} is not a torchvision ResNet-50 state dict "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


class CRNNArtClassifier(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="crnn-art",
    tags=["image-classification", "art", "wikiart", "crnn"],
    pipeline_tag="image-classification",
    license="mit",
):
    """ResNet-50 + row/column BiGRU + attention pooling, one linear head per task.

    Args:
        heads: task name -> number of classes, e.g. ``{"style": 27}`` or
            ``{"style": 27, "genre": 10, "artist": 23}`` for the combined task.
        class_names: task name -> class names (saved in ``config.json`` as each head's id2label).
        backbone_weights: ``"imagenet"`` (torchvision's IMAGENET1K_V2), a local ResNet-50 file,
            or ``None`` for random init.
        image_size: the training crop side, recorded so that inference uses the same size.
    """

    def __init__(
        self,
        heads: dict[str, int],
        class_names: dict[str, list[str]] | None = None,
        backbone_weights: str | None = None,
        image_size: int = 384,
        proj_channels: int = 320,
        gru_hidden: int = 256,
        gru_layers: int = 2,
        gru_dropout: float = 0.2,
        dropout: float = 0.4,
        mean: tuple[float, float, float] | list[float] = IMAGENET_MEAN,
        std: tuple[float, float, float] | list[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if not heads or any(int(n) < 1 for n in heads.values()):
            raise ValueError(f"heads must map task names to class counts >= 1, got {heads!r}")
        if class_names is not None:
            for task, n in heads.items():
                if task in class_names and len(class_names[task]) != n:
                    raise ValueError(f"head {task!r} has {n} classes but {len(class_names[task])} names")
        self.heads_spec = {str(k): int(v) for k, v in heads.items()}
        self.class_names = class_names or {t: [str(i) for i in range(n)] for t, n in heads.items()}
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.arch = {
            "heads": self.heads_spec, "class_names": self.class_names, "backbone_weights": backbone_weights,
            "image_size": self.image_size, "proj_channels": proj_channels, "gru_hidden": gru_hidden,
            "gru_layers": gru_layers, "gru_dropout": gru_dropout, "dropout": dropout,
            "mean": list(self.mean), "std": list(self.std),
        }

        self.trunk = _build_trunk(backbone_weights)
        trunk_channels = 2048
        self.proj = nn.Sequential(
            nn.Conv2d(trunk_channels, proj_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(proj_channels),
            nn.ReLU(inplace=True),
        )
        self.row_branch = AxisGRU(proj_channels, gru_hidden, gru_layers, gru_dropout, along="rows")
        self.col_branch = AxisGRU(proj_channels, gru_hidden, gru_layers, gru_dropout, along="cols")
        self.embedding_dim = trunk_channels + 4 * gru_hidden
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({t: nn.Linear(self.embedding_dim, n) for t, n in self.heads_spec.items()})

    # -- structure -------------------------------------------------------------------------------
    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def new_parameters(self) -> list[nn.Parameter]:
        """Everything that is not the ResNet trunk: projection, GRUs, attention pools, heads."""
        trunk_ids = {id(p) for p in self.trunk.parameters()}
        return [p for p in self.parameters() if id(p) not in trunk_ids]

    def stem_parameters(self) -> list[nn.Parameter]:
        return [p for i in range(2) for p in self.trunk[i].parameters()]

    @property
    def stem_norm(self) -> nn.BatchNorm2d:
        return self.trunk[1]

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> CRNNOutput:
        if self.trunk[0].weight.is_contiguous(memory_format=torch.channels_last):
            images = images.contiguous(memory_format=torch.channels_last)  # follow the model's layout
        fmap = self.trunk(images)
        global_desc = fmap.mean(dim=(2, 3))
        proj = self.proj(fmap)
        row_vec, row_att = self.row_branch(proj)
        col_vec, col_att = self.col_branch(proj)
        embedding = torch.cat([global_desc.float(), row_vec, col_vec], dim=1)
        dropped = self.dropout(embedding)
        logits = {task: head(dropped) for task, head in self.heads.items()}
        return CRNNOutput(logits=logits, embedding=embedding, row_attention=row_att, col_attention=col_att)

    # -- saving and loading ------------------------------------------------------------------------
    def hub_config(self) -> dict[str, Any]:
        """What ``config.json`` holds: every constructor argument (class names always filled in), and
        each head's ``id2label`` in the usual Hugging Face form."""
        return {
            **self.arch,
            "architecture": "CRNNArtClassifier",
            "id2label": {head: dict(enumerate(names)) for head, names in self.class_names.items()},
        }

    def save_pretrained(self, save_directory, *, config=None, **kwargs):  # type: ignore[override]
        return super().save_pretrained(save_directory, config=config or self.hub_config(), **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ) -> CRNNArtClassifier:
        """Rebuild from ``config.json`` and load ``model.safetensors`` with strict key checks.

        The trunk is built without downloading anything (the saved weights replace it), and only
        safetensors are read, so loading a model never unpickles code.
        """
        model_kwargs["backbone_weights"] = None
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, WEIGHTS_NAME)
        else:
            weights = hf_hub_download(
                repo_id=model_id,
                filename=WEIGHTS_NAME,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        if "heads" not in model_kwargs:
            raise ModelLoadError(
                f"{model_id}: config.json is missing or has no 'heads'; this is not a crnn-art model folder"
            )
        model = cls(**model_kwargs)
        load_weights(model, weights, strict=strict)
        model.to(map_location)
        model.eval()
        return model


def load_weights(model: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> None:
    """Load a safetensors file into ``model``; any damage or mismatch is one clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = str(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path} does not exist; point at a run's best/ or last/ folder")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"{path} is damaged or not a safetensors file ({exc}); use another checkpoint or retrain"
        ) from exc
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ: other heads or class counts
        first = str(exc).strip().splitlines()[-1].strip()
        raise ModelLoadError(f"{path} does not fit this model's config.json ({first})") from exc
    if strict and (missing or unexpected):
        raise ModelLoadError(
            f"{path} does not match this model (missing {list(missing)[:3]}, "
            f"unexpected {list(unexpected)[:3]}); was it saved with other heads or another version?"
        )
