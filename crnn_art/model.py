"""The CRNN: a backbone (ResNet-50, or any timm model with a 2-D feature map) read by row and column BiGRUs
with attention pooling (docs/model-and-recipe.md).

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

from crnn_art.backbones import RESNET50, build_trunk, stem_norms, stem_parameters, trunk_channels
from crnn_art.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from crnn_art.errors import ModelLoadError

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


class CRNNArtClassifier(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="crnn-art",
    tags=["image-classification", "art", "wikiart", "crnn"],
    pipeline_tag="image-classification",
    license="mit",
):
    """A backbone + row/column BiGRU + attention pooling, one linear head per task.

    Args:
        heads: task name -> number of classes, e.g. ``{"style": 27}`` or
            ``{"style": 27, "genre": 10, "artist": 23}`` for the combined task.
        class_names: task name -> class names (saved in ``config.json`` as each head's id2label).
        backbone_weights: ``"imagenet"`` (torchvision's IMAGENET1K_V2 for ResNet-50, timm's own pretrained
            weights for a timm backbone), a local state-dict file of the backbone, or ``None`` for random init.
        backbone: ``"resnet50"`` (torchvision) or ``"timm:NAME"`` (``crnn_art.backbones``); the embedding is
            the backbone's channels plus ``4 * gru_hidden``.
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
        backbone: str = RESNET50,
        embedding_dim: int | None = None,
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
            "mean": list(self.mean), "std": list(self.std), "backbone": backbone,
        }

        self.trunk = build_trunk(backbone, backbone_weights, self.image_size)
        channels = trunk_channels(self.trunk)
        self.proj = nn.Sequential(
            nn.Conv2d(channels, proj_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(proj_channels),
            nn.ReLU(inplace=True),
        )
        self.row_branch = AxisGRU(proj_channels, gru_hidden, gru_layers, gru_dropout, along="rows")
        self.col_branch = AxisGRU(proj_channels, gru_hidden, gru_layers, gru_dropout, along="cols")
        self.embedding_dim = channels + 4 * gru_hidden
        if embedding_dim is not None and embedding_dim != self.embedding_dim:
            raise ModelLoadError(f"config.json records an embedding of {embedding_dim} but {backbone} with gru_hidden="
                                 f"{gru_hidden} gives {self.embedding_dim}: the folder does not fit this crnn-art")
        self.arch["embedding_dim"] = self.embedding_dim
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({t: nn.Linear(self.embedding_dim, n) for t, n in self.heads_spec.items()})

    # -- structure -------------------------------------------------------------------------------
    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def new_parameters(self) -> list[nn.Parameter]:
        """Everything that is not the backbone: projection, GRUs, attention pools, heads."""
        trunk_ids = {id(p) for p in self.trunk.parameters()}
        return [p for p in self.parameters() if id(p) not in trunk_ids]

    def stem_parameters(self) -> list[nn.Parameter]:
        """The backbone's first stage (ResNet-50: conv1 and bn1; timm: its stem or patch embedding)."""
        return stem_parameters(self.trunk)

    def stem_norms(self) -> list[nn.Module]:
        """The first stage's BatchNorm layers (none for a ViT or ConvNeXt)."""
        return stem_norms(self.trunk)

    @property
    def _first_conv(self) -> torch.Tensor:
        """The backbone's first 4-D weight, whose memory layout says whether the model runs channels-last."""
        return next(p for p in self.trunk.parameters() if p.ndim == 4)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> CRNNOutput:
        if self._first_conv.is_contiguous(memory_format=torch.channels_last):
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
