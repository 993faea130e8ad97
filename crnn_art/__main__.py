"""``python -m crnn_art`` and ``accelerate launch -m crnn_art``: the same CLI as ``crnn-art``."""

from crnn_art.cli import run

run()
