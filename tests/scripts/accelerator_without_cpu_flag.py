"""Launched by a test under the 2-process CPU config: builds the run's Accelerator as a program
that forgot ``cpu=True`` would, and must be stopped by crnn-art's world check."""

from crnn_art.runtime import make_accelerator

make_accelerator(cpu=False)
print("trained alone")
