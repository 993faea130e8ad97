"""Per-batch MixUp/CutMix over several heads, and the soft-target loss they need.

Labels become one concatenated one-hot row per sample, with an all-zero block where a head's
label is unknown. MixUp/CutMix (torchvision v2, which accepts such probability labels) mix those
rows like any other; a head's loss is then ``-sum(target * log_softmax)`` over its block, summed
over samples and divided by the known label mass. That equals cross-entropy when nothing is
mixed, weighs each half of a mixed pair by its area or lambda, and lets an unknown label simply
contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from crnn_art.config import AugmentConfig


def one_hot_targets(labels: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``(B, heads)`` int labels (-1 unknown) -> ``(B, sum(sizes))`` float targets."""
    blocks = []
    for h, n in enumerate(sizes):
        col = labels[:, h]
        block = F.one_hot(col.clamp(min=0), n).to(torch.float32)
        blocks.append(block * (col >= 0).unsqueeze(1))
    return torch.cat(blocks, dim=1)


class BatchMixer:
    """One draw per batch: ``r < mixup_prob`` MixUp; ``r < mixup_prob + cutmix_prob`` CutMix; else none."""

    def __init__(self, aug: AugmentConfig) -> None:
        self.mixup_prob = aug.mixup_prob
        self.cutmix_prob = aug.cutmix_prob
        self.mixup = v2.MixUp(alpha=aug.mixup_alpha)
        self.cutmix = v2.CutMix(alpha=aug.cutmix_alpha)

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Mix with randomness from ``seed`` alone (the step), so a resumed run mixes the same way."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            r = float(torch.rand(()))
            if r < self.mixup_prob:
                kind, op = "mixup", self.mixup
            elif r < self.mixup_prob + self.cutmix_prob:
                kind, op = "cutmix", self.cutmix
            else:
                return images, targets, "none"
            # the random draws (lambda, box) are made on the CPU generator; the mixing runs where the batch is
            mixed_images, mixed_targets = op(images, targets)
        return mixed_images, mixed_targets, kind


def soft_target_loss(
    logits: dict[str, torch.Tensor], targets: torch.Tensor, sizes: dict[str, int], smoothing: float,
    class_weights: dict[str, torch.Tensor] | None = None, head_scale: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over heads of each head's mean soft cross-entropy over its known label mass.

    With ``class_weights`` (streamed runs balance classes in the loss) each class's term is weighed by
    that class's weight, the smoothing term's included, and the mean is over the weighted label mass:
    for hard labels exactly ``F.cross_entropy(weight=w, label_smoothing=s)`` (PyTorch's definition).
    ``head_scale`` multiplies each head's term in the total (a micro-batch's share of the step's label mass);
    ``per_head`` stays unscaled.
    """
    total = torch.zeros((), device=targets.device)
    per_head = {}
    start = 0
    for head, n in sizes.items():
        block = targets[:, start:start + n]
        start += n
        mass = block.sum(dim=1, keepdim=True)  # 1 for a known (possibly mixed) label, 0 for an unknown one
        weight = torch.ones(n, device=block.device) if class_weights is None else class_weights[head].to(block)
        smoothed = (block * (1 - smoothing) + mass * (smoothing / n)) * weight
        log_probs = F.log_softmax(logits[head].float(), dim=1)
        denom = (block * weight).sum().clamp(min=1e-8)
        loss = -(smoothed * log_probs).sum() / denom
        per_head[head] = loss.detach()
        total = total + (loss if head_scale is None else loss * head_scale[head])
    return total, per_head
