"""Backbones: what reads a painting before the row and column GRUs.

``resnet50`` is torchvision's ResNet-50 up to layer4 (the default, and the seed's model: its state-dict
keys ``trunk.0.*`` ... ``trunk.7.*`` are those of every crnn-art checkpoint so far). ``timm:NAME`` is any
model of the `timm` library that gives a 2-D feature map: a CNN's last stage (``forward_features``) or a
vision transformer's patch tokens laid back on their ``h x w`` grid (class and register tokens left out),
so that the GRUs read rows and columns of patches.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from torch import nn

from crnn_art.errors import ModelLoadError, first_line
from crnn_art.hub_reach import cache_only_if_unreachable

RESNET50 = "resnet50"
TIMM_PREFIX = "timm:"
RESNET_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
TIMM_STEM = ("conv1", "bn1", "conv_stem", "stem", "patch_embed")
"""Top-level modules of timm models that make their first stage (ResNets, EfficientNets/MobileNets, ConvNeXts,
ViTs): what ``train.freeze_stem`` keeps frozen."""
TIMM_STEM_PARAMETERS = ("cls_token", "reg_token", "pos_embed")


def backbone_problem(name: str) -> str | None:
    """Why ``model.backbone`` cannot be used (a one-line reason with the fix), or None. Imports timm for
    ``timm:`` names, so it is called where training starts, before any data is read."""
    if name == RESNET50:
        return None
    if not name.startswith(TIMM_PREFIX) or not name[len(TIMM_PREFIX):]:
        return f"model.backbone {name!r} is not a backbone: use resnet50 or timm:NAME (e.g. timm:convnext_tiny)"
    try:
        import timm
    except ImportError:
        return f"model.backbone {name!r} needs the timm library, which is not installed: pip install timm"
    if not timm.is_model(name[len(TIMM_PREFIX):]):
        import difflib

        close = difflib.get_close_matches(name[len(TIMM_PREFIX):], timm.list_models(), n=5, cutoff=0.6)
        return (f"model.backbone {name!r}: timm has no model {name[len(TIMM_PREFIX):]!r}"
                + (f" (close: {', '.join(close)})" if close else "") + "; see timm.list_models()")
    return None


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean and std the backbone was pretrained with: ImageNet's for ResNet-50, timm's ``pretrained_cfg``
    for a timm model (0.5/0.5 for many ViTs, CLIP's own for CLIP towers). Training, evaluation, inference and
    export all use them (the model records them in ``config.json``)."""
    from crnn_art.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    if name.startswith(TIMM_PREFIX):
        import timm

        cfg = timm.get_pretrained_cfg(name[len(TIMM_PREFIX):])
        if cfg is not None and cfg.mean and cfg.std:
            return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
    return IMAGENET_MEAN, IMAGENET_STD


def build_trunk(name: str, weights: str | None, image_size: int) -> nn.Module:
    """The backbone as a module whose forward gives a ``(B, C, h, w)`` map; ``weights``: ``imagenet`` (the
    library's pretrained weights), a local state-dict file, or None (random init)."""
    problem = backbone_problem(name)
    if problem:
        raise ModelLoadError(problem)
    if name == RESNET50:
        return _resnet50(weights)
    return TimmTrunk(name[len(TIMM_PREFIX):], weights, image_size)


def _resnet50(weights: str | None) -> nn.Sequential:
    from torchvision.models import ResNet50_Weights, resnet50

    if weights == "imagenet":
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
        if weights is not None:
            load_backbone_file(net, weights, "a torchvision ResNet-50")
    return nn.Sequential(*[getattr(net, name) for name in RESNET_TRUNK])


WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""What wrappers put before a model's own keys: DDP and ``AveragedModel`` (EMA) ``module.``,
``torch.compile`` ``_orig_mod.``, in any combination."""


def _backbone_key(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.removeprefix("module.").removeprefix("_orig_mod.")
    return key


def _is_classifier_key(key: str) -> bool:
    return key.startswith(("fc.", "head.", "classifier.", "head_dist.")) or key == "n_averaged"


def load_backbone_file(net: nn.Module, path: str, what: str) -> None:
    """Load a state dict from a local file into ``net`` (classifier keys ignored) without unpickling arbitrary
    objects; anything that does not fit is one ``ModelLoadError`` naming the file."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"backbone weights file {path!r} does not exist; give {what} .pth or .safetensors "
                             "file, 'imagenet', or null")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        first = first_line(exc, empty=type(exc).__name__)
        raise ModelLoadError(f"cannot read backbone weights {path!r} as tensors ({first}); give {what} state "
                             "dict saved with torch.save(model.state_dict()) or safetensors") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path!r} holds a {type(state).__name__}, not a state dict; save model.state_dict()")
    state = {k: v for k, v in ((_backbone_key(k), v) for k, v in state.items()) if not _is_classifier_key(k)}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ
        raise ModelLoadError(f"{path!r} is not {what} state dict ({first_line(exc)})") from exc
    missing = [k for k in missing if not _is_classifier_key(k)]
    if missing or unexpected:
        raise ModelLoadError(f"{path!r} is not {what} state dict (missing {missing[:3]}, unexpected {unexpected[:3]})")


