"""``python -m crnn_art`` and ``accelerate launch -m crnn_art``: the same CLI as ``crnn-art``."""

import sys

from crnn_art.cli import main

sys.exit(main())
