"""Fault injection for tests, loaded by Python at start-up when this folder is on PYTHONPATH.

``CRNN_ART_TEST_FAULT`` picks the fault; ``CRNN_ART_TEST_FAULT_RANK`` limits it to one process.
Nothing here is part of crnn-art: the tests put it on the path of the processes they start.
"""

import os

FAULT = os.environ.get("CRNN_ART_TEST_FAULT")
RANK = os.environ.get("CRNN_ART_TEST_FAULT_RANK")

if FAULT and (RANK is None or os.environ.get("RANK", "0") == RANK):
    if FAULT == "worker":  # a DataLoader worker fails while loading its 10th sample
        import torch.utils.data

        import crnn_art.data.loaders as loaders

        original = loaders.load_sample
        calls = {"n": 0}

        def load_sample(*args, **kwargs):
            if torch.utils.data.get_worker_info() is not None:
                calls["n"] += 1
                if calls["n"] >= 10:
                    raise MemoryError("injected: a worker ran out of memory decoding an image")
            return original(*args, **kwargs)

        loaders.load_sample = load_sample
    elif FAULT == "stall":  # a worker stays alive but never delivers (as when its shared memory is full)
        import time

        import torch.utils.data

        import crnn_art.data.loaders as loaders

        original = loaders.load_sample
        loaders.WORKER_TIMEOUT = 5

        def load_sample(*args, **kwargs):
            if torch.utils.data.get_worker_info() is not None:
                time.sleep(3600)
            return original(*args, **kwargs)

        loaders.load_sample = load_sample
    elif FAULT == "save":  # the second checkpoint fails the way torch reports a full disk
        import accelerate

        original_save = accelerate.Accelerator.save_state
        saves = {"n": 0}

        def save_state(self, *args, **kwargs):
            saves["n"] += 1
            if saves["n"] >= 2:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4544 vs 4438")
            return original_save(self, *args, **kwargs)

        accelerate.Accelerator.save_state = save_state
