"""Training: the loop (``train``), one optimizer step (``TrainStep``) and the loss with MixUp/CutMix."""

from crnn_art.training.loop import train
from crnn_art.training.step import StepResult, TrainStep

__all__ = ["StepResult", "TrainStep", "train"]