class TimmTrunk(nn.Module):
    """A timm model without its classifier, giving ``(B, C, h, w)``: a CNN's last feature map as it is, a ViT's
    patch tokens (after the class/register tokens) reshaped to the patch grid."""

    def __init__(self, model_name: str, weights: str | None, image_size: int) -> None:
        super().__init__()
        import timm

        kwargs = {"num_classes": 0, "global_pool": ""}
        pretrained = weights == "imagenet"
        try:
            with cache_only_if_unreachable() if pretrained else nullcontext():
                try:  # transformers take the training size (position embeddings); CNNs refuse the argument
                    self.body = timm.create_model(model_name, pretrained=pretrained, img_size=image_size, **kwargs)
                except TypeError:
                    self.body = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        except Exception as exc:  # noqa: BLE001 - offline, or a gated/missing checkpoint
            if not pretrained:
                raise
            raise ModelLoadError(
                f"could not fetch timm's pretrained weights for {model_name} ({type(exc).__name__}); run once with "
                "network access to cache them (Hugging Face cache), or set model.backbone_weights to a local file, "
                "or to null for random init") from exc
        if weights not in (None, "imagenet"):
            load_backbone_file(self.body, weights, f"a timm {model_name}")
        self.channels = int(self.body.num_features)
        self.prefix_tokens = int(getattr(self.body, "num_prefix_tokens", 0))
        self.nhwc = getattr(self.body, "output_fmt", "NCHW") == "NHWC"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.body.forward_features(images)
        if x.ndim == 3:  # (B, tokens, C): patch tokens back onto their grid
            x = x[:, self.prefix_tokens:]
            h, w = self._grid(images)
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        return x.permute(0, 3, 1, 2) if self.nhwc else x

    def _grid(self, images: torch.Tensor) -> tuple[int, int]:
        """Rows and columns of patches: from the patch layer (``patch_embed``, or ``stem`` in MLP-Mixers)."""
        layer = getattr(self.body, "patch_embed", None) or getattr(self.body, "stem", None)
        patch = getattr(layer, "patch_size", None)
        if patch is None:
            raise ModelLoadError(f"{type(self.body).__name__} gives tokens without a patch grid crnn-art can read; "
                                 "use a CNN or a ViT-style backbone")
        patch = (patch, patch) if isinstance(patch, int) else patch
        return images.shape[-2] // patch[0], images.shape[-1] // patch[1]

    def stem_modules(self) -> list[nn.Module]:
        return [getattr(self.body, name) for name in TIMM_STEM if isinstance(getattr(self.body, name, None),
                                                                              nn.Module)]

    def stem_parameters(self) -> list[nn.Parameter]:
        own = [getattr(self.body, name) for name in TIMM_STEM_PARAMETERS
               if isinstance(getattr(self.body, name, None), nn.Parameter)]
        return own + [p for m in self.stem_modules() for p in m.parameters()]


def trunk_channels(trunk: nn.Module) -> int:
    return 2048 if isinstance(trunk, nn.Sequential) else trunk.channels


def stem_parameters(trunk: nn.Module) -> list[nn.Parameter]:
    """The first stage's parameters (frozen with ``train.freeze_stem``)."""
    if isinstance(trunk, nn.Sequential):
        return [p for i in range(2) for p in trunk[i].parameters()]
    return trunk.stem_parameters()


def frozen_stem_note(trunk: nn.Module, backbone: str) -> str | None:
    """A warning when ``train.freeze_stem`` cannot apply: a timm backbone whose first stage has none of the names
    crnn-art knows (DenseNet's ``features``, VGG, Inception). None when there is a stem to freeze."""
    if stem_parameters(trunk):
        return None
    return (f"warning: train.freeze_stem: {backbone} has no first stage crnn-art can find (it looks for "
            f"{', '.join(TIMM_STEM)}), so nothing is frozen and every layer trains from the first epoch; set "
            "train.freeze_stem=false to say so and silence this")


def stem_norms(trunk: nn.Module) -> list[nn.Module]:
    """The first stage's BatchNorm layers (kept in eval mode while it is frozen)."""
    modules = [trunk[1]] if isinstance(trunk, nn.Sequential) else trunk.stem_modules()
    return [m for root in modules for m in root.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
